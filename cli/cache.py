"""`crepa-mem cache build|verify`: precompute the teacher features of cached latents, check a store.

Under `accelerate launch --multi_gpu --num_processes N` (or torchrun; on a CPU-only host the ranks
use gloo) each process takes every N-th latent file and writes its own entries; the main process
prints the summary of all of them. (`accelerate launch --cpu` starts several processes only through
an MPI hostfile; without one it runs a single process, which builds everything.) Exit codes: 0 ok,
1 a known error (a corrupt entry found by verify, a model not on this machine), 2 bad input.
--json prints exactly the summary dict.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import _options as O
from ._errors import EXIT_ERROR, EXIT_USAGE, fail, user_errors
from ._output import console, emit_json, human_bytes

DTYPE_NAMES = ("fp32", "bf16", "fp16")
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C
LATENT_DTYPES = ("as-stored", *DTYPE_NAMES)

cache_app = typer.Typer(help="Precompute CREPA teacher features from cached latents (the `cache` tier).",
                        no_args_is_help=True)


def _device(value: str | None):
    """cpu, cuda or cuda:N; checked against this machine."""
    import torch

    if value is None:
        return None
    try:
        dev = torch.device(value)
    except RuntimeError:
        fail(f"--device {value!r} is invalid: valid is cpu, cuda or cuda:N", EXIT_USAGE)
    if dev.type not in ("cpu", "cuda"):
        fail(f"--device {value!r} is invalid: valid is cpu, cuda or cuda:N", EXIT_USAGE)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        fail(f"--device {value!r} is not available on this machine "
             f"({torch.cuda.device_count()} CUDA device(s)); use --device cpu", EXIT_USAGE)
    return dev


def _distributed(requested):
    """(rank, world, device, gather): accelerate's state when launched with several processes
    (`accelerate launch --multi_gpu --num_processes N`, or torchrun); otherwise one process."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        default = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return 0, 1, requested or default, lambda obj: [obj]
    from accelerate import PartialState
    from accelerate.utils import gather_object

    # cpu=True gives gloo process groups (CI, CPU-only hosts); otherwise one GPU per local rank.
    on_cpu = not torch.cuda.is_available() or (requested is not None and requested.type == "cpu")
    state = PartialState(cpu=on_cpu)
    if on_cpu:
        dev = torch.device("cpu")
    elif requested is None or requested.index is None:
        dev = state.device
    else:
        dev = requested
    return state.process_index, state.num_processes, dev, lambda obj: gather_object([obj])


def _progress(enabled: bool):
    """A rich progress bar with ETA on stderr (one per process under accelerate)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console(stderr=True), disable=not enabled)


def _quiet_hub_logs() -> None:
    """transformers/diffusers print loading bars and deprecation notes to stderr; ours is the only bar."""
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    for lib in (tl, dl):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _render_build(report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"feature cache {escape(report['out'])}", show_header=False, title_justify="left")
    rows = [("latent files", report["files"]), ("samples", report["samples"]),
            ("written", report["written"]), ("already present (resumed)", report["skipped"]),
            ("repaired (were corrupt)", report["repaired"]), ("entries in the store", report["entries"]),
            ("store size", human_bytes(report["store_bytes"])), ("processes", report["ranks"]),
            ("device", report["device"]), ("encoder width", report["encoder_dim"]),
            ("time", f"{report['seconds']:.1f} s")]
    for k, v in rows:
        t.add_row(k, escape(str(v)))
    console().print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")


@cache_app.command("build")
@user_errors
def build(
    latents: Path = typer.Option(..., "--latents", help="folder of cached latents (SimpleTuner's VAE cache, .pt or .safetensors)"),
    out: Path = typer.Option(..., "--out", help="store folder (created; an existing one with the same settings resumes)"),
    config: Optional[Path] = typer.Option(None, "--config", help="SimpleTuner config.json to read crepa_* settings from"),
    encoder: Optional[str] = O.encoder(None),
    encoder_path: Optional[Path] = typer.Option(None, "--encoder-path", help="local folder with the encoder's weights"),
    image_size: Optional[int] = O.image_size(None),
    encoder_dtype: Optional[str] = O.encoder_dtype(None),
    vae: Optional[Path] = typer.Option(None, "--vae", help="diffusers VAE folder (save_pretrained); default: --model's VAE from the HF cache"),
    vae_dtype: str = O.vae_dtype("fp32", "the dtype the trainer decodes in."),
    model: Optional[str] = O.model("Checkpoint profile: T' = T // patch_t, DiT grid, default VAE.", required=False),
    target_frames: Optional[int] = typer.Option(None, "--target-frames", help="DiT frames T' (default: from the latent and --model)"),
    true_grid: Optional[bool] = typer.Option(None, "--true-grid/--no-true-grid", help="encode at the DiT's h'×w' grid",
                                             metavar=""),
    vae_tiling: Optional[bool] = O.vae_tiling(None),
    vae_tile_size: Optional[int] = O.vae_tile_size(),
    latents_dtype: str = typer.Option("as-stored", "--latents-dtype", help="cast latents as the trainer does: as-stored · fp32 · bf16 · fp16"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu · cuda · cuda:N (default: cuda if present, else "
                                         "cpu; per rank under accelerate)"),
    chunk: Optional[int] = O.chunk(),
    json_out: bool = O.as_json("Print the summary as JSON."),
    progress: bool = O.flag("--progress/--no-progress", "Progress bar on stderr.", default=True),
) -> None:
    """Compute the teacher features of every cached latent file into a feature-cache store."""
    from crepa_mem.config import CrepaConfig

    if not latents.is_dir():
        fail(f"--latents {str(latents)!r} is not a directory", EXIT_USAGE)
    O.choice("--vae-dtype", vae_dtype, DTYPE_NAMES)
    O.choice("--latents-dtype", latents_dtype, LATENT_DTYPES)
    if encoder_dtype is not None:
        O.choice("--encoder-dtype", encoder_dtype, DTYPE_NAMES)
    O.at_least_one("--chunk", chunk)
    O.at_least_one("--target-frames", target_frames)
    O.check_image_size(image_size)
    if vae is not None and not vae.is_dir():
        fail(f"--vae {str(vae)!r} is not a directory (a diffusers VAE saved with save_pretrained)", EXIT_USAGE)
    from crepa_mem.teacher.cache import find_latent_files

    files = find_latent_files(latents, exclude=out)
    if not files:
        fail(f"--latents {str(latents)!r} holds no latent files (valid: *.pt or *.safetensors)", EXIT_USAGE)

    base = CrepaConfig.from_file(config) if config is not None else CrepaConfig()
    changes = {"encoder": encoder, "encoder_path": str(encoder_path) if encoder_path else None,
               "encoder_image_size": image_size, "encoder_dtype": encoder_dtype,
               "encoder_frames_batch_size": chunk, "true_grid": true_grid, "vae_tiling": vae_tiling,
               "vae_tile_size": vae_tile_size}
    cfg = base.replace(**{k: v for k, v in changes.items() if v is not None})
    if model is None and config is not None:
        model = _model_from_config(config)
    patch = (1, 2, 2)  # every supported family has patch_t = 1, so T' = T without --model
    if model is not None:
        from crepa_mem.profiles import get_model

        patch = tuple(get_model(model).patch_size)
    if cfg.true_grid and model is None:
        fail("--true-grid needs --model M (the DiT's patch size gives its h'×w' grid)", EXIT_USAGE)
    if vae is None and model is None:
        fail("no VAE: pass --vae DIR (a diffusers VAE saved with save_pretrained) or --model M "
             "(its VAE from the local Hugging Face cache)", EXIT_USAGE)

    _check_existing(out, cfg)  # before minutes of model loading
    from crepa_mem.teacher.encoders import local_encoder_dir

    local_encoder_dir(cfg.encoder, cfg.encoder_path)  # a local folder that is not there: exit 2 now, no network
    rank, world, dev, gather = _distributed(_device(device))
    try:
        report = _run_build(files, latents, out, cfg, vae, vae_dtype, model, target_frames, patch, latents_dtype,
                            dev, rank, world, progress)
    except KeyboardInterrupt:
        fail(f"interrupted: the entries written so far are kept in {out}; rerun the same command to resume",
             EXIT_INTERRUPTED)
    summaries = gather(report)
    _leave_process_group()
    if rank != 0:
        # Its entries are written and the group is gone. Under load, interpreter teardown on a non-zero
        # rank still aborted now and then ("terminate called without an active exception", exit -6, a C++
        # thread of torch.distributed's destroyed while joinable): skip the teardown, nothing is left to do.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _finish(summaries, out, latents, dev, world, json_out)


def _leave_process_group() -> None:
    """Destroy the process group before exit: gloo's threads torn down at interpreter exit abort a
    rank now and then ("terminate called without an active exception", exit -6)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears its sockets down while another's gloo threads still talk to them
        dist.destroy_process_group()


def _model_from_config(path: Path) -> str | None:
    """The checkpoint a SimpleTuner config trains (model_family / model_flavour), if it is a known one."""
    import json

    from crepa_mem.errors import ProfileNotFoundError
    from crepa_mem.profiles import model_from_simpletuner

    data = {str(k).lstrip("-"): v for k, v in json.loads(path.read_text()).items()}
    if not data.get("model_family"):
        return None
    try:
        return model_from_simpletuner(data["model_family"], data.get("model_flavour")).name
    except ProfileNotFoundError:
        return None


def _check_existing(out: Path, cfg) -> None:
    from crepa_mem.teacher.cache import check_settings
    from crepa_mem.teacher.store import MANIFEST, FeatureStore

    if out.exists() and not out.is_dir():
        fail(f"--out {str(out)!r} is a file, not a directory", EXIT_USAGE)
    if (out / MANIFEST).is_file():
        check_settings(FeatureStore.open(out), cfg, hint="use a new --out directory or delete this one")


def _run_build(files, latents, out, cfg, vae_dir, vae_dtype, model, target_frames, patch, latents_dtype,
               dev, rank, world, show_progress) -> dict:
    import torch

    import crepa_mem
    from crepa_mem.teacher.cache import build_feature_cache, load_model_vae, load_vae
    from crepa_mem.teacher.encoders import DTYPES, load_encoder

    _quiet_hub_logs()
    enc = load_encoder(cfg.encoder, path=cfg.encoder_path, dtype=cfg.encoder_dtype)
    vae_mod = load_vae(vae_dir, DTYPES[vae_dtype]) if vae_dir is not None else load_model_vae(model, DTYPES[vae_dtype])
    info = {"crepa_mem": crepa_mem.__version__, "torch": torch.__version__, "encoder_name": cfg.encoder,
            "vae_dtype": vae_dtype, "model": model}
    label = f"rank {rank}/{world}" if world > 1 else "teacher features"
    with _progress(show_progress) as prog:
        task = prog.add_task(label, total=len(files[rank::world]))
        summary = build_feature_cache(
            files, out, cfg=cfg, encoder=enc, vae=vae_mod, device=dev, target_frames=target_frames,
            patch_size=patch, latents_dtype=None if latents_dtype == "as-stored" else DTYPES[latents_dtype],
            rank=rank, world=world, source_root=latents, info=info,
            on_file=lambda _f: prog.advance(task))
    return summary.as_dict()


def _finish(summaries: list[dict], out: Path, latents: Path, dev, world: int, json_out: bool) -> None:
    from crepa_mem.teacher.cache import BuildSummary
    from crepa_mem.teacher.store import FeatureStore

    total = BuildSummary()
    for s in summaries:
        total.add(BuildSummary(**s))
    store = FeatureStore.open(out)
    keys = list(store.keys())
    report = {"out": str(out), "latents": str(latents), **total.as_dict(), "entries": len(keys),
              "store_bytes": sum(store.path_of(k).stat().st_size for k in keys), "ranks": world,
              "device": str(dev), "encoder_dim": store.encoder_dim, "settings": store.settings}
    if json_out:
        emit_json(report)
    else:
        _render_build(report)


@cache_app.command("verify")
@user_errors
def verify(
    out: Path = typer.Option(..., "--out", help="store folder to check"),
    latents: Optional[Path] = typer.Option(None, "--latents", help="also check that every latent here has an entry"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Read back every entry (checksum, settings); with --latents, report latents without an entry."""
    from crepa_mem.teacher.store import FeatureStore

    if not out.is_dir():
        fail(f"--out {str(out)!r} is not a directory", EXIT_USAGE)
    if latents is not None and not latents.is_dir():
        fail(f"--latents {str(latents)!r} is not a directory", EXIT_USAGE)
    store = FeatureStore.open(out)
    keys = list(store.keys())
    bad = [{"key": k, "error": err} for k in keys if (err := store.verify(k)) is not None]
    report = {"out": str(out), "entries": len(keys), "ok": len(keys) - len(bad), "bad": bad,
              "temp_files": len(store.temp_files()), "settings": store.settings}
    if latents is not None:
        report["missing"] = _missing(store, latents, out)
    failed = bool(bad) or bool(report.get("missing"))
    if json_out:
        emit_json(report)
    else:
        from rich.markup import escape

        c = console()
        c.print(f"[bold]{escape(str(out))}[/]: {report['ok']}/{report['entries']} entries intact"
                + (f", {len(report['missing'])} latent(s) without an entry" if "missing" in report else ""),
                soft_wrap=True)
        for b in bad:
            c.print(f"  [red]✖[/] {escape(b['error'])}", soft_wrap=True)
        for m in report.get("missing", [])[:20]:
            c.print(f"  [yellow]missing[/] {escape(m)}", soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_ERROR)


def _missing(store, latents: Path, out: Path) -> list[str]:
    import torch

    from crepa_mem.teacher.cache import find_latent_files, read_latents
    from crepa_mem.teacher.store import latent_key

    cast = store.settings.get("latents_dtype", "as stored")
    dtype = None if cast == "as stored" else getattr(torch, cast)
    missing = []
    for f in find_latent_files(latents, exclude=out):
        for i, lat in enumerate(read_latents(f)):
            if not store.has(latent_key(lat if dtype is None else lat.to(dtype))):
                missing.append(f"{f.relative_to(latents)}[{i}]")
    return missing
