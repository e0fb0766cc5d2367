"""The `Placement` interface every tier implements, and the tensor moves they share (see tiers.py for the table)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


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


def tensors_of(module: nn.Module) -> list[torch.Tensor]:
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
    for t in tensors_of(module):
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

    def close(self) -> None:
        """Release what the tier holds beyond the module (threads, scratch files); most hold nothing."""


def host_copy(module: nn.Module) -> nn.Module:
    """A separate, frozen copy of `module` with its tensors on the CPU, made without allocating on its
    device (each tensor is copied to the host before deepcopy sees it)."""
    import copy

    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(module, memo)
