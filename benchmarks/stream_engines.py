"""The `stream` tier's two candidate engines on the CPU: diffusers group offloading vs RamTorch OffloadModel.

    python benchmarks/stream_engines.py [--frames 8] [--size 224] [--repeats 5]

DINOv2 ViT-S/14 (real width and depth, random weights). Each engine runs the same forward as the
resident model; the script checks the outputs are identical and prints the best wall time of each.
RamTorch is cut as REFERENCE §4 says: [embeddings, *encoder.layer, layernorm] reproduces
last_hidden_state. On a CPU-only build its copies degrade to clones; group offloading's onload to the
CPU is a no-op. (What each would cost on a GPU is reasoned in crepa_mem/teacher/stream.py and
crepa_mem/teacher/ramtorch_engine.py; RamTorch runs through crepa-mem's placement, `stream_engine="ramtorch"`.)
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each, measured round-robin so load on a shared machine hits all alike."""
    for fn in fns.values():
        fn()  # warm-up (group offloading records the execution order on its first call)
    out = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - start)
        print(f"  round {i + 1}/{repeats}", file=sys.stderr, flush=True)
    return {name: min(ts) for name, ts in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from transformers import Dinov2Config, Dinov2Model

    from crepa_mem.teacher.tiers import place

    torch.manual_seed(0)
    base = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                    image_size=518, patch_size=14)).eval().requires_grad_(False)
    x = torch.randn(args.frames, 3, args.size, args.size)
    with torch.no_grad():
        ref = base(pixel_values=x).last_hidden_state

    grouped = place(copy.deepcopy(base), "stream", compute_device="cpu").module
    ram = place(copy.deepcopy(base), "stream", compute_device="cpu", stream_engine="ramtorch")  # the real engine

    def run_resident():
        with torch.no_grad():
            return base(pixel_values=x).last_hidden_state

    def run_grouped():
        with torch.no_grad():
            return grouped(pixel_values=x).last_hidden_state

    def run_ramtorch():
        with ram.active() as m:
            return m(pixel_values=x).last_hidden_state

    torch.testing.assert_close(run_grouped(), ref, rtol=0, atol=0)
    torch.testing.assert_close(run_ramtorch(), ref, rtol=0, atol=0)
    times = best_times({"resident": run_resident, "diffusers group offloading": run_grouped,
                        "ramtorch OffloadModel": run_ramtorch}, args.repeats)
    ram.close()
    print(f"threads {torch.get_num_threads()}, {args.frames} frames at {args.size} px, ViT-S/14; best of {args.repeats}")
    for name, t in times.items():
        print(f"{name:28s} {t:.3f} s  ({t / times['resident'] - 1:+.1%} vs resident)")


if __name__ == "__main__":
    main()
