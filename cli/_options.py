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
