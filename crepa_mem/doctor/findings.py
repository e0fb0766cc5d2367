"""What every doctor check shares: the `Finding` it returns and the `Context` it reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

SEVERITIES = ("error", "warning", "info")
PHASES = ("vae_decode", "encoder", "projector", "transformer", "unknown")
SUPPORTED_FAMILIES = ("wan", "ltxvideo", "sanavideo", "kandinsky5_video")


@dataclass(frozen=True)
class Finding:
    """One diagnosis: a stable `code`, a severity, what happened (message) and what to do (fix)."""

    code: str
    severity: str
    message: str
    fix: str
    details: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity={self.severity!r} is invalid: valid is {' · '.join(SEVERITIES)}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "severity": self.severity,
                               "message": self.message, "fix": self.fix}
        if "phase" in self.details:  # OOM findings: the phase is a top-level key too
            out["phase"] = self.details["phase"]
        out["details"] = dict(self.details)
        return out


@dataclass
class Context:
    """What the checks know about the user's run; every field may be unknown (None)."""

    model: Any = None
    """ModelProfile from --model or SimpleTuner's model_family/model_flavour."""
    model_family: str | None = None
    """The raw model_family of the config (may be a family without CREPA hooks)."""
    model_note: str | None = None
    """Why the model is unknown (a flavour missing from the catalog, …)."""
    gpu: str | None = None
    """--gpu as given: a catalog name or a size."""
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The config file's keys, normalised (no leading dashes, '-' → '_')."""


def normalise_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """`--crepa-lambda` / `--crepa_lambda` / `crepa_lambda` → `crepa_lambda` (SimpleTuner accepts all)."""
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in data.items()}
