"""Where a teacher component's weights live and run: one small interface over the tiers.

`gpu`: resident on the compute device. `device`: resident on another device (the CPU or a second
GPU); inputs go there and only the results come back. swap / stream / cache are added by the
memory-tiers work on top of the same interface.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import CrepaConfigError


class Placement:
    """A component (VAE or encoder) with its tier: `exec_device` is where its inputs must be."""

    def __init__(self, module: nn.Module, *, tier: str, exec_device: torch.device):
        self.module, self.tier, self.exec_device = module, tier, torch.device(exec_device)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The module, ready to run on `exec_device` for the duration of the block."""
        yield self.module

    def facts(self) -> dict:
        return {"tier": self.tier, "device": str(self.exec_device)}


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def place(module: nn.Module, tier: str, *, compute_device: torch.device | str,
          teacher_device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Placement:
    """Put `module` on its tier and return the Placement the teacher path runs through."""
    compute_device = torch.device(compute_device)
    if dtype is not None:
        module.to(dtype=dtype)
    if tier == "gpu":
        module.to(compute_device)
        return Placement(module, tier=tier, exec_device=compute_device)
    if tier == "device":
        target = torch.device(teacher_device or "cpu")
        module.to(target)
        return Placement(module, tier=tier, exec_device=target)
    raise CrepaConfigError("tier", tier, valid="gpu · device")
