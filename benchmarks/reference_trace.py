"""The reference workload's two targets, through the real CLI, timed (REFERENCE §6; issue targets).

    python benchmarks/reference_trace.py

Runs `crepa-mem trace` on Wan 2.1 14B, 81 frames at 480×832, DINOv2 ViT-g/14 at 518 for
(1) the most frugal fp32-encoder configuration without a feature cache that stays on the GPU:
    encoder streamed, VAE decoder streamed, spatial VAE tiling, decode-only VAE, one frame per chunk
    (target: ≥ 8× below SimpleTuner's recipe), and
(2) the feature cache (target: ≥ 12×; the whole call, whose loss phase keeps the hidden states' gradient),
and prints each command, its JSON report, its wall time (target: < 3 min each) and the verdicts.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

BASE = ["--model", "wan-2.1-14b", "--frames", "81", "--height", "480", "--width", "832",
        "--encoder", "dinov2_vitg14", "--image-size", "518"]
RUNS = [
    ("frugal fp32, no cache", ["--encoder-tier", "stream", "--vae-tier", "stream", "--vae-tiling",
                               "--drop-vae-encoder", "--chunk", "1", "--loss-chunk", "1"], 8.0),
    ("feature cache", ["--feature-cache", "--loss-chunk", "1"], 12.0),
]


def main() -> int:
    ok = True
    for label, extra, target in RUNS:
        cmd = ["crepa-mem", "trace", *BASE, *extra, "--json"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        print(f"$ {shlex.join(cmd)}")
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        report = json.loads(done.stdout)
        print(json.dumps(report, indent=2))
        meets = report["ratio"] >= target and wall < 180
        ok &= meets
        print(f"{label}: ratio {report['ratio']:.2f}× (target ≥ {target:g}×), {wall:.0f} s (target < 180 s): "
              f"{'met' if meets else 'NOT met'}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
