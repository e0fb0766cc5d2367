"""crepa_mem.estimate against crepa_mem.trace on a fast subset of estimate.calibration_cases() (±10 %).

The whole matrix (all cases) is benchmarks/calibration_matrix.py. Cases marked xfail(strict) are off
today for a known reason (reported to whoever owns estimate.py); once the estimate is refitted they
XPASS, which fails the run so the mark gets removed.
"""
import pytest

from crepa_mem.estimate import calibration_cases, estimate_case, teacher_peak
from crepa_mem.trace import TeacherSettings, Workload, trace_candidate

TOLERANCE = 0.10
# A fast subset (a few seconds each) spanning the VAE families and the tiers gpu / swap.
FAST = {9: None, 14: None, 19: None,
        1: "the estimate keeps the swapped encoder and Wan's causal cache alive through both phases; "
           "the teacher now decodes, releases the VAE, then brings the encoder in",
        13: "LTX under enable_tiling() decodes each 512-px tile over all frames at about the untiled "
            "per-pixel cost; the estimate's tiled constant is lower"}


def _trace(case: dict) -> int:
    chunk = case.get("frames_per_chunk")
    w = Workload(model=case["model"], frames=case["frames"], height=case["height"], width=case["width"],
                 encoder=case["encoder"], image_size=case["image_size"], vae_dtype=case.get("vae_dtype", "bf16"))
    s = TeacherSettings(encoder_tier=case["encoder_tier"], vae_tier=case["vae_tier"],
                        chunk=chunk if chunk and chunk > 0 else None, encoder_dtype=case["encoder_dtype"],
                        vae_tiling=case.get("vae_tiling", False), drop_vae_encoder=case.get("drop_vae_encoder", False))
    return trace_candidate(w, s).peak_bytes


def test_there_are_enough_cases():
    cases = calibration_cases()
    assert len(cases) >= 24
    assert {c["model"] for c in cases} >= {"wan-2.1-1.3b", "wan-2.2-ti2v-5b", "ltxvideo-2b", "kandinsky5-video-lite"}


@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.xfail(strict=True, reason=why)) if why else i
                                   for i, why in FAST.items()])
def test_estimate_within_ten_percent_of_trace(index):
    case = calibration_cases()[index]
    traced = _trace(case)
    estimated = teacher_peak(estimate_case(case))
    assert abs(estimated / traced - 1) <= TOLERANCE, f"case {index}: estimate {estimated} vs trace {traced}"
