"""Step-time model of the teacher's knobs: extra seconds per training step over everything resident. No torch.

Every constant cites where it comes from. Costs are FLOPs / (the card's dense bf16 FLOP/s × an achieved
fraction), bytes / the PCIe link's measured host→device rate, or a measured ratio.
"""
from __future__ import annotations

from crepa_mem.planning import estimate as est
from crepa_mem.profiles import EncoderProfile, ModelProfile, VaeProfile
from crepa_mem.units import GB

# Achieved fraction of dense bf16 FLOP/s for ViT matmuls: REFERENCE §6 gives H100 ≈ 790 of 989 TFLOP/s
# (0.8) on large GEMMs; ViT-g at ~1.4k tokens also spends time in attention, LayerNorm and GELU, so
# half of peak is taken (an assumption, not measured here).
ENCODER_MFU = 0.5
# Convolutional VAE decoders: public RTX 4090 measurement of the Wan 2.2 VAE decoding 121 frames at
# 1280×704 in 66.9 s (utensils/mold issue #802, 2026-08; Wan2GP issue #705 reports 77 s for the same
# clip), i.e. 2.04 PFLOP (VAE_DECODE_FLOPS_PER_PX) in 66.9 s = 30 TFLOP/s = 0.18 of the card's 165.
VAE_MFU = 0.18
# fp32 (TF32 off, PyTorch's default for matmuls) relative to bf16 tensor cores: spec sheets give 2× on an
# RTX 4090 (82.6 vs 165 TFLOP/s) and 15-16× on A100/H100 (19.5 vs 312, 67 vs 989); 4× is taken between.
FP32_SLOWDOWN = 4.0
# Decoder FLOPs per output pixel-frame, counted with torch's FlopCounterMode on the diffusers VAEs.
VAE_DECODE_FLOPS_PER_PX = {"wan-2.1": 8.6e6, "wan-2.2": 18.7e6, "hunyuanvideo": 23.1e6,
                           "ltx-0.9.5": 0.9e6, "ltx-0.9.0": 0.9e6}
VAE_DECODE_FLOPS_DEFAULT = 10e6
# PCIe Gen4 x16 host→device, measured ≈ 25 GB/s (REFERENCE §6); an RTX 4090's dense bf16 (spec).
DEFAULT_H2D, DEFAULT_TFLOPS = 25 * GB, 165.0
# Per extra teacher chunk: launches and syncs. SimpleTuner PR #2258 measured 8-frame slices at 0.513 s vs
# 0.555 s in one call (REFERENCE §1), benchmarks/chunk_overhead.py a paired ratio of 0.979 on a CPU.
CHUNK_OVERHEAD_S = 1e-3
# Stream tier: part of the compute that prefetching does not hide (diffusers group offloading with
# record_stream measured −2 % time, REFERENCE §6).
STREAM_COMPUTE_OVERHEAD = 0.02
# Feature-cache reads: sha256 of each entry on one CPU core, ≈ 1 GB/s with SHA extensions (hashlib;
# 0.35 GB/s measured on this project's shared 2-core CI machine under load), disk reads overlap it.
CACHE_CHECKSUM_BYTES_PER_S = 1 * GB


def tflops(bf16_tflops: float | None) -> float:
    return (bf16_tflops or DEFAULT_TFLOPS) * 1e12


def encoder_seconds(model: ModelProfile, enc: EncoderProfile, *, frames: int, batch: int, image_size: int,
                    encoder_dtype: str, bf16_tflops: float | None) -> float:
    """Teacher encoder time per step: the selected frames through the encoder."""
    n = batch * min(frames, model.latent_frames(frames))
    s = n * est.encoder_flops_per_frame(enc, image_size) / (tflops(bf16_tflops) * ENCODER_MFU)
    return s * (FP32_SLOWDOWN if encoder_dtype == "fp32" else 1.0)


def tiling_work_factor(vae: VaeProfile, height: int, width: int) -> float:
    """Decoded area over the frame's area under diffusers' spatial tiling: tiles of tile_sample_min start
    every tile_sample_stride pixels and each is decoded whole (cut at the edge), so the overlaps are
    decoded twice; blending is negligible. Wan 2.1 at 480×832: 1.66; Wan 2.2 at 704×1280: 1.65."""
    def covered(side: int) -> int:
        if side <= vae.tile_sample_min:
            return side
        return sum(min(vae.tile_sample_min, side - start) for start in range(0, side, vae.tile_sample_stride))

    return covered(height) * covered(width) / (height * width)


def vae_decode_seconds(model: ModelProfile, *, frames: int, height: int, width: int, batch: int, tiling: bool,
                       bf16_tflops: float | None) -> float:
    vae = model.vae
    per_px = VAE_DECODE_FLOPS_PER_PX.get(vae.name, VAE_DECODE_FLOPS_DEFAULT)
    factor = tiling_work_factor(vae, height, width) if tiling else 1.0
    return batch * frames * height * width * per_px * factor / (tflops(bf16_tflops) * VAE_MFU)


def cache_read_seconds(feature_bytes: int) -> float:
    return feature_bytes / CACHE_CHECKSUM_BYTES_PER_S


# The chunked loss phase (crepa_mem_loss_chunk) runs each chunk's forward again in backward: one more forward
# of the fp32 projector (2·M·D_dit·D_enc FLOPs over the M = B·T'·P rows) at the encoder's achieved rate, plus
# a launch per chunk. benchmarks/loss_chunk_overhead.py measured chunked / whole loss + backward on this
# project's 2-core CPU at 1.66 (chunks of 1 frame) and 1.23 (3 frames), medians of paired runs: the
# recomputation (≈ +1/3 of forward + backward) and small-matrix overheads a GPU's GEMMs lose less to.
def loss_recompute_seconds(model: ModelProfile, enc: EncoderProfile, *, frames: int, height: int, width: int,
                           batch: int, chunk: int, bf16_tflops: float | None) -> float:
    dit_frames = model.latent_frames(frames)
    rows = batch * dit_frames * model.tokens_per_frame(height, width)
    flops = 2 * rows * model.hidden_size * enc.hidden_size
    return flops * FP32_SLOWDOWN / (tflops(bf16_tflops) * ENCODER_MFU) + CHUNK_OVERHEAD_S * -(-dit_frames // chunk)
