"""The whole CREPA call on the fake GPU: `CrepaRegularizer.compute_loss` (teacher, projection,
alignment, schedule) and the backward of its loss, measured phase by phase.

This module sits above the regularizer (README, Layout): it runs the real `compute_loss`, so the order
in which the call holds things (teacher first, then the projector's graph) is what is measured.

Legend: B batch, T' DiT frames, P DiT tokens per frame, D DiT width.

- The teacher runs on the fake `cuda:0` as `crepa-mem trace` always ran it; its host side (swap/stream
  weights, a `device`-tier encoder) stays counted on the host.
- The loss side runs on fake CPU tensors counted on the fake GPU (`LiveBytes.count_as`): a CPU-only
  torch's autograd engine cannot run a backward of CUDA tensors. The features cross over as the same
  bytes (freed on one side, made on the other), so nothing is counted twice.
- Resident on the GPU for the call: the projector (fp32) and Adam's two states per parameter, made
  before the call; its gradients appear in the backward and stay, as in training until `zero_grad`.
- The hidden states (B, T', P, D) in the DiT's dtype with `requires_grad` are the DiT's, alive with
  or without CREPA: they are not counted; what the call makes from them (fp32 copy, projector
  activations, their gradient) is.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from crepa_mem.config import CrepaConfig
from crepa_mem.teacher.path import TeacherFeatures
from crepa_mem.trace.runtime import FAKE_GPU, LiveBytes

LOSS_PHASE = "loss"


class TracedTeacher:
    """What `compute_loss` sees as its teacher: `run(latents, target_frames)` makes the features on the
    fake GPU; they are handed to the loss side and the loss phase begins."""

    def __init__(self, run: Callable[[torch.Tensor, int], TeacherFeatures], tracker: LiveBytes, encoder_dim: int,
                 parts: dict | None = None):
        self._run, self._tracker, self.encoder_dim = run, tracker, encoder_dim
        self._parts = dict(parts or {})
        self.loss_phase = contextlib.ExitStack()

    def __getattr__(self, name: str):  # the vae / encoder placements, for compute_loss's facts
        parts = self.__dict__.get("_parts", {})
        if name in parts:
            return parts[name]
        raise AttributeError(name)

    def features(self, latents: torch.Tensor, target_frames: int, dit_grid=None) -> TeacherFeatures:
        with self._tracker.count_as("cpu", "cpu"), self._tracker.phase("teacher"):
            result = self._run(latents, target_frames)
        if result.staged:  # on the host: the loss side's copies of its frames are counted where they are made
            self.loss_phase.enter_context(self._tracker.phase(LOSS_PHASE))
            return result
        shape, dtype = result.features.shape, result.features.dtype
        result.features = None  # freed on the GPU side ...
        result.features = torch.empty(shape, dtype=dtype, device="cpu")  # ... made on the loss side
        self.loss_phase.enter_context(self._tracker.phase(LOSS_PHASE))
        return result


def phase_around(placement, tracker: LiveBytes, name: str) -> None:
    """Make `placement.active()` a tracker phase (weights arriving and leaving included)."""
    inner = placement.active

    @contextlib.contextmanager
    def active():
        with tracker.phase(name), inner() as module:
            yield module

    placement.active = active


def trace_call(tracker: LiveBytes, teacher: TracedTeacher, config: CrepaConfig, latents: torch.Tensor, *,
               hidden_shape: tuple[int, int, int, int], dit_dtype: torch.dtype = torch.bfloat16) -> int:
    """Run compute_loss and backward once inside `fake_gpu()`; returns the GPU bytes resident before the
    call that the regularizer added (projector and Adam states). Phase peaks land in `tracker.phase_peaks`."""
    from crepa_mem.regularizer import CrepaRegularizer

    before = tracker.live_bytes(FAKE_GPU)
    with tracker.count_as("cpu", FAKE_GPU):
        reg = CrepaRegularizer(config, hidden_size=hidden_shape[-1], teacher=teacher, device="cpu")
        adam = [torch.zeros_like(p) for p in reg.projector.parameters() for _ in ("exp_avg", "exp_avg_sq")]
    resident = tracker.live_bytes(FAKE_GPU) - before
    hidden = torch.empty(hidden_shape, dtype=dit_dtype, device="cpu", requires_grad=True)
    tracker.reset_peak()
    try:
        with tracker.phase("step"), tracker.count_as("cpu", FAKE_GPU), torch.enable_grad():
            loss, _ = reg.compute_loss(hidden, latents, step=0)
            loss.backward()
            del loss
    finally:
        teacher.loss_phase.close()
    del hidden, adam, reg
    return resident
