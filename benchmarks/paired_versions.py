"""CPU wall time of the same commands under two source trees, run back to back in pairs: the check that a
change does not make `crepa-mem trace` or the CREPA step slower.

    git worktree add ../crepa-mem-before <commit>
    python benchmarks/paired_versions.py --before ../crepa-mem-before [--repeats 1] [--only trace,step]

Each command runs in a fresh process with PYTHONPATH set to one tree, then to the other (the order
alternates between repeats), so each pair's ratio (this tree / before) is taken under the same load; with
`--together` the two run at the same time, one thread each. The library comes from each tree; the CLI
layer (`crepa_mem.cli`) is the installed one in both. The commands:
- trace: `crepa-mem trace` of the reference workload's most frugal fp32 configuration (Wan 2.1 14B,
  81 × 480 × 832, ViT-g/518, everything streamed, VAE tiled, chunk 1, loss chunk 1);
- step, step-tiled: `crepa-mem bench`, the real teacher path computing on the CPU with full-size random
  weights (the Wan 2.1 VAE in bf16 decoding 5 × 160 × 288, untiled and in two 256-px tiles, and DINOv2
  ViT-S/224), the median time of its 2 teacher steps;
- example: `examples/train_wan_lora.py`, 20 training steps with CREPA on tiny models (its wall time).
Prints one line per run and the median ratio per command.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
APP = [sys.executable, "-m", "crepa_mem.cli.app"]
BENCH = APP + ["bench", "--model", "wan-2.1-1.3b", "--frames", "5", "--height", "160", "--width", "288", "--encoder",
               "dinov2_vits14", "--image-size", "224", "--runs", "given", "--steps", "2", "--encoder-tier", "gpu",
               "--vae-tier", "gpu", "--no-trace", "--json"]
COMMANDS = {
    "trace": APP + ["trace", "--model", "wan-2.1-14b", "--frames", "81", "--height", "480", "--width", "832",
                    "--encoder", "dinov2_vitg14", "--image-size", "518", "--encoder-tier", "stream", "--vae-tier",
                    "stream", "--vae-tiling", "--drop-vae-encoder", "--chunk", "1", "--loss-chunk", "1", "--json"],
    "step": BENCH,
    "step-tiled": BENCH + ["--vae-tiling"],
    "example": [sys.executable, "examples/train_wan_lora.py"],
}


def start(tree: Path, name: str, threads: str) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": threads}
    return subprocess.Popen(COMMANDS[name], cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True), time.perf_counter()


def finish(proc: subprocess.Popen, began: float, tree: Path, name: str) -> float:
    out, err = proc.communicate()
    wall = time.perf_counter() - began
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if res.returncode != 0:
        sys.exit(f"{name} under {tree} exited {res.returncode}:\n{res.stderr[-2000:]}")
    if name.startswith("step"):  # the teacher's own seconds per step, not the process start-up
        return float(json.loads(res.stdout)["runs"][0]["median_step_s"])
    if name == "example":
        return float(re.search(r"done: .*?([\d.]+)s wall", res.stdout).group(1))
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the other source tree (a git worktree)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", default="step,step-tiled,example,trace", help=f"comma-separated: {', '.join(COMMANDS)}")
    ap.add_argument("--together", action="store_true", help="run each pair at the same time, one thread each (both "
                    "see the same load; for the long single-threaded trace)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in COMMANDS]
    if unknown or not args.before.is_dir():
        sys.exit(f"--only {','.join(unknown)!r} is invalid: valid are {', '.join(COMMANDS)}" if unknown
                 else f"--before {str(args.before)!r} is not a directory")
    trees = {"this": HERE, "before": args.before.resolve()}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        for i in range(args.repeats):
            order = ("before", "this") if i % 2 == 0 else ("this", "before")
            t = {}
            if args.together:
                procs = {w: start(trees[w], name, "1") for w in order}
                t = {w: finish(*procs[w], trees[w], name) for w in order}
            else:
                for which in order:
                    t[which] = finish(*start(trees[which], name, os.environ.get("OMP_NUM_THREADS", "2")),
                                      trees[which], name)
                    print(f"{name} repeat {i + 1} {which}: {t[which]:.2f} s", file=sys.stderr, flush=True)
            ratios[name].append(t["this"] / t["before"])
            print(f"{name}: this {t['this']:.2f} s, before {t['before']:.2f} s, ratio {ratios[name][-1]:.3f}")
    for name, r in ratios.items():
        print(f"{name}: median ratio this / before {statistics.median(r):.3f} over {len(r)} pair(s) (budget ≤ 1.10)")


if __name__ == "__main__":
    main()
