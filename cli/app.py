"""Wires the commands; each lives in its own module with a `register(app)` function."""
from __future__ import annotations

from importlib import import_module

import typer

app = typer.Typer(
    name="crepa-mem",
    help="CREPA for video DiTs, made to fit: plan, trace, cache, diagnose.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# One module per command; each defines register(app: typer.Typer).
COMMAND_MODULES = ["demo", "doctor", "cache", "plan", "gpus", "profiles", "trace"]

for _name in COMMAND_MODULES:
    import_module(f"crepa_mem.cli.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
