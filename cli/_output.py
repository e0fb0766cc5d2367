"""The one sink: data to stdout (exactly the report dict with --json, rich tables otherwise), messages to stderr."""
from __future__ import annotations

import json
import sys
from typing import Any

from crepa_mem.units import format_bytes


def emit_json(report: dict[str, Any]) -> None:
    """Print the report dict as JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")


class _RStripLines:
    """A text stream that drops the spaces rich pads lines with (tables, padded blocks): redirected
    output has no trailing whitespace."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.stream.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self.pending.rstrip(" "))
            self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False, soft_wrap=False)
    return Console(file=_RStripLines(stream), highlight=False, soft_wrap=False, width=_width())


def _width() -> int:
    """A pipe or a file gets COLUMNS, else 80 (what rich assumes)."""
    import os

    try:
        return max(40, int(os.environ.get("COLUMNS", "80")))
    except ValueError:
        return 80


def table(title: str | None = None, **kwargs):
    """A compact table (no outer box, one-space padding) whose cells fold rather than truncate."""
    from rich import box
    from rich.table import Table

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, **kwargs)


def message(text: str) -> None:
    """A human message on stderr (progress, notes)."""
    console(stderr=True).print(text)


def human_bytes(n: int | float | None) -> str:
    return "—" if n is None else format_bytes(n)
