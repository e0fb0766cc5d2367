"""The teacher path: clean latents → pixels → selected frames → DINOv2 tokens, in frame chunks.

Legend: B batch, C latent channels, T latent frames, F pixel frames, H×W pixels, N encoder tokens
per frame, D encoder width.

Memory effect, in order of size on the reference workload (Wan 14B, 81 frames at 480×832, ViT-g/518):
- Only the frames that temporal alignment keeps are ever encoded (81 → 21 for Wan): selecting before
  encoding gives SimpleTuner's loss exactly with about 4× less encoder work and activation.
- Decode first, keeping only the selected frames' pixels (21 × 3×480×832 bf16 ≈ 50 MB), then release
  the VAE before the encoder comes in: the two components' weights and activations never need the
  device at the same time (this is what makes a `swap` tier pay off).
- Frames are encoded `frames_per_chunk` images at a time; a chunk's resized pixels and encoder
  activations are freed before the next chunk is made.
- Wan's VAE decodes one latent frame at a time with a causal cache (its activation peak does not grow
  with T). Its stock `decode` then concatenates every frame's pixels (and, tiled, every tile's whole
  clip before blending). We run the same loop over its stock blocks, carrying the same cache, keep
  only the selected frames as they come and blend finished tiles into one output (wan_decode.py):
  identical pixels, while the full clip is never alive at once.
  Other VAEs (LTX, HunyuanVideo) decode in one call (their own tiling/slicing bounds them).

Threads: `TeacherPath.features` holds a lock per VAE and per encoder module for the whole call, so
callers from several threads (one model per GPU in threads, ThreadPoolExecutor loops) are served one
at a time with the right result: Wan's causal decode cache lives on the VAE module and a swap tier
moves the module itself, so neither can be shared mid-call.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crepa_mem.errors import ShapeError, TeacherOutOfMemoryError
from crepa_mem.loss import temporal_indices
from crepa_mem.teacher.placement import Placement, pinning_available

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------ VAE side
def vae_compression(vae: nn.Module) -> tuple[int, int]:
    """(temporal, spatial) compression of a diffusers video VAE, read from its config/attributes."""
    cfg = vae.config
    for t_key, s_key in (("scale_factor_temporal", "scale_factor_spatial"),  # Wan
                         ("temporal_compression_ratio", "spatial_compression_ratio")):  # HunyuanVideo
        t, s = cfg.get(t_key), cfg.get(s_key)
        if t and s:
            return int(t), int(s)
    # LTX computes the ratios in __init__ (its config entries may be None).
    t, s = getattr(vae, "temporal_compression_ratio", None), getattr(vae, "spatial_compression_ratio", None)
    if t and s:
        return int(t), int(s)
    raise ValueError(f"cannot read the compression of {type(vae).__name__}")


def vae_latent_channels(vae: nn.Module) -> int:
    """Latent channels of a diffusers video VAE (z_dim for Wan, latent_channels otherwise)."""
    cfg = vae.config
    return int(cfg.get("z_dim") or cfg["latent_channels"])


def pixel_frames(vae: nn.Module, latent_frames: int) -> int:
    """Frames a causal video VAE decodes from T latent frames: 1 + t·(T-1)."""
    return 1 + vae_compression(vae)[0] * (latent_frames - 1)


def denormalize_latents(latents_BCThw: Tensor, vae: nn.Module) -> Tensor:
    """Undo the training-time latent normalisation of each family (REFERENCE §2.2), in fp32."""
    z = latents_BCThw.float()
    cfg, name = vae.config, type(vae).__name__
    shape = (1, z.shape[1]) + (1,) * (z.ndim - 2)
    if name == "AutoencoderKLLTXVideo":  # buffers; diffusers' LTX pipeline: z·std/sf + mean
        mean = vae.latents_mean.to(z.device, torch.float32).view(shape)
        std = vae.latents_std.to(z.device, torch.float32).view(shape)
        return z * std / float(cfg.scaling_factor) + mean
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=torch.float32).view(shape)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=torch.float32).view(shape)
        z = z / float(getattr(cfg, "scaling_factor", None) or 1.0)
        return z * std + mean
    z = z / float(getattr(cfg, "scaling_factor", None) or 1.0)
    shift = getattr(cfg, "shift_factor", None)
    return z + shift if shift is not None else z


def decode_selected(vae: nn.Module, z_BCThw: Tensor, keep: list[int], *,
                    cache_host: str | None = None) -> tuple[Tensor, int]:
    """Clamped pixels (B, 3, K, H, W) of the kept frames (in order) in the VAE's dtype, and the number of
    frames the VAE decoded. `z` is already denormalised and in the VAE's dtype, on its execution device.

    Wan decodes frame by frame in our own loop over its stock blocks, keeping only these frames
    (teacher/wan_decode.py); LTX and HunyuanVideo decode in one stock call (their own tiling/slicing
    bounds them) and the frames are selected after it. `cache_host`: where Wan's causal cache waits
    between decoder calls (the `stream` tier keeps it on the host with the weights)."""
    if type(vae).__name__ == "AutoencoderKLWan":
        from crepa_mem.teacher.wan_decode import decode_kept_frames

        return decode_kept_frames(vae, z_BCThw, keep, cache_host=cache_host)
    if type(vae).__name__ == "AutoencoderKLLTXVideo" and getattr(vae.config, "timestep_conditioning", False):
        # Clean latents: decode timestep 0.
        temb = torch.zeros(z_BCThw.shape[0], device=z_BCThw.device, dtype=z_BCThw.dtype)
        pixels = vae.decode(z_BCThw, temb).sample
    else:
        pixels = vae.decode(z_BCThw).sample
    frames = pixels.shape[2]
    wanted = [f for f in sorted(set(keep)) if f < frames]
    if not wanted:  # the VAE gave fewer frames than asked for (the caller names the shortfall)
        return pixels[:, :, :0].clone(), frames
    return torch.stack([pixels[:, :, i] for i in wanted], dim=2).clamp_(-1.0, 1.0), frames  # no index tensor


# ------------------------------------------------------------------ encoder side
def encoder_dim(encoder: nn.Module) -> int:
    """Output width of a transformers Dinov2Model or a torch.hub DINOv2 (`embed_dim`)."""
    cfg = getattr(encoder, "config", None)
    if cfg is not None and getattr(cfg, "hidden_size", None):
        return int(cfg.hidden_size)
    if getattr(encoder, "embed_dim", None):
        return int(encoder.embed_dim)
    raise ValueError(f"cannot tell the output width of encoder {type(encoder).__name__}")


def encoder_patch_size(encoder: nn.Module) -> int:
    cfg = getattr(encoder, "config", None)
    if cfg is not None and getattr(cfg, "patch_size", None):
        return int(cfg.patch_size)
    pe = getattr(encoder, "patch_embed", None)
    size = getattr(pe, "patch_size", 14)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def encode_tokens(encoder: nn.Module, images: Tensor) -> Tensor:
    """Patch tokens after the final LayerNorm: (n, 3, h, w) → (n, N, D)."""
    if hasattr(encoder, "forward_features"):  # torch.hub DINOv2
        return encoder.forward_features(images)["x_norm_patchtokens"]
    out = encoder(pixel_values=images)
    return out.last_hidden_state[:, leading_tokens(encoder):]


def leading_tokens(encoder: nn.Module) -> int:
    """CLS and register tokens ahead of the patch tokens in a transformers DINOv2's output."""
    return 1 + int(getattr(encoder.config, "num_register_tokens", 0) or 0)


def encoder_attention_mask(encoder: nn.Module, embeddings: Tensor):
    """The mask Dinov2Model.forward builds for its layers when given none (None where it needs none)."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 4.56 builds no mask here
        return None
    return create_bidirectional_mask(config=encoder.config, inputs_embeds=embeddings, attention_mask=None)


def module_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def prepare_images(frames_n3HW: Tensor, size: tuple[int, int], encoder_dtype: torch.dtype) -> Tensor:
    """[-1, 1] pixels → [0, 1] → bilinear resize in the VAE dtype → encoder dtype → ImageNet norm."""
    x = (frames_n3HW + 1.0) * 0.5
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).to(encoder_dtype)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------ the path
@dataclass
class TeacherFeatures:
    """Encoder tokens of the selected frames, with what it took to make them."""

    features: Tensor                      # (B, T_sel, N, D) on the compute device (staged: on the host)
    grid: tuple[int, int]                 # encoder token grid (h, w)
    frame_indices: list[int]              # pixel frames kept (temporal alignment)
    pixel_frames: int                     # F decoded
    stats: dict = field(default_factory=dict)
    staged: bool = False                  # the chunked loss copies the frames each chunk needs to the device


_OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def _is_oom(err: BaseException) -> bool:
    """torch's OutOfMemoryError, and the RuntimeErrors CUDA/cuBLAS raise for the same thing."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MESSAGES))


_MODULE_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_MODULE_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _holding(*modules: nn.Module | None) -> Iterator[None]:
    """The locks of these modules, taken in one global order (no deadlock between two paths)."""
    with _MODULE_LOCKS_GUARD:
        locks = {id(m): _MODULE_LOCKS.setdefault(m, threading.Lock()) for m in modules if m is not None}
    with contextlib.ExitStack() as stack:
        for _, lock in sorted(locks.items()):
            stack.enter_context(lock)
        yield


class TeacherPath:
    """decode → select frames → resize/normalise → encode, streamed in chunks of frames."""

    def __init__(self, *, vae: Placement | None, encoder: Placement, image_size: int | tuple[int, int],
                 compute_device: torch.device | str, frames_per_chunk: int | None = None,
                 true_grid: bool = False, on_chunk: Callable[[int], None] | None = None,
                 stage_features: bool = False):
        self.vae, self.encoder = vae, encoder
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.compute_device = torch.device(compute_device)
        self.frames_per_chunk = frames_per_chunk if frames_per_chunk and frames_per_chunk > 0 else None
        self.true_grid = true_grid
        self.on_chunk = on_chunk  # test seam: called before each encoder chunk with its image count
        self.working_chunk: int | None = None  # the chunk an OOM back-off settled on, kept for later steps
        # The chunked loss (crepa_mem_loss_chunk) copies each chunk's frames to the device itself: the
        # features can wait on the host (pinned on CUDA), written there as each encoder call finishes.
        self.stage_features = stage_features and self.compute_device.type != "cpu"

    def input_size(self, dit_grid: tuple[int, int] | None) -> tuple[int, int]:
        """Encoder input size: (S, S), or (h'·patch, w'·patch) in true-grid mode."""
        if self.true_grid and dit_grid is not None:
            p = encoder_patch_size(self.encoder.module)
            return dit_grid[0] * p, dit_grid[1] * p
        return self.image_size

    def features(self, latents_BCThw: Tensor, target_frames: int,
                 dit_grid: tuple[int, int] | None = None) -> TeacherFeatures:
        """Tokens of the pixel frames SimpleTuner would keep for `target_frames` DiT frames (one thread
        at a time per VAE/encoder: see the module notes)."""
        if self.vae is None:
            raise ValueError("the teacher path needs a VAE (or a feature cache) to see pixels")
        with _holding(self.vae.module, self.encoder.module):
            return self._features(latents_BCThw, target_frames, dit_grid)

    @torch.no_grad()
    def _features(self, latents_BCThw: Tensor, target_frames: int,
                  dit_grid: tuple[int, int] | None) -> TeacherFeatures:
        vae_mod = self.vae.module
        num_pixel = pixel_frames(vae_mod, latents_BCThw.shape[2])
        keep = temporal_indices(num_pixel, target_frames).tolist() if num_pixel > target_frames \
            else list(range(num_pixel))
        slot_of = {f: i for i, f in enumerate(keep)}
        size = self.input_size(dit_grid)
        enc_dtype = module_dtype(self.encoder.module)
        batch = latents_BCThw.shape[0]
        chunk = min(self.working_chunk or self.frames_per_chunk or batch * len(keep),
                    self.frames_per_chunk or batch * len(keep))
        stats = {"chunk_frames": chunk, "retries": 0, "encoder_calls": 0, "frames_encoded": 0}
        out: Tensor | None = None
        pending: list[tuple[int, int, Tensor]] = []  # (batch index, slot, frame (3, H, W))

        def place_tokens(group: list, tokens: Tensor) -> None:
            """One encoder call's tokens into their (video, kept-frame) slots of the output."""
            nonlocal out
            if out is None:
                shape = (batch, len(keep), tokens.shape[1], tokens.shape[2])
                out = (torch.empty(shape, dtype=tokens.dtype, device="cpu", pin_memory=pinning_available())
                       if self.stage_features else torch.empty(shape, dtype=tokens.dtype, device=self.compute_device))
            for (b, slot, _), tok in zip(group, tokens):
                out[b, slot] = tok
            stats["encoder_calls"] += 1
            stats["frames_encoded"] += len(group)

        def encode_pending(encoder: nn.Module) -> None:
            nonlocal out, chunk
            if getattr(self.encoder, "layers", None) is not None:  # streamed: layer-major, weights cross once
                return encode_layer_major()
            while pending:
                take = min(chunk, len(pending))
                group = pending[:take]
                try:
                    tokens = self._encode(encoder, [g[2] for g in group], size, enc_dtype)
                except Exception as err:  # noqa: BLE001 - only OOM is retried
                    if not _is_oom(err):
                        raise
                    if take == 1:
                        raise TeacherOutOfMemoryError(
                            f"out of memory encoding one frame (encoder tier {self.encoder.tier}, "
                            f"VAE tier {self.vae.tier}, chunk tried down to 1 frame from "
                            f"{self.frames_per_chunk or 'all'}); run `crepa-mem doctor --log` on this "
                            f"traceback, or `crepa-mem plan` for a configuration that fits") from err
                    chunk = max(1, take // 2)  # retry from this chunk; earlier chunks are kept
                    stats["retries"] += 1
                    stats["chunk_frames"] = self.working_chunk = chunk  # later steps start here
                    continue
                del pending[:take]
                place_tokens(group, tokens)

        def encode_layer_major() -> None:
            nonlocal out, chunk
            while True:
                groups = [pending[i:i + chunk] for i in range(0, len(pending), chunk)]
                try:
                    states = self.encoder.encode_layer_major(
                        [lambda g=g: self._images([f[2] for f in g], size, enc_dtype) for g in groups])
                    break
                except Exception as err:  # noqa: BLE001 - only OOM is retried (the whole pass, smaller chunks)
                    if not _is_oom(err) or chunk == 1:
                        raise
                    chunk = max(1, chunk // 2)
                    stats["retries"] += 1
                    stats["chunk_frames"] = chunk
            skip = leading_tokens(self.encoder.module)
            for group, h in zip(groups, states):
                place_tokens(group, h[:, skip:])
            pending.clear()

        # Phase 1, decode: only the selected frames' pixels are kept, the rest is freed as it comes.
        # The VAE (and Wan's causal cache) is released before the encoder is brought in, so the two
        # never need device memory at once: a swap tier holds one of them at a time.
        z = denormalize_latents(latents_BCThw.to(self.vae.exec_device), vae_mod).to(module_dtype(vae_mod))
        try:
            with self.vae.active() as vae:
                pixels, decoded = decode_selected(vae, z, keep,
                                                  cache_host="cpu" if self.vae.tier == "stream" else None)
        except Exception as err:  # noqa: BLE001 - only OOM gets the phase and what to try
            if not _is_oom(err):
                raise
            raise TeacherOutOfMemoryError(
                f"out of memory in the VAE decode (phase vae_decode, VAE tier {self.vae.tier}, tiling "
                f"{'on' if getattr(vae_mod, 'use_tiling', False) else 'off'}, {latents_BCThw.shape[0]} × "
                f"{latents_BCThw.shape[2]} latent frames); try crepa_mem_vae_tiling, a lower crepa_mem_vae_tier "
                f"(swap, stream), or a feature cache; `crepa-mem plan` finds one that fits") from err
        del z
        if decoded != num_pixel:  # slots of frames that never came would stay uninitialised
            raise ShapeError(f"{type(vae_mod).__name__} decoded {decoded} frames from {latents_BCThw.shape[2]} latent "
                             f"frames; expected {num_pixel} (1 + temporal compression × (T − 1))")
        for k, frame in enumerate(sorted(slot_of)):  # views of one tensor, all of it kept
            for b in range(batch):
                pending.append((b, slot_of[frame], pixels[b, :, k]))
        del pixels
        # Phase 2, encode `chunk` frames at a time: a chunk's resized images and activations are freed
        # before the next chunk's are made.
        with self.encoder.active() as encoder:
            encode_pending(encoder)
        assert out is not None
        p = encoder_patch_size(self.encoder.module)
        grid = (size[0] // p, size[1] // p)
        return TeacherFeatures(out, grid, keep, num_pixel, stats, staged=self.stage_features)

    def _images(self, frames: list[Tensor], size: tuple[int, int], enc_dtype: torch.dtype) -> Tensor:
        """One chunk's encoder input on the encoder's device."""
        if self.on_chunk is not None:
            self.on_chunk(len(frames))
        return prepare_images(torch.stack(frames).to(self.encoder.exec_device), size, enc_dtype)

    def _encode(self, encoder: nn.Module, frames: list[Tensor], size: tuple[int, int],
                enc_dtype: torch.dtype) -> Tensor:
        return encode_tokens(encoder, self._images(frames, size, enc_dtype))  # placed into the output by the caller
