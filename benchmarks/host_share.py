"""Host memory of the teacher's masters with 2 local ranks: a private copy each, one shared mapped copy, NVMe tier.

    python benchmarks/host_share.py [--ranks 2] [--layers 12] [--width 768]

Each rank is a separate process that builds the same random DINOv2 (ViT-B/14 width and depth by
default), places it as the `swap` tier would on this CPU-only machine, and runs one encoder call; then it
reports its RSS and PSS (Linux /proc/self/smaps_rollup: PSS splits shared pages between the processes
mapping them, so the ranks' PSS sum is what the node really holds; Anonymous is the private memory the
kernel cannot drop, while file-backed pages - the mapped copy, RamTorch's NVMe masters - are page cache
it can evict under pressure and read back from disk). Three ways:
- private:  every rank keeps its own copy of the weights (what swap/stream do today, pinned on CUDA);
- shared:   crepa_mem_host_share_path: the weights are read-only views of one safetensors file;
- nvme:     crepa_mem_stream_engine=ramtorch + crepa_mem_stream_nvme_path: masters in a scratch file.
Baseline: the same process without the encoder (torch and transformers imported), subtracted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _rollup() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].rstrip(":") in ("Rss", "Pss", "Anonymous"):
                out[parts[0].rstrip(":").lower()] = int(parts[1]) * 1024
    return out


def rank(way: str, layers: int, width: int, folder: str, barrier: str) -> None:
    import time

    import torch
    from transformers import Dinov2Config, Dinov2Model

    from crepa_mem.teacher.host_share import map_host_copy
    from crepa_mem.teacher.path import encode_tokens
    from crepa_mem.teacher.tiers import place

    torch.manual_seed(0)
    placement = None
    if way != "none":
        enc = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
                                       image_size=224, patch_size=14)).eval().requires_grad_(False)
        if way == "nvme":
            placement = place(enc, "stream", compute_device="cpu", stream_engine="ramtorch",
                              nvme_path=os.path.join(folder, f"masters-{os.getpid()}.bin"))
        else:
            placement = place(enc, "swap", compute_device="cpu")
            if way == "shared":
                map_host_copy(enc, os.path.join(folder, "encoder.safetensors"))
        import gc

        gc.collect()
        with placement.active() as m:
            encode_tokens(m, torch.randn(1, 3, 224, 224))
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    while len(os.listdir(barrier)) < int(os.environ["RANKS"]):  # all ranks alive: shared pages are counted once
        time.sleep(0.05)
    time.sleep(0.3)
    print(json.dumps(_rollup()), flush=True)
    time.sleep(0.5)  # stay mapped until every rank has read its figures
    if placement is not None:
        placement.close()


def run(way: str, ranks: int, layers: int, width: int, folder: str) -> list[dict[str, int]]:
    barrier = tempfile.mkdtemp(dir=folder)
    env = {**os.environ, "RANKS": str(ranks), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", way, "--layers", str(layers), "--width",
                               str(width), "--folder", folder, "--barrier", barrier], stdout=subprocess.PIPE,
                              env=env, text=True) for _ in range(ranks)]
    out = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank of {way!r} failed")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--barrier", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        return rank(args.rank, args.layers, args.width, args.folder, args.barrier)
    mib = 1024 * 1024
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as folder:  # a real disk, not tmpfs
        print("[1/4] ranks without the encoder (the baseline)", file=sys.stderr, flush=True)
        base = run("none", args.ranks, args.layers, args.width, folder)
        print(f"{args.ranks} ranks, DINOv2 {args.layers} layers × {args.width} wide, fp32; MiB above a rank "
              f"without the encoder (RSS / PSS per rank; node = sum of PSS; anonymous per rank)")
        for i, way in enumerate(("private", "shared", "nvme"), 2):
            print(f"[{i}/4] {way}", file=sys.stderr, flush=True)
            rows = run(way, args.ranks, args.layers, args.width, folder)
            rss = [(r["rss"] - b["rss"]) / mib for r, b in zip(rows, base)]
            pss = [(r["pss"] - b["pss"]) / mib for r, b in zip(rows, base)]
            anon = [(r["anonymous"] - b["anonymous"]) / mib for r, b in zip(rows, base)]
            print(f"{way:8s} RSS {' '.join(f'{x:7.1f}' for x in rss)}   PSS {' '.join(f'{x:7.1f}' for x in pss)}"
                  f"   node {sum(pss):7.1f}   anonymous {' '.join(f'{x:7.1f}' for x in anon)}  MiB", flush=True)


if __name__ == "__main__":
    main()
