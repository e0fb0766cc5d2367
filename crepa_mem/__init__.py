"""crepa-mem: SimpleTuner's CREPA regularizer, made to fit on the GPUs people have.

Importing this package imports no torch: the names below are loaded on first use, so
`crepa-mem plan` starts in well under a second.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from crepa_mem.config import CrepaConfig
from crepa_mem.errors import CrepaConfigError, CrepaMemError

__version__ = "0.1.0"

# public name → module that defines it (imported lazily; most of them pull in torch)
_LAZY = {
    "CrepaRegularizer": "regularizer",
    "capture_hidden_states": "capture",
    "plan": "planning.planner",
    "Plan": "planning.planner",
    "wrap": "integrations.wrap",
    "CrepaHooks": "integrations.adapters",
}

__all__ = ["CrepaConfig", "CrepaConfigError", "CrepaMemError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'crepa_mem' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from crepa_mem.capture import capture_hidden_states
    from crepa_mem.planning.planner import Plan, plan
    from crepa_mem.regularizer import CrepaRegularizer
    from crepa_mem.integrations.adapters import CrepaHooks
    from crepa_mem.integrations.wrap import wrap
