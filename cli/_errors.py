"""Maps exceptions to one line on stderr and the documented exit code; never a traceback for a user mistake.

Exit codes: 0 ok, 1 a known error, 2 bad usage or bad input, 3 a plan that does not fit.
"""
from __future__ import annotations

import functools
import inspect
import re
import sys
from typing import Callable, NoReturn, TypeVar

from crepa_mem.errors import CrepaMemError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DOES_NOT_FIT = 0, 1, 2, 3

F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line to stderr and exit."""
    import typer

    print(f"crepa-mem: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


# library names (config keys, keyword arguments) whose command-line flag is named differently
_FLAG_OF_KEY = {"encoder_image_size": "image_size", "encoder_frames_batch_size": "chunk", "host_ram_bytes": "host_ram"}


def flags_of(func: Callable) -> dict[str, str]:
    """Parameter name → its long flag ('train_gib' → '--train-gib'), read from the typer options."""
    flags = {}
    for name, param in inspect.signature(func).parameters.items():
        longs = [d.split("/")[0] for d in getattr(param.default, "param_decls", None) or () if d.startswith("--")]
        if longs:
            flags[name] = longs[0]
    return flags


def name_flags(message: str, flags: dict[str, str], given: dict) -> str:
    """'train_gib=-3.0 is invalid…' → '--train-gib -3.0 is invalid…': errors name what the user typed.
    A key is renamed only when its flag was given (a bad value read from --config keeps its key)."""

    def flag(m: re.Match) -> str:
        key = m.group(1)
        if key.startswith("--"):
            return f"{key} "
        bare = key.removeprefix("crepa_mem_").removeprefix("crepa_")
        for name in (key, bare, _FLAG_OF_KEY.get(bare)):
            if name in flags and given.get(name) is not None:
                return f"{flags[name]} "
        return m.group(0)

    return re.sub(r"^(--[\w-]+|\w+)=", flag, message)


def user_errors(func: F) -> F:
    """Decorator for command bodies: known errors → one line + exit code."""
    flags = flags_of(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CrepaMemError as e:
            fail(name_flags(str(e), flags, kwargs), getattr(e, "exit_code", EXIT_ERROR))
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            fail(f"{e.strerror}: {e.filename}", EXIT_USAGE)
        except OSError as e:  # a read-only filesystem, a full disk (or a full stdout: `> /dev/full`)
            from crepa_mem.fileio import describe_os_error

            if e.filename is None:
                _silence_stdout()
            fail(describe_os_error(e, what="" if e.filename else "standard output"), EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


def _silence_stdout() -> None:
    """After a failed write to stdout, drop what is still buffered: the exit flush would fail again
    and print a second, unhelpful error."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
