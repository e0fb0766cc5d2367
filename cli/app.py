"""Wires the commands; each lives in its own module with a `register(app)` function."""
from __future__ import annotations

import re
import sys
from importlib import import_module
from typing import Optional

import typer
from typer.core import TyperGroup

from typer import Abort

try:  # newer typer carries its own click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException


class _App(TyperGroup):
    """Usage errors as one line on stderr (`crepa-mem: error: …`, exit 2), not typer's boxed panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the help was printed already
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            text = e.format_message()
            if re.search(r"extra argument(\(s\))? \(?'?(true|false|yes|no|on|off|1|0)'?\)?", text, re.I):
                text += ": flags take no value (write --json, not --json true; --no-X turns X off)"
            print(f"crepa-mem: error: {text}{see}", file=sys.stderr)
            sys.exit(e.exit_code)
        except Abort:
            print("crepa-mem: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="crepa-mem",
    cls=_App,
    help="CREPA for video DiTs, made to fit: plan, trace, cache, diagnose.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from crepa_mem import __version__

        typer.echo(f"crepa-mem {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, metavar="",
                                                 help="Print the version and exit.")) -> None:
    """CREPA for video DiTs, made to fit: plan, trace, cache, diagnose."""


# One module per command; each defines register(app: typer.Typer).
COMMAND_MODULES = ["demo", "doctor", "cache", "plan", "gpus", "profiles", "trace", "bench"]

for _name in COMMAND_MODULES:
    import_module(f"crepa_mem.cli.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
