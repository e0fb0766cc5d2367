"""`crepa-mem bench`: the real teacher path on this machine's device — SimpleTuner's recipe, the given settings and
the `auto` choice — with full-size modules of random weights; measured peak and time per step next to the trace's
and the estimate's peaks. On a CPU it reports times only and says so.
--json prints exactly {"device", "device_name", "memory_measured", "note", "workload", "steps", "runs": [...]}.
Exit codes: 0 ok, 1 a known error (e.g. the teacher ran out of memory on every rung), 2 bad input.
"""
from __future__ import annotations

from typing import Optional

import typer

from crepa_mem.cli._errors import EXIT_USAGE, fail, user_errors
from crepa_mem.cli._output import console, emit_json, human_bytes, message
from crepa_mem.config import ENCODER_DTYPES as DTYPES
from crepa_mem.config import TIERS

PLACED = tuple(t for t in TIERS if t != "cache")
RUNS = ("baseline", "given", "auto")


def register(app: typer.Typer) -> None:
    @app.command("bench")
    @user_errors
    def bench_cmd(
        model: str = typer.Option("wan-2.1-14b", "--model", "-m", help="Checkpoint or family; its VAE is run."),
        frames: Optional[int] = typer.Option(None, "--frames", help="Pixel frames per clip (default: the model's)."),
        height: Optional[int] = typer.Option(None, "--height", help="Clip height (default: the model's)."),
        width: Optional[int] = typer.Option(None, "--width", help="Clip width (default: the model's)."),
        batch: int = typer.Option(1, "--batch", help="Clips per step."),
        encoder: str = typer.Option("dinov2_vitg14", "--encoder", help="dinov2_vit{s,b,l,g}14, optionally _reg."),
        image_size: int = typer.Option(518, "--image-size", help="Encoder input size (a multiple of 14)."),
        vae_dtype: str = typer.Option("bf16", "--vae-dtype", help="VAE weights and decode dtype."),
        encoder_tier: Optional[str] = typer.Option(None, "--encoder-tier", help="Given: gpu · swap · stream · device."),
        vae_tier: Optional[str] = typer.Option(None, "--vae-tier", help="Given: gpu · swap · stream · device."),
        chunk: Optional[int] = typer.Option(None, "--chunk", help="Given: frames per encoder call."),
        encoder_dtype: Optional[str] = typer.Option(None, "--encoder-dtype", help="Given: fp32 · bf16 · fp16."),
        vae_tiling: bool = typer.Option(False, "--vae-tiling", help="Given: spatial VAE tiling."),
        drop_vae_encoder: bool = typer.Option(False, "--drop-vae-encoder", help="Given: decode-only VAE."),
        runs: str = typer.Option(",".join(RUNS), "--runs", help="Which runs, comma-separated: baseline,given,auto."),
        steps: int = typer.Option(3, "--steps", help="Teacher steps per run."),
        trace: bool = typer.Option(True, "--trace/--no-trace", help="Also trace each run on the fake GPU."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:1 or cpu (default: cuda if any)."),
        as_json: bool = typer.Option(False, "--json", help="Print exactly the report dict."),
    ) -> None:
        """Run the teacher path on this device: measured peak and time per step vs the trace and the estimate."""
        import torch

        from crepa_mem.planning.bench import bench
        from crepa_mem.profiles import get_encoder, get_model
        from crepa_mem.trace.workloads import TeacherSettings, Workload

        for flag, value, valid in (("--encoder-tier", encoder_tier, PLACED), ("--vae-tier", vae_tier, PLACED),
                                   ("--encoder-dtype", encoder_dtype, DTYPES), ("--vae-dtype", vae_dtype, DTYPES)):
            if value is not None and value not in valid:
                fail(f"{flag} {value!r} is invalid: valid is {' · '.join(valid)}", EXIT_USAGE)
        chosen = tuple(r.strip() for r in runs.split(",") if r.strip())
        if not chosen or any(r not in RUNS for r in chosen):
            fail(f"--runs {runs!r} is invalid: valid is a comma-separated subset of {','.join(RUNS)}", EXIT_USAGE)
        if steps < 1:
            fail(f"--steps {steps} is invalid: valid is an integer ≥ 1", EXIT_USAGE)
        if chunk is not None and chunk < 1:
            fail(f"--chunk {chunk} is invalid: valid is an integer ≥ 1 (omit it for all frames at once)", EXIT_USAGE)
        if image_size < 14 or image_size % 14:
            fail(f"--image-size {image_size} is invalid: valid is a multiple of 14 (e.g. 224, 518)", EXIT_USAGE)
        for flag, value in (("--frames", frames), ("--height", height), ("--width", width), ("--batch", batch)):
            if value is not None and value < 1:
                fail(f"{flag} {value} is invalid: valid is a positive integer", EXIT_USAGE)
        if device is not None:
            try:
                dev = torch.device(device)
            except RuntimeError:
                fail(f"--device {device!r} is invalid: valid is cpu, cuda or cuda:N", EXIT_USAGE)
            if dev.type == "cuda" and not torch.cuda.is_available():
                fail(f"--device {device!r} is invalid here: this torch has no CUDA device (use --device cpu)",
                     EXIT_USAGE)
        profile = get_model(model)
        get_encoder(encoder)
        pick = lambda given, default: default if given is None else given  # noqa: E731
        workload = Workload(model=profile.name, frames=pick(frames, profile.default_frames),
                            height=pick(height, profile.default_height), width=pick(width, profile.default_width),
                            encoder=encoder, image_size=image_size, batch=batch, vae_dtype=vae_dtype)
        any_given = any(v is not None for v in (encoder_tier, vae_tier, chunk, encoder_dtype)) or vae_tiling \
            or drop_vae_encoder
        given = TeacherSettings(encoder_tier=encoder_tier or "gpu", vae_tier=vae_tier or "gpu", chunk=chunk,
                                encoder_dtype=encoder_dtype or "fp32", vae_tiling=vae_tiling,
                                drop_vae_encoder=drop_vae_encoder) if any_given else None
        report = bench(workload, given, device=device, steps=steps, runs=chosen, trace=trace,
                       progress=lambda text: message(f"bench: {text}"))
        if as_json:
            emit_json(report)
        else:
            _print(report)


def _print(report: dict) -> None:
    from rich.table import Table

    out = console()
    w = report["workload"]
    out.print(f"[bold]{w['model']}[/] on {report['device']} ({report['device_name']}): {w['batch']}×{w['frames']} "
              f"frames at {w['height']}×{w['width']}, {w['encoder']} at {w['image_size']}, {report['steps']} steps")
    if report["note"]:
        out.print(report["note"])
    table = Table(show_header=True, header_style="bold")
    for col in ("run", "settings", "s/step (median)", "measured peak", "trace", "estimate", "÷ trace", "÷ estimate"):
        table.add_column(col, justify="left" if col in ("run", "settings") else "right")
    ratio = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    for r in report["runs"]:
        settings = r["rung"] or ("SimpleTuner 4.10 recipe" if r["name"] == "baseline" else "")
        table.add_row(r["name"], settings, f"{r['median_step_s']:.3f}", human_bytes(r["peak_bytes"]),
                      human_bytes(r["trace_peak_bytes"]), human_bytes(r["estimate_peak_bytes"]),
                      ratio(r["peak_over_trace"]), ratio(r["peak_over_estimate"]))
    out.print(table)
    for r in report["runs"]:
        if r["note"]:
            out.print(f"{r['name']}: {r['note']}")
