"""Tiny random models built from configs of the real diffusers/transformers classes.

For tests here and in users' CI: nothing is downloaded, every builder is deterministic for a seed
and runs in milliseconds on a CPU. Widths are tiny; what CREPA depends on is kept real: the block
list attribute, the patch sizes, the latent channel counts and each VAE's true temporal × spatial
compression (so pixel frames are 1 + c·(T−1) and latent grids are realistic).
"""
from __future__ import annotations

from typing import Any

import torch

from crepa_mem.teacher.path import vae_compression, vae_latent_channels  # noqa: F401  (re-exported for tests)

# Families each builder knows; kept here so error messages list them.
VAE_FAMILIES = ("wan", "wan2.2", "ltxvideo", "sanavideo", "kandinsky5_video")
TRANSFORMER_FAMILIES = ("wan", "ltxvideo", "sanavideo", "kandinsky5_video")

_TEXT_LEN = 4  # tokens of the fake prompt embedding


def _seeded(seed: int):
    """Seeds the global CPU generator for one construction (diffusers inits from it)."""
    torch.manual_seed(seed)


def _unknown(kind: str, family: str, known: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown {kind} family {family!r}; known: {', '.join(known)}")


# --------------------------------------------------------------------------- DINOv2


def tiny_dinov2(
    *,
    registers: bool = False,
    hidden_size: int = 32,
    num_layers: int = 2,
    heads: int = 2,
    image_size: int = 28,
    seed: int = 0,
):
    """A random `Dinov2Model` (or `Dinov2WithRegistersModel`, 4 registers), patch 14, eval mode.

    `last_hidden_state` has 1 + (4 if registers) + (S/14)² tokens for an S×S input.
    """
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    common = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 4,
        image_size=image_size,
        patch_size=14,  # the registers class defaults to 16
    )
    _seeded(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    return model.eval()


# --------------------------------------------------------------------------- VAEs


def meta_dinov2(layers: int = 4, width: int = 64):
    """A DINOv2 built on the meta device (no memory), for the fake-GPU runtime of `crepa_mem.trace`."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        return Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
                                        intermediate_size=width * 4, image_size=28, patch_size=14)).eval()


def devices_of(module: torch.nn.Module) -> set[str]:
    """Every device the module's parameters and buffers are on."""
    return {str(t.device) for t in (*module.parameters(), *module.buffers())}


def _ramp(n: int, lo: float, hi: float) -> list[float]:
    """n distinct deterministic values: stands in for per-channel latent statistics."""
    return [lo + (hi - lo) * i / max(n - 1, 1) for i in range(n)]


def tiny_vae(family: str, *, seed: int = 0, timestep_conditioning: bool = False):
    """A random video VAE of the family, eval mode; `vae.decode(z).sample` is (B, 3, F, H, W).

    wan / sanavideo: AutoencoderKLWan 2.1 (z 16, 4×8); wan2.2: the 2.2 config (z 48, residual,
    patch 2 → 4×16); ltxvideo: AutoencoderKLLTXVideo (z 128, 8×32); kandinsky5_video:
    AutoencoderKLHunyuanVideo (z 16, 4×8). `timestep_conditioning` (LTX only) builds the 0.9.1+
    decoder, which then needs `vae.decode(z, temb)`.
    """
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo, AutoencoderKLWan

    if timestep_conditioning and family != "ltxvideo":
        raise ValueError(f"timestep_conditioning is only for ltxvideo, not {family!r}")
    _seeded(seed)
    if family in ("wan", "sanavideo"):
        # The 2.1 config keeps its real 16 latents_mean/std (the class defaults).
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=1)
    elif family == "wan2.2":
        vae = AutoencoderKLWan(
            base_dim=8,
            decoder_base_dim=16,
            z_dim=48,
            num_res_blocks=1,
            is_residual=True,
            patch_size=2,
            in_channels=12,  # 3 × patch² after patchify
            out_channels=12,
            scale_factor_temporal=4,
            scale_factor_spatial=16,
            latents_mean=_ramp(48, -0.5, 0.5),
            latents_std=_ramp(48, 0.5, 2.0),
        )
    elif family == "ltxvideo":
        widths = (8, 16, 32, 32)
        common = dict(latent_channels=128, block_out_channels=widths, layers_per_block=(1, 1, 1, 1, 1))
        if timestep_conditioning:
            # 0.9.1-style decoder: residual ×2 upsamplers keep each up block's in == out width,
            # which the timestep-conditioned resnets need.
            vae = AutoencoderKLLTXVideo(
                **common,
                decoder_block_out_channels=(8, 16, 32),
                decoder_layers_per_block=(1, 1, 1, 1),
                decoder_spatio_temporal_scaling=(True, True, True),
                decoder_inject_noise=(False, False, False, False),
                upsample_residual=(True, True, True),
                upsample_factor=(2, 2, 2),
                timestep_conditioning=True,
            )
        else:  # 0.9.0-style decoder: vae.decode(z) with no timestep
            vae = AutoencoderKLLTXVideo(
                **common, decoder_block_out_channels=widths, decoder_layers_per_block=(1, 1, 1, 1, 1)
            )
    elif family == "kandinsky5_video":
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=16, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4
        )
    else:
        raise _unknown("VAE", family, VAE_FAMILIES)
    return vae.eval()


# --------------------------------------------------------------------------- DiTs


def tiny_transformer(family: str, *, num_layers: int = 3, seed: int = 0):
    """A random DiT of the family (real class, real block-list attribute and patch size), eval mode.

    Hidden size is 32 for every family; latent channels are the real ones (16; LTX 128).
    """
    from diffusers import (
        Kandinsky5Transformer3DModel,
        LTXVideoTransformer3DModel,
        SanaVideoTransformer3DModel,
        WanTransformer3DModel,
    )

    _seeded(seed)
    if family == "wan":
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=16,
            freq_dim=16,
            ffn_dim=64,
            num_layers=num_layers,
            rope_max_seq_len=64,
        )
    elif family == "ltxvideo":
        model = LTXVideoTransformer3DModel(
            in_channels=128,
            out_channels=128,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,  # the caption projection maps to the inner dim
            num_layers=num_layers,
            caption_channels=16,
        )
    elif family == "sanavideo":
        model = SanaVideoTransformer3DModel(
            in_channels=16,
            out_channels=16,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=num_layers,
            num_cross_attention_heads=2,
            cross_attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=16,
            sample_size=8,
            patch_size=(1, 2, 2),
            rope_max_seq_len=64,
        )
    elif family == "kandinsky5_video":
        model = Kandinsky5Transformer3DModel(
            in_visual_dim=16,
            out_visual_dim=16,
            in_text_dim=16,
            in_text_dim2=8,
            time_dim=16,
            patch_size=(1, 2, 2),
            model_dim=32,
            ff_dim=64,
            num_text_blocks=1,
            num_visual_blocks=num_layers,
            axes_dims=(4, 6, 6),  # head_dim 16 → 2 heads
        )
    else:
        raise _unknown("transformer", family, TRANSFORMER_FAMILIES)
    return model.eval()


def tiny_transformer_inputs(
    family: str,
    transformer,
    *,
    batch: int = 1,
    latent_frames: int = 3,
    latent_height: int = 8,
    latent_width: int = 8,
    seed: int = 0,
    sparse_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments with which `transformer(**kwargs)` runs, for a latent of
    (batch, C, latent_frames, latent_height, latent_width), laid out as each forward wants:
    Wan/Sana (B, C, T, H, W); LTX packed tokens (B, T·H·W, C) plus num_frames/height/width
    (patch 1, so the token grid is the latent grid); Kandinsky 5 channels-last (B, T, H, W, C)
    with its RoPE positions (`sparse_params` is passed through, for K5 only).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    B, T, H, W = batch, latent_frames, latent_height, latent_width

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if family == "wan":
        return dict(
            hidden_states=randn(B, cfg.in_channels, T, H, W),
            timestep=torch.full((B,), 500, dtype=torch.long),
            encoder_hidden_states=randn(B, _TEXT_LEN, cfg.text_dim),
        )
    if family == "sanavideo":
        return dict(
            hidden_states=randn(B, cfg.in_channels, T, H, W),
            encoder_hidden_states=randn(B, _TEXT_LEN, cfg.caption_channels),
            timestep=torch.full((B,), 500, dtype=torch.long),
            encoder_attention_mask=torch.ones(B, _TEXT_LEN),
        )
    if family == "ltxvideo":
        latents = randn(B, cfg.in_channels, T, H, W)
        # The pipeline's _pack_latents with patch 1: (B, C, T, H, W) → (B, T·H·W, C), raster order.
        packed = latents.flatten(2).transpose(1, 2).contiguous()
        return dict(
            hidden_states=packed,
            encoder_hidden_states=randn(B, _TEXT_LEN, cfg.caption_channels),
            timestep=torch.full((B,), 500, dtype=torch.long),
            encoder_attention_mask=torch.ones(B, _TEXT_LEN),
            num_frames=T,
            height=H,
            width=W,
        )
    if family == "kandinsky5_video":
        pt, ph, pw = cfg.patch_size
        channels = 2 * cfg.in_visual_dim + 1 if cfg.visual_cond else cfg.in_visual_dim
        kwargs = dict(
            hidden_states=randn(B, T, H, W, channels),
            encoder_hidden_states=randn(B, _TEXT_LEN, cfg.in_text_dim),
            timestep=torch.full((B,), 500.0),
            pooled_projections=randn(B, cfg.in_text_dim2),
            # as Kandinsky5T2VPipeline builds them: positions of the patched grid
            visual_rope_pos=[torch.arange(T // pt), torch.arange(H // ph), torch.arange(W // pw)],
            text_rope_pos=torch.arange(_TEXT_LEN),
        )
        if sparse_params is not None:
            kwargs["sparse_params"] = sparse_params
        return kwargs
    raise _unknown("transformer", family, TRANSFORMER_FAMILIES)
