"""The planner's search laid out as one ladder of teacher configurations, best first. No torch.

`plan()` walks quality levels and, within the first level that has fitting candidates (tiers, smaller
chunks, VAE tiling, dropping the VAE encoder, RamTorch's resident chunks), takes the cheapest in step
time. Sorting each level's candidates by (step-time overhead, estimated peak) — the planner's own tie
order — turns that walk into a list: the first rung whose estimate fits a budget is exactly plan()'s choice for it
(tests/test_planning_ladder.py checks this over a range of budgets). At run time the same list is
  - `choose`: the `auto` decision from the memory measured at the first teacher step;
  - `next_rung`: after an OOM, the best rung whose estimate is below the failed one's. From any starting
    configuration the walk therefore ends at the first rung that really fits: every rung before it
    either needs more than the failed ones or was tried.
Runtime rungs keep the run's encoder and image size (no other weights to load mid-run), never a feature
cache (it has to be built beforehand), never a second GPU (under DDP each other GPU is another rank's),
and never drop the VAE's encoder unless the config already does (the trainer may still encode with it).
Lossy levels (bf16 encoder, pooled alignment) come only with crepa_mem_allow_lossy.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from crepa_mem.config import AUTO_TIER, CrepaConfig
from crepa_mem.planning import estimate as est
from crepa_mem.planning import host as hosts
from crepa_mem.planning import choose as planner_choice
from crepa_mem.planning import planner as pl
from crepa_mem.planning.devices import DeviceInfo
from crepa_mem.profiles import EncoderProfile, ModelProfile

# What the DiT's backward needs beyond what its forward left allocated: autograd's working set — one
# DiT block's saved tensors from the training model (crepa_mem.planning.training.block_backward_bytes)
# when the DiT is a catalog model, else a fraction of the allocation measured at the teacher step — plus
# the trainable parameters' gradients, plus Adam's two fp32 states per trainable parameter when they do
# not exist yet (before the first optimizer step).
BACKWARD_MARGIN = 0.10
ADAM_STATE_BYTES_PER_PARAM = 8
AUTO_HEADROOM = 0.05  # of the card kept free at run time (the plan's 10 % covers a prediction; this a measurement)


def backward_reserve_bytes(allocated_bytes: int, *, trainable_params: int = 0, trainable_bytes: int = 0,
                           optimizer_states_allocated: bool = True, working_bytes: int | None = None) -> int:
    """Bytes the coming backward and optimizer step need on top of what is allocated at the teacher step
    (CREPA's own loss and projector backward are in every rung's estimate, not here). `working_bytes`:
    the training model's backward working set; None → BACKWARD_MARGIN × allocated."""
    working = int(BACKWARD_MARGIN * allocated_bytes) if working_bytes is None else int(working_bytes)
    reserve = working + int(trainable_bytes)
    if not optimizer_states_allocated:
        reserve += ADAM_STATE_BYTES_PER_PARAM * int(trainable_params)
    return reserve


def budget_bytes(free_bytes: int, total_bytes: int, headroom: float) -> int:
    """The teacher's budget from what is free for it, as plan() computes it (free − headroom × total)."""
    return int(free_bytes) - int(headroom * total_bytes)


@dataclass(frozen=True)
class Rung:
    settings: dict[str, Any]       # the crepa_* keys plan() writes
    peak_bytes: int                # the estimate's peak (teacher + CREPA's loss phase)
    overhead_s: float
    level: int                     # index of its quality level (0 = the run's configured quality)
    lossy: bool

    @property
    def key(self) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in self.settings.items()))


def _levels(cfg: CrepaConfig, allow_lossy: bool) -> list[tuple[pl.Level, bool]]:
    """The planner's level order restricted to the run's encoder: dtype first, then alignment."""
    dtypes = [cfg.encoder_dtype] + (["bf16"] if cfg.encoder_dtype == "fp32" else [])
    aligns = [cfg.spatial_align] + ([False] if cfg.spatial_align else [])
    out = []
    for align in aligns:
        for dtype in dtypes:
            lossy = dtype != cfg.encoder_dtype or align != cfg.spatial_align
            if allow_lossy or not lossy:
                out.append((pl.Level(cfg.encoder, cfg.encoder_image_size, dtype, align), lossy))
    return out


def ladder(model: ModelProfile, encoder: EncoderProfile, cfg: CrepaConfig, *, gpu: DeviceInfo, frames: int,
           height: int, width: int, batch: int = 1, host_ram_bytes: int | None = None) -> list[Rung]:
    """Every runtime configuration, best first (see the module docstring). `cfg`'s tiers that are not
    `auto` stay fixed; `encoder` is the profile of the run's encoder (its name is cfg.encoder)."""
    ctx = pl._Ctx(model, gpu, frames, height, width, batch, budget=1 << 62,
                  host=hosts.read_host(ram_bytes=host_ram_bytes), others={}, headroom=0.0)
    ctx.encoders[cfg.encoder] = encoder
    total_frames = batch * min(frames, model.latent_frames(frames))
    fixed = {k: v for k, v in (("vae_tier", cfg.vae_tier), ("encoder_tier", cfg.encoder_tier)) if v != AUTO_TIER}
    evaluate = lambda c: pl._evaluate(ctx, c)  # noqa: E731 - the planner's own evaluation
    rungs: list[Rung] = []
    seen: set[tuple] = set()
    for rank, (level, lossy) in enumerate(_levels(cfg, cfg.allow_lossy)):
        found = []  # plan() takes, within a quality level, the fastest fitting candidate of all its steps
        for step in pl._steps(level, total_frames, [])[:-1]:  # the last step is the feature cache: never at run time
            step = [replace(c, tiling=c.tiling or cfg.vae_tiling, drop_vae_encoder=cfg.drop_vae_encoder, **fixed)
                    for c in step if cfg.drop_vae_encoder or not c.drop_vae_encoder]
            for variant in planner_choice.variants(ctx, step, evaluate):
                if "encoder_tier" in fixed and variant.encoder_tier == "stream" \
                        and variant.stream_engine != cfg.stream_engine:
                    continue  # a configured stream keeps its configured engine
                # plan() takes the largest loss chunk that fits its budget; with no budget yet, every one is a rung
                for c in (variant, *planner_choice.loss_twins(ctx, variant, evaluate)):
                    e, fits, cost = evaluate(c)
                    rung = Rung(pl._settings(model, c, cfg), e.peak_bytes, sum(cost.values()), rank, lossy)
                    if not fits or rung.key in seen:  # not fitting an unbounded budget: host RAM too small
                        continue
                    seen.add(rung.key)
                    found.append(rung)
        rungs.extend(sorted(found, key=lambda r: (r.overhead_s, r.peak_bytes)))  # stable: plan()'s tie order
    return rungs


def choose(rungs: list[Rung], budget: int) -> Rung | None:
    """The first rung whose estimate fits `budget` (plan()'s choice), or None."""
    return next((r for r in rungs if r.peak_bytes <= budget), None)


def next_rung(rungs: list[Rung], failed_peak_bytes: int, tried: set[tuple] = frozenset()) -> Rung | None:
    """After a rung needing `failed_peak_bytes` ran out of memory: the best rung estimated to need less."""
    return next((r for r in rungs if r.peak_bytes < failed_peak_bytes and r.key not in tried), None)


def estimate_of(model: ModelProfile, encoder: EncoderProfile, cfg: CrepaConfig, *, frames: int, height: int,
                width: int, batch: int = 1) -> est.Estimate:
    """The estimate of a concrete configuration (a start that is not a rung, e.g. a user's chunk of 3)."""
    return est.estimate(model, encoder, frames=frames, height=height, width=width, batch=batch,
                        image_size=cfg.encoder_image_size, encoder_dtype=cfg.encoder_dtype,
                        encoder_tier=cfg.encoder_tier, vae_tier=cfg.vae_tier, vae_tiling=cfg.vae_tiling,
                        drop_vae_encoder=cfg.drop_vae_encoder, frames_per_chunk=cfg.encoder_frames_batch_size,
                        spatial_align=cfg.spatial_align)


def apply(rung: Rung, cfg: CrepaConfig) -> CrepaConfig:
    """`cfg` with the rung's teacher settings (the student block and every loss option stay the run's)."""
    s = rung.settings
    return cfg.replace(encoder_tier=s["crepa_mem_encoder_tier"], vae_tier=s["crepa_mem_vae_tier"],
                       encoder_frames_batch_size=s["crepa_encoder_frames_batch_size"],
                       encoder_dtype=s["crepa_mem_encoder_dtype"], vae_tiling=s["crepa_mem_vae_tiling"],
                       drop_vae_encoder=s["crepa_drop_vae_encoder"], spatial_align=s["crepa_spatial_align"],
                       teacher_device=s["crepa_mem_teacher_device"] or cfg.teacher_device,
                       stream_engine=s["crepa_mem_stream_engine"], stream_resident_chunks=s["crepa_mem_stream_resident_chunks"],
                       stream_nvme_path=s["crepa_mem_stream_nvme_path"] or cfg.stream_nvme_path,
                       host_share_path=s["crepa_mem_host_share_path"] or cfg.host_share_path,
                       loss_chunk=s["crepa_mem_loss_chunk"])


def rung_of(rungs: list[Rung], cfg: CrepaConfig) -> Rung | None:
    """The rung that is `cfg`'s teacher configuration, if any."""
    return next((r for r in rungs if apply(r, cfg) == cfg), None)
