"""Wan's VAE decode, keeping only the frames the teacher encodes: diffusers' blocks, our loop and buffers.

`decode_kept_frames(vae, z, keep)` gives what `AutoencoderKLWan.decode(z).sample.clamp(-1, 1)[:, :, keep]`
gives, bit for bit (tested on tiny models of Wan 2.1 and 2.2, bf16 and fp32, tiled and not), with less
alive at once. It runs diffusers' own decoder, `post_quant_conv` and `blend_v`/`blend_h`; what it
changes is only what is held between them, and three leaf computations rewritten to the same values:

- The frame loop (stock `_decode` / `tiled_decode`, diffusers 0.42) runs here, one latent frame at a
  time with the stock causal cache, and keeps only the selected pixel frames as they come out (21 of
  81 for Wan at 81 frames). Stock concatenates every frame of every tile and blends whole clips: at
  81 × 480 × 832 in bf16 that is 15 tiles × 81 frames (≈0.32 GB) plus two full-clip copies (≈0.2 GB each).
- Tiles are blended and cropped into one output buffer as they finish, in the stock order with the
  stock blend functions; of a finished tile only the strips its right and lower neighbours blend with
  are kept (the blend reads nothing else of it).
- Inside the decoder, for the duration of the call (instance `forward`s on leaf modules, removed after;
  a leaf that already has one, e.g. from another library's hook, is left as it is):
  - `WanRMS_norm` normalises in slices of at most `NORM_SLICE_BYTES` of fp32: the stock norm upcasts
    the whole activation to fp32 twice (≈1.2 GB at an untiled 480 × 832 frame's last block; a 256-px
    tile's stays whole); the slices give the same values, since the norm is over channels, position by
    position.
  - `WanUpsample` (nearest / nearest-exact) interpolates in the activation's own dtype: nearest
    interpolation copies values, so the fp32 round trip (4× the upsampled size in bf16) changes nothing.
  - `WanCausalConv3d` writes its cache frames and its input into one zero-padded buffer: stock
    concatenates them, then pads the concatenation (two copies of the input where we make one).
- Under the `stream` VAE tier the causal cache waits on the host between decoder calls (`HostCache`):
  at a 256 × 256 tile in bf16 Wan 2.1's cache is ≈0.31 GB, the largest thing left on the device. It
  comes back entry by entry as each conv runs, synchronously, so it costs PCIe time that the weights'
  prefetch does not hide (`planning.estimate.vae_cache_traffic_bytes`, counted in `plan`'s step time).
Encoding, LTX and HunyuanVideo are not touched (their decoders run in one stock call).

Measured (`crepa-mem trace ... --vae-tier stream --vae-tiling --json`, Wan 2.1 14B, 81 × 480 × 832, bf16 VAE,
`phase_peak_bytes.decode`): 578,215,334 B, where the stock decode set the whole call's 1,048,882,598 B.
"""
from __future__ import annotations

import contextlib
import math
import types
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crepa_mem.teacher.placement import pinning_available

# fp32 bytes of one slice of the sliced RMS norm. An untiled 480 × 832 Wan 2.1 decode upcasts 0.6 GB per
# norm (5 slices); a 256-px tile's 0.1 GB stays whole: there the slices' extra ops cost more time (kernel
# launches; under `crepa-mem trace`, +10 % for the reference) than the memory is worth below the loss phase.
NORM_SLICE_BYTES = 128 << 20


# ------------------------------------------------------------------ lean leaves
def _rms_norm_sliced(self, x: Tensor) -> Tensor:
    """WanRMS_norm.forward, normalised slice by slice along the height."""
    low = x.dtype in (torch.float16, torch.bfloat16) or any(t in str(x.dtype) for t in ("float4_", "float8_"))
    dim = -2  # height, for both the (B, C, T, H, W) and the (N, C, H, W) forms
    slices = math.ceil(x.numel() * 4 / NORM_SLICE_BYTES)
    if not (low and self.channel_first) or slices <= 1 or x.shape[dim] < 2:
        return type(self).forward(self, x)
    out = torch.empty_like(x)
    step = max(1, math.ceil(x.shape[dim] / slices))
    for start in range(0, x.shape[dim], step):
        part = x.narrow(dim, start, min(step, x.shape[dim] - start))
        normalized = F.normalize(part.float(), dim=1).to(x.dtype)
        out.narrow(dim, start, part.shape[dim]).copy_(normalized * self.scale * self.gamma + self.bias)
    return out


def _upsample_in_dtype(self, x: Tensor) -> Tensor:
    """WanUpsample.forward without its fp32 round trip (nearest modes copy values exactly)."""
    return nn.Upsample.forward(self, x)


def _causal_conv_one_buffer(self, x: Tensor, cache_x: Tensor | None = None) -> Tensor:
    """WanCausalConv3d.forward with the cache written into the padded input (stock: concatenate the cache
    and the input, then pad the concatenation): the same zeros, cache frames and input, in one buffer."""
    padding = list(self._padding)
    nc = cache_x.shape[2] if cache_x is not None and padding[4] > 0 else 0
    if nc > padding[4]:
        return type(self).forward(self, x, cache_x)
    buf = F.pad(x, padding)  # zero frames in front, as many as stock pads plus the cache's
    if nc:
        wl, _, ht, _, front, _ = padding
        buf[:, :, front - nc:front, ht:ht + x.shape[3], wl:wl + x.shape[4]] = cache_x.to(x.device)
    return nn.Conv3d.forward(self, buf)


def _lean_forwards() -> dict[type, object]:
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    return {wan.WanRMS_norm: _rms_norm_sliced, wan.WanUpsample: _upsample_in_dtype,
            wan.WanCausalConv3d: _causal_conv_one_buffer}


@contextlib.contextmanager
def lean_leaves(decoder: nn.Module) -> Iterator[None]:
    """The decoder's RMS norms, upsamplers and causal convs run lean for the block (see the module notes)."""
    lean, patched = _lean_forwards(), []
    for m in decoder.modules():
        fn = lean.get(type(m))
        if fn is None or "forward" in m.__dict__:
            continue
        if fn is _upsample_in_dtype and m.mode not in ("nearest", "nearest-exact"):
            continue
        m.forward = types.MethodType(fn, m)
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# ------------------------------------------------------------------ the causal cache on the host
class HostCache(list):
    """Wan's causal cache (`feat_cache`), each entry kept on the host between decoder calls.

    The stock blocks store an entry with `feat_cache[i] = x` and read it back only through
    `WanCausalConv3d` (`cache_x.to(x.device)`) or a slice `.to(x.device)`, so entries can live anywhere:
    one entry is on the device while its conv runs. Copies are synchronous: a slice of an entry is read
    by the host, which must not see a copy still in flight."""

    def __init__(self, size: int, host: torch.device):
        super().__init__([None] * size)
        self.host = host

    def __setitem__(self, index, value):
        if isinstance(value, Tensor) and value.device != self.host:
            if value.is_cuda and self.host.type == "cpu" and pinning_available():  # pinned: faster copies back
                value = torch.empty(value.shape, dtype=value.dtype, pin_memory=True).copy_(value)
            else:
                value = value.to(self.host)
        super().__setitem__(index, value)


# ------------------------------------------------------------------ the frame loop
def _frames_of_chunk(start: int, n: int, keep: Sequence[int]) -> list[int]:
    return [f - start for f in keep if start <= f < start + n]


def _decode_clip(vae: nn.Module, z_tile: Tensor, keep: Sequence[int], *, per_frame_quant: bool,
                 cache_host: torch.device | None) -> tuple[Tensor, int]:
    """The kept frames of one (tile of a) clip, patchified, unclamped; and the frames decoded.

    `per_frame_quant`: the tiled path applies post_quant_conv per latent frame of a tile, the untiled
    one to the whole latent first (mirrored, so each path equals its stock twin). `cache_host`: the
    causal cache lives there between calls (HostCache) instead of on the device."""
    vae.clear_cache()
    cache = vae._feat_map if cache_host is None else HostCache(len(vae._feat_map), cache_host)
    kept, start = [], 0
    x = None if per_frame_quant else vae.post_quant_conv(z_tile)
    try:
        for k in range(z_tile.shape[2]):
            vae._conv_idx = [0]
            frame = vae.post_quant_conv(z_tile[:, :, k:k + 1]) if per_frame_quant else x[:, :, k:k + 1]
            out = vae.decoder(frame, feat_cache=cache, feat_idx=vae._conv_idx, first_chunk=(k == 0))
            sel = _frames_of_chunk(start, out.shape[2], keep)
            if sel:
                kept.append(torch.stack([out[:, :, i] for i in sel], dim=2))  # no index tensor to copy over
            start += out.shape[2]
            blank = dict(size=out.shape[:2] + (0,) + out.shape[3:], dtype=out.dtype, device=out.device)
            del out, frame
    finally:
        vae.clear_cache()
        cache.clear()
    # none kept: the VAE gave fewer frames than asked for (the caller names the shortfall)
    return (torch.cat(kept, dim=2) if kept else torch.empty(**blank)), start


def _tiled(vae: nn.Module, z: Tensor, keep: Sequence[int], cache_host: torch.device | None) -> tuple[Tensor, int]:
    """AutoencoderKLWan.tiled_decode's loop, blending each finished tile into the output at once."""
    _, _, _, height, width = z.shape
    s = vae.spatial_compression_ratio
    patch = vae.config.patch_size
    sample_h, sample_w = height * s, width * s
    lat_h, lat_w = vae.tile_sample_min_height // s, vae.tile_sample_min_width // s
    lat_sh, lat_sw = vae.tile_sample_stride_height // s, vae.tile_sample_stride_width // s
    stride_h, stride_w = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    if patch is not None:
        sample_h, sample_w, stride_h, stride_w = sample_h // patch, sample_w // patch, stride_h // patch, stride_w // patch
        blend_h = vae.tile_sample_min_height // patch - stride_h
        blend_w = vae.tile_sample_min_width // patch - stride_w
    else:
        blend_h, blend_w = vae.tile_sample_min_height - stride_h, vae.tile_sample_min_width - stride_w
    out, decoded = None, 0
    above: dict[int, Tensor] = {}  # column → lower strip of the finished tile above
    for r, i in enumerate(range(0, height, lat_sh)):
        below: dict[int, Tensor] = {}
        left = None
        for c, j in enumerate(range(0, width, lat_sw)):
            tile, decoded = _decode_clip(vae, z[:, :, :, i:i + lat_h, j:j + lat_w], keep, per_frame_quant=True,
                                         cache_host=cache_host)
            if r > 0:
                tile = vae.blend_v(above[c], tile, blend_h)
            if c > 0:
                tile = vae.blend_h(left, tile, blend_w)
            below[c] = tile[:, :, :, max(0, tile.shape[-2] - blend_h):].clone()
            left = tile[..., max(0, tile.shape[-1] - blend_w):].clone()
            if out is None:
                out = tile.new_empty(tile.shape[:3] + (sample_h, sample_w))
            r0, c0 = r * stride_h, c * stride_w
            hh, ww = min(stride_h, tile.shape[-2], sample_h - r0), min(stride_w, tile.shape[-1], sample_w - c0)
            if hh > 0 and ww > 0:
                out[:, :, :, r0:r0 + hh, c0:c0 + ww] = tile[:, :, :, :hh, :ww]
            del tile
        above = below
    return out, decoded


def tiles_decode(vae: nn.Module, height: int, width: int) -> bool:
    """Whether AutoencoderKLWan.decode tiles this latent size."""
    s = vae.spatial_compression_ratio
    return bool(vae.use_tiling) and (width > vae.tile_sample_min_width // s or height > vae.tile_sample_min_height // s)


@torch.no_grad()
def decode_kept_frames(vae: nn.Module, z_BCThw: Tensor, keep: Sequence[int], *,
                       cache_host: torch.device | str | None = None) -> tuple[Tensor, int]:
    """`vae.decode(z).sample.clamp(-1, 1)[:, :, sorted(keep)]` of an AutoencoderKLWan, and the frame count
    it decodes; `z` is denormalised, in the VAE's dtype, on its execution device. `cache_host` keeps the
    causal cache there between decoder calls (the `stream` tier: the host)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    keep = sorted(set(keep))
    cache_host = None if cache_host is None or torch.device(cache_host) == z_BCThw.device else torch.device(cache_host)
    tiled = tiles_decode(vae, z_BCThw.shape[-2], z_BCThw.shape[-1])
    parts = z_BCThw.split(1) if vae.use_slicing and z_BCThw.shape[0] > 1 else (z_BCThw,)
    result, decoded = None, 0
    with lean_leaves(vae.decoder):
        for b0, z in zip(range(0, z_BCThw.shape[0], len(parts[0])), parts):
            x, decoded = (_tiled(vae, z, keep, cache_host) if tiled else
                          _decode_clip(vae, z, keep, per_frame_quant=False, cache_host=cache_host))
            if vae.config.patch_size is not None:
                x = unpatchify(x, patch_size=vae.config.patch_size)
            x = x.clamp_(-1.0, 1.0)
            if len(parts) == 1:
                return x, decoded
            if result is None:
                result = x.new_empty((z_BCThw.shape[0],) + x.shape[1:])
            result[b0:b0 + 1] = x
            del x
    return result, decoded
