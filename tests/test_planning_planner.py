"""The planner: search order, costs, second GPU, budgets, monotonicity, Plan → config/dict."""
from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crepa_mem.planning import estimate as E
from crepa_mem.config import CrepaConfig
from crepa_mem.planning.devices import DeviceInfo, from_size
from crepa_mem.errors import CrepaConfigError, ProfileNotFoundError
from crepa_mem.planning.planner import GPU_TIERS, plan
from crepa_mem.profiles import get_encoder, get_model
from crepa_mem.units import GiB

RAM = 256 * GiB  # host RAM for the swap/stream tiers, fixed so tests do not depend on this machine


def card(gib: float, cuda_index: int | None = None) -> DeviceInfo:
    d = from_size(int(gib * GiB), f"{gib}GiB")
    d.cuda_index = cuda_index
    return d


def run(gib, model="wan-2.1-14b", **kw):
    kw.setdefault("host_ram_bytes", RAM)
    kw.setdefault("teacher_gpus", [])
    kw.setdefault("train_gib", 0)  # the CREPA search alone; the training model has tests of its own
    return plan(model, card(gib), **kw)


def test_room_to_spare_keeps_simpletuners_defaults_resident():
    p = run(16)
    assert p.fits and p.quality_level == 0 and p.step_overhead_s == 0
    assert p.tiers == {"encoder": "gpu", "vae": "gpu"}
    s = p.settings
    assert (s["crepa_encoder"], s["crepa_encoder_image_size"], s["crepa_spatial_align"]) == ("dinov2_vitg14", 518, True)
    assert (s["crepa_encoder_frames_batch_size"], s["crepa_mem_encoder_dtype"], s["crepa_mem_vae_tiling"]) == (-1, "fp32", False)
    assert p.costs == [] and "fits" in p.reasons[3]


def _fits_any_tier(p, **knobs) -> bool:
    """Would a tiers-only candidate (the previous step) with these knobs fit the plan's budget?"""
    enc = get_encoder(p.settings["crepa_encoder"])
    kw = dict(frames=p.shape["frames"], height=p.shape["height"], width=p.shape["width"], batch=p.shape["batch"],
              image_size=p.settings["crepa_encoder_image_size"], encoder_dtype=p.settings["crepa_mem_encoder_dtype"])
    return any(E.estimate(p.model, enc, vae_tier=v, encoder_tier=e, **kw, **knobs).peak_bytes
               <= p.budget["budget_bytes"] for v in GPU_TIERS for e in GPU_TIERS)


def test_tiers_come_first():
    p = run(6, feature_cache=False)  # the cache, with its chunked loss phase, would fit at once
    assert p.fits and p.quality_level == 0 and p.tiers["encoder"] in ("swap", "stream")
    assert p.settings["crepa_encoder_frames_batch_size"] == -1 and not p.settings["crepa_mem_vae_tiling"]
    assert any(c["setting"] == "crepa_mem_encoder_tier" for c in p.costs) and p.step_overhead_s > 0


def test_chunks_when_no_tier_fits_alone():
    p = run(2, model="wan-2.1-1.3b", height=256, width=256, feature_cache=False)  # small frames: the encoder binds
    assert p.fits and p.quality_level == 0 and p.settings["crepa_encoder_frames_batch_size"] > 0
    assert not _fits_any_tier(p)


def test_time_decides_within_a_quality_level_cache_over_tiling():
    p = run(2)  # wan-2.1-14b: without the cache only VAE tiling (+seconds per step) keeps ViT-g/518 fp32
    knobs = dict(frames_per_chunk=1, loss_chunk=1)
    assert _fits_any_tier(p, vae_tiling=True, **knobs) and not _fits_any_tier(p, **knobs)
    assert p.fits and p.quality_level == 0 and p.settings["crepa_mem_feature_cache"]
    assert 0 < p.step_overhead_s < 1.0  # the cache read, against the tiled decode's seconds
    assert p.cache_build_command.startswith("crepa-mem cache build ") and "--encoder dinov2_vitg14" in p.cache_build_command
    assert any(r.startswith("before training, build the cache: crepa-mem cache build") for r in p.reasons)
    assert p.fastest["overhead_s"] <= p.step_overhead_s
    assert any(r.startswith("step time: this plan") for r in p.reasons)


def test_fastest_is_never_slower_than_the_chosen_plan():
    for gib in (3, 5, 6, 16):
        p = run(gib)
        assert p.fastest is not None and p.fastest["overhead_s"] <= p.step_overhead_s + 1e-9
        assert p.fastest["quality_level"] >= p.quality_level


def test_quality_drops_only_when_no_knob_fits():
    p = run(0.7)  # below even the chunked loss phase of level 0 with the cache (≈0.69 GB)
    assert p.fits and p.quality_level > 0
    assert p.settings["crepa_mem_encoder_dtype"] == "bf16"
    assert any("quality" in r and "crepa_encoder" in r for r in p.reasons)


def test_nothing_fits_reports_the_smallest_and_what_it_needs():
    p = run(0.3)
    assert not p.fits and p.settings["crepa_mem_feature_cache"]
    assert p.tiers == {"encoder": "cache", "vae": "cache"}
    assert p.reasons[-1].startswith("nothing fits") and "more free memory" in p.reasons[-1]
    assert p.budget["left_bytes"] < 0
    p.to_config()  # still a valid config


def test_second_gpu_takes_the_teacher_when_it_has_room():
    p = run(6, teacher_gpus=[card(80, cuda_index=1)])
    assert p.fits and p.tiers == {"encoder": "device", "vae": "device"}
    assert p.settings["crepa_mem_teacher_device"] == "cuda:1" and p.teacher_gpu is not None
    q = run(6, teacher_gpus=[card(2, cuda_index=1)])  # too small for the teacher
    assert q.settings["crepa_mem_teacher_device"] is None


def test_without_host_ram_no_cpu_tiers():
    p = run(6, host_ram_bytes=0)
    assert p.tiers["encoder"] not in ("swap", "stream") and p.tiers["vae"] not in ("swap", "stream")


def test_budget_from_free_memory_or_train_gib():
    d = DeviceInfo(index=0, name="NVIDIA GeForce RTX 4090", uuid="GPU-x", total_bytes=24 * GiB, free_bytes=10 * GiB,
                   reserved_bytes=GiB // 2, used_bytes=13 * GiB + GiB // 2, compute_capability="8.9", pcie_gen=4,
                   pcie_width=16, h2d_bytes_per_s=25 * 10**9, bf16_tflops=165.2)
    p = plan("wan", d, host_ram_bytes=RAM, teacher_gpus=[])
    head = int(0.1 * 24 * GiB)
    assert p.budget["train_bytes"] == d.used_bytes and p.budget["budget_bytes"] == 10 * GiB - head
    q = plan("wan", d, train_gib=4, headroom=0.2, host_ram_bytes=RAM, teacher_gpus=[])
    assert q.budget["budget_bytes"] == 24 * GiB - GiB // 2 - 4 * GiB - int(0.2 * 24 * GiB)


def test_plan_dict_has_the_documented_keys_and_is_json():
    d = run(16).to_dict()
    assert {"gpu", "model", "fits", "settings", "tiers", "estimate", "reasons"} <= set(d)
    assert {"total_bytes", "components"} <= set(d["estimate"]) and set(d["tiers"]) == {"encoder", "vae"}
    assert {"crepa_encoder", "crepa_encoder_image_size", "crepa_spatial_align", "crepa_drop_vae_encoder",
            "crepa_encoder_frames_batch_size"} <= set(d["settings"])
    assert json.loads(json.dumps(d)) == d


def test_to_config_applies_the_settings_over_a_base():
    base = CrepaConfig(enabled=True, lambda_=0.3, block_index=12)
    p = run(4, base_config=base)
    c = p.to_config()
    assert c.lambda_ == 0.3 and c.block_index == 12 and c.enabled
    assert (c.encoder_tier, c.vae_tier, c.vae_tiling) == (p.tiers["encoder"], p.tiers["vae"],
                                                          p.settings["crepa_mem_vae_tiling"])
    assert CrepaConfig.from_dict(c.to_dict()) == c
    assert run(16).to_config().block_index == get_model("wan-2.1-14b").recommended_block
    # a config handed over later keeps its own student block (wrap(config=…, plan=…))
    assert run(16).to_config(CrepaConfig(enabled=True, block_index=3)).block_index == 3


def test_forced_options():
    assert run(1, spatial_align=True).settings["crepa_spatial_align"] is True
    p = run(16, encoder="dinov2_vitl14")
    assert p.settings["crepa_encoder"] == "dinov2_vitl14" and p.quality_level == 0
    assert run(16, model=get_model("sanavideo-2b")).model.name == "sanavideo-2b"


@pytest.mark.parametrize("kw, match", [(dict(batch=0), "batch"), (dict(headroom=1.0), "headroom"),
                                       (dict(frames=80), "frames"), (dict(width=830), "width"),
                                       (dict(train_gib=-1), "train_gib")])
def test_bad_input_is_explained(kw, match):
    with pytest.raises(CrepaConfigError, match=match):
        run(16, **kw)


def test_unknown_names():
    with pytest.raises(ProfileNotFoundError, match="wan"):
        run(16, model="wann")
    with pytest.raises(ProfileNotFoundError, match="rtx4090"):
        plan("wan", "rtx4099")


# 10 examples: each plans twice, and a plan whose best is the feature cache (its read is not free) walks every
# lower quality level for the fastest plan that fits (≈1-2.5 s on the shared machine)
@settings(max_examples=10, deadline=None)
@given(a=st.integers(2, 64), b=st.integers(2, 64), model=st.sampled_from(["wan-2.1-14b", "ltxvideo-2b", "wan-2.2-ti2v-5b"]))
def test_more_free_memory_never_lowers_quality(a, b, model):
    small, big = sorted((a / 4, b / 4))
    p, q = run(small, model=model), run(big, model=model)
    assert q.quality_level <= p.quality_level
    assert q.fits or not p.fits


def test_plan_result_is_a_dataclass_with_the_profile():
    p = run(16)
    assert dataclasses.is_dataclass(p) and p.model.name == "wan-2.1-14b" and p.gpu.source == "size"
