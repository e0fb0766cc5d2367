"""The planner: the best CREPA configuration whose teacher path fits the GPU's budget. No torch.

Quality levels, best first (each taken only when no configuration of the one before fits):
    dinov2_vitg14 @ 518 fp32, spatial_align on → bf16 encoder → smaller encoder or image size
    (vitl14@518 … vits14@224) → spatial_align off (same ladder) → feature cache (same ladder).
Within a level the knobs that do not change the loss are tried in the issue's order, each step only
when the one before has no fitting candidate: tiers (gpu → swap → stream, or the teacher on a second
GPU with room) → smaller frame chunks → VAE tiling → drop the VAE encoder. Among the candidates of a
step the one with the lowest estimated step-time overhead wins. Since the level is the first one with
any fitting candidate, more free memory can never give a lower level (a lower-quality plan).
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from typing import Any

from crepa_mem.planning import choose
from crepa_mem.planning import estimate as est
from crepa_mem.planning import host as hosts
from crepa_mem.planning import step_time as st
from crepa_mem.planning import training as tr
from crepa_mem.planning.explain import FEATURE_CACHE_DIR, cache_build_command, explain
from crepa_mem.config import CrepaConfig
from crepa_mem.planning.devices import DeviceInfo, other_visible_gpus, resolve_gpu
from crepa_mem.errors import CrepaConfigError
from crepa_mem.profiles import EncoderProfile, ModelProfile, get_encoder, get_model
from crepa_mem.units import GiB

ENCODER_LADDER = [("dinov2_vitg14", 518), ("dinov2_vitl14", 518), ("dinov2_vitl14", 448), ("dinov2_vitl14", 224),
                  ("dinov2_vitb14", 518), ("dinov2_vitb14", 448), ("dinov2_vitb14", 224),
                  ("dinov2_vits14", 518), ("dinov2_vits14", 448), ("dinov2_vits14", 224)]
CHUNKS = (16, 8, 4, 2, 1)
GPU_TIERS = ("gpu", "swap", "stream")
@dataclass(frozen=True)
class Level:
    """One teacher quality level."""
    encoder: str
    image_size: int
    encoder_dtype: str
    spatial_align: bool
    cache: bool = False


@dataclass(frozen=True)
class Candidate:
    level: Level
    vae_tier: str = "gpu"
    encoder_tier: str = "gpu"
    chunk: int = -1
    tiling: bool = False
    drop_vae_encoder: bool = False
    teacher_device: str | None = None
    stream_engine: str = "group_offload"  # the encoder's stream engine, with RamTorch's resident chunks
    resident_chunks: int = 0
    encoder_host: str = "pinned"  # pinned · shared · nvme (planning/host.py)
    loss_chunk: int = -1  # crepa_mem_loss_chunk: DiT frames per loss chunk, recomputed in backward (lossless)


@dataclass
class Plan:
    fits: bool
    settings: dict[str, Any]
    tiers: dict[str, str]
    estimate: est.Estimate
    reasons: list[str]
    gpu: DeviceInfo
    model: ModelProfile
    shape: dict[str, int] = field(default_factory=dict)
    budget: dict[str, int] = field(default_factory=dict)
    costs: list[dict[str, Any]] = field(default_factory=list)
    step_overhead_s: float = 0.0
    quality_level: int = 0
    teacher_gpu: DeviceInfo | None = None
    base_config: CrepaConfig | None = None
    host: dict[str, Any] = field(default_factory=dict)
    training: tr.TrainingEstimate | None = None
    fastest: dict[str, Any] | None = None
    """The fitting configuration with the smallest step-time cost at any quality level."""
    cache_build_command: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from crepa_mem.planning.report import plan_to_dict

        return plan_to_dict(self)

    def to_config(self, base: CrepaConfig | None = None) -> CrepaConfig:
        """The plan's settings over `base` (or the config given to plan(), or the defaults)."""
        base = base or self.base_config or CrepaConfig(enabled=True, block_index=self.model.recommended_block)
        settings = dict(self.settings)
        if base.block_index is not None:  # the student block is the user's choice, not a memory setting
            settings.pop("crepa_block_index", None)
        return CrepaConfig.from_dict({**base.to_dict(), "crepa_enabled": True, **settings})


# ---------------------------------------------------------------------------- search space

def _levels(start: EncoderProfile, spatial_align: bool | None) -> list[Level]:
    reg = start.name.endswith("_reg")
    names = [n for n, _ in ENCODER_LADDER]
    first = names.index(start.name.removesuffix("_reg")) if start.name.removesuffix("_reg") in names else 0
    ladder = [(n + ("_reg" if reg else ""), s) for n, s in ENCODER_LADDER if names.index(n) >= first]
    if start.name.removesuffix("_reg") not in names:  # a user encoder: it alone, at decreasing sizes
        ladder = [(start.name, s) for s in (518, 448, 224)]
    one = [Level(ladder[0][0], ladder[0][1], "fp32", True), Level(ladder[0][0], ladder[0][1], "bf16", True)]
    one += [Level(n, s, "bf16", True) for n, s in ladder[1:]]
    aligns = [True, False] if spatial_align is None else [spatial_align]
    return [Level(lv.encoder, lv.image_size, lv.encoder_dtype, a) for a in aligns for lv in one]


def _steps(level: Level, total_frames: int, others: list[DeviceInfo]) -> list[list[Candidate]]:
    """Candidates per knob step (cumulative), in the issue's order; the feature cache (same teacher) last."""
    chunks = [-1] + [c for c in CHUNKS if c < total_frames]
    tiers = [(v, e, None) for v in GPU_TIERS for e in GPU_TIERS]
    tiers += [("device", "device", f"cuda:{d.cuda_index}") for d in others if d.cuda_index is not None]
    out = [[Candidate(level, v, e, -1, False, False, dev) for v, e, dev in tiers]]
    out.append([Candidate(level, v, e, c, False, False, dev) for v, e, dev in tiers for c in chunks[1:]])
    for tiling, drop in ((True, False), (True, True)):
        out.append([Candidate(level, v, e, c, tiling, drop, dev) for v, e, dev in tiers for c in chunks])
    cached = Level(level.encoder, level.image_size, level.encoder_dtype, level.spatial_align, cache=True)
    return out + [[Candidate(cached, "cache", "cache")]]


# ---------------------------------------------------------------------------- evaluation

@dataclass
class _Ctx:
    model: ModelProfile
    gpu: DeviceInfo
    frames: int
    height: int
    width: int
    batch: int
    budget: int
    host: hosts.HostInfo | None
    others: dict[str, DeviceInfo]
    headroom: float
    encoders: dict[str, EncoderProfile] = field(default_factory=dict)

    def encoder(self, name: str, profiles_dir=None) -> EncoderProfile:
        if name not in self.encoders:
            self.encoders[name] = get_encoder(name, profiles_dir)
        return self.encoders[name]


def _kwargs(ctx: _Ctx, c: Candidate) -> dict[str, Any]:
    return dict(frames=ctx.frames, height=ctx.height, width=ctx.width, batch=ctx.batch,
                image_size=c.level.image_size, encoder_dtype=c.level.encoder_dtype, vae_tiling=c.tiling,
                drop_vae_encoder=c.drop_vae_encoder, frames_per_chunk=c.chunk, spatial_align=c.level.spatial_align,
                loss_chunk=c.loss_chunk if c.loss_chunk > 0 else None)


def _evaluate(ctx: _Ctx, c: Candidate) -> tuple[est.Estimate, bool, dict[str, float]]:
    """(estimate, fits, step-time overhead in seconds by knob)."""
    enc = ctx.encoder(c.level.encoder)
    e = est.estimate(ctx.model, enc, encoder_tier=c.encoder_tier, vae_tier=c.vae_tier, **_kwargs(ctx, c))
    e = choose.with_engine(ctx, e, enc, c)  # RamTorch's window, resident chunks and traffic if it streams
    fits = e.peak_bytes <= ctx.budget
    fits = fits and choose.host_plan(ctx, c, enc).fits  # swap/stream keep the weights in host RAM, per rank
    if c.teacher_device:
        other = ctx.others[c.teacher_device]
        need = est.teacher_bytes(ctx.model, enc, **_kwargs(ctx, c))
        fits = fits and need <= other.free_bytes - int(ctx.headroom * other.total_bytes)
    return e, fits, _overhead(ctx, c, e, enc)


def _overhead(ctx: _Ctx, c: Candidate, e: est.Estimate, enc: EncoderProfile) -> dict[str, float]:
    """Extra seconds per step over everything resident: transfers compute does not hide, tiling, chunks,
    cache reads (constants and their sources: crepa_mem.planning.step_time)."""
    h2d = ctx.gpu.h2d_bytes_per_s or st.DEFAULT_H2D
    frames = ctx.batch * min(ctx.frames, ctx.model.latent_frames(ctx.frames))
    shape = dict(frames=ctx.frames, batch=ctx.batch, bf16_tflops=ctx.gpu.bf16_tflops)
    enc_s = st.encoder_seconds(ctx.model, enc, image_size=c.level.image_size, encoder_dtype=c.level.encoder_dtype,
                               **shape)
    vae_s = st.vae_decode_seconds(ctx.model, height=ctx.height, width=ctx.width, tiling=False, **shape)
    parts: dict[str, float] = {}
    # Wan's causal cache waits on the host under a streamed VAE: copied both ways, synchronously (not hidden)
    i = e.inputs
    cache = est.vae_cache_traffic_bytes(ctx.model.vae, latent_frames=i["latent_frames"], height=i["height"],
                                        width=i["width"], vae_dtype=i["vae_dtype"], tiling=i["vae_tiling"],
                                        batch=i["batch"]) if c.vae_tier == "stream" else 0
    for key, tier, moved, compute in (("crepa_mem_encoder_tier", c.encoder_tier, e.h2d.get("encoder", 0), enc_s),
                                      ("crepa_mem_vae_tier", c.vae_tier, e.h2d.get("vae", 0), vae_s)):
        if tier == "swap":
            parts[key] = moved / h2d
        elif tier == "stream":  # prefetched weights: only the part of the copy that compute does not hide
            synchronous = cache if key == "crepa_mem_vae_tier" else 0
            parts[key] = (max(0.0, (moved - synchronous) / h2d - compute) + 2 * synchronous / h2d
                          + st.STREAM_COMPUTE_OVERHEAD * compute)
    if c.level.cache:
        parts["crepa_mem_feature_cache"] = st.cache_read_seconds(est.features_bytes(e))
    if c.teacher_device:  # features come back over PCIe (through the host without P2P)
        parts["crepa_mem_teacher_device"] = 2 * est.features_bytes(e) / h2d
    if c.tiling:
        parts["crepa_mem_vae_tiling"] = st.vae_decode_seconds(ctx.model, height=ctx.height, width=ctx.width,
                                                              tiling=True, **shape) - vae_s
    if c.chunk > 0:
        parts["crepa_encoder_frames_batch_size"] = st.CHUNK_OVERHEAD_S * (-(-frames // c.chunk) - 1)
    if c.loss_chunk > 0:
        parts["crepa_mem_loss_chunk"] = st.loss_recompute_seconds(ctx.model, enc, height=ctx.height, width=ctx.width,
                                                                  chunk=c.loss_chunk, **shape)
    return parts




# ---------------------------------------------------------------------------- plan()

def plan(model: str | ModelProfile, gpu: str | DeviceInfo = "auto", *, frames: int | None = None,
         height: int | None = None, width: int | None = None, batch: int = 1, train_gib: float | None = None,
         headroom: float = 0.10, host_ram_bytes: int | None = None, profiles_dir=None,
         base_config: CrepaConfig | None = None, spatial_align: bool | None = None, encoder: str | None = None,
         teacher_gpus: list[DeviceInfo] | None = None, local_ranks: int | None = None,
         training: dict | None = None, feature_cache: bool = True, may_drop_vae_encoder: bool = True) -> Plan:
    """The best configuration that fits (or, with fits=False, the smallest one and what it needs).

    gpu: a selector for devices.resolve_gpu ("auto", "1", "rtx4090", "24GB") or a DeviceInfo.
    train_gib: what training uses without CREPA, overriding the training model. Default: the model
    (crepa_mem.planning.training) for this shape, with `training` as its keyword arguments (precision,
    lora_rank, optimizer, gradient_checkpointing, offload; "source": "config" when read from a
    config.json); on a live GPU the larger of that and what is in use now.
    teacher_gpus: other GPUs for the `device` tier (default: the other visible GPUs).
    feature_cache: False keeps the teacher live (no precomputed features, e.g. on-the-fly augmentations).
    may_drop_vae_encoder: False when the trainer still encodes with the VAE (no cached latents; the runtime
    ladder's case).
    host_ram_bytes, local_ranks: host RAM of the node and ranks on it (default: read, LOCAL_WORLD_SIZE).
    """
    m = model if isinstance(model, ModelProfile) else get_model(model, profiles_dir)
    frames = m.default_frames if frames is None else int(frames)
    height = m.default_height if height is None else int(height)
    width = m.default_width if width is None else int(width)
    if batch < 1:
        raise CrepaConfigError("batch", batch, valid="an integer ≥ 1")
    if not 0 <= headroom < 1:
        raise CrepaConfigError("headroom", headroom, valid="a fraction in [0, 1), e.g. 0.1")
    if train_gib is not None and train_gib < 0:
        raise CrepaConfigError("train_gib", train_gib, valid="a number of GiB ≥ 0")
    m.check_shape(frames, height, width)
    dev = gpu if isinstance(gpu, DeviceInfo) else resolve_gpu(gpu, profiles_dir=profiles_dir)
    if dev.source == "catalog" and dev.note.startswith("no GPU found"):  # the CLI prints it as a note
        warnings.warn(f"crepa_mem.plan(gpu={gpu!r}): {dev.note}", RuntimeWarning, stacklevel=2)
    others = other_visible_gpus(dev, profiles_dir=profiles_dir) if teacher_gpus is None else teacher_gpus
    roomy = [d for d in others if d.cuda_index is not None]
    if not dev.total_bytes or dev.total_bytes <= 0:
        raise CrepaConfigError("gpu", gpu if isinstance(gpu, str) else dev.name, valid="a GPU with memory > 0")
    if train_gib is not None and not 0 <= train_gib < float("inf"):  # NaN fails both comparisons
        raise CrepaConfigError("train_gib", train_gib, valid="a finite number of GiB ≥ 0")
    if train_gib is not None and train_gib * GiB >= dev.total_bytes:
        raise CrepaConfigError("train_gib", train_gib, valid=f"less than the GPU's {dev.total_bytes / GiB:.2f} GiB")
    headroom_bytes = int(headroom * dev.total_bytes)
    training_use = tr.training_use(m, dev, frames=frames, height=height, width=width, batch=batch,
                                   train_gib=train_gib, training=training)
    train = training_use.total_bytes
    avail = dev.free_bytes if training_use.source == "live GPU" else dev.total_bytes - (dev.reserved_bytes or 0) - train
    budget = avail - headroom_bytes
    ctx = _Ctx(m, dev, frames, height, width, batch, budget,
               hosts.read_host(ram_bytes=host_ram_bytes, ranks=local_ranks),
               {f"cuda:{d.cuda_index}": d for d in roomy}, headroom)
    start = get_encoder(encoder or "dinov2_vitg14", profiles_dir)
    ctx.encoders[start.name] = start
    total_frames = batch * min(frames, m.latent_frames(frames))

    levels = _levels(start, spatial_align)
    base_c = Candidate(levels[0])
    baseline = (base_c, _evaluate(ctx, base_c)[0])  # everything resident at the best level, for the reasons
    chosen = smallest = fastest = None
    for rank, level in enumerate(levels):
        enc = ctx.encoder(level.encoder, profiles_dir)
        # lower bound: no teacher at all on the GPU (features + the chunked loss only, what the cache also needs)
        floor = est.estimate(m, enc, encoder_tier="device", vae_tier="device",
                             **_kwargs(ctx, Candidate(level, loss_chunk=1)))
        if floor.peak_bytes > budget and rank < len(levels) - 1:
            continue
        fitting = []  # every candidate of equal teacher quality that fits: the fastest wins
        for step in _steps(level, total_frames, roomy)[:None if feature_cache else -1]:
            for c in choose.variants(ctx, step, lambda v: _evaluate(ctx, v)):
                if c.drop_vae_encoder and not may_drop_vae_encoder:
                    continue
                e, ok, cost = _evaluate(ctx, c)
                if smallest is None or (e.peak_bytes, not c.level.cache) < (smallest[1].peak_bytes,
                                                                              not smallest[0].level.cache):
                    smallest = (c, e, cost, rank)
                if ok:
                    fitting.append((sum(cost.values()), e.peak_bytes, len(fitting), c, e, cost))
        if fitting:
            best = min(fitting, key=lambda x: x[:3])
            chosen = chosen or (best[3], best[4], best[5], rank)
            if fastest is None or best[0] < fastest[0] - 1e-9:
                fastest = (best[0], best[3], rank)
            if best[0] <= 1e-9:
                break  # nothing below can be faster
    fits = chosen is not None and train + headroom_bytes < dev.total_bytes
    c, e, cost, rank = chosen or smallest
    reasons, costs = explain(ctx, c, e, cost, baseline, fits, smallest, training_use, fastest)
    shape = dict(frames=frames, height=height, width=width, batch=batch, latent_frames=m.latent_frames(frames),
                 dit_tokens_per_frame=m.tokens_per_frame(height, width))
    budget_d = dict(total_bytes=dev.total_bytes, free_bytes=dev.free_bytes, reserved_bytes=dev.reserved_bytes,
                    train_bytes=train, headroom_bytes=headroom_bytes, budget_bytes=budget,
                    left_bytes=budget - e.peak_bytes)
    fast = None if fastest is None else {"overhead_s": round(fastest[0], 4), "quality_level": fastest[2],
                                         "settings": _settings(m, fastest[1], base_config)}
    return Plan(fits=fits, settings=_settings(m, c, base_config), tiers={"encoder": c.encoder_tier, "vae": c.vae_tier},
                estimate=e, reasons=reasons, gpu=dev, model=m, shape=shape, budget=budget_d, costs=costs,
                step_overhead_s=round(sum(cost.values()), 4), quality_level=rank,
                teacher_gpu=ctx.others.get(c.teacher_device) if c.teacher_device else None, base_config=base_config,
                host={**(ctx.host.to_dict() if ctx.host else {}),
                      **choose.host_plan(ctx, c, ctx.encoder(c.level.encoder)).to_dict()},
                training=training_use, fastest=fast,
                cache_build_command=cache_build_command(ctx, c.level) if c.level.cache else None)


def _settings(m: ModelProfile, c: Candidate, base: CrepaConfig | None) -> dict[str, Any]:
    lv = c.level
    return {
        "crepa_enabled": True,
        "crepa_block_index": base.block_index if base and base.block_index is not None else m.recommended_block,
        "crepa_encoder": lv.encoder,
        "crepa_encoder_image_size": lv.image_size,
        "crepa_spatial_align": lv.spatial_align,
        "crepa_drop_vae_encoder": c.drop_vae_encoder,
        "crepa_encoder_frames_batch_size": c.chunk,
        "crepa_mem_encoder_tier": c.encoder_tier,
        **choose.settings(c),
        "crepa_mem_vae_tier": c.vae_tier,
        "crepa_mem_encoder_dtype": lv.encoder_dtype,
        "crepa_mem_vae_tiling": c.tiling,
        "crepa_mem_teacher_device": c.teacher_device,
        "crepa_mem_feature_cache": FEATURE_CACHE_DIR if lv.cache else None,
        "crepa_mem_loss_chunk": c.loss_chunk,
    }
