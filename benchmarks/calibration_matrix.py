"""crepa_mem.planning.estimate (analytic) against crepa_mem.trace.workloads (measured on fake tensors), case by case.

    python benchmarks/calibration_matrix.py            # every calibration.calibration_cases() entry (≥ 24)
    python benchmarks/calibration_matrix.py --only 0 3 # some of them

For each case: the teacher-step peak on the compute device as estimate.teacher_peak() predicts it and
as the trace measures it through the real teacher path, and the error (estimate / trace − 1). The
estimate is within calibration when |error| ≤ 10 % (tests/test_calibration.py checks a fast subset).
"""
from __future__ import annotations

import argparse
import json
import time

from crepa_mem.planning.calibration import calibration_cases, estimate_case
from crepa_mem.planning.estimate import teacher_peak
from crepa_mem.trace.workloads import TeacherSettings, Workload, trace_candidate
from crepa_mem.units import format_bytes

TOLERANCE = 0.10


def workload_and_settings(case: dict) -> tuple[Workload, TeacherSettings]:
    """The trace's description of one estimate() keyword set."""
    chunk = case.get("frames_per_chunk")
    w = Workload(model=case["model"], frames=case["frames"], height=case["height"], width=case["width"],
                 encoder=case["encoder"], image_size=case.get("image_size", 518), batch=case.get("batch", 1),
                 vae_dtype=case.get("vae_dtype", "bf16"))
    s = TeacherSettings(encoder_tier=case.get("encoder_tier", "gpu"), vae_tier=case.get("vae_tier", "gpu"),
                        chunk=chunk if chunk and chunk > 0 else None, encoder_dtype=case.get("encoder_dtype", "fp32"),
                        vae_tiling=case.get("vae_tiling", False), drop_vae_encoder=case.get("drop_vae_encoder", False))
    return w, s


def compare_case(case: dict) -> dict:
    w, s = workload_and_settings(case)
    traced = trace_candidate(w, s)
    estimated = teacher_peak(estimate_case(case))
    return {"case": case, "estimate_bytes": estimated, "trace_bytes": traced.teacher_peak_bytes,
            "error": estimated / traced.teacher_peak_bytes - 1.0, "trace_s": traced.wall_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=int, nargs="*", help="case indices to run (default: all)")
    ap.add_argument("--json", action="store_true", help="one JSON object per case instead of the table")
    args = ap.parse_args()
    cases = calibration_cases()
    picked = args.only if args.only else range(len(cases))
    t0, worst = time.perf_counter(), 0.0
    if not args.json:
        print(f"{'#':>2} {'model':22s} {'encoder':14s} {'S':>4s} {'dtype':5s} {'enc':6s} {'vae':6s} {'chunk':>5s} "
              f"{'tile':4s} {'estimate':>11s} {'trace':>11s} {'error':>7s}")
    for i in picked:
        row = compare_case(cases[i])
        worst = max(worst, abs(row["error"]))
        c = row["case"]
        if args.json:
            print(json.dumps({"index": i, **row}), flush=True)
            continue
        chunk = c.get("frames_per_chunk") if c.get("frames_per_chunk", -1) > 0 else "all"
        flag = "" if abs(row["error"]) <= TOLERANCE else "  <-- outside ±10 %"
        print(f"{i:2d} {c['model']:22s} {c['encoder']:14s} {c['image_size']:4d} {c['encoder_dtype']:5s} "
              f"{c['encoder_tier']:6s} {c['vae_tier']:6s} {chunk!s:>5s} {'yes' if c.get('vae_tiling') else 'no':4s} "
              f"{format_bytes(row['estimate_bytes']):>11s} {format_bytes(row['trace_bytes']):>11s} "
              f"{row['error']:+7.1%}{flag}", flush=True)
    if not args.json:
        print(f"worst |error| {worst:.1%} over {len(list(picked))} cases; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
