"""The pure memory model: exact bytes on hand-computable shapes, tier and knob effects, phase overlap."""
from __future__ import annotations

import pytest

from crepa_mem.planning import estimate as E
from crepa_mem.planning.calibration import calibration_cases, estimate_case
from crepa_mem.errors import CrepaConfigError
from crepa_mem.profiles import get_encoder, get_model
from crepa_mem.units import GiB, MB, MiB

WAN14 = get_model("wan-2.1-14b")
G = get_encoder("dinov2_vitg14")
SHAPE = dict(frames=81, height=480, width=832)


def est(model=WAN14, encoder=G, **kw):
    return E.estimate(model, encoder, **{**SHAPE, **kw})


def test_exact_terms_on_the_reference_workload():
    e = est(encoder_dtype="bf16")
    c = e.components
    assert e.inputs["latent_frames"] == 21 and e.inputs["dit_tokens_per_frame"] == 1560
    assert c["projector"] == (2 * 5120 + 5120 * 1536 + 1536) * 16  # fp32 weight + grad + 2 Adam states
    assert c["encoder_weights"] == G.params * 2
    assert c["vae_weights"] == (WAN14.vae.params_encoder + WAN14.vae.params_decoder) * 2
    assert c["features"] == 21 * 1369 * 1536 * 2  # REFERENCE §6: 21 frames bf16 ≈ 88 MB
    assert c["features"] == pytest.approx(88 * MB, rel=0.01)
    rows, aligned = 21 * 1560, 21 * 1369 * 1536 * 4  # projected rows; y, the aligned fp32 features
    # the forward at its peak: fp32 copy, LayerNorm and Linear outputs, projected side resampled and normalised, y + a product
    assert c["loss_activations"] == 2 * rows * 5120 * 4 + rows * 1536 * 4 + 4 * aligned
    assert c["features_fp32"] == aligned  # the bf16 features, cast (the bf16 copy is freed)
    assert "decoded_video" not in c and "decoded_tile" not in c  # Wan: a latent frame per call, kept frames only
    assert c["vae_decode_cache"] + c["vae_decode_activations"] == E.vae_decode_activation_bytes(
        WAN14.vae, 81, 480, 832, tiling=False, dtype="bf16")
    assert c["selected_frames"] == 21 * 3 * 480 * 832 * 2
    tiled = est(encoder_dtype="bf16", vae_tiling=True, vae_tier="stream").components
    # the tile being decoded (its kept frames) and the 64-px strips its neighbours blend with; the cache on the host
    cache = E.vae_cache_bytes(WAN14.vae, 480, 832, "bf16", tiling=True)
    assert tiled["decoded_tile"] == 21 * 3 * (256 * 256 + 64 * (832 + 256)) * 2
    assert tiled["vae_decode_cache"] == int(cache * E.CALIBRATION["vae_cache_in_flight_tiled"])  # the rest: host
    assert tiled["vae_decode_activations"] == E.vae_decode_activation_bytes(
        WAN14.vae, 81, 480, 832, tiling=True, dtype="bf16") - cache
    ltx = est(model=get_model("ltxvideo-2b"), frames=161, height=512, width=704).components
    assert ltx["decoded_video"] == 161 * 3 * 512 * 704 * 2 and "vae_decode_cache" not in ltx  # one call
    assert c["encoder_activations"] == 21 * 1370 * (4 * 1536 + 3 * 4096) * 2


def test_calibration_anchors_from_the_reference():
    # ViT-g, bf16, 518 px, no grad: ≈ 49 MiB of activations per frame (REFERENCE §3)
    assert E.encoder_activation_bytes(G, 518, 1, "bf16") == pytest.approx(49 * MiB, rel=0.05)
    # Wan 2.1 decodes one latent frame at a time: ≈3.5 GiB bf16 at 480×832 (cache included), whatever the length
    for frames in (5, 81):
        act = E.vae_decode_activation_bytes(WAN14.vae, frames, 480, 832, tiling=False, dtype="bf16")
        assert 3.4 * GiB <= act <= 3.7 * GiB


def test_peak_is_resident_plus_the_largest_phase():
    e = est()
    resident = sum(t.bytes for t in e.terms if t.phase == "resident")
    for phase in E.PHASES:
        alive = resident + sum(t.bytes for t in e.terms if phase in t.phase.split("+"))
        assert e.phase_bytes[phase] == alive
    assert e.peak_bytes == max(e.phase_bytes[p] for p in E.PHASES) == e.phase_bytes[e.peak_phase]
    assert e.peak_bytes < sum(t.bytes for t in e.terms)  # phases do not all overlap
    assert e.to_dict()["total_bytes"] == e.peak_bytes


def phase_of(e, name):
    return [t.phase for t in e.terms if t.name == name]


def test_encoder_tiers():
    enc_w = G.params * 4
    gpu, swap, stream = (est(encoder_tier=t) for t in ("gpu", "swap", "stream"))
    assert phase_of(gpu, "encoder_weights") == ["resident"]
    # swap: on the GPU for the encode phase only (the teacher decodes first, then brings the encoder in)
    assert phase_of(swap, "encoder_weights") == ["encode"] and swap.components["encoder_weights"] == enc_w
    assert gpu.phase_bytes["loss"] - swap.phase_bytes["loss"] == enc_w
    assert gpu.phase_bytes["decode"] - swap.phase_bytes["decode"] == enc_w
    assert gpu.phase_bytes["encode"] == swap.phase_bytes["encode"]
    assert stream.components["encoder_weights"] == 2 * E.encoder_layer_params(G) * 4  # window of two layers
    assert phase_of(stream, "encoder_weights") == ["encode"]
    assert gpu.phase_bytes["decode"] - stream.phase_bytes["decode"] == enc_w  # not alive while the VAE decodes
    for tier in ("device", "cache"):
        e = est(encoder_tier=tier)
        assert "encoder_weights" not in e.components and "encoder_activations" not in e.components
        assert e.components["features"] == 21 * 1369 * 1536 * 4  # features still reach the training GPU


def test_vae_tiers_tiling_and_drop():
    gpu, swap, dev = (est(vae_tier=t) for t in ("gpu", "swap", "device"))
    # every encode runs after the VAE's active() block, chunked or not: a swapped VAE is gone by then
    assert swap.phase_bytes["encode"] == gpu.phase_bytes["encode"] - gpu.components["vae_weights"]
    assert phase_of(est(vae_tier="swap", frames_per_chunk=4), "vae_weights") == ["decode"]
    assert "vae_decode_activations" not in dev.components and "vae_weights" not in dev.components
    dropped = est(drop_vae_encoder=True)
    assert gpu.components["vae_weights"] - dropped.components["vae_weights"] == WAN14.vae.params_encoder * 2
    tiled = est(vae_tiling=True)
    assert tiled.components["vae_decode_activations"] + tiled.components["vae_decode_cache"] == int(1296 * 4 * 256 * 256) * 2
    transient = lambda e: e.phase_bytes["decode"] - e.phase_bytes["resident"]
    assert transient(tiled) < transient(gpu) / 3


def test_chunks_scale_encoder_activations():
    one = est(frames_per_chunk=1).components["encoder_activations"]
    assert est(frames_per_chunk=7).components["encoder_activations"] == 7 * one
    assert est(frames_per_chunk=-1).components["encoder_activations"] == 21 * one
    assert est(frames_per_chunk=100).components["encoder_activations"] == 21 * one
    # the decode finishes (and Wan's causal cache is freed) before the first chunk is encoded; all 21
    # selected frames are kept from the decode into the encode, chunked or not
    assert phase_of(est(frames_per_chunk=4), "vae_decode_cache") == ["decode"]
    assert phase_of(est(), "vae_decode_cache") == ["decode"]
    assert est(frames_per_chunk=4).components["selected_frames"] == 21 * 3 * 480 * 832 * 2


def test_decode_scaling_differs_by_family():
    ltx, k5 = get_model("ltxvideo-2b"), get_model("kandinsky5-video-lite")
    act = lambda m, f: E.vae_decode_activation_bytes(m.vae, f, 512, 704, tiling=False, dtype="bf16")
    assert act(ltx, 161) == pytest.approx(act(ltx, 81) * 161 / 81, rel=1e-6)  # LTX: all frames at once
    assert act(WAN14, 161) == act(WAN14, 81)  # Wan: one latent frame at a time
    assert act(k5, 161) == act(k5, 17) > act(k5, 5)  # HunyuanVideo: temporal tiles of 17 frames


def test_spatial_align_off_pools_in_the_loss():
    on, off = est(), est(spatial_align=False)
    assert off.components["features"] == on.components["features"]  # the teacher returns every token
    assert off.components["loss_activations"] < on.components["loss_activations"]
    assert off.components["loss_activations"] >= 3 * 21 * 1560 * 5120 * 4  # the projector still sees every token


def test_batch_and_smaller_encoders():
    assert est(batch=2).components["loss_activations"] == 2 * est().components["loss_activations"]
    s = get_encoder("dinov2_vits14")
    assert est(encoder=s, image_size=224).components["features"] == 21 * 256 * 384 * 4
    assert est(encoder=s).peak_bytes < est().peak_bytes


def test_teacher_bytes_exclude_the_training_side():
    full = est(encoder_tier="swap", vae_tier="stream")
    teacher = E.teacher_peak(full)
    assert teacher <= full.peak_bytes  # the teacher's phases without the loss-side terms
    no_loss = [t for t in full.terms if t.name not in E.LOSS_TERMS]
    assert teacher == max(sum(t.bytes for t in no_loss if t.alive_in(p)) for p in E.PHASES)
    need = E.teacher_bytes(WAN14, G, **SHAPE)  # on another GPU: both modules resident there
    assert need >= G.params * 4 + E.vae_weight_bytes(WAN14.vae, "bf16", False)


def test_calibration_cases_span_the_axes():
    cases = calibration_cases()
    assert len(cases) >= 24
    for axis in ("model", "encoder", "image_size", "encoder_tier", "vae_tier", "frames_per_chunk"):
        assert len({c[axis] for c in cases}) >= 2
    assert all(estimate_case(c).peak_bytes > 0 for c in cases)


def test_bad_inputs():
    with pytest.raises(CrepaConfigError, match="crepa_mem_encoder_tier"):
        est(encoder_tier="cpu")
    with pytest.raises(CrepaConfigError, match="frames"):
        est(frames=80)


def test_flops_anchor():
    # REFERENCE §6: ≈ 3.0 TFLOP per frame for the matmuls; attention adds ~0.5
    assert 3.0e12 <= E.encoder_flops_per_frame(G, 518) <= 3.7e12


def test_chunked_loss_phase_and_h2d_per_step():
    whole, chunked = est(encoder_tier="cache", vae_tier="cache"), est(encoder_tier="cache", vae_tier="cache", loss_chunk=1)
    assert chunked.phase_bytes["loss"] < whole.phase_bytes["loss"] / 2 and "loss_activations" not in chunked.components
    assert chunked.components["hidden_grad"] == 21 * 1560 * 5120 * 2  # bf16, written chunk by chunk
    stream = est(encoder_tier="stream", vae_tier="stream", vae_tiling=True, frames_per_chunk=1)
    # the encoder once per step (layer-major); Wan's decoder once per latent frame and tile (3 × 5 tiles at
    # 480×832), and its causal cache back from the host for every call after a tile's first
    cache = E.vae_cache_traffic_bytes(WAN14.vae, latent_frames=21, height=480, width=832, vae_dtype="bf16", tiling=True)
    assert stream.h2d == {"encoder": G.params * 4, "vae": WAN14.vae.params_decoder * 2 * 21 * 15 + cache}
    tile_pixels = (256 + 256 + 96) * (256 * 4 + 64)  # rows 0/192/384, columns 0…768: edge tiles are smaller
    assert E.tile_area_sum(WAN14.vae, 480, 832, True) == tile_pixels
    assert cache == int(1.03 * 592 * 4 * 2 * tile_pixels * 19.5)
    assert est(encoder_tier="swap", vae_tier="swap").h2d == {"encoder": G.params * 4,
                                                             "vae": E.vae_weight_bytes(WAN14.vae, "bf16", False)}
    assert est().h2d == {"encoder": 0, "vae": 0} and est().to_dict()["h2d_bytes"] == est().h2d


def test_features_bytes_count_the_clip_wherever_it_waits():
    """A cache's features are read per step even where the chunked loss keeps them off the GPU."""
    cached = est(encoder_tier="cache", vae_tier="cache", loss_chunk=1)
    assert "features" not in cached.components
    assert E.features_bytes(cached) == E.features_bytes(est()) == 21 * 1369 * 1536 * 4
    assert E.features_bytes(est(encoder_dtype="bf16", batch=2)) == 2 * 21 * 1369 * 1536 * 2
