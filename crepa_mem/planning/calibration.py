"""The cases the analytic memory model (crepa_mem.planning.estimate) is calibrated against the trace on.

The matrix the trace-based calibration compares against (tests/test_planning_calibration.py checks a subset
within ±10 %, benchmarks/calibration_matrix.py prints all of it): families × encoders × image sizes × tiers
× chunks, then the out-of-grid cases that were misses. estimate.CALIBRATION is what gets refitted; nothing
here holds a measured figure.
"""
from __future__ import annotations

from crepa_mem.planning.estimate import Estimate, estimate


def calibration_cases() -> list[dict]:
    """≥ 24 estimate() keyword sets (model and encoder by profile name) spanning the model's axes, then the
    out-of-grid cases that were misses (indices of the grid stay put)."""
    shapes = {"wan-2.1-1.3b": (81, 480, 832), "wan-2.2-ti2v-5b": (49, 704, 1280), "ltxvideo-2b": (49, 512, 704),
              "kandinsky5-video-lite": (49, 480, 832), "sanavideo-2b": (81, 480, 832)}
    knobs = [dict(encoder="dinov2_vitg14", image_size=518, encoder_dtype="bf16", encoder_tier="gpu", vae_tier="gpu",
                  frames_per_chunk=-1),
             dict(encoder="dinov2_vitg14", image_size=518, encoder_dtype="fp32", encoder_tier="swap", vae_tier="gpu",
                  frames_per_chunk=4),
             dict(encoder="dinov2_vitl14", image_size=448, encoder_dtype="bf16", encoder_tier="stream",
                  vae_tier="swap", frames_per_chunk=8),
             dict(encoder="dinov2_vitl14", image_size=224, encoder_dtype="fp32", encoder_tier="gpu", vae_tier="gpu",
                  frames_per_chunk=1, vae_tiling=True),
             dict(encoder="dinov2_vits14", image_size=518, encoder_dtype="bf16", encoder_tier="gpu", vae_tier="swap",
                  frames_per_chunk=-1, drop_vae_encoder=True)]
    cases = [dict(model=m, frames=f, height=h, width=w, **k) for m, (f, h, w) in shapes.items() for k in knobs]
    # Shapes outside the grid where the estimate once missed (VAE streamed: +33 % Wan 2.2, +9.8 % LTX 13B).
    small = dict(encoder="dinov2_vitb14", image_size=224, encoder_dtype="fp32", frames_per_chunk=1, vae_tiling=True)
    cases += [dict(model="wan-2.2-ti2v-5b", frames=49, height=512, width=768, encoder_tier="stream", vae_tier="stream",
                   **small),
              dict(model="ltxvideo-13b", frames=161, height=512, width=704, encoder_tier="stream", vae_tier="stream",
                   **small)]
    # Wan's own decode loop (crepa_mem.teacher.wan_decode), outside the grid: 121 frames at 720 × 1280 tiled (the
    # stock tiled decode held every tile's clip: −39 % before the loop), and 49 frames untiled with the cache on
    # the host, a bf16 encoder in chunks of 3.
    cases += [dict(model="wan-2.1-14b", frames=121, height=720, width=1280, encoder="dinov2_vitl14", image_size=448,
                   encoder_dtype="bf16", encoder_tier="stream", vae_tier="swap", frames_per_chunk=3, vae_tiling=True,
                   drop_vae_encoder=True),
              dict(model="wan-2.1-1.3b", frames=49, height=480, width=832, encoder="dinov2_vitl14", image_size=448,
                   encoder_dtype="bf16", encoder_tier="gpu", vae_tier="stream", frames_per_chunk=3)]
    return cases


def estimate_case(case: dict, profiles_dir=None) -> Estimate:
    """estimate() for one calibration_cases() entry."""
    from crepa_mem.profiles import get_encoder, get_model

    kw = dict(case)
    return estimate(get_model(kw.pop("model"), profiles_dir), get_encoder(kw.pop("encoder"), profiles_dir), **kw)
