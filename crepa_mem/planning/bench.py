"""`crepa-mem bench`: the real teacher path on this machine's device, next to the trace and the estimate.

Each run builds the full-size VAE and DINOv2 from their configs with random weights (no downloads) on
the local device, runs a few teacher steps on random latents, and reports
  - wall time per step (CUDA synchronised around each step);
  - on CUDA the measured peak: `torch.cuda.max_memory_allocated` (reset before the run, the one place
    crepa-mem resets it) minus what was allocated before the modules were built, and `mem_get_info`
    before and after; on a CPU no device memory exists to measure, and the report says so;
  - the peak `crepa-mem trace` measures for the same run on its fake GPU, the estimate's teacher peak
    (crepa_mem.planning.estimate.teacher_peak), and measured/trace, measured/estimate.
Runs: `baseline` (SimpleTuner 4.10's recipe), `given` (the settings passed, when any), `auto` (tiers and
chunk chosen at the first step from the memory free then, through crepa_mem.integrations.auto — the
runtime path `crepa_mem_*_tier: auto` takes in training).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from crepa_mem.config import CrepaConfig
from crepa_mem.planning import estimate as est
from crepa_mem.profiles import get_encoder
from crepa_mem.teacher.encoders import DTYPES
from crepa_mem.trace.workloads import (TeacherSettings, Workload, build_encoder, build_vae, simpletuner_teacher,
                                       trace_baseline, trace_candidate)

Progress = Callable[[str], None]


@dataclass
class BenchRun:
    name: str
    settings: dict[str, Any]
    step_seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    free_before_bytes: int | None = None
    free_after_bytes: int | None = None
    trace_peak_bytes: int | None = None
    estimate_peak_bytes: int | None = None
    rung: str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["median_step_s"] = statistics.median(self.step_seconds) if self.step_seconds else None
        for ref in ("trace", "estimate"):
            other = getattr(self, f"{ref}_peak_bytes")
            d[f"peak_over_{ref}"] = (self.peak_bytes / other) if (self.peak_bytes and other) else None
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> int | None:
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None


def _estimate(workload: Workload, s: TeacherSettings) -> int:
    m = workload.profile()
    e = est.estimate(m, get_encoder(workload.encoder), frames=workload.frames, height=workload.height,
                     width=workload.width, batch=workload.batch, image_size=workload.image_size,
                     encoder_dtype=s.encoder_dtype, vae_dtype=workload.vae_dtype, encoder_tier=s.encoder_tier,
                     vae_tier=s.vae_tier, vae_tiling=s.vae_tiling, drop_vae_encoder=s.drop_vae_encoder,
                     frames_per_chunk=s.chunk or -1)
    return est.teacher_peak(e)


def _settings_of(cfg: CrepaConfig) -> TeacherSettings:
    return TeacherSettings(encoder_tier=cfg.encoder_tier, vae_tier=cfg.vae_tier, chunk=cfg.frames_per_chunk,
                           encoder_dtype=cfg.encoder_dtype, vae_tiling=cfg.vae_tiling, vae_tile_size=cfg.vae_tile_size,
                           drop_vae_encoder=cfg.drop_vae_encoder)


def bench_run(name: str, workload: Workload, settings: TeacherSettings | CrepaConfig | None, *,
              device: torch.device, steps: int, trace: bool = True, progress: Progress | None = None,
              seed: int = 0) -> BenchRun:
    """One run: `settings` None = SimpleTuner's recipe; otherwise crepa-mem's teacher (TeacherRunner with the
    ladder), a CrepaConfig with `auto` tiers being the runtime choice."""
    from crepa_mem.integrations.auto import AutoTiers
    from crepa_mem.teacher.ladder import TeacherRunner, rung_label
    from crepa_mem.teacher.placement import move_module

    say = progress or (lambda _m: None)
    baseline = settings is None
    cfg = settings if isinstance(settings, CrepaConfig) else (CrepaConfig() if baseline else settings.config())
    run = BenchRun(name, {} if baseline else _settings_of(cfg).to_dict() if not cfg.auto_tiers else
                   {"encoder_tier": cfg.encoder_tier, "vae_tier": cfg.vae_tier})
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        before, run.free_before_bytes = torch.cuda.memory_allocated(device), _free(device)
    say(f"{name}: building {workload.encoder} and the {workload.profile().vae.name} VAE with random weights")
    torch.manual_seed(seed)
    vae = move_module(build_vae(workload.profile().vae.name, device=device), dtype=DTYPES[workload.vae_dtype])
    vae.requires_grad_(False)
    encoder = build_encoder(workload.encoder, device=device).requires_grad_(False)
    s = workload.shapes()
    latents = torch.randn(workload.batch, s["latent_channels"], s["latent_frames"], s["latent_height"],
                          s["latent_width"], device=device)
    runner = None
    if not baseline:  # crepa-mem places them itself, from the host
        move_module(vae, "cpu"), move_module(encoder, "cpu")
        cfg = cfg.replace(encoder_image_size=workload.image_size, encoder=workload.encoder)
        runner = TeacherRunner(cfg, encoder=encoder, vae=vae, compute_device=device, policy=AutoTiers(),
                               hidden_size=workload.profile().hidden_size)
    if cuda:  # the one place crepa-mem resets CUDA's peak statistics: around a bench run
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    tokens = workload.profile().tokens_per_frame(workload.height, workload.width)
    for i in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if baseline:
                out = simpletuner_teacher(vae, encoder, latents, workload.image_size, s["dit_frames"])
            else:
                out = runner.features(latents, s["dit_frames"], step=i, dit_tokens_per_frame=tokens).features
        _sync(device)
        run.step_seconds.append(time.perf_counter() - t0)
        del out
        say(f"{name}: step {i + 1}/{steps} {run.step_seconds[-1]:.2f} s")
    chosen = TeacherSettings()
    if runner is not None:
        chosen = _settings_of(runner.config)
        run.settings, run.rung = chosen.to_dict(), rung_label(runner.config)
        run.note = (runner.record.decision or {}).get("line", "")
        if runner.record.tried:
            run.note += (" " if run.note else "") + "ladder: " + "; ".join(runner.record.tried)
    if cuda:
        run.peak_bytes = int(torch.cuda.max_memory_allocated(device) - before)
        run.free_after_bytes = _free(device)
    del vae, encoder, latents, runner
    if cuda:
        torch.cuda.empty_cache()
    if not baseline:  # the estimate models crepa-mem's teacher path, not SimpleTuner's recipe
        run.estimate_peak_bytes = _estimate(workload, chosen)
    if trace:
        say(f"{name}: tracing the same run on the fake GPU")
        traced = trace_baseline(workload) if baseline else trace_candidate(workload, chosen)
        run.trace_peak_bytes = traced.peak_bytes
    return run


def bench(workload: Workload, given: TeacherSettings | None, *, device: torch.device | str | None = None,
          steps: int = 3, runs: tuple[str, ...] = ("baseline", "given", "auto"), trace: bool = True,
          progress: Progress | None = None) -> dict[str, Any]:
    """The `--json` report of `crepa-mem bench`."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    chosen = {"baseline": None, "given": given, "auto": CrepaConfig(encoder_tier="auto", vae_tier="auto")}
    out = [bench_run(name, workload, chosen[name], device=device, steps=steps, trace=trace, progress=progress)
           for name in runs if not (name == "given" and given is None)]
    measured = device.type == "cuda"
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if measured else "cpu",
            "memory_measured": measured,
            "note": "" if measured else "CPU: times only (no device memory to measure); the peaks shown are the "
                                        "trace's and the estimate's",
            "workload": {**workload.__dict__, **workload.shapes()}, "steps": steps,
            "runs": [r.to_dict() for r in out]}
