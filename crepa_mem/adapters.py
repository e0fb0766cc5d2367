"""Old path of `crepa_mem.integrations.adapters` (the README's `crepa_mem.adapters.CrepaHooks`)."""
from crepa_mem.integrations.adapters import CrepaHooks  # noqa: F401

__all__ = ["CrepaHooks"]
