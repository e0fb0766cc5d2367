"""`crepa-mem trace`: the teacher path's GPU peak, SimpleTuner's recipe against a candidate, on a CPU.

Full-size models on fake tensors (crepa_mem.trace); nothing is downloaded and no GPU is needed.
The peak is the whole CREPA call's: the teacher, then the projection, the alignment and the backward.
--json prints exactly {"baseline": SIDE, "candidate": {**SIDE, "settings"}, "ratio"} with
SIDE = {"peak_bytes", "teacher_peak_bytes", "loss_peak_bytes", "phase_peak_bytes": {"decode", "encode",
"loss"}, "h2d_bytes": {"vae", "encoder"}} (per step).
Exit codes: 0 ok, 2 bad input (unknown model or encoder, a shape the VAE cannot encode).
"""
from __future__ import annotations

from typing import Optional

import typer

from crepa_mem.cli import _options as O
from crepa_mem.cli._errors import EXIT_USAGE, fail, user_errors
from crepa_mem.cli._output import console, emit_json, human_bytes

from crepa_mem.config import ENCODER_DTYPES as DTYPES
from crepa_mem.config import STREAM_ENGINES, TIERS

PLACED = tuple(t for t in TIERS if t != "cache")  # the feature cache is its own flag here
NOT_HERE = " (the feature cache is --feature-cache)"


def register(app: typer.Typer) -> None:
    @app.command("trace")
    @user_errors
    def trace_cmd(
        model: str = O.model("Checkpoint or family (wan-2.1-14b, ltxvideo, ...); its VAE is traced."),
        frames: Optional[int] = O.frames(),
        height: Optional[int] = O.height(),
        width: Optional[int] = O.width(),
        batch: int = O.batch(),
        encoder: str = O.encoder(),
        image_size: int = O.image_size(),
        vae_dtype: str = O.vae_dtype("bf16", "VAE weights and decode dtype, both runs."),
        encoder_tier: str = typer.Option("gpu", "--encoder-tier", help="Candidate: gpu · swap · stream · device."),
        vae_tier: str = typer.Option("gpu", "--vae-tier", help="Candidate: gpu · swap · stream · device."),
        chunk: Optional[int] = O.chunk(),
        encoder_dtype: str = O.encoder_dtype(),
        vae_tiling: bool = O.vae_tiling(),
        vae_tile_size: Optional[int] = O.vae_tile_size(),
        drop_vae_encoder: bool = O.flag("--drop-vae-encoder", "Candidate: decode-only VAE."),
        stream_engine: str = typer.Option("group_offload", "--stream-engine", help="Candidate: the encoder's "
                                          "stream engine, group_offload · ramtorch (its window is measured)."),
        resident_chunks: int = typer.Option(0, "--resident-chunks", help="Candidate, ramtorch: DINOv2 chunks kept "
                                            "on the GPU (RamTorch's pin)."),
        feature_cache: bool = O.flag("--feature-cache", "Candidate: features read from a feature cache (no VAE, "
                                     "no encoder on the GPU)."),
        loss_chunk: Optional[int] = typer.Option(None, "--loss-chunk", help="Candidate: DiT frames per loss "
                                                 "chunk, recomputed in backward (default: all at once)."),
        dit: bool = O.flag("--dit", "Trace the DiT's own training step instead (forward + backward + AdamW, LoRA "
                           "attached); --json: {\"dit\": {\"peak_bytes\", ...}}."),
        dit_dtype: str = typer.Option("bf16", "--dit-dtype", help="--dit: base weights and compute dtype."),
        lora_rank: int = typer.Option(16, "--lora-rank", help="--dit: LoRA rank on SimpleTuner's targets; 0 = full."),
        checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                           help="--dit: diffusers gradient checkpointing."),
        as_json: bool = O.as_json(),
    ) -> None:
        """Trace the teacher's compute-device peak: SimpleTuner's recipe vs the candidate settings (or, with
        --dit, the DiT's own training step)."""
        from crepa_mem.profiles import get_model
        from crepa_mem.trace.workloads import TeacherSettings, Workload, expected_steps, trace_baseline, trace_candidate
        from crepa_mem.trace.workloads import report as make_report

        if dit:
            return _trace_dit(model, frames, height, width, batch, dit_dtype, lora_rank, checkpointing, as_json)
        O.choice("--encoder-tier", encoder_tier, PLACED, NOT_HERE if encoder_tier == "cache" else "")
        O.choice("--vae-tier", vae_tier, PLACED, NOT_HERE if vae_tier == "cache" else "")
        O.choice("--encoder-dtype", encoder_dtype, DTYPES)
        O.choice("--stream-engine", stream_engine, STREAM_ENGINES)
        if resident_chunks < 0:
            fail(f"--resident-chunks {resident_chunks} is invalid: valid is an integer ≥ 0", EXIT_USAGE)
        O.choice("--vae-dtype", vae_dtype, DTYPES)
        O.at_least_one("--chunk", chunk, " (omit it for all frames at once)")
        O.at_least_one("--loss-chunk", loss_chunk, " (omit it for all frames at once)")
        O.check_image_size(image_size)
        profile = get_model(model)
        from crepa_mem.profiles import get_encoder

        get_encoder(encoder)  # unknown names fail here with suggestions
        pick = lambda given, default: default if given is None else given  # noqa: E731 - 0 is bad input, not "default"
        workload = Workload(model=profile.name, frames=pick(frames, profile.default_frames),
                            height=pick(height, profile.default_height), width=pick(width, profile.default_width),
                            encoder=encoder, image_size=image_size, batch=batch, vae_dtype=vae_dtype)
        settings = TeacherSettings(encoder_tier=encoder_tier, vae_tier=vae_tier, chunk=chunk,
                                   encoder_dtype=encoder_dtype, vae_tiling=vae_tiling, vae_tile_size=vae_tile_size,
                                   drop_vae_encoder=drop_vae_encoder, feature_cache=feature_cache,
                                   stream_engine=stream_engine, resident_chunks=resident_chunks,
                                   loss_chunk=loss_chunk)
        with _progress(expected_steps(workload, settings)) as step:
            base = trace_baseline(workload, progress=lambda what: step(f"baseline: {what}"))
            cand = trace_candidate(workload, settings, progress=lambda what: step(f"candidate: {what}"))
        report = make_report(base, cand, settings)
        if as_json:
            emit_json(report)
        else:
            _print(workload, base, cand, report)


def _trace_dit(model, frames, height, width, batch, dtype, lora_rank, checkpointing, as_json) -> None:
    from crepa_mem.planning.training import training_bytes
    from crepa_mem.profiles import get_model
    from crepa_mem.trace.dit import trace_dit

    O.choice("--dit-dtype", dtype, ("bf16", "fp16", "fp32"))
    if lora_rank < 0 or batch < 1:
        fail(f"--lora-rank {lora_rank} / --batch {batch} is invalid: valid is a rank ≥ 0 and a batch ≥ 1", EXIT_USAGE)
    for flag, v in (("--frames", frames), ("--height", height), ("--width", width)):
        if v is not None and v < 1:
            fail(f"{flag} {v} is invalid: valid is an integer ≥ 1 (omit it for the model's default)", EXIT_USAGE)
    profile = get_model(model)
    if not profile.dit.get("config"):
        fail(f"{profile.name} has no [model.\"{profile.name}\".dit] table in its profile: --dit cannot build it", 1)
    r = trace_dit(profile, frames=frames, height=height, width=width, batch=batch, dtype=dtype,
                  lora_rank=lora_rank or None, gradient_checkpointing=checkpointing)
    s = r.settings
    m = training_bytes(profile, frames=s["frames"], height=s["height"], width=s["width"], batch=batch,
                       precision=dtype, lora_rank=lora_rank or None, optimizer="adamw",
                       gradient_checkpointing=checkpointing, cuda_context=False)
    report = {"dit": {**r.to_dict(), "model_bytes": m.total_bytes,
                      "model_error": round(m.total_bytes / r.peak_bytes - 1, 4) if r.peak_bytes else None}}
    if as_json:
        emit_json(report)
        return
    out = console()
    out.print(f"[bold]{profile.name}[/] ({profile.diffusers_class}): {batch}×{s['frames']} frames at {s['height']}×"
              f"{s['width']}, {dtype}, " + (f"LoRA rank {lora_rank}" if lora_rank else "full fine-tune")
              + f", gradient checkpointing {'on' if checkpointing else 'off'}, AdamW")
    for label, v in (("weights (base + trainable)", r.weights_bytes), ("forward peak", r.forward_peak_bytes),
                     ("backward peak", r.backward_peak_bytes), ("optimizer step peak", r.step_peak_bytes),
                     ("[bold]device peak[/]", r.peak_bytes), ("training model (plan)", m.total_bytes)):
        out.print(f"  {label:<28} {human_bytes(v):>12}")
    out.print(f"  trainable parameters {r.trainable_params:,}; traced in {r.wall_s:.1f} s; CUDA context not included")


class _progress:
    """A rich progress bar on stderr while tracing (only on a terminal); `step(label)` advances it."""

    def __init__(self, total: int):
        self.total, self.bar, self.task = total, None, None

    def __enter__(self):
        err = console(stderr=True)
        if err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]tracing[/] {task.description:<28}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("building models", total=self.total)
        return self.step

    def step(self, label: str) -> None:
        if self.bar is not None:
            done = self.bar.tasks[0].completed + 1
            self.bar.update(self.task, advance=1, description=label, total=max(self.total, done))

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _print(workload, base, cand, report) -> None:
    from rich.table import Table

    out = console()
    s = workload.shapes()
    out.print(f"[bold]{workload.model}[/]: {workload.batch}×{workload.frames} frames at {workload.height}×"
              f"{workload.width} → {s['latent_frames']} latent frames, {s['dit_frames']} selected; "
              f"{workload.encoder} at {workload.image_size} ({s['encoder_tokens']} tokens); VAE {workload.vae_dtype}")
    table = Table(show_header=True, header_style="bold")
    for col in ("", "peak", "resident weights", "transient", "host peak", "trace"):
        table.add_column(col, justify="left" if not col else "right")
    for name, r in (("baseline (SimpleTuner)", base), ("candidate", cand)):
        table.add_row(name, human_bytes(r.peak_bytes), human_bytes(r.weights_bytes),
                      human_bytes(r.peak_bytes - r.weights_bytes), human_bytes(r.host_peak_bytes), f"{r.wall_s:.1f} s")
    out.print(table)
    settings = " ".join(f"{k}={v}" for k, v in report["candidate"]["settings"].items())
    out.print(f"candidate: {settings}")
    out.print(f"whole call = max(teacher step, loss phase): baseline {human_bytes(base.teacher_peak_bytes)} / "
              f"{human_bytes(base.loss_peak_bytes)}, candidate {human_bytes(cand.teacher_peak_bytes)} / "
              f"{human_bytes(cand.loss_peak_bytes)}")
    h2d = cand.h2d_bytes
    if any(h2d.values()):
        from crepa_mem.planning.devices import h2d_bandwidth

        rate = h2d_bandwidth(4, 16)
        out.print("host → device per step: " + ", ".join(f"{k} {human_bytes(v)} (≈{v / rate:.2f} s at PCIe Gen4 x16)"
                                                          for k, v in h2d.items() if v))
    if cand.prefetch_bytes:
        out.print(f"stream tier: includes {human_bytes(cand.prefetch_bytes)} for the block a CUDA side stream prefetches")
    if report["candidate"]["settings"].get("stream_engine") == "ramtorch" and cand.prefetch_bytes == 0:
        out.print("stream tier (ramtorch): RamTorch's loader ran on the traced thread, so its window and resident "
                  "chunks are in the measured peak")
    out.print(f"[bold]ratio[/] {report['ratio']:.2f}× (baseline peak / candidate peak, whole call)")
