"""Compute-device peak of the whole CREPA call for a matrix of tier settings on one workload.

    python benchmarks/trace_matrix.py                       # the reference workload (REFERENCE §6)
    python benchmarks/trace_matrix.py --model wan-2.1-1.3b --frames 21 --height 240 --width 416 --quick

Prints one row per configuration: the whole call's peak on the (fake) GPU (teacher step, then the loss
phase: projection, alignment, backward), the ratio to SimpleTuner's recipe, the teacher and loss phases
apart, the host → device bytes per step, and the trace's own wall time. Every figure is measured by `crepa_mem.trace.workloads` when this runs.
"""
from __future__ import annotations

import argparse
import sys
import time

from crepa_mem.trace.workloads import TeacherSettings, Workload, trace_baseline, trace_candidate
from crepa_mem.units import format_bytes

FRUGAL = dict(chunk=1, vae_tiling=True, drop_vae_encoder=True, loss_chunk=1)
MATRIX = [
    ("crepa-mem defaults (resident, selection first)", TeacherSettings()),
    ("chunk 1", TeacherSettings(chunk=1)),
    ("encoder bf16, chunk 4", TeacherSettings(encoder_dtype="bf16", chunk=4)),
    ("encoder swap, chunk 1", TeacherSettings(encoder_tier="swap", chunk=1)),
    ("encoder stream, chunk 1", TeacherSettings(encoder_tier="stream", chunk=1)),
    ("encoder stream, VAE swap, tiled", TeacherSettings(encoder_tier="stream", vae_tier="swap", **FRUGAL)),
    ("encoder stream, VAE stream, tiled", TeacherSettings(encoder_tier="stream", vae_tier="stream", **FRUGAL)),
    ("encoder stream, VAE stream, untiled (the cache on the host)",
     TeacherSettings(encoder_tier="stream", vae_tier="stream", chunk=1, drop_vae_encoder=True, loss_chunk=1)),
    ("encoder and VAE on the CPU (device tier)", TeacherSettings(encoder_tier="device", vae_tier="device", chunk=1)),
    ("feature cache", TeacherSettings(feature_cache=True)),
    ("feature cache, loss chunk 1", TeacherSettings(feature_cache=True, loss_chunk=1)),
    ("crepa-mem defaults, loss chunk 3", TeacherSettings(loss_chunk=3)),
]
QUICK = [0, 1, 4, 6, 9, 10]
# Smaller tiles save a little more but multiply the decoder calls the trace walks through (~6 min here).
SLOW = [("encoder stream, VAE stream, tiles 128", TeacherSettings(encoder_tier="stream", vae_tier="stream",
                                                                  vae_tile_size=128, **FRUGAL))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wan-2.1-14b")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--encoder", default="dinov2_vitg14")
    ap.add_argument("--image-size", type=int, default=518)
    ap.add_argument("--quick", action="store_true", help="five rows instead of all")
    ap.add_argument("--slow", action="store_true", help="also the rows that take minutes to trace")
    args = ap.parse_args()
    w = Workload(model=args.model, frames=args.frames, height=args.height, width=args.width,
                 encoder=args.encoder, image_size=args.image_size)
    t0 = time.perf_counter()
    print("tracing SimpleTuner's recipe (the baseline), then one row per configuration", file=sys.stderr, flush=True)
    base = trace_baseline(w)
    print(f"workload: {w}")
    print(f"{'configuration':48s} {'peak':>12s} {'ratio':>7s} {'teacher':>12s} {'loss':>12s} {'h2d/step':>12s} "
          f"{'trace s':>8s}")

    def row(label, r) -> None:
        print(f"{label:48s} {format_bytes(r.peak_bytes):>12s} {base.peak_bytes / r.peak_bytes:7.2f} "
              f"{format_bytes(r.teacher_peak_bytes):>12s} {format_bytes(r.loss_peak_bytes):>12s} "
              f"{format_bytes(sum(r.h2d_bytes.values())):>12s} {r.wall_s:8.1f}", flush=True)

    row("SimpleTuner recipe (baseline)", base)
    rows = [MATRIX[i] for i in QUICK] if args.quick else MATRIX + (SLOW if args.slow else [])
    for label, settings in rows:
        row(label, trace_candidate(w, settings))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
