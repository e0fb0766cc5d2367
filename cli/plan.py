"""`crepa-mem plan`: the CREPA configuration that fits a GPU (no torch on this path)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from crepa_mem.cli import _options as O
from crepa_mem.cli._errors import EXIT_DOES_NOT_FIT, EXIT_USAGE, fail, user_errors
from crepa_mem.cli._output import console, emit_json, human_bytes


def register(app: typer.Typer) -> None:
    @app.command("plan")
    @user_errors
    def plan_cmd(
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Family (wan, ltxvideo, sanavideo, "
                                            "kandinsky5_video) or checkpoint (wan-2.1-14b, ...); `crepa-mem profiles` "
                                            "lists them. Default: the --config's model_family/model_flavour."),
        config: Optional[Path] = typer.Option(None, "--config", help="A SimpleTuner config.json: model, shape, "
                                              "precision, LoRA rank, optimizer, checkpointing, RamTorch keys."),
        gpu: str = typer.Option("auto", "--gpu", help="auto, an index (1 or cuda:1), a catalog name (rtx4090) "
                                "or a size (24GB, 24GiB)."),
        frames: Optional[int] = O.frames(),
        height: Optional[int] = O.height(),
        width: Optional[int] = O.width(),
        batch: int = O.batch(),
        train_gib: Optional[float] = typer.Option(None, "--train-gib", help="GiB the training uses without CREPA "
                                                  "(default: the training-memory model; on a live GPU the larger of "
                                                  "it and what is in use now)."),
        precision: Optional[str] = typer.Option(None, "--precision", help="Base weights: bf16 · fp16 · fp32 · fp8 · "
                                                "int8 · int4 · nf4 (or SimpleTuner's base_model_precision) (default: bf16)."),
        lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank; 0 = full fine-tune (default: 16)."),
        optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw · adamw_bf16 · adamw8bit · "
                                                "prodigy · sgd · adafactor (default: adamw)."),
        checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                     help="The DiT's gradient checkpointing (default: on)."),
        ramtorch_percent: Optional[float] = typer.Option(None, "--ramtorch-percent", help="SimpleTuner RamTorch: "
                                                         "% of the blocks' Linear weights on the host (default: 0)."),
        blocks_to_swap: Optional[int] = typer.Option(None, "--blocks-to-swap", help="musubi-tuner blocks_to_swap (default: 0)."),
        headroom: float = typer.Option(0.10, "--headroom", help="Fraction of the GPU kept free."),
        host_ram: Optional[str] = typer.Option(None, "--host-ram", help="Host RAM for the swap/stream tiers, e.g. "
                                               "64GiB: this node's, for all its local ranks (default: available now)."),
        local_ranks: Optional[int] = typer.Option(None, "--local-ranks", help="Training processes on this node, each "
                                                  "with its own host copy (default: $LOCAL_WORLD_SIZE, else 1)."),
        profiles: Optional[list[str]] = O.profiles(),
        feature_cache: bool = typer.Option(True, "--feature-cache/--no-feature-cache", help="Let the plan use the "
                                           "feature cache (precomputed teacher features) when it is the fastest."),
        as_json: bool = O.as_json("Print the plan as JSON."),
        write: Optional[Path] = typer.Option(None, "--write", help="Write the planned config (crepa_* keys) to FILE."),
    ) -> None:
        """The best CREPA configuration that fits: tiers, chunks, encoder, and what each choice costs."""
        from crepa_mem.planning.planner import plan
        from crepa_mem.units import parse_size

        training, shape = _training_inputs(model, config, profiles, dict(
            precision=precision, lora_rank=lora_rank, optimizer=optimizer, gradient_checkpointing=checkpointing,
            ramtorch_percent=ramtorch_percent, blocks_to_swap=blocks_to_swap))
        model = model or shape.pop("model")
        frames, height, width = (v if v is not None else shape.get(k) for k, v in
                                 (("frames", frames), ("height", height), ("width", width)))
        if "batch" in shape and batch == 1:
            batch = shape["batch"]
        ram = None
        if host_ram is not None:
            try:
                ram = parse_size(host_ram)
            except ValueError as e:
                fail(f"--host-ram: {e}")
        if local_ranks is not None and local_ranks < 1:
            fail(f"--local-ranks {local_ranks} is invalid: valid is an integer ≥ 1", EXIT_USAGE)
        with warnings.catch_warnings():  # the no-GPU fallback is printed as one note line below
            warnings.simplefilter("ignore", RuntimeWarning)
            p = plan(model, gpu, frames=frames, height=height, width=width, batch=batch, train_gib=train_gib,
                     headroom=headroom, host_ram_bytes=ram, profiles_dir=profiles or None, local_ranks=local_ranks,
                     training=training, feature_cache=feature_cache)
        if p.gpu.source == "catalog" and p.gpu.note.startswith("no GPU found"):
            typer.echo(f"crepa-mem: {p.gpu.note}", err=True)  # one line, never wrapped
        if write is not None:
            _write(write, p)
        if as_json:
            emit_json(p.to_dict())
        else:
            _print(p)
        if not p.fits:
            raise typer.Exit(EXIT_DOES_NOT_FIT)


def _write(path: Path, p) -> None:
    """A new file gets just the planned keys; an existing config.json gets them merged in, every other key
    as it was, and one line per change."""
    from crepa_mem.integrations.simpletuner_options import merge_config, refused_by_simpletuner

    planned = {k: v for k, v in p.settings.items()}
    existing: dict = {}
    if path.exists():
        try:
            existing = json.loads(path.read_text() or "{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            fail(f"--write {path}: not a JSON file ({e}); nothing written")
        if not isinstance(existing, dict):
            fail(f"--write {path}: not a JSON object of config keys; nothing written")
    merged, changes = merge_config(existing, planned)
    from crepa_mem.fileio import atomic_write

    atomic_write(path, json.dumps(merged, indent=2) + "\n")  # never half a config
    note = "" if p.fits else " (this configuration does not fit)"
    typer.echo(f"crepa-mem: {'merged into' if existing else 'wrote'} {path}{note}: "
               + ("; ".join(changes) if changes else "no change"), err=True)
    needs = [k for k in refused_by_simpletuner(merged) if k in planned]
    if needs:
        typer.echo(f"crepa-mem: {', '.join(needs)} need the patched SimpleTuner "
                   "(python -m crepa_mem.simpletuner …); unpatched SimpleTuner refuses them", err=True)


def _training_inputs(model, config, profiles, flags: dict) -> tuple[dict, dict]:
    """(training_bytes keywords with their source, shape and model read from --config); flags win."""
    training: dict = {"source": "model"}
    shape: dict = {}
    if config is not None:
        from crepa_mem.planning.training_config import training_inputs

        got = training_inputs(config, profiles_dir=profiles or None)
        training = {**got.kwargs, "source": "config"}
        shape = {"model": got.model.name, "frames": got.frames, "height": got.height, "width": got.width,
                 "batch": training.pop("batch")}
    elif model is None:
        fail("--model is required (or --config with a SimpleTuner config.json)", 2)
    for key, value in flags.items():
        if value is not None:
            training[key] = value if key != "lora_rank" else (value or None)
    return training, shape


def _print(p) -> None:
    from rich.table import Table

    out = console()
    g, b, s = p.gpu, p.budget, p.shape
    head = Table(title=f"crepa-mem plan: {p.model.name} on {g.name}", show_header=False, title_justify="left")
    head.add_row("GPU", f"{g.name} ({g.source}) {human_bytes(g.total_bytes)} total, {human_bytes(g.free_bytes)} free")
    head.add_row("shape", f"{s['batch']} × {s['frames']} frames × {s['height']}×{s['width']} "
                          f"({s['latent_frames']} latent frames, {s['dit_tokens_per_frame']} tokens each)")
    t = p.training
    head.add_row("training uses", f"{human_bytes(b['train_bytes'])} (from {t.source if t else 'unknown'})")
    head.add_row("headroom", human_bytes(b["headroom_bytes"]))
    head.add_row("budget for CREPA", human_bytes(b["budget_bytes"]) if b["budget_bytes"] > 0 else
                 "[red]nothing: training alone does not fit this card[/]")
    if p.host.get("node_bytes"):
        head.add_row("host (this node)", f"{human_bytes(p.host['node_bytes'])} for {p.host['local_ranks']} local rank(s)"
                     + (f" of {human_bytes(p.host['available_bytes'])} available" if p.host.get("available_bytes")
                        else ""))
    head.add_row("fits", "[green]yes[/]" if p.fits else "[red]no[/]")
    if p.fits and p.fastest is not None:
        head.add_row("step time", f"+{p.step_overhead_s:.3f} s/step (fastest that fits: "
                                  f"+{p.fastest['overhead_s']:.3f} s/step)")
    out.print(head)

    mem = Table(title="CREPA on the training GPU", title_justify="left")
    mem.add_column("component")
    mem.add_column("bytes", justify="right")
    mem.add_column("phase")
    for t in p.estimate.terms:
        mem.add_row(t.name, human_bytes(t.bytes), t.phase)
    mem.add_row("[bold]peak[/]", f"[bold]{human_bytes(p.estimate.peak_bytes)}[/]", p.estimate.peak_phase)
    mem.add_row("left in budget", human_bytes(b["left_bytes"]), "")
    out.print(mem)

    st = Table(title="settings", title_justify="left")
    st.add_column("key")
    st.add_column("value")
    for k, v in p.settings.items():
        st.add_row(k, json.dumps(v))
    out.print(st)
    out.print("[bold]why[/]")
    for r in p.reasons:
        out.print(f" • {r}", markup=False)
    if p.step_overhead_s:
        out.print(f"estimated step-time overhead: +{p.step_overhead_s:.3f} s/step")
    if p.cache_build_command:
        out.print("before training, build the feature cache:", markup=False)
        out.print(f"  {p.cache_build_command}", markup=False, soft_wrap=True)
