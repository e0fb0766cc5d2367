"""Why a plan is what it is: one reason per fact or choice, and what each choice costs. No torch.

`ctx` and the candidates are the planner's (crepa_mem.planning.planner); this module only reads them.
"""
from __future__ import annotations

from typing import Any

from crepa_mem.planning import choose
from crepa_mem.planning import estimate as est
from crepa_mem.planning import step_time as st
from crepa_mem.planning.training import TrainingEstimate
from crepa_mem.units import format_bytes

FEATURE_CACHE_DIR = "crepa_features"  # default directory written into a cache plan


def explain(ctx, c, e: est.Estimate, cost: dict[str, float], baseline, fits: bool, smallest,
            training: TrainingEstimate, fastest) -> tuple[list[str], list[dict[str, Any]]]:
    """The plan's reasons (one line per fact or choice) and its cost table."""
    f, g, lv = format_bytes, ctx.gpu, c.level
    enc = ctx.encoder(lv.encoder)
    frames = ctx.batch * min(ctx.frames, ctx.model.latent_frames(ctx.frames))
    reasons = [f"GPU {g.name} ({g.source}): {f(g.total_bytes)} total, {f(g.free_bytes)} free"
               + (f"; {g.note}" if g.note else "")]
    b = ctx.budget
    reasons.append(training_reason(training))
    reasons.append(f"budget {f(b)} for CREPA = available {f(b + int(ctx.headroom * g.total_bytes))} "
                   f"(after training's {f(training.total_bytes)}) - headroom {ctx.headroom:.0%} of total")
    head = int(ctx.headroom * g.total_bytes)
    if training.total_bytes + head >= g.total_bytes:
        reasons.append(f"training alone does not fit: it needs {f(training.total_bytes)} + {f(head)} headroom of the "
                       f"card's {f(g.total_bytes)}, so there is no budget for CREPA; reduce training's memory first "
                       f"(gradient checkpointing, LoRA, fp8/int8 base weights, ramtorch or blocks_to_swap, a shorter "
                       f"clip) or use a larger GPU")
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

    h2d = (g.h2d_bytes_per_s or st.DEFAULT_H2D) / 1e9
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
        per_clip = est.features_bytes(e) // max(ctx.batch, 1)
        choice("crepa_mem_feature_cache", FEATURE_CACHE_DIR, "teacher features precomputed once with `crepa-mem cache "
               "build` at latent-caching time; no VAE or DINOv2 on the GPU while training",
               "none for cached latents; augmentations after caching are not seen",
               f"no teacher compute per step, but each clip's ~{f(per_clip)} is read from disk and checksummed "
               f"(sha256, ~1 GB/s on one CPU core); one teacher pass over the dataset up front")
        reasons.append("before training, build the cache: " + cache_build_command(ctx, lv))
    gen = f"PCIe Gen{g.pcie_gen}" if g.pcie_gen else "PCIe"
    shape = dict(frames=ctx.frames, batch=ctx.batch, bf16_tflops=g.bf16_tflops)
    for key, tier, what, full, side, compute in (
            ("crepa_mem_vae_tier", c.vae_tier, "the VAE", e.components.get("vae_weights", 0), "vae",
             st.vae_decode_seconds(ctx.model, height=ctx.height, width=ctx.width, tiling=c.tiling, **shape)),
            ("crepa_mem_encoder_tier", c.encoder_tier, "DINOv2", e.components.get("encoder_weights", 0), "encoder",
             st.encoder_seconds(ctx.model, enc, image_size=lv.image_size, encoder_dtype=lv.encoder_dtype, **shape))):
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
    if c.loss_chunk > 0:
        keys = ("frames", "height", "width", "batch", "image_size", "encoder_dtype", "vae_dtype", "encoder_tier",
                "vae_tier", "vae_tiling", "drop_vae_encoder", "frames_per_chunk", "spatial_align")
        whole = est.estimate(ctx.model, enc, **{k: e.inputs[k] for k in keys})
        choice("crepa_mem_loss_chunk", c.loss_chunk, f"loss phase (projection, alignment, backward) in chunks of "
               f"{c.loss_chunk} of the {ctx.model.latent_frames(ctx.frames)} DiT frames, recomputed in backward: "
               f"{f(whole.phase_bytes['loss'])} -> {f(e.phase_bytes['loss'])}"
               + ("" if whole.peak_bytes <= b else " (the whole loss phase does not fit)"),
               "none (loss and gradient equal within 1e-6)")
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
    if fits and fastest is not None:
        spent = sum(cost.values())
        if fastest[0] < spent - 5e-4:
            fc = fastest[1].level
            reasons.append(f"step time: this plan +{spent:.3f} s/step; the fastest that fits, at lower teacher quality "
                           f"({fc.encoder}@{fc.image_size} {fc.encoder_dtype}, spatial_align "
                           f"{'on' if fc.spatial_align else 'off'}{', feature cache' if fc.cache else ''}), "
                           f"+{fastest[0]:.3f} s/step")
        else:
            reasons.append(f"step time: this plan +{spent:.3f} s/step is the fastest that fits")
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


def training_reason(t: TrainingEstimate) -> str:
    """One line: what training uses and where the figure comes from."""
    f, i = format_bytes, t.inputs
    if t.source == "--train-gib":
        return f"training uses {f(t.total_bytes)} (given with --train-gib)"
    if t.source == "live GPU":
        return (f"training uses {f(t.total_bytes)} (live GPU: in use now, more than the model's "
                f"{f(i.get('predicted_bytes', 0))} for this workload)")
    what = (f"{i.get('model')} {i.get('precision')} weights, "
            + (f"LoRA rank {i['lora_rank']}" if i.get("lora_rank") else "full fine-tune")
            + f", {i.get('optimizer')}, gradient checkpointing {'on' if i.get('gradient_checkpointing') else 'off'}"
            + (f", ramtorch {i['ramtorch_percent']:g}%" if i.get("ramtorch_percent") else "")
            + (f", blocks_to_swap {i['blocks_to_swap']}" if i.get("blocks_to_swap") else "")
            + (", group offload" if i.get("group_offload") else ""))
    big = sorted(((v, k) for k, v in t.components.items()), reverse=True)[:3]
    live = f"; {f(i['in_use_bytes'])} in use now" if "in_use_bytes" in i else ""
    return (f"training uses {f(t.total_bytes)} ({t.source}: {what}; largest: "
            + ", ".join(f"{k} {f(v)}" for v, k in big) + f"{live})")


def cache_build_command(ctx, lv) -> str:
    """The `crepa-mem cache build` line for a cache plan (latents: the trainer's VAE cache folder)."""
    return (f"crepa-mem cache build --latents <your VAE latent cache> --out {FEATURE_CACHE_DIR} --model "
            f"{ctx.model.name} --encoder {lv.encoder} --image-size {lv.image_size} --encoder-dtype {lv.encoder_dtype}")
