"""The options plan, trace and cache share, defined once so their flags, help and defaults agree.

Each function returns a fresh `typer.Option` (typer reads one per parameter). Help texts say defaults
as "(default: X)", never "[X]", which rich would take for markup; flags carry `metavar=""` so the help
shows `--json`, not `--json <bool>` (which invites `--json true`).
"""
from __future__ import annotations

from typing import Any

import typer

from crepa_mem.config import ENCODER_DTYPES

DTYPES = " · ".join(ENCODER_DTYPES)


def flag(decls: str, help: str, default: bool = False) -> Any:
    """A boolean flag: `--x` or `--x/--no-x`."""
    return typer.Option(default, *decls.split(" "), help=help, metavar="")


def as_json(help: str = "Print exactly the report dict as JSON.") -> Any:
    return flag("--json", help)


def model(help: str = "Checkpoint or family (wan-2.1-14b, wan, ltxvideo, ...); `crepa-mem profiles` lists them.",
          required: bool = True) -> Any:
    return typer.Option(... if required else None, "--model", "-m", help=help)


def frames() -> Any:
    return typer.Option(None, "--frames", help="Pixel frames per clip (default: the checkpoint's).")


def height() -> Any:
    return typer.Option(None, "--height", help="Clip height in pixels (default: the checkpoint's).")


def width() -> Any:
    return typer.Option(None, "--width", help="Clip width in pixels (default: the checkpoint's).")


def batch() -> Any:
    return typer.Option(1, "--batch", help="Clips per step.")


def encoder(default: str | None = "dinov2_vitg14") -> Any:
    return typer.Option(default, "--encoder", help="dinov2_vit{s,b,l,g}14 (optionally _reg), a hub id or a local "
                        "folder" + ("" if default else " (default: dinov2_vitg14 or --config's)") + ".")


def image_size(default: int | None = 518) -> Any:
    return typer.Option(default, "--image-size", help="Encoder input size S, a multiple of 14"
                        + ("" if default else " (default: 518 or --config's)") + ".")


def encoder_dtype(default: str | None = "fp32") -> Any:
    return typer.Option(default, "--encoder-dtype", help=f"Encoder dtype: {DTYPES}"
                        + ("" if default else " (default: fp32 or --config's)") + ".")


def vae_dtype(default: str, help: str) -> Any:
    return typer.Option(default, "--vae-dtype", help=f"{DTYPES}: {help}")


def vae_tiling(default: bool | None = False) -> Any:
    return typer.Option(default, "--vae-tiling/--no-vae-tiling", help="Spatial tiling of the VAE decode.", metavar="")


def vae_tile_size() -> Any:
    return typer.Option(None, "--vae-tile-size", help="Tile edge in pixels when tiling (≥ 64).")


def chunk() -> Any:
    return typer.Option(None, "--chunk", help="Frames per encoder call (default: all selected frames at once).")


def profiles() -> Any:
    return typer.Option(None, "--profiles", help="Directory of extra profile *.toml files (also $CREPA_MEM_PROFILES).")


# ------------------------------------------------------------------ checks the commands share

def choice(flag_name: str, value: str, valid: tuple[str, ...], extra: str = "") -> str:
    from crepa_mem.cli._errors import fail

    if value not in valid:
        fail(f"{flag_name} {value!r} is invalid: valid is {' · '.join(valid)}{extra}")
    return value


def at_least_one(flag_name: str, value: int | None, extra: str = "") -> None:
    from crepa_mem.cli._errors import fail

    if value is not None and value < 1:
        fail(f"{flag_name} {value} is invalid: valid is an integer ≥ 1{extra}")


def check_image_size(value: int | None) -> None:
    """The one image-size rule (CrepaConfig's, so SimpleTuner configs load): ≥ 64. A size that is not a
    multiple of 14 works (DINOv2's patch grid drops the remainder) and gets a note saying what it wastes."""
    from crepa_mem.cli._errors import fail
    from crepa_mem.cli._output import message

    if value is None:
        return
    if value < 64:
        fail(f"--image-size {value} is invalid: valid is an integer ≥ 64 (a multiple of 14, e.g. 224, 518)")
    if value % 14:
        near = sorted({value - value % 14, value - value % 14 + 14} - {0})
        message(f"crepa-mem: note: --image-size {value} is not a multiple of 14: the encoder's {value // 14}×"
                f"{value // 14} patch grid leaves {value % 14} px unused ({' or '.join(map(str, near))} use every pixel)")
