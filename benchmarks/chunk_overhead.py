"""CPU wall time of the teacher path encoding in chunks against all frames in one call (one run).

    python benchmarks/chunk_overhead.py [--frames 21] [--chunk 4] [--size 224] [--repeats 7]

A DINOv2 ViT-S/14 (real width and depth, random weights, built from its config) and the tiny Wan VAE
from crepa_mem.testing; the teacher path (decode → select → encode) runs with frames_per_chunk=None
and with --chunk, back to back, `repeats` times. Each pair's ratio (chunked / all) is taken under
the same load, so on a shared machine the median of the paired ratios is the robust figure; it is
compared with the 5 % budget. Also prints best and median times, and checks the features are equal.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=21, help="DiT frames = frames encoded")
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--size", type=int, default=224, help="encoder input size")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()

    from transformers import Dinov2Config, Dinov2Model

    from crepa_mem.teacher.path import TeacherPath
    from crepa_mem.testing import tiny_vae
    from crepa_mem.teacher.tiers import place

    torch.manual_seed(0)
    enc = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                                   image_size=518, patch_size=14)).eval()
    vae = tiny_vae("wan")
    t = args.frames
    latents = torch.randn(1, 16, t, 8, 8, generator=torch.Generator().manual_seed(1))

    def path(chunk):
        return TeacherPath(vae=place(vae, "gpu", compute_device="cpu"), encoder=place(enc, "gpu", compute_device="cpu"),
                           image_size=args.size, compute_device="cpu", frames_per_chunk=chunk)

    whole, chunked = path(None), path(args.chunk)
    torch.testing.assert_close(chunked.features(latents, t).features, whole.features(latents, t).features,
                               rtol=1e-5, atol=1e-5)
    times = {"all": [], "chunked": []}
    for i in range(args.repeats):  # alternate, so load on the machine hits both alike
        for name, p in (("all", whole), ("chunked", chunked)):
            start = time.perf_counter()
            p.features(latents, t)
            times[name].append(time.perf_counter() - start)
        print(f"  pair {i + 1}/{args.repeats}: all {times['all'][-1]:.2f} s, chunked {times['chunked'][-1]:.2f} s",
              file=sys.stderr, flush=True)
    print(f"threads {torch.get_num_threads()}, {t} frames at {args.size} px, ViT-S/14 (12 layers, width 384)")
    for name, label in (("all", "all at once    "), ("chunked", f"chunks of {args.chunk:<5d}")):
        runs = ", ".join(f"{x:.3f}" for x in times[name])
        print(f"{label} best {min(times[name]):.3f} s  median {statistics.median(times[name]):.3f} s  (runs: {runs})")
    paired = statistics.median(c / a for a, c in zip(times["all"], times["chunked"]))
    verdict = "within" if paired <= 1.05 else "OVER"
    print(f"chunked / all, median of paired runs = {paired:.3f}  ({paired - 1:+.1%}; {verdict} the 5 % budget); "
          f"best/best {min(times['chunked']) / min(times['all']):.3f}")


if __name__ == "__main__":
    main()
