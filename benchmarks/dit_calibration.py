"""The DiT training-memory model (crepa_mem.planning.training) against `trace --dit`, and its fit.

    python benchmarks/dit_calibration.py          # model vs trace, full-size checkpoints (≈ 4 min)
    python benchmarks/dit_calibration.py --fit    # refit training.CALIBRATION from 1- and 2-block traces

The fit traces each family's smallest checkpoint with 2 and 3 blocks at full width, varying the token
count, the FFN width (LTX: the width, its FFN is 4·D) and the text length, and solves per-block and
fixed activation bytes for the features of training.activation_features. The comparison runs whole
checkpoints — including the larger ones the fit never saw — over shapes × checkpointing × precision.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from crepa_mem.planning import training
from crepa_mem.profiles import get_model
from crepa_mem.trace.dit import trace_dit

FIT_MODELS = ("wan-2.1-1.3b", "ltxvideo-2b", "sanavideo-2b", "kandinsky5-video-lite")
WIDEN = {"wan": ("ffn_dim", 1.5), "kandinsky5_video": ("ff_dim", 1.5), "sanavideo": ("mlp_ratio", 1.6),
         "ltxvideo": ("num_attention_heads", 0.75)}
CASES = [  # model, frames, height, width, batch, gradient checkpointing, precision
    ("wan-2.1-1.3b", 81, 480, 832, 1, True, "bf16"), ("wan-2.1-1.3b", 33, 480, 832, 1, False, "bf16"),
    ("wan-2.1-1.3b", 49, 480, 832, 2, True, "bf16"), ("wan-2.1-1.3b", 17, 480, 832, 1, False, "fp32"),
    ("wan-2.1-14b", 81, 480, 832, 1, True, "bf16"), ("wan-2.1-14b", 33, 720, 1280, 1, True, "bf16"),
    ("wan-2.1-14b", 17, 480, 832, 1, False, "bf16"), ("wan-2.2-ti2v-5b", 121, 704, 1280, 1, True, "bf16"),
    ("wan-2.2-ti2v-5b", 49, 704, 1280, 1, False, "bf16"),
    ("ltxvideo-2b", 121, 512, 768, 1, True, "bf16"), ("ltxvideo-2b", 49, 512, 704, 1, False, "bf16"),
    ("ltxvideo-2b", 49, 512, 704, 1, True, "fp32"), ("ltxvideo-13b", 121, 512, 768, 1, True, "bf16"),
    ("sanavideo-2b", 81, 480, 832, 1, True, "bf16"), ("sanavideo-2b", 33, 480, 832, 1, False, "bf16"),
    ("kandinsky5-video-lite", 121, 512, 768, 1, True, "bf16"), ("kandinsky5-video-lite", 49, 512, 768, 1, False, "bf16"),
    ("kandinsky5-video-pro", 121, 512, 768, 1, True, "bf16"),
]


def _variant(name: str, *, widen: bool = False, text_x2: bool = False):
    m = get_model(name)
    cfg = dict(m.dit["config"])
    if widen:
        key, factor = WIDEN[m.family]
        cfg[key] = int(cfg[key] * factor) if isinstance(cfg[key], int) else cfg[key] * factor
    hidden = m.hidden_size
    if m.family == "ltxvideo":  # its width is heads × head_dim, and cross-attention projects to it
        hidden = cfg["cross_attention_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    dit = {**m.dit, "config": cfg, "text_tokens": m.dit["text_tokens"] * (2 if text_x2 else 1)}
    return dataclasses.replace(m, dit=dit, hidden_size=hidden)


def fit() -> dict:
    out = {}
    for name in FIT_MODELS:
        rows = {False: ([], [], []), True: ([], [], [])}  # gc → (features, per-block bytes, fixed bytes)
        for frames, widen, text_x2 in ((17, False, False), (33, False, False), (17, True, False), (17, False, True)):
            m = _variant(name, widen=widen, text_x2=text_x2)
            for gc in (False, True):
                act = []
                for layers in (2, 3):  # 1 → 2 blocks is not yet linear under checkpointing
                    t = trace_dit(m, frames=frames, height=480, width=832, num_layers=layers,
                                  gradient_checkpointing=gc, optimizer=False)
                    act.append(t.peak_bytes - t.weights_bytes)
                feats = training.activation_features(m, frames=frames, height=480, width=832, batch=1)
                lat_b, text_b, _ = training.input_bytes(m, frames=frames, height=480, width=832)
                rows[gc][0].append(feats)
                rows[gc][1].append(act[1] - act[0])
                rows[gc][2].append(3 * act[0] - 2 * act[1] - lat_b - text_b)  # inputs are terms of their own
                print(f"  {name} frames={frames} widen={widen} text_x2={text_x2} gc={gc}: block {act[1] - act[0]:,} "
                      f"fixed {3 * act[0] - 2 * act[1]:,}", file=sys.stderr)
        fam = get_model(name).family
        out[fam] = {}
        for gc, (x, blk, fix) in rows.items():
            key = "gc" if gc else "no_gc"
            a = np.array(x, dtype=float)
            out[fam][key] = {"block": [round(v, 3) for v in np.linalg.lstsq(a, np.array(blk, float), rcond=None)[0]],
                             "fixed": [round(v, 3) for v in np.linalg.lstsq(a, np.array(fix, float), rcond=None)[0]]}
        ratios = []
        for gc in (False, True):  # fp32 compute over bf16, 3 blocks (training.FP32_FACTOR)
            a = {}
            for dt in ("bf16", "fp32"):
                m = get_model(name)
                t = trace_dit(m, frames=17, height=480, width=832, num_layers=3, gradient_checkpointing=gc,
                              optimizer=False, dtype=dt)
                lat_b, text_b, _ = training.input_bytes(m, frames=17, height=480, width=832, compute_dtype=dt)
                a[dt] = t.peak_bytes - t.weights_bytes - lat_b - text_b
            ratios.append(round(a["fp32"] / a["bf16"], 3))
        out[fam]["fp32_factor"] = ratios
    return out


def compare() -> list[dict]:
    results = []
    for name, frames, h, w, batch, gc, precision in CASES:
        t0 = time.perf_counter()
        tr = trace_dit(name, frames=frames, height=h, width=w, batch=batch, dtype=precision, gradient_checkpointing=gc)
        est = training.training_bytes(name, frames=frames, height=h, width=w, batch=batch, precision=precision,
                                      lora_rank=16, optimizer="adamw", gradient_checkpointing=gc, cuda_context=False)
        err = est.total_bytes / tr.peak_bytes - 1
        results.append(dict(model=name, frames=frames, height=h, width=w, batch=batch, gradient_checkpointing=gc,
                            precision=precision, trace_bytes=tr.peak_bytes, model_bytes=est.total_bytes,
                            error=round(err, 4), trace_s=round(time.perf_counter() - t0, 1)))
        print(f"{name:24} {batch}×{frames}×{h}×{w} gc={gc!s:5} {precision}: trace {tr.peak_bytes / 2**30:7.2f} GiB "
              f"model {est.total_bytes / 2**30:7.2f} GiB  {err:+.1%}", flush=True)
    worst = max(results, key=lambda r: abs(r["error"]))
    print(f"worst error {worst['error']:+.1%} ({worst['model']}, {worst['frames']} frames, gc={worst['gradient_checkpointing']}, "
          f"{worst['precision']}) over {len(results)} cases (budget ±10 %)")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = fit() if args.fit else compare()
    if args.json or args.fit:
        print(json.dumps(res, indent=1))
