"""Exceptions every layer raises; each keeps what was wrong so the CLI can print one line.

Exit codes (the same in every command): 0 ok, 1 a known error, 2 bad usage or bad input,
3 a plan that does not fit.
"""
from __future__ import annotations

from difflib import get_close_matches
from typing import Any, Iterable


class CrepaMemError(Exception):
    """Base of every error crepa-mem raises on purpose."""

    exit_code = 1


class CrepaConfigError(CrepaMemError, ValueError):
    """An option value outside its valid range: names the key, the value and what is valid."""

    exit_code = 2

    def __init__(self, key: str, value: Any, valid: str, hint: str | None = None):
        self.key, self.value, self.valid, self.hint = key, value, valid, hint
        msg = f"{key}={value!r} is invalid: valid is {valid}"
        super().__init__(msg + (f" ({hint})" if hint else ""))


class ProfileNotFoundError(CrepaMemError, LookupError):
    """An unknown model, GPU or encoder name; suggests the closest known names."""

    exit_code = 2

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        close = get_close_matches(name.lower(), [k.lower() for k in self.known], n=3, cutoff=0.4)
        suggestion = f"; did you mean {', '.join(close)}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}{suggestion} (known: {', '.join(self.known)})")

    def __str__(self) -> str:  # LookupError would quote the message otherwise
        return self.args[0]


class CaptureError(CrepaMemError):
    """Hidden states could not be captured from the requested block or model."""


class ShapeError(CrepaMemError, ValueError):
    """Tensors whose shapes do not fit together; names both shapes."""

    exit_code = 2


class EncoderNotAvailableError(CrepaMemError):
    """The encoder's weights are not on this machine (offline) or the name is unknown."""


class DoesNotFitError(CrepaMemError):
    """No configuration fits the memory budget."""

    exit_code = 3


class OffloadConflictError(CrepaMemError):
    """Two offload mechanisms were asked to manage the same module."""


class TeacherOutOfMemoryError(CrepaMemError):
    """The teacher path ran out of memory even at one frame per chunk."""


class FeatureCacheError(CrepaMemError):
    """A feature-cache entry is missing, stale (settings mismatch) or corrupt."""
