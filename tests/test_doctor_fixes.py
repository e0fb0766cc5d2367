"""Fixes: the --gpu of a plan command, the training estimate, fragmentation, the planner behind OOM fixes."""
from __future__ import annotations

from pathlib import Path

import pytest

from crepa_mem.doctor.diagnose import Context
from crepa_mem.doctor.fixes import (config_lines, fragmented, gpu_argument, plan_fix, teacher_resident_bytes,
                                      train_estimate)
from crepa_mem.doctor.logs import findings_from_scan, scan_log
from crepa_mem.profiles import get_encoder, get_model
from crepa_mem.units import GiB, MiB

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"


@pytest.mark.parametrize("reported_gib, expected", [
    (23.53, "23.53GiB"),   # rtx3090 and rtx4090 both match: the size itself
    (31.36, "rtx5090"),    # exactly one catalog card
    (139.81, "h200"),
    (79.19, "79.19GiB"),   # a100-80gb, h100-pcie, h100-sxm
    (44.39, "44.39GiB"),   # l40s and a40 (both 46068 MiB)
    (15.99, "rtx4080"),
    (10.0, "10GiB"),       # no catalog card
])
def test_gpu_argument(reported_gib, expected):
    assert gpu_argument(int(reported_gib * GiB), None) == expected


def test_gpu_argument_falls_back_to_the_flag():
    assert gpu_argument(None, "rtx4090") == "rtx4090"
    assert gpu_argument(None, None) is None


def test_fragmented_thresholds():
    base = {"total_bytes": 24 * GiB, "free_bytes": 100 * MiB, "tried_bytes": 2 * GiB}
    assert not fragmented({**base, "reserved_unallocated_bytes": 900 * MiB})  # under 1 GiB
    assert not fragmented({**base, "reserved_unallocated_bytes": int(1.1 * GiB)})  # under 5 % of 24 GiB
    assert fragmented({**base, "reserved_unallocated_bytes": 2 * GiB})  # 2 GiB + free covers the request
    assert not fragmented({**base, "tried_bytes": 8 * GiB, "reserved_unallocated_bytes": 2 * GiB})
    assert fragmented({**base, "tried_bytes": 20 * GiB, "reserved_unallocated_bytes": 5 * GiB})  # > 20 % idle
    assert not fragmented({"reserved_unallocated_bytes": 5 * GiB})  # no total: cannot judge
    big_card = {"total_bytes": 140 * GiB, "free_bytes": 2 * GiB, "tried_bytes": 3 * GiB}
    assert fragmented({**big_card, "reserved_unallocated_bytes": int(3.5 * GiB)})  # the cache held the request
    assert not fragmented({**big_card, "tried_bytes": 9 * GiB, "reserved_unallocated_bytes": int(3.5 * GiB)})


def test_teacher_resident_and_train_estimate():
    m = get_model("wan-2.1-14b")
    vitg = get_encoder("dinov2_vitg14").params
    ctx = Context(model=m)
    assert teacher_resident_bytes(ctx) == vitg * 4 + m.vae.params * 2  # SimpleTuner: fp32 DINOv2 + VAE
    streamed = Context(model=m, config={"crepa_mem_encoder_tier": "stream", "crepa_mem_vae_tier": "swap"})
    assert teacher_resident_bytes(streamed) == 0
    oom = {"process_bytes": 20 * GiB, "tried_bytes": 2 * GiB, "phase": "encoder"}
    assert train_estimate(oom, ctx) == 20 * GiB - teacher_resident_bytes(ctx)
    assert train_estimate({**oom, "phase": "transformer"}, streamed) == 22 * GiB  # the DiT needed at least that
    assert train_estimate({"allocated_bytes": 10 * GiB, "reserved_unallocated_bytes": GiB}, streamed) == 11 * GiB
    assert train_estimate({"total_bytes": 24 * GiB, "free_bytes": 4 * GiB}, streamed) == 20 * GiB
    assert train_estimate({"wording": "bare"}, ctx) is None


def test_plan_fix_without_a_model_asks_for_one():
    out = plan_fix(Context(), "rtx4090")
    assert out["command"] is None and "--model" in out["text"]


def test_plan_fix_runs_the_planner_for_that_gpu_and_training():
    pytest.importorskip("crepa_mem.planning.estimate")
    ctx = Context(model=get_model("wan-2.1-1.3b"))
    out = plan_fix(ctx, "23.53GiB", train_bytes=16 * GiB)
    assert out["command"] == ("crepa-mem plan --model wan-2.1-1.3b --gpu 23.53GiB --frames 81 --height 480 "
                              "--width 832 --train-gib 16")
    from crepa_mem.planning.planner import plan
    expected = plan("wan-2.1-1.3b", "23.53GiB", frames=81, height=480, width=832, train_gib=16.0)
    assert out["fits"] is expected.fits and out["settings"] == expected.settings
    if expected.fits:
        assert config_lines(expected.settings) in out["text"]
    full = plan_fix(ctx, "23.53GiB", train_bytes=23 * GiB)  # nothing left for CREPA
    assert full["fits"] is False and "does not fit" in full["text"]


def test_plan_fix_reports_a_planner_refusal():
    pytest.importorskip("crepa_mem.planning.estimate")
    out = plan_fix(Context(model=get_model("wan-2.1-1.3b"), frames=80), "rtx4090")
    assert out["fits"] is None and "frames" in out["plan_error"] and out["command"] in out["text"]


def test_oom_finding_carries_the_plan_and_its_settings():
    pytest.importorskip("crepa_mem.planning.estimate")
    ctx = Context(model=get_model("wan-2.1-1.3b"))
    (oom,) = [f for f in findings_from_scan(scan_log(FIXTURES / "oom_vae_decode_wan_rtx4090.log"), ctx)
              if f.code == "oom"]
    assert oom.details["plan_command"].startswith("crepa-mem plan --model wan-2.1-1.3b --gpu 23.53GiB")
    assert oom.details["train_bytes"] == int(22.40 * GiB) - teacher_resident_bytes(ctx)
    if oom.details["plan_fits"]:
        assert oom.details["settings"]["crepa_enabled"] is True
        assert '"crepa_encoder"' in oom.fix


def test_config_lines_leave_out_unset_values():
    assert config_lines({"crepa_lambda": 0.5, "crepa_mem_feature_cache": None, "crepa_spatial_align": False}) == (
        '  "crepa_lambda": 0.5,\n  "crepa_spatial_align": false')


def test_every_phase_has_words_and_advice():
    from crepa_mem.doctor.diagnose import PHASES
    from crepa_mem.doctor.fixes import _PHASE_ADVICE, _PHASE_WORDS
    assert set(_PHASE_WORDS) == set(_PHASE_ADVICE) == set(PHASES)
