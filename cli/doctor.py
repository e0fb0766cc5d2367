"""`crepa-mem doctor`: diagnose out-of-memory, block-index and configuration failures, and the machine.

Exit status: 1 when any finding is an error, 0 otherwise, 2 for bad usage (a missing file, a bad
--model/--gpu). `--json` prints exactly {"findings": [...], "summary": {...}}.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._errors import user_errors
from ._output import console, emit_json

_STYLE = {"error": ("red", "✖ error"), "warning": ("yellow", "▲ warning"), "info": ("cyan", "• info")}


def render(report: dict) -> None:
    """The rich report: a summary line, then each finding (errors first) with its fix."""
    from rich.markup import escape
    from rich.padding import Padding

    out = console()
    s = report["summary"]
    head = f"[bold]crepa-mem doctor[/]: {s['errors']} error(s), {s['warnings']} warning(s), {s['info']} note(s)"
    extras = [f"model {s['model']}" if s.get("model") else None,
              f"log {s['log']['source']} ({s['log']['lines']} lines)" if s.get("log") else None]
    out.print(head + "".join(f" · {escape(e)}" for e in extras if e))
    for f in report["findings"]:
        color, label = _STYLE[f["severity"]]
        phase = f" [dim](phase {f['phase']})[/]" if "phase" in f else ""
        out.print()
        out.print(f"[bold {color}]{label}[/] [bold]{f['code']}[/]{phase}")
        out.print(Padding(escape(f["message"]), (0, 0, 0, 2)))
        if f["fix"] and f["fix"] != "Nothing to change.":
            out.print(Padding(f"[green]fix:[/] {escape(f['fix'])}", (0, 0, 0, 2)))


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    @user_errors
    def doctor(
        config: Optional[Path] = typer.Option(None, "--config", help="SimpleTuner config.json or crepa-mem's config"),
        log: Optional[str] = typer.Option(None, "--log", help="training log or traceback; - reads stdin"),
        model: Optional[str] = typer.Option(None, "--model", help="checkpoint or family (default: from --config)"),
        gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU for plan fixes: catalog name or size (24GiB)"),
        frames: Optional[int] = typer.Option(None, "--frames", min=1, help="training clip length in pixel frames"),
        height: Optional[int] = typer.Option(None, "--height", min=1),
        width: Optional[int] = typer.Option(None, "--width", min=1),
        json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
        no_machine: bool = typer.Option(False, "--no-machine", help="skip the live machine checks"),
    ) -> None:
        """Diagnose out-of-memory, block-index and configuration failures, and the machine."""
        from crepa_mem.doctor.diagnose import diagnose

        result = diagnose(config=config, log=log, model=model, gpu=gpu, frames=frames, height=height,
                          width=width, machine=not no_machine)
        report = result.to_dict()
        if json_out:
            emit_json(report)
        else:
            render(report)
        raise typer.Exit(result.exit_code)
