"""CPU wall time of the CREPA loss and its backward in frame chunks (crepa_mem_loss_chunk, recomputed in
backward) against the whole computation (one run).

    python benchmarks/loss_chunk_overhead.py [--frames 21] [--tokens 390] [--width 1536] [--chunk 1] [--repeats 7]

`CrepaRegularizer.compute_loss` with a teacher that hands over fixed features (as the feature cache
does on a CPU: no VAE or encoder in the timing) and `loss.backward()`, on hidden states (B=1, T', P, D) in bf16 as the DiT gives them and fp32
features of ViT-L/14 at 224 px (256 tokens, width 1024), with crepa_mem_loss_chunk -1 and --chunk, back to
back, `repeats` times. Each pair's ratio (chunked / whole) is taken under the same load, so on a shared
machine the median of the paired ratios is the robust figure: the cost of the recomputation, which
`crepa_mem.planning.step_time.LOSS_RECOMPUTE_FRACTION` models. Also checks loss and gradient agree (1e-6).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=21, help="DiT frames T'")
    ap.add_argument("--tokens", type=int, default=390, help="DiT tokens per frame P (Wan at 240×416: 15×26)")
    ap.add_argument("--width", type=int, default=1536, help="DiT width D (Wan 2.1 1.3B)")
    ap.add_argument("--chunk", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    from crepa_mem.config import CrepaConfig
    from crepa_mem.regularizer import CrepaRegularizer
    from crepa_mem.teacher.path import TeacherFeatures

    class FixedFeatures:
        encoder_dim = 1024

        def features(self, latents, target_frames, dit_grid=None):
            return TeacherFeatures(features, (16, 16), list(range(target_frames)), target_frames)

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.frames, args.tokens, args.width, generator=g).to(torch.bfloat16).requires_grad_()
    features = torch.randn(1, args.frames, 256, 1024, generator=g)
    latents = torch.empty(1, 16, args.frames, 2, 2)  # only its shape is read: the features are given

    def regularizer(chunk: int) -> CrepaRegularizer:
        torch.manual_seed(0)
        cfg = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_mem_loss_chunk": chunk})
        return CrepaRegularizer(cfg, hidden_size=args.width, teacher=FixedFeatures(), device="cpu")

    def step(reg: CrepaRegularizer):
        hidden.grad = None
        reg.projector.zero_grad(set_to_none=True)
        loss, _ = reg.compute_loss(hidden, latents)
        loss.backward()
        return loss.detach(), hidden.grad.float(), reg.projector[1].weight.grad.clone()

    whole, chunked = regularizer(-1), regularizer(args.chunk)
    ref, got = step(whole), step(chunked)
    assert abs(got[0] - ref[0]) <= 1e-6 * abs(ref[0]), (got[0], ref[0])
    for a, b in zip(got[1:], ref[1:]):
        assert (a - b).norm() <= 1e-6 * b.norm(), f"gradient differs: {(a - b).norm() / b.norm():.2e} relative"
    times = {"whole": [], "chunked": []}
    for _ in range(args.repeats):  # alternate, so load on the machine hits both alike
        for name, reg in (("whole", whole), ("chunked", chunked)):
            start = time.perf_counter()
            step(reg)
            times[name].append(time.perf_counter() - start)
    print(f"threads {torch.get_num_threads()}, hidden (1, {args.frames}, {args.tokens}, {args.width}) bf16, "
          f"features (1, {args.frames}, 256, 1024) fp32, loss + backward")
    for name, label in (("whole", "whole          "), ("chunked", f"chunks of {args.chunk:<5d}")):
        runs = ", ".join(f"{x:.3f}" for x in times[name])
        print(f"{label} best {min(times[name]):.3f} s  median {statistics.median(times[name]):.3f} s  (runs: {runs})")
    paired = statistics.median(c / a for a, c in zip(times["whole"], times["chunked"]))
    print(f"chunked / whole, median of paired runs = {paired:.3f}  ({paired - 1:+.1%}); "
          f"best/best {min(times['chunked']) / min(times['whole']):.3f}")


if __name__ == "__main__":
    main()
