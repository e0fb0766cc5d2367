"""crepa_mem.trace.workloads: live-byte counting on a fake GPU, full-size configs, the baseline recipe, the CLI."""
import json

import pytest
import torch
from typer.testing import CliRunner

from crepa_mem.cli.app import app
from crepa_mem.errors import CrepaConfigError
from crepa_mem.profiles import get_encoder, get_vae
from crepa_mem.teacher.path import encode_tokens
from crepa_mem.teacher.placement import module_bytes
from crepa_mem.trace.workloads import (DINOV2_CONFIGS, VAE_CONFIGS, TeacherSettings, Workload, build_encoder, build_vae,
                             compare, trace_baseline, trace_candidate)
from crepa_mem.trace.runtime import FAKE_GPU, fake_gpu, materialize

MiB = 2**20
SMALL = dict(model="wan-2.1-1.3b", frames=9, height=64, width=64, encoder="dinov2_vits14", image_size=56)








@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_configs_have_the_profiles_parameter_counts(name):
    vae = build_vae(name)
    assert next(vae.parameters()).device.type == "meta"
    assert sum(p.numel() for p in vae.parameters()) == get_vae(name).params


@pytest.mark.parametrize("name", [*DINOV2_CONFIGS, *(f"{n}_reg" for n in DINOV2_CONFIGS)])
def test_encoder_configs_have_the_profiles_parameter_counts(name):
    assert sum(p.numel() for p in build_encoder(name).parameters()) == get_encoder(name).params


def test_trace_matches_simpletuner_pr_2258_measurement_within_ten_percent():
    """REFERENCE §1: DINOv2-L, 64 frames at 224 px in one call peaked at 2133 MB, slices of 8 at 1352 MB
    (torch.cuda.max_memory_allocated on a GPU, SimpleTuner PR #2258)."""
    for frames, measured in ((64, 2133e6), (8, 1352e6)):
        enc = build_encoder("dinov2_vitl14")
        with fake_gpu() as b:
            materialize(enc, FAKE_GPU)
            encode_tokens(enc, torch.empty(frames, 3, 224, 224, device=FAKE_GPU))
            error = b.peak_bytes() / measured - 1
            print(f"\nPR #2258, {'one call' if frames == 64 else 'slices of 8'}: traced {b.peak_bytes() / 1e6:.0f} MB, "
                  f"measured {measured / 1e6:.0f} MB ({error:+.1%})")  # the README's figures (run with -s)
            assert abs(error) < 0.10


def test_baseline_holds_fp32_encoder_and_vae_and_all_frames():
    w = Workload(**SMALL)
    base = trace_baseline(w)
    enc_bytes = get_encoder("dinov2_vits14").params * 4
    vae_bytes = get_vae("wan-2.1").params * 2
    projector = 3 * (2 * 1536 + 1536 * 384 + 384) * 4  # fp32 weights and Adam's two states, Wan 1.3B → ViT-S
    assert base.weights_bytes == enc_bytes + vae_bytes + projector
    assert base.peak_bytes > base.weights_bytes
    same = trace_candidate(w, TeacherSettings())  # same tiers, but select-then-encode in chunks of all
    assert same.weights_bytes == base.weights_bytes and same.peak_bytes <= base.peak_bytes


def test_feature_cache_whole_call_peak_equals_a_hand_count():
    """No teacher weights: the peak is the loss phase, at the projector's Linear backward (P = N tokens, so
    nothing is resampled; fp32 features, so no cast)."""
    for kw in (SMALL, dict(SMALL, frames=17, encoder="dinov2_vitb14", batch=2)):
        w = Workload(**kw)
        s, p = w.shapes(), w.profile()
        d, e = p.hidden_size, get_encoder(w.encoder).hidden_size
        rows = w.batch * s["dit_frames"] * p.tokens_per_frame(w.height, w.width)  # projected tokens
        projector = (2 * d + d * e + e) * 4
        latents = w.batch * s["latent_channels"] * s["latent_frames"] * s["latent_height"] * s["latent_width"] * 4
        feats = w.batch * s["dit_frames"] * s["encoder_tokens"] * e * 4
        hand = (3 * projector              # weights + Adam's exp_avg and exp_avg_sq, resident
                + latents + feats          # the caller's latents, the cached features
                + 3 * rows * d * 4         # fp32 hidden copy, LayerNorm output (both saved), grad of the latter
                + 2 * rows * 4             # LayerNorm's saved mean and rstd
                + (d * e + e) * 4          # the Linear's weight and bias gradients
                + 2 * 4)                   # the loss and backward's seed gradient (0-d fp32)
        r = trace_candidate(w, TeacherSettings(feature_cache=True))
        assert r.peak_bytes == r.loss_peak_bytes == hand
        assert r.teacher_peak_bytes == 3 * projector + latents + feats and r.weights_bytes == 3 * projector


def test_swap_has_no_resident_weights_and_stream_counts_a_prefetched_block():
    w = Workload(**SMALL)
    swap = trace_candidate(w, TeacherSettings(encoder_tier="swap", vae_tier="swap"))
    enc, vae = module_bytes(build_encoder("dinov2_vits14")), get_vae("wan-2.1").params * 2
    gpu = trace_candidate(w, TeacherSettings())
    # the teacher decodes, releases the VAE, then encodes: a swap tier holds one component at a time
    projector = 3 * (2 * 1536 + 1536 * 384 + 384) * 4
    assert swap.weights_bytes == projector and max(enc, vae) < swap.peak_bytes < min(enc + vae, gpu.peak_bytes)
    stream = trace_candidate(w, TeacherSettings(encoder_tier="stream", vae_tier="stream", chunk=1))
    assert stream.weights_bytes - projector < MiB and stream.prefetch_bytes > 0
    assert stream.peak_bytes < swap.peak_bytes


def test_ramtorch_stream_window_and_resident_chunks_are_measured():
    from crepa_mem.teacher.ramtorch_engine import chunk_bytes

    w = Workload(**SMALL)
    sizes = chunk_bytes(build_encoder("dinov2_vits14"))  # embeddings, 12 layers, layernorm
    ram = trace_candidate(w, TeacherSettings(encoder_tier="stream", vae_tier="swap", chunk=1, stream_engine="ramtorch"))
    projector = 3 * (2 * 1536 + 1536 * 384 + 384) * 4  # the whole call's: projector and Adam's two states
    assert ram.prefetch_bytes == 0 and ram.weights_bytes == projector  # the window is in the measured peak
    pinned = trace_candidate(w, TeacherSettings(encoder_tier="stream", vae_tier="swap", chunk=1,
                                                stream_engine="ramtorch", resident_chunks=4))
    assert pinned.weights_bytes == projector + sum(sizes[i] for i in (0, 3, 7, 10))  # RamTorch's evenly spaced 4 of 14
    assert pinned.peak_bytes >= ram.peak_bytes


def test_mid_size_ratios():
    """Encoder-heavy clip (17 frames, ViT-B at 224): streaming both components one frame at a time is
    several times below SimpleTuner's recipe, and the feature cache is far below."""
    w = Workload(model="wan-2.1-1.3b", frames=17, height=64, width=112, encoder="dinov2_vitb14", image_size=224)
    frugal = TeacherSettings(encoder_tier="stream", vae_tier="stream", chunk=1, drop_vae_encoder=True)
    r = compare(w, frugal)
    assert set(r) == {"baseline", "candidate", "ratio"} and r["candidate"]["settings"] == frugal.to_dict()
    assert r["ratio"] >= 4
    cache = trace_candidate(w, TeacherSettings(feature_cache=True))
    # the whole call: without teacher weights the loss phase (projector, its Adam states and backward) sets it
    assert cache.peak_bytes == cache.loss_peak_bytes > cache.teacher_peak_bytes
    assert r["baseline"]["peak_bytes"] / cache.peak_bytes >= 25


def test_settings_and_workload_validate_with_one_line_errors():
    with pytest.raises(CrepaConfigError, match="crepa_mem_encoder_tier"):
        TeacherSettings(encoder_tier="ram")
    with pytest.raises(CrepaConfigError, match="chunk"):
        TeacherSettings(chunk=0)
    with pytest.raises(CrepaConfigError, match="frames"):
        Workload(model="wan-2.1-1.3b", frames=10, height=64, width=64)


# ---------------------------------------------------------------------------- CLI
ARGS = ["trace", "--model", "wan-2.1-1.3b", "--frames", "9", "--height", "64", "--width", "64",
        "--encoder", "dinov2_vits14", "--image-size", "70"]  # the smallest size the one image-size rule (≥ 64) allows


def test_cli_json_prints_exactly_the_report():
    res = CliRunner().invoke(app, [*ARGS, "--encoder-tier", "swap", "--chunk", "2", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(report) == {"baseline", "candidate", "ratio"}
    side = {"peak_bytes", "teacher_peak_bytes", "loss_peak_bytes", "phase_peak_bytes", "h2d_bytes"}
    assert set(report["baseline"]) == side and set(report["candidate"]) == side | {"settings"}
    assert set(report["candidate"]["h2d_bytes"]) == {"vae", "encoder"}
    assert set(report["candidate"]["phase_peak_bytes"]) == {"decode", "encode", "loss"}
    assert max(report["candidate"]["phase_peak_bytes"].values()) <= report["candidate"]["peak_bytes"]
    assert report["candidate"]["peak_bytes"] == max(report["candidate"]["teacher_peak_bytes"],
                                                    report["candidate"]["loss_peak_bytes"])
    assert report["candidate"]["settings"]["encoder_tier"] == "swap" and report["candidate"]["settings"]["chunk"] == 2
    assert report["ratio"] == pytest.approx(report["baseline"]["peak_bytes"] / report["candidate"]["peak_bytes"])


def test_cli_human_output_and_feature_cache():
    res = CliRunner().invoke(app, [*ARGS, "--feature-cache"])
    assert res.exit_code == 0, res.output
    assert "baseline" in res.stdout and "ratio" in res.stdout and "feature_cache=True" in res.stdout


@pytest.mark.parametrize("extra,needle", [
    (["--encoder-tier", "cache"], "--feature-cache"),
    (["--vae-tier", "disk"], "--vae-tier"),
    (["--chunk", "0"], "--chunk"),
    (["--image-size", "40"], "≥ 64"),  # the one rule: CrepaConfig's (500 works, with a note)
    (["--frames", "10"], "--frames 10"),
    (["--frames", "0"], "--frames 0"),  # 0 is bad input, not "the default"
    (["--height", "0"], "--height 0"),
])
def test_cli_bad_input_is_one_line_and_exit_2(extra, needle):
    res = CliRunner().invoke(app, [*ARGS, *extra])
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output


@pytest.mark.parametrize("tile, size", [(None, 320), (64, 128)])  # the default 256 px tile, a small one: both tile
def test_progress_total_counts_the_tiled_decoder_calls(tile, size):
    from crepa_mem.trace.workloads import expected_steps

    w = Workload(model="wan-2.1-1.3b", frames=5, height=size, width=size, encoder="dinov2_vits14", image_size=56)
    settings = TeacherSettings(vae_tiling=True, vae_tile_size=tile, chunk=1)
    calls = []
    trace_baseline(w, progress=calls.append)
    trace_candidate(w, settings, progress=calls.append)
    assert calls.count("decode") > 2 * w.shapes()["latent_frames"]  # tiles are decoder calls of their own
    assert len(calls) == expected_steps(w, settings)


def test_cli_unknown_model_suggests_names():
    res = CliRunner().invoke(app, ["trace", "--model", "wan-2.1-13b"])
    assert res.exit_code == 2 and "did you mean" in res.stderr
