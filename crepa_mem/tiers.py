"""Where a teacher component's weights live and run: one small interface over the tiers.

A `Placement` wraps a frozen component (the VAE or the DINOv2 encoder); the teacher path runs it
inside `with placement.active() as module:` and sends its inputs to `placement.exec_device`.

| tier     | weights between teacher steps | during the step              | compute-device cost          |
|----------|-------------------------------|------------------------------|------------------------------|
| `gpu`    | compute device                | compute device               | all weights, always          |
| `swap`   | CPU (pinned when CUDA exists) | copied to the compute device | all weights, in its phase    |
| `stream` | CPU (pinned when CUDA exists) | one block at a time, prefetch| ~two blocks (tiers_stream)   |
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

from .errors import CrepaConfigError

PLACED_TIERS = ("gpu", "swap", "stream", "device")


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def module_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers, each once (tied weights stay tied because the objects are kept)."""
    out, seen = [], set()
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def pinning_available() -> bool:
    """Pinned host memory only means something (and only works) when CUDA exists."""
    return torch.cuda.is_available()


def move_module(module: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                *, pin: bool = False) -> nn.Module:
    """`module.to(device, dtype)` done tensor by tensor through `.data`, keeping every Parameter object.

    This is what nn.Module.to does for ordinary tensors; doing it here also works for the fake tensors
    of `crepa-mem trace`, for which torch 2.13's Module.to takes a swap_tensors path that fails.
    Floating tensors only change dtype (integer buffers keep theirs, as with Module.to).
    """
    device = torch.device(device) if device is not None else None
    for t in _tensors(module):
        want_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        want_device = device or t.device
        if t.device != want_device or t.dtype != want_dtype:
            t.data = t.data.to(device=want_device, dtype=want_dtype)
        if pin and t.device.type == "cpu" and not t.data.is_pinned():
            t.data = t.data.pin_memory()
    return module


class Placement:
    """A component with its tier: `exec_device` is where its inputs must be (gpu and device tiers)."""

    def __init__(self, module: nn.Module, *, tier: str, exec_device: torch.device | str):
        self.module, self.tier, self.exec_device = module, tier, torch.device(exec_device)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The module, ready to run on `exec_device` for the duration of the block."""
        yield self.module

    def facts(self) -> dict:
        """For the per-step logs: where this component lives and runs."""
        return {"tier": self.tier, "device": str(self.exec_device)}


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
        tensors = _tensors(self.module)
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
          teacher_device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Placement:
    """Put `module` on its tier and return the Placement the teacher path runs through."""
    compute_device = torch.device(compute_device)
    if dtype is not None:
        move_module(module, dtype=dtype)
    if tier == "gpu":
        move_module(module, compute_device)
        return Placement(module, tier=tier, exec_device=compute_device)
    if tier == "swap":
        return SwapPlacement(module, exec_device=compute_device)
    if tier == "stream":
        from .tiers_stream import StreamPlacement

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
