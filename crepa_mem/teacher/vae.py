"""The VAE as the teacher uses it: frozen, decode-only when asked, tiled when asked."""
from __future__ import annotations

from torch import nn

from crepa_mem.config import CrepaConfig


def prepare_vae(vae: nn.Module, cfg: CrepaConfig) -> nn.Module:
    """Frozen, eval; decode-only when asked (SimpleTuner drops vae.encoder and vae.quant_conv); tiling."""
    vae.eval().requires_grad_(False)
    if cfg.drop_vae_encoder:
        for name in ("encoder", "quant_conv"):
            if getattr(vae, name, None) is not None:
                setattr(vae, name, None)
    if cfg.vae_tiling and hasattr(vae, "enable_tiling"):
        if cfg.vae_tile_size:
            vae.enable_tiling(tile_sample_min_height=cfg.vae_tile_size, tile_sample_min_width=cfg.vae_tile_size,
                              tile_sample_stride_height=cfg.vae_tile_size * 3 // 4,
                              tile_sample_stride_width=cfg.vae_tile_size * 3 // 4)
        else:
            vae.enable_tiling()
    return vae
