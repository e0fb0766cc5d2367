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
from crepa_mem.config import CrepaConfig
from crepa_mem.planning.devices import DeviceInfo, other_visible_gpus, resolve_gpu
from crepa_mem.errors import CrepaConfigError
from crepa_mem.profiles import EncoderProfile, ModelProfile, get_encoder, get_model
from crepa_mem.units import GB, GiB, format_bytes

ENCODER_LADDER = [("dinov2_vitg14", 518), ("dinov2_vitl14", 518), ("dinov2_vitl14", 448), ("dinov2_vitl14", 224),
                  ("dinov2_vitb14", 518), ("dinov2_vitb14", 448), ("dinov2_vitb14", 224),
                  ("dinov2_vits14", 518), ("dinov2_vits14", 448), ("dinov2_vits14", 224)]
CHUNKS = (16, 8, 4, 2, 1)
GPU_TIERS = ("gpu", "swap", "stream")
FEATURE_CACHE_DIR = "crepa_features"  # default directory written into a cache plan
# Step-time model: achieved fraction of the card's dense bf16 TFLOP/s (REFERENCE §6: H100 ≈ 790 of 989
# on big matmuls; convolutional VAEs run far below peak), and fp32 (no TF32) relative to bf16.
ENCODER_MFU, VAE_MFU, FP32_SLOWDOWN = 0.5, 0.2, 4.0
VAE_DECODE_FLOPS_PER_PX = {"wan-2.1": 8.6e6, "wan-2.2": 18.7e6, "hunyuanvideo": 23.1e6,  # FlopCounterMode
                           "ltx-0.9.5": 0.9e6, "ltx-0.9.0": 0.9e6}                       # traces, per px-frame
DEFAULT_H2D, DEFAULT_TFLOPS = 25 * GB, 165.0  # PCIe Gen4 x16 measured (REFERENCE §6); an RTX 4090
CHUNK_OVERHEAD_S = 1e-3  # per extra teacher chunk (launches, syncs); SimpleTuner PR #2258: no slowdown


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
    live = [Level(lv.encoder, lv.image_size, lv.encoder_dtype, a) for a in aligns for lv in one]
    return live + [Level(lv.encoder, lv.image_size, lv.encoder_dtype, lv.spatial_align, cache=True) for lv in live]


def _steps(level: Level, total_frames: int, others: list[DeviceInfo]) -> list[list[Candidate]]:
    """Candidates per knob step (cumulative), in the issue's order."""
    if level.cache:
        return [[Candidate(level, "cache", "cache")]]
    chunks = [-1] + [c for c in CHUNKS if c < total_frames]
    tiers = [(v, e, None) for v in GPU_TIERS for e in GPU_TIERS]
    tiers += [("device", "device", f"cuda:{d.cuda_index}") for d in others if d.cuda_index is not None]
    out = [[Candidate(level, v, e, -1, False, False, dev) for v, e, dev in tiers]]
    out.append([Candidate(level, v, e, c, False, False, dev) for v, e, dev in tiers for c in chunks[1:]])
    for tiling, drop in ((True, False), (True, True)):
        out.append([Candidate(level, v, e, c, tiling, drop, dev) for v, e, dev in tiers for c in chunks])
    return out


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
                drop_vae_encoder=c.drop_vae_encoder, frames_per_chunk=c.chunk, spatial_align=c.level.spatial_align)


def _evaluate(ctx: _Ctx, c: Candidate) -> tuple[est.Estimate, bool, dict[str, float]]:
    """(estimate, fits, step-time overhead in seconds by knob)."""
    enc = ctx.encoder(c.level.encoder)
    e = est.estimate(ctx.model, enc, encoder_tier=c.encoder_tier, vae_tier=c.vae_tier, **_kwargs(ctx, c))
    e = choose.with_engine(e, enc, c)  # RamTorch's window and resident chunks in place of group offloading's
    fits = e.peak_bytes <= ctx.budget
    weights = choose.moved_weights(ctx, enc, c)  # bytes over PCIe per step, by component
    fits = fits and choose.host_plan(ctx, c, enc).fits  # swap/stream keep the weights in host RAM, per rank
    if c.teacher_device:
        other = ctx.others[c.teacher_device]
        need = est.teacher_bytes(ctx.model, enc, **_kwargs(ctx, c))
        fits = fits and need <= other.free_bytes - int(ctx.headroom * other.total_bytes)
    return e, fits, _overhead(ctx, c, e, enc, weights)


def _overhead(ctx: _Ctx, c: Candidate, e: est.Estimate, enc: EncoderProfile, w: dict[str, int]) -> dict[str, float]:
    """Extra seconds per step over everything resident: transfers compute does not hide, tiling, chunks."""
    h2d = ctx.gpu.h2d_bytes_per_s or DEFAULT_H2D
    frames = ctx.batch * min(ctx.frames, ctx.model.latent_frames(ctx.frames))
    enc_s = encoder_seconds(ctx, enc, c.level)
    vae_s = vae_decode_seconds(ctx, False)
    parts: dict[str, float] = {}
    for key, tier, weights, compute in (("crepa_mem_encoder_tier", c.encoder_tier, e.h2d.get("encoder", 0), enc_s),
                                        ("crepa_mem_vae_tier", c.vae_tier, e.h2d.get("vae", 0), vae_s)):
        if tier == "swap":
            parts[key] = weights / h2d
        elif tier == "stream":  # prefetched: only the part of the copy that compute does not hide
            parts[key] = max(0.0, weights / h2d - compute) + 0.02 * compute
    if c.teacher_device:  # features come back over PCIe (through the host without P2P)
        parts["crepa_mem_teacher_device"] = 2 * e.components.get("features", 0) / h2d
    if c.tiling:
        parts["crepa_mem_vae_tiling"] = vae_decode_seconds(ctx, True) - vae_s
    if c.chunk > 0:
        parts["crepa_encoder_frames_batch_size"] = CHUNK_OVERHEAD_S * (-(-frames // c.chunk) - 1)
    return parts


def _tflops(ctx: _Ctx) -> float:
    return (ctx.gpu.bf16_tflops or DEFAULT_TFLOPS) * 1e12


def encoder_seconds(ctx: _Ctx, enc: EncoderProfile, level: Level) -> float:
    frames = ctx.batch * min(ctx.frames, ctx.model.latent_frames(ctx.frames))
    s = frames * est.encoder_flops_per_frame(enc, level.image_size) / (_tflops(ctx) * ENCODER_MFU)
    return s * (FP32_SLOWDOWN if level.encoder_dtype == "fp32" else 1.0)


def vae_decode_seconds(ctx: _Ctx, tiling: bool) -> float:
    vae = ctx.model.vae
    per_px = VAE_DECODE_FLOPS_PER_PX.get(vae.name, 10e6)
    factor = (vae.tile_sample_min / vae.tile_sample_stride) ** 2 if tiling else 1.0
    flops = ctx.batch * ctx.frames * ctx.height * ctx.width * per_px * factor
    return flops / (_tflops(ctx) * VAE_MFU)




# ---------------------------------------------------------------------------- plan()

def plan(model: str | ModelProfile, gpu: str | DeviceInfo = "auto", *, frames: int | None = None,
         height: int | None = None, width: int | None = None, batch: int = 1, train_gib: float | None = None,
         headroom: float = 0.10, host_ram_bytes: int | None = None, profiles_dir=None,
         base_config: CrepaConfig | None = None, spatial_align: bool | None = None, encoder: str | None = None,
         teacher_gpus: list[DeviceInfo] | None = None, local_ranks: int | None = None) -> Plan:
    """The best configuration that fits (or, with fits=False, the smallest one and what it needs).

    gpu: a selector for devices.resolve_gpu ("auto", "1", "rtx4090", "24GB") or a DeviceInfo.
    train_gib: what training uses without CREPA; default: what is in use on the GPU now.
    teacher_gpus: other GPUs for the `device` tier (default: the other visible GPUs).
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
    if train_gib is None:
        train, avail = dev.used_bytes or 0, dev.free_bytes
    else:
        train = int(train_gib * GiB)
        avail = dev.total_bytes - (dev.reserved_bytes or 0) - train
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
    chosen = smallest = None
    for rank, level in enumerate(levels):
        enc = ctx.encoder(level.encoder, profiles_dir)
        if not level.cache:  # lower bound: no teacher at all on the GPU (features + loss only)
            floor = est.estimate(m, enc, encoder_tier="device", vae_tier="device", **_kwargs(ctx, Candidate(level)))
            if floor.peak_bytes > budget:
                continue
        for step in _steps(level, total_frames, roomy):
            fitting = []
            for c in choose.variants(ctx, step, lambda v: _evaluate(ctx, v)):
                e, ok, cost = _evaluate(ctx, c)
                if smallest is None or e.peak_bytes < smallest[1].peak_bytes:
                    smallest = (c, e, cost, rank)
                if ok:
                    fitting.append((sum(cost.values()), e.peak_bytes, len(fitting), c, e, cost))
            if fitting:
                _, _, _, c, e, cost = min(fitting, key=lambda x: x[:3])
                chosen = (c, e, cost, rank)
                break
        if chosen:
            break
    fits = chosen is not None
    c, e, cost, rank = chosen or smallest
    reasons, costs = _explain(ctx, c, e, cost, baseline, fits, smallest)
    if train_gib is None and dev.source in ("catalog", "size"):
        i = next((k for k, r in enumerate(reasons) if r.startswith("budget")), 0)
        reasons[i] += (f"; training's own use is unknown for a card not inspected live ({dev.name}), so it is "
                       f"taken as 0 B and this plan is optimistic: pass --train-gib with what training uses "
                       f"without CREPA")
    shape = dict(frames=frames, height=height, width=width, batch=batch, latent_frames=m.latent_frames(frames),
                 dit_tokens_per_frame=m.tokens_per_frame(height, width))
    budget_d = dict(total_bytes=dev.total_bytes, free_bytes=dev.free_bytes, reserved_bytes=dev.reserved_bytes,
                    train_bytes=train, headroom_bytes=headroom_bytes, budget_bytes=budget,
                    left_bytes=budget - e.peak_bytes)
    return Plan(fits=fits, settings=_settings(m, c, base_config), tiers={"encoder": c.encoder_tier, "vae": c.vae_tier},
                estimate=e, reasons=reasons, gpu=dev, model=m, shape=shape, budget=budget_d, costs=costs,
                step_overhead_s=round(sum(cost.values()), 4), quality_level=rank,
                teacher_gpu=ctx.others.get(c.teacher_device) if c.teacher_device else None, base_config=base_config,
                host={**(ctx.host.to_dict() if ctx.host else {}),
                      **choose.host_plan(ctx, c, ctx.encoder(c.level.encoder)).to_dict()})


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
    }


# ---------------------------------------------------------------------------- why, and what it costs

def _explain(ctx: _Ctx, c: Candidate, e: est.Estimate, cost: dict[str, float], baseline, fits: bool,
             smallest) -> tuple[list[str], list[dict[str, Any]]]:
    f, g, lv = format_bytes, ctx.gpu, c.level
    enc = ctx.encoder(lv.encoder)
    frames = ctx.batch * min(ctx.frames, ctx.model.latent_frames(ctx.frames))
    reasons = [f"GPU {g.name} ({g.source}): {f(g.total_bytes)} total, {f(g.free_bytes)} free"
               + (f"; {g.note}" if g.note else "")]
    b = ctx.budget
    reasons.append(f"budget {f(b)} for CREPA = available {f(b + int(ctx.headroom * g.total_bytes))} "
                   f"(after training's use) - headroom {ctx.headroom:.0%} of total")
    b_c, b_e = baseline
    reasons.append(f"everything resident (dinov2_vitg14 @ 518 px fp32, VAE and DINOv2 on the GPU, all {frames} "
                   f"teacher frames at once) needs {f(b_e.peak_bytes)} at its {b_e.peak_phase} phase"
                   + (" - fits" if b_e.peak_bytes <= b else f" > budget {f(b)}"))
    costs: list[dict[str, Any]] = []

    def choice(key: str, value: Any, why: str, quality: str = "none", speed: str | None = None) -> None:
        s = cost.get(key, 0.0)
        speed = speed or (f"+{s:.3f} s/step" if s > 5e-4 else "~no step-time cost")
        costs.append({"setting": key, "value": value, "why": why, "quality_cost": quality,
                      "speed_cost": speed, "overhead_s": round(s, 4)})
        reasons.append(f"{key}={value}: {why}; quality: {quality}; speed: {speed}")

    h2d = (g.h2d_bytes_per_s or DEFAULT_H2D) / 1e9
    if lv.encoder_dtype != "fp32":
        choice("crepa_mem_encoder_dtype", lv.encoder_dtype, "DINOv2 in bf16 instead of SimpleTuner's fp32 halves its "
               "weights and activations", "small: features differ from fp32 by ~1e-2 relative", "faster (tensor cores)")
    if (lv.encoder, lv.image_size) != ("dinov2_vitg14", 518):
        n, _ = est.encoder_tokens(enc, lv.image_size)
        choice("crepa_encoder", f"{lv.encoder}@{lv.image_size}", f"smaller teacher: {lv.encoder} at {lv.image_size} px "
               f"({n} tokens per frame) instead of dinov2_vitg14 at 518 px (1369 tokens)",
               "weaker or coarser alignment targets", "faster")
    if not lv.spatial_align:
        choice("crepa_spatial_align", False, "both sides mean-pooled to one token per frame: no resampled token grids",
               "loses spatial correspondence (per-frame alignment only)")
    if lv.cache:
        per_clip = e.components.get("features", 0) // max(ctx.batch, 1)
        choice("crepa_mem_feature_cache", FEATURE_CACHE_DIR, "teacher features precomputed once with `crepa-mem cache "
               "build` at latent-caching time; no VAE or DINOv2 on the GPU while training",
               "none for cached latents; augmentations after caching are not seen",
               f"no teacher compute per step, but each clip's ~{f(per_clip)} is read from disk and checksummed "
               f"(sha256, ~1 GB/s on one CPU core); one teacher pass over the dataset up front")
    gen = f"PCIe Gen{g.pcie_gen}" if g.pcie_gen else "PCIe"
    for key, tier, what, full, side, compute in (
            ("crepa_mem_vae_tier", c.vae_tier, "the VAE", e.components.get("vae_weights", 0), "vae",
             vae_decode_seconds(ctx, c.tiling)),
            ("crepa_mem_encoder_tier", c.encoder_tier, "DINOv2", e.components.get("encoder_weights", 0), "encoder",
             encoder_seconds(ctx, enc, lv))):
        moved = e.h2d.get(side, 0)
        traffic = (f"{f(moved)} host → device per step, ≈{moved / (h2d * 1e9):.2f} s over {gen} at ~{h2d:.0f} GB/s "
                   f"against ≈{compute:.2f} s of its compute")
        if tier == "swap":
            choice(key, tier, f"{what} ({f(full)}) is on the GPU only during the teacher step, copied in each step "
                   f"and dropped after: {traffic}")
        elif tier == "stream":
            choice(key, tier, f"{what} streamed block by block from pinned host memory ({f(full)} on the GPU at "
                   f"once); prefetched copies hide behind compute where it is longer: {traffic}")
    if c.teacher_device:
        other = ctx.others[c.teacher_device]
        choice("crepa_mem_teacher_device", c.teacher_device, f"the teacher (VAE + DINOv2) runs on {c.teacher_device} "
               f"({other.name}, {f(other.free_bytes)} free); only its features come to the training GPU")
    if c.chunk > 0:
        all_act = est.encoder_activation_bytes(enc, lv.image_size, frames, lv.encoder_dtype)
        choice("crepa_encoder_frames_batch_size", c.chunk, f"teacher in chunks of {c.chunk} of the {frames} frames: "
               f"encoder activations {f(all_act)} -> {f(e.components.get('encoder_activations', 0))}",
               "none (same features)", "~none (SimpleTuner PR #2258: 8-frame slices were not slower)")
    if c.tiling:
        vae = ctx.model.vae
        untiled = est.vae_decode_activation_bytes(vae, ctx.frames, ctx.height, ctx.width, tiling=False, dtype="bf16")
        choice("crepa_mem_vae_tiling", True, f"VAE decode in {vae.tile_sample_min}-px tiles: decode activations "
               f"{f(untiled)} -> {f(e.components.get('vae_decode_activations', 0))}",
               "tile blending changes decoded pixels slightly")
    if c.drop_vae_encoder:
        choice("crepa_drop_vae_encoder", True, f"vae.encoder deleted ({f(ctx.model.vae.params_encoder * 2)} in bf16); "
               "the trainer must feed cached latents (no on-the-fly VAE encode)", "none")
    reasons += choose.reasons(ctx, c, enc)
    if fits:
        reasons.append(f"peak {f(e.peak_bytes)} at the {e.peak_phase} phase leaves {f(b - e.peak_bytes)} of the "
                       f"budget, plus {f(int(ctx.headroom * g.total_bytes))} headroom")
    else:
        if ctx.host is not None and ctx.host.available_bytes is not None:
            reasons.append(f"host RAM available for the swap/stream tiers on this node: {f(ctx.host.available_bytes)} "
                           f"for {ctx.host.local_ranks} local rank(s)")
        sc, se = smallest[0], smallest[1]
        what = (f"{sc.level.encoder}@{sc.level.image_size} {sc.level.encoder_dtype}, spatial_align "
                f"{'on' if sc.level.spatial_align else 'off'}, tiers vae={sc.vae_tier} encoder={sc.encoder_tier}")
        reasons.append(f"nothing fits: the smallest configuration ({what}) needs {f(se.peak_bytes)} > budget {f(b)}; "
                       f"it would need {f(se.peak_bytes - b)} more free memory (lower --train-gib, fewer --frames, "
                       f"a smaller --batch, or a larger GPU)")
    return reasons, costs
