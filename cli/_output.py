"""The one sink: data to stdout (exactly the report dict with --json, rich tables otherwise), messages to stderr."""
from __future__ import annotations

import json
import sys
from typing import Any

from crepa_mem.units import format_bytes


def emit_json(report: dict[str, Any]) -> None:
    """Print the report dict as JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def message(text: str) -> None:
    """A human message on stderr (progress, notes)."""
    console(stderr=True).print(text)


def human_bytes(n: int | float | None) -> str:
    return "—" if n is None else format_bytes(n)
