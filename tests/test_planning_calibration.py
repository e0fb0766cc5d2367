"""crepa_mem.planning.estimate against crepa_mem.trace.workloads on a fast subset of estimate.calibration_cases() (±10 %).

The whole matrix (all cases) is benchmarks/calibration_matrix.py (29 cases, worst |error| 8.3 %).
"""
import pytest

from crepa_mem.planning.calibration import calibration_cases, estimate_case
from crepa_mem.planning.estimate import teacher_peak
from crepa_mem.trace.workloads import TeacherSettings, Workload, trace_candidate

TOLERANCE = 0.10
# A fast subset (a few seconds each) spanning the VAE families and the tiers gpu / swap.
FAST = [1, 9, 13, 14, 19]  # swap encoder (Wan), swap VAE (Wan 2.2, LTX, K5), LTX under tiling


def _trace(case: dict) -> int:
    chunk = case.get("frames_per_chunk")
    w = Workload(model=case["model"], frames=case["frames"], height=case["height"], width=case["width"],
                 encoder=case["encoder"], image_size=case["image_size"], vae_dtype=case.get("vae_dtype", "bf16"))
    s = TeacherSettings(encoder_tier=case["encoder_tier"], vae_tier=case["vae_tier"],
                        chunk=chunk if chunk and chunk > 0 else None, encoder_dtype=case["encoder_dtype"],
                        vae_tiling=case.get("vae_tiling", False), drop_vae_encoder=case.get("drop_vae_encoder", False))
    return trace_candidate(w, s).teacher_peak_bytes


def test_there_are_enough_cases():
    cases = calibration_cases()
    assert len(cases) >= 24
    assert {c["model"] for c in cases} >= {"wan-2.1-1.3b", "wan-2.2-ti2v-5b", "ltxvideo-2b", "kandinsky5-video-lite"}


@pytest.mark.parametrize("index", FAST)
def test_estimate_within_ten_percent_of_trace(index):
    case = calibration_cases()[index]
    traced = _trace(case)
    estimated = teacher_peak(estimate_case(case))
    assert abs(estimated / traced - 1) <= TOLERANCE, f"case {index}: estimate {estimated} vs trace {traced}"
