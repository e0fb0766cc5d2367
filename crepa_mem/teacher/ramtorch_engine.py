"""The `stream` tier's second engine for the encoder: RamTorch's `OffloadModel` (`crepa_mem_stream_engine: ramtorch`).

DINOv2 is cut into RamTorch's sequential chunks [embeddings, *encoder.layer, layernorm] (chunk i+1 takes
chunk i's output; the last one's output is `last_hidden_state`). A loader thread copies upcoming chunks
from (pinned) host memory into `window` device slots on a copy stream; `resident_chunks` evenly spaced
chunks (RamTorch's `pin`) stay on the device for good and are never copied again. So, per teacher step:
- device weights ≈ (window + 1 + resident) chunks: `window` slots, plus the chunk the compute thread
  still holds while it waits for the next one (see `CallerThreadOffloadModel`), plus the resident ones;
- bytes moved host → device = the streamed chunks' bytes, once per encoder call (per frame chunk);
- host bytes = the streamed chunks' masters, in pinned memory when CUDA exists — or none of them with
  `crepa_mem_stream_nvme_path` (RamTorch's NVMe tier: masters in one mmap-backed scratch file, staged
  disk → pinned buffer → device; inference only reads it, so RamTorch's SSD-wear gate never fires).
`resident_chunks` is the dial between `stream` (0) and `gpu` (every chunk resident) that
crepa_mem.planning.planner turns. Only transformers' Dinov2Model streams this way; the VAE (convolutions)
stays on diffusers group offloading (crepa_mem.teacher.stream).

On a CPU-only torch the same code runs (RamTorch's copies become clones) and gives the features of `gpu`
bit for bit. `close()` stops RamTorch's threads and removes its NVMe scratch file.
"""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Iterator

import torch
from torch import nn

from crepa_mem.errors import CrepaConfigError
from crepa_mem.teacher.placement import Placement, module_bytes, move_module

DEFAULT_WINDOW = 2  # RamTorch's default: one slot computing, one loading (its simulator's sweet spot)


def encoder_chunks(encoder: nn.Module) -> list[nn.Module]:
    """[embeddings, *encoder.layer, layernorm] of a transformers DINOv2 (with or without registers)."""
    if hasattr(encoder, "forward_features") or not all(hasattr(encoder, a) for a in ("embeddings", "layernorm")) \
            or not hasattr(getattr(encoder, "encoder", None), "layer"):
        raise CrepaConfigError("crepa_mem_stream_engine", "ramtorch",
                               valid="group_offload for this module", hint=f"RamTorch streams a transformers "
                               f"Dinov2Model cut into [embeddings, *encoder.layer, layernorm]; "
                               f"{type(encoder).__name__} is not one (the VAE streams with group_offload)")
    return [encoder.embeddings, *encoder.encoder.layer, encoder.layernorm]


def chunk_bytes(encoder: nn.Module) -> list[int]:
    """Weight bytes of each RamTorch chunk, in order."""
    return [module_bytes(c) for c in encoder_chunks(encoder)]


def _caller_thread_engine():
    """RamTorch's OffloadModel with its loader run on the calling thread (built lazily: imports RamTorch)."""
    from ramtorch import OffloadModel
    from ramtorch.offload import _Resident

    class CallerThreadOffloadModel(OffloadModel):
        """RamTorch's own residency policy (`_try_start_load`: window slots, farthest-next-use eviction,
        resident chunks skipped), with each load done by the thread that asks for the chunk.

        Why: `crepa-mem trace` counts bytes in a TorchDispatchMode, which is thread-local, so the loader
        thread's copies would be invisible to it; and its fake `cuda:0` has no CUDA streams or events. At
        each `_acquire` this loads every chunk the policy would start, until the window is full: the
        prefetch RamTorch's thread makes while a chunk runs is made here before it runs. The chunk just
        used is still held by OffloadModel.forward's local variable while the next loads, as it is in
        the threaded run, so the trace sees the same worst case: window + 1 + resident chunks.
        Masters stay on the CPU, unpinned; the device is set after construction so RamTorch makes no
        CUDA stream (there is none to make on a CPU build).
        """

        def __init__(self, chunks, *, device, window: int, pin: int):
            super().__init__(chunks, device="cpu", window=window, pin=pin)
            self.device = torch.device(device)
            for i in self.pinned_layers:
                move_module(self.chunks[i], self.device)

        def _loader_loop(self):  # the thread RamTorch starts has nothing to do: loads happen in _acquire
            return

        def _materialize(self, state):
            return {name: t.to(self.device) for name, t in state.tensors.items()}

        def _acquire(self, layer):
            with self._cv:
                while (action := self._try_start_load()) is not None:
                    _, load = action  # inference announces forward uses only: weight loads, never grad slots
                    self._resident[load] = _Resident(self._materialize(self._state[load]), None)
                    self._in_flight = None
                    self.stats["loads"] += 1
            return super()._acquire(layer)

    return CallerThreadOffloadModel


class _ChunkedEncoder:
    """What the teacher path calls in place of the Dinov2Model: `encoder(pixel_values=x).last_hidden_state`
    and `encoder.config` (crepa_mem.teacher.path.encode_tokens), run through RamTorch's chunks."""

    def __init__(self, encoder: nn.Module, engine: nn.Module):
        self.config, self.engine = encoder.config, engine

    def __call__(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.engine(pixel_values))


class RamTorchPlacement(Placement):
    """The encoder streamed by RamTorch's OffloadModel (see the module docstring for its bytes)."""

    def __init__(self, module: nn.Module, *, exec_device: torch.device | str, resident_chunks: int = 0,
                 nvme_path: str | None = None, window: int = DEFAULT_WINDOW, caller_thread: bool | None = None):
        super().__init__(module, tier="stream", exec_device=exec_device)
        chunks = encoder_chunks(module)
        if resident_chunks < 0:
            raise CrepaConfigError("crepa_mem_stream_resident_chunks", resident_chunks, valid="an integer ≥ 0")
        self.resident_chunks = min(int(resident_chunks), len(chunks))
        cuda = self.exec_device.type == "cuda"
        # A CUDA device without CUDA is the trace's fake GPU: no streams, and a thread-local byte counter.
        self.caller_thread = (cuda and not torch.cuda.is_available()) if caller_thread is None else caller_thread
        if self.caller_thread:
            if nvme_path:
                raise CrepaConfigError("crepa_mem_stream_nvme_path", nvme_path, valid="null when the loader runs "
                                       "on the calling thread", hint="the NVMe tier changes host bytes only: trace "
                                       "without it")
            self.engine = _caller_thread_engine()(chunks, device=self.exec_device, window=window,
                                                  pin=self.resident_chunks)
        else:
            from ramtorch import OffloadModel

            nvme = len(chunks) if nvme_path else 0  # every streamed chunk (RamTorch drops the resident ones)
            self.engine = OffloadModel(chunks, device=self.exec_device, window=window, pin=self.resident_chunks,
                                       nvme=nvme, nvme_path=str(nvme_path) if nvme_path else None)
        self.window, self.nvme_path = window, (str(nvme_path) if nvme_path else None)
        self.host_pinned = cuda and torch.cuda.is_available() and not self.nvme_path
        self._adapter = _ChunkedEncoder(module, self.engine)
        self._closed = False

    @contextmanager
    def active(self) -> Iterator[_ChunkedEncoder]:
        if self._closed:
            raise RuntimeError("this RamTorch placement was closed (its regularizer was removed)")
        try:
            yield self._adapter  # RamTorch moves each chunk in and out as it runs
        finally:
            # RamTorch keeps the last `window` chunks in their slots after a forward (a cache for the next
            # call, which a sequential forward evicts before reuse anyway): release them, so the encoder
            # holds only its resident chunks while training runs between teacher steps.
            self.engine.invalidate_residency()

    def chunk_bytes(self) -> list[int]:
        return [module_bytes(c) for c in self.engine.chunks]

    def window_bytes(self) -> int:
        """Device weight bytes at the worst moment: the resident chunks plus the window + 1 largest streamed."""
        sizes = self.chunk_bytes()
        pinned = self.engine.pinned_layers
        streamed = sorted((b for i, b in enumerate(sizes) if i not in pinned), reverse=True)
        return sum(sizes[i] for i in pinned) + sum(streamed[:self.window + 1])

    def facts(self) -> dict:
        return {**super().facts(), "engine": "ramtorch.OffloadModel", "window": self.window,
                "resident_chunks": len(self.engine.pinned_layers), "chunks": self.engine.n,
                "nvme_chunks": len(self.engine.nvme_layers), "host_pinned": self.host_pinned,
                "chunk_loads": int(self.engine.stats["loads"])}

    def close(self) -> None:
        """Stop RamTorch's loader and writeback threads and unlink its NVMe scratch file (idempotent)."""
        if not self._closed:
            self._closed = True
            self.engine.close()
