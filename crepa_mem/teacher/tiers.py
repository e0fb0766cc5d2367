"""Where a teacher component's weights live and run: one small interface over the tiers.

A `Placement` wraps a frozen component (the VAE or the DINOv2 encoder); the teacher path runs it
inside `with placement.active() as module:` and sends its inputs to `placement.exec_device`.

| tier     | weights between teacher steps | during the step              | compute-device cost          |
|----------|-------------------------------|------------------------------|------------------------------|
| `gpu`    | compute device                | compute device               | all weights, always          |
| `swap`   | CPU (pinned when CUDA exists) | copied to the compute device | all weights, in its phase    |
| `stream` | CPU (pinned when CUDA exists) | one block at a time, prefetch| ~two blocks (tiers_stream)   |
| `stream` with engine `ramtorch` (encoder only) | CPU (pinned), or an NVMe scratch file | RamTorch chunks through `window` slots | window + 1 + resident chunks (ramtorch_engine) |
| `device` | another device (CPU, cuda:1)  | there; results copied back   | none                         |
| `cache`  | nowhere: features are read from a feature cache (crepa_mem.cache), not placed here       |

Every tier runs on a CPU-only machine (with the CPU as the compute device) and gives bit-identical
results to `gpu`: only where the weights sit changes, never the arithmetic.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from crepa_mem.errors import CrepaConfigError
from crepa_mem.teacher.placement import Placement, move_module, pinning_available, tensors_of
from crepa_mem.teacher.stream import StreamPlacement

PLACED_TIERS = ("gpu", "swap", "stream", "device")


class SwapPlacement(Placement):
    """Weights on the CPU between teacher steps; on `exec_device` inside `active()`, dropped after.

    Why not accelerate's `cpu_offload_with_hook`: its hook fires on `module.forward`, but the teacher
    calls `vae.decode` and, for Wan, `vae.decoder` directly, so the hook would never move the VAE;
    and it offloads only when the next hooked model runs or `hook.offload()` is called, with pageable
    memory and blocking copies. A context manager states the lifetime exactly, copies from pinned
    memory with `non_blocking=True` (CUDA only), and since the teacher is frozen, leaving needs no copy
    back: the device copies are simply released and the CPU originals put back.
    """

    def __init__(self, module: nn.Module, *, exec_device: torch.device | str):
        super().__init__(module, tier="swap", exec_device=exec_device)
        self.pinned = pinning_available() and self.exec_device.type == "cuda"
        move_module(module, "cpu", pin=self.pinned)
        self._depth = 0

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        if self._depth or self.exec_device.type == "cpu":  # nested, or the CPU is the compute device
            self._depth += 1
            try:
                yield self.module
            finally:
                self._depth -= 1
            return
        tensors = tensors_of(self.module)
        host = [t.data for t in tensors]
        self._depth += 1
        try:
            for t, h in zip(tensors, host):
                t.data = h.to(self.exec_device, non_blocking=self.pinned)
            yield self.module
        finally:
            for t, h in zip(tensors, host):
                t.data = h  # frozen weights: the device copy is released, nothing to write back
            self._depth -= 1

    def facts(self) -> dict:
        return {**super().facts(), "host_pinned": self.pinned}


def place(module: nn.Module, tier: str, *, compute_device: torch.device | str,
          teacher_device: torch.device | str | None = None, dtype: torch.dtype | None = None,
          stream_engine: str = "group_offload", resident_chunks: int = 0, nvme_path: str | None = None) -> Placement:
    """Put `module` on its tier and return the Placement the teacher path runs through.

    `stream_engine`, `resident_chunks`, `nvme_path`: the `stream` tier's engine for the encoder
    (crepa_mem_stream_engine, crepa_mem_stream_resident_chunks, crepa_mem_stream_nvme_path)."""
    compute_device = torch.device(compute_device)
    if dtype is not None:
        move_module(module, dtype=dtype)
    if tier == "gpu":
        move_module(module, compute_device)
        return Placement(module, tier=tier, exec_device=compute_device)
    if tier == "swap":
        return SwapPlacement(module, exec_device=compute_device)
    if tier == "stream" and stream_engine == "ramtorch":
        from crepa_mem.teacher.ramtorch_engine import RamTorchPlacement

        return RamTorchPlacement(module, exec_device=compute_device, resident_chunks=resident_chunks,
                                 nvme_path=nvme_path)
    if tier == "stream":
        return StreamPlacement(module, exec_device=compute_device)
    if tier == "device":
        target = torch.device(teacher_device or "cpu")
        move_module(module, target)
        return Placement(module, tier=tier, exec_device=target)
    if tier == "cache":
        raise CrepaConfigError("tier", tier, valid=" · ".join(PLACED_TIERS),
                               hint="`cache` reads precomputed features (crepa_mem_feature_cache); "
                                    "no component is placed for it")
    raise CrepaConfigError("tier", tier, valid=" · ".join(PLACED_TIERS + ("cache",)))
