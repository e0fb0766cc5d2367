"""`crepa-mem doctor` on a large training log: wall time and the child's peak resident memory.

    python benchmarks/doctor_big_log.py [--mib 300]

Writes a log of about --mib MiB (progress-bar noise, as trainers print it, then a real-looking CUDA OOM
traceback from the VAE decode at the end) to a temporary file, runs
`crepa-mem doctor --log FILE --no-machine --json` on it in a subprocess, and prints the wall time, the
child's peak RSS (ru_maxrss) next to that of `doctor` on a tiny log (the baseline cost of starting it),
and the finding codes. The log is read as a stream, so memory must not grow with its size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOISE = "Epoch 1/10, Steps:  {i:>7}/100000 [{i}s<1:00:00, 1.23s/it, lr=6e-05, step_loss=0.1234, crepa_loss=-0.4321]\n"
OOM_TAIL = (Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "doctor" / "oom_vae_decode_wan_rtx4090.log")


def write_log(path: Path, mib: int) -> None:
    target = mib * 2**20
    with path.open("w") as f:
        i, written = 0, 0
        while written < target:
            line = NOISE.format(i=i)
            f.write(line)
            written += len(line)
            i += 1
        f.write(OOM_TAIL.read_text())


def run(path: Path) -> tuple[float, int, dict]:
    """One doctor run in a fresh child; returns (seconds, peak RSS bytes of that child, report)."""
    probe = ("import resource, subprocess, sys, json; "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps({'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
             "'out': p.stdout}))")
    cmd = [sys.executable, "-c", probe, sys.executable, "-m", "crepa_mem.cli.app", "doctor", "--log", str(path),
           "--no-machine", "--json", "--model", "wan-2.1-14b"]
    t0 = time.perf_counter()
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return time.perf_counter() - t0, out["rss"], json.loads(out["out"])


def step(what: str) -> None:
    print(what, file=sys.stderr, flush=True)  # progress on stderr: the result line stays alone on stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small.log", Path(tmp) / "big.log"
        small.write_text(OOM_TAIL.read_text())
        step(f"[1/3] writing a {args.mib} MiB log")
        write_log(big, args.mib)
        size = os.path.getsize(big)
        step("[2/3] doctor on a tiny log (the baseline)")
        t_small, rss_small, _ = run(small)
        step(f"[3/3] doctor on the {size / 2**20:.0f} MiB log (≈ 3-4 min on a shared 2-core machine)")
        t_big, rss_big, report = run(big)
    codes = [f["code"] for f in report["findings"]]
    print(f"log {size / 2**20:.0f} MiB: {t_big:.2f} s wall (a tiny log: {t_small:.2f} s); peak RSS "
          f"{rss_big / 2**20:.0f} MiB vs {rss_small / 2**20:.0f} MiB on the tiny log "
          f"(+{(rss_big - rss_small) / 2**20:.0f} MiB); findings: {codes}")


if __name__ == "__main__":
    main()
