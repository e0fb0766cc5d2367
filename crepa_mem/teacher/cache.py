"""The `cache` tier: teacher features computed once from the cached latents, read back during training.

Legend: B batch, C latent channels, T latent frames, T' DiT frames, N encoder tokens, D encoder width.

Memory effect: with a feature cache neither DINOv2 nor the VAE is ever loaded by the trainer; a step
reads B × T_sel × N × D values from disk (Wan 14B reference, ViT-g/518 fp32: 21 × 1369 × 1536 × 4 B
= 177 MB per sample, half with a bf16 encoder) and hashes each latent (8 MB) to find them.

Correctness: an entry is found by the sha256 of the latent's exact bytes, dtype and shape, inside a
store whose manifest records every setting that changes the features. Anything that does not match
is a FeatureCacheError — a cache is never recomputed behind the user's back and never used stale.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from crepa_mem.config import CrepaConfig
from crepa_mem.errors import FeatureCacheError
from crepa_mem.loss import temporal_indices
from crepa_mem.teacher.identity import (CONFIG_KEYS, FRAME_SELECTION, TEACHER_RECIPE, VAE_KEYS,  # noqa: F401 - re-exported
                                        check_settings, encoder_identity, encoder_settings, teacher_settings,
                                        vae_settings)
from crepa_mem.teacher.path import TeacherFeatures, TeacherPath, encoder_dim, vae_latent_channels
from crepa_mem.teacher.store import FeatureStore, latent_key

LATENT_SUFFIXES = (".pt", ".safetensors")
MAX_LATENT_FILE_BYTES = 4 << 30  # a latent file (gzip: its content) larger than this is refused, not read


class LatentFileError(FeatureCacheError):
    """A latent file that cannot be read or does not fit the VAE: bad input."""

    exit_code = 2


# ------------------------------------------------------------------ the tier
class FeatureCacheTeacher:
    """Drop-in teacher for CrepaRegularizer: `features()` reads precomputed tokens instead of decoding
    and encoding. Has no `.encoder` or `.vae`, so the regularizer logs both tiers as "cache"."""

    tier = "cache"

    def __init__(self, store: FeatureStore, cfg: CrepaConfig, compute_device: torch.device | str = "cpu"):
        self.store, self.config = store, cfg
        self.compute_device = torch.device(compute_device)

    @classmethod
    def open(cls, directory: str | os.PathLike, cfg: CrepaConfig, compute_device: torch.device | str = "cpu",
             *, vae: nn.Module | None = None, encoder: nn.Module | None = None) -> "FeatureCacheTeacher":
        """Open a store and check it against the config, and against the weights of the VAE and encoder
        when given (hashed once here, not kept); a warning says which weights could not be checked."""
        store = FeatureStore.open(directory)
        check_settings(store, cfg, vae=vae, encoder=encoder, warn_unchecked=True,
                       hint="rebuild it with `crepa-mem cache build` and the same settings and weights, or "
                            "point crepa_mem_feature_cache at a matching cache")
        return cls(store, cfg, compute_device)

    @property
    def encoder_dim(self) -> int:
        return self.store.encoder_dim

    @torch.no_grad()
    def features(self, latents_BCThw: Tensor, target_frames: int,
                 dit_grid: tuple[int, int] | None = None) -> TeacherFeatures:
        """The stored tokens of each batch item, (B, T_sel, N, D) in their stored dtype.

        Each entry is read from its file straight into its slice of one batch buffer (pinned when the
        compute device is CUDA), checksummed as it arrives. With the chunked loss (crepa_mem_loss_chunk) the
        buffer stays on the host, `staged`: each chunk copies the frames it needs (loss.FeatureSide), so
        the clip never sits on the device; otherwise it goes to the compute device in one copy."""
        want_grid = tuple(dit_grid) if (self.config.true_grid and dit_grid is not None) else None
        batch, device = latents_BCThw.shape[0], self.compute_device
        buffer: list[Tensor] = []

        def into(b: int):
            def slot(shape: tuple, dtype: torch.dtype) -> Tensor:
                if not buffer:
                    buffer.append(torch.empty((batch, *shape), dtype=dtype, pin_memory=device.type == "cuda"))
                if tuple(buffer[0].shape[1:]) != shape or buffer[0].dtype != dtype:
                    raise FeatureCacheError(
                        f"feature-cache entries of one batch differ: item {b} holds {shape} "
                        f"{str(dtype).removeprefix('torch.')}, item 0 {tuple(buffer[0].shape[1:])} "
                        f"{str(buffer[0].dtype).removeprefix('torch.')}; rebuild the cache with one setting")
                return buffer[0][b]
            return slot

        entries, read_bytes = [], 0
        for b in range(batch):
            latent = latents_BCThw[b]
            key = latent_key(latent)
            if not self.store.has(key):
                raise FeatureCacheError(
                    f"feature cache {str(self.store.root)!r} has no entry for batch item {b} (latent "
                    f"{tuple(latent.shape)} {str(latent.dtype).removeprefix('torch.')}, key {key[:16]}…; the "
                    f"cache was built from latents as {self.store.settings.get('latents_dtype', 'stored')}): "
                    f"build it with `crepa-mem cache build` from the same latents the trainer passes")
            entry = self.store.read(key, into=into(b))
            f = entry.pixel_frames
            keep = temporal_indices(f, target_frames).tolist() if f > target_frames else list(range(f))
            if keep != entry.frame_indices or entry.dit_grid != want_grid:
                raise FeatureCacheError(
                    f"feature-cache entry {key[:16]}… was built for {entry.target_frames} DiT frames (pixel "
                    f"frames {entry.frame_indices}) and DiT grid {entry.dit_grid}, but training asks for "
                    f"{target_frames} frames ({keep}) and grid {want_grid}: rebuild with --target-frames/--model "
                    f"matching the trainer")
            entry.features = None  # a view of the buffer
            entries.append(entry)
            read_bytes += entry.nbytes
        staged = self.config.loss_chunk > 0 and device.type != "cpu"
        features = buffer[0] if staged else buffer[0].to(device)
        first = entries[0]
        stats = {"tier": "cache", "hits": len(entries), "read_bytes": read_bytes}
        return TeacherFeatures(features, first.grid, first.frame_indices, first.pixel_frames, stats, staged=staged)


# ------------------------------------------------------------------ latent files
def find_latent_files(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """Every .pt / .safetensors under `root` (SimpleTuner's VAE cache or plain tensors), sorted."""
    root = Path(root)
    skip = Path(exclude).resolve() if exclude else None
    out = []
    for p in root.rglob("*"):
        if p.suffix not in LATENT_SUFFIXES or p.name.startswith(".") or not p.is_file():
            continue
        if skip is not None and skip in p.resolve().parents:
            continue
        out.append(p)
    return sorted(out)


def read_latents(path: str | os.PathLike) -> list[Tensor]:
    """The (C, T, h, w) latents of one file, as the trainer receives them.

    SimpleTuner writes one `.pt` per sample with torch.save (gzip-compressed under
    compress_disk_cache): a tensor (C, T, h, w), or a dict whose "latents" holds it (LTX adds
    num_frames/height/width). Plain .pt/.safetensors files may hold (C, h, w) image latents or a
    batch (B, C, T, h, w); safetensors use the tensor named "latents", or the only tensor.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            obj = tensors.get("latents", next(iter(tensors.values())) if len(tensors) == 1 else tensors)
        else:
            from crepa_mem.fileio import read_capped

            data = read_capped(path, MAX_LATENT_FILE_BYTES)  # gzip too: a bomb stops at the cap
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is the same user-facing problem
        raise LatentFileError(f"cannot read latent file {str(path)!r}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict):
        if not isinstance(obj.get("latents"), Tensor):
            raise LatentFileError(f"latent file {str(path)!r} holds a dict without a 'latents' tensor "
                                  f"(keys: {', '.join(map(str, obj))})")
        obj = obj["latents"]
    if not isinstance(obj, Tensor):
        raise LatentFileError(f"latent file {str(path)!r} holds a {type(obj).__name__}, not a tensor")
    if obj.ndim == 3:
        return [obj.unsqueeze(1)]
    if obj.ndim == 4:
        return [obj]
    if obj.ndim == 5:
        return list(obj.unbind(0))
    raise LatentFileError(f"latent file {str(path)!r} holds a tensor of shape {tuple(obj.shape)}; "
                          f"valid: (C, T, h, w), (B, C, T, h, w) or (C, h, w)")


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A diffusers VAE saved with save_pretrained: the class named by config.json's `_class_name`."""
    import diffusers

    path = Path(path)
    try:
        name = json.loads((path / "config.json").read_text())["_class_name"]
        cls = getattr(diffusers, name)
    except FileNotFoundError:
        raise LatentFileError(f"--vae {str(path)!r} has no config.json (a diffusers VAE folder is expected)") from None
    except (KeyError, AttributeError, TypeError, ValueError, RecursionError) as e:
        raise LatentFileError(f"--vae {str(path)!r}: config.json does not name a diffusers class "
                              f"({type(e).__name__}: {str(e)[:120]})") from None
    try:
        vae = cls.from_pretrained(str(path), torch_dtype=dtype)
    except Exception as e:  # noqa: BLE001 - a damaged weights file fails in many ways (safetensors, pickle, OSError)
        raise LatentFileError(f"--vae {str(path)!r}: its weights cannot be loaded ({type(e).__name__}: "
                              f"{str(e)[:160]}); save the VAE again with save_pretrained") from None
    return vae.eval().requires_grad_(False)


def load_model_vae(model: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The VAE of a checkpoint profile (`--model wan-2.1-14b`) from the local Hugging Face cache only."""
    import warnings

    import diffusers

    from crepa_mem.errors import EncoderNotAvailableError
    from crepa_mem.profiles import get_model

    prof = get_model(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # huggingface_hub deprecation notes on an offline lookup
            vae = getattr(diffusers, prof.vae.diffusers_class).from_pretrained(
                prof.hub_id, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EncoderNotAvailableError(
            f"the VAE of {prof.name} ({prof.hub_id}, subfolder vae) is not in the local Hugging Face cache "
            f"({type(e).__name__}); pass --vae DIR (a folder saved with save_pretrained)") from None
    return vae.eval().requires_grad_(False)


# ------------------------------------------------------------------ building
@dataclass
class BuildSummary:
    files: int = 0
    samples: int = 0
    written: int = 0
    skipped: int = 0        # entries already present and intact (resume)
    repaired: int = 0       # entries present but corrupt (or made for another T' or grid), written again
    bytes_written: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, other: "BuildSummary") -> None:
        """Sum of counts across ranks; the wall time is the slowest rank's."""
        for k, v in asdict(other).items():
            setattr(self, k, max(getattr(self, k), v) if k == "seconds" else getattr(self, k) + v)


def build_feature_cache(files: Sequence[Path], out: str | os.PathLike, *, cfg: CrepaConfig, encoder: nn.Module,
                        vae: nn.Module, device: torch.device | str = "cpu", target_frames: int | None = None,
                        patch_size: tuple[int, int, int] = (1, 2, 2), latents_dtype: torch.dtype | None = None,
                        rank: int = 0, world: int = 1, source_root: str | os.PathLike | None = None,
                        info: dict | None = None, on_file: Callable[[Path], None] | None = None,
                        on_entry: Callable[[int], None] | None = None) -> BuildSummary:
    """Compute and store the teacher features of every latent in `files[rank::world]`.

    T' is `target_frames`, or T // patch_t of each latent (the DiT's frames); the DiT grid (for
    true-grid mode) is (h // ph, w // pw). Entries already present and intact are skipped, so a
    killed build resumes where it stopped. `on_file` is called after each file (progress), and
    `on_entry(n)` after the n-th entry this process wrote (a test seam for interruptions).
    """
    from crepa_mem.teacher.encoders import DTYPES
    from crepa_mem.teacher.vae import prepare_vae
    from crepa_mem.teacher.tiers import place

    t0 = time.perf_counter()
    device = torch.device(device)
    # The weights fingerprints make a resume with other weights a settings mismatch, not a silent skip.
    settings = {**teacher_settings(cfg), **vae_settings(vae), **encoder_settings(encoder, cfg),
                "latents_dtype": str(latents_dtype).removeprefix("torch.") if latents_dtype else "as stored"}
    store = FeatureStore.create(out, settings, encoder_dim=encoder_dim(encoder), info=info, rank=rank)
    store.remove_stale_temps()
    path = TeacherPath(vae=place(prepare_vae(vae, cfg), "gpu", compute_device=device),
                       encoder=place(encoder.eval().requires_grad_(False), "gpu", compute_device=device,
                                     dtype=DTYPES[cfg.encoder_dtype]),
                       image_size=cfg.encoder_image_size, compute_device=device,
                       frames_per_chunk=cfg.frames_per_chunk, true_grid=cfg.true_grid)
    channels = vae_latent_channels(vae)
    root = Path(source_root) if source_root else None
    summary = BuildSummary()
    for file in list(files)[rank::world]:
        summary.files += 1
        source = str(file.relative_to(root)) if root and file.is_relative_to(root) else str(file)
        for latent in read_latents(file):
            summary.samples += 1
            if latents_dtype is not None:
                latent = latent.to(latents_dtype)
            if latent.shape[0] != channels:
                raise LatentFileError(f"latent file {str(file)!r} has {latent.shape[0]} channels "
                                      f"{tuple(latent.shape)}, but the {type(vae).__name__} decodes {channels}")
            if not torch.isfinite(latent).all():
                bad = int((~torch.isfinite(latent)).sum())
                raise LatentFileError(f"latent file {str(file)!r} holds {bad} NaN/Inf value(s) in {tuple(latent.shape)}: "
                                      f"its features would be NaN; re-encode it (remove it from the VAE cache)")
            key = latent_key(latent)
            t_dit = target_frames or max(1, latent.shape[1] // patch_size[0])
            dit_grid = (latent.shape[2] // patch_size[1], latent.shape[3] // patch_size[2]) if cfg.true_grid else None
            if store.has(key):
                if _reusable(store, key, t_dit, dit_grid):
                    summary.skipped += 1
                    continue
                summary.repaired += 1
            result = path.features(latent.unsqueeze(0).to(device), t_dit, dit_grid)
            summary.bytes_written += store.write(
                key, result.features[0], frame_indices=result.frame_indices, pixel_frames=result.pixel_frames,
                target_frames=t_dit, grid=result.grid, dit_grid=dit_grid, source=source, rank=rank)
            summary.written += 1
            if on_entry is not None:
                on_entry(summary.written)
        if on_file is not None:
            on_file(file)
    summary.seconds = time.perf_counter() - t0
    return summary


def _reusable(store: FeatureStore, key: str, target_frames: int, dit_grid: tuple[int, int] | None) -> bool:
    """An existing entry is kept only if it reads back intact and was made for the same T' and grid."""
    try:
        entry = store.read(key)
    except FeatureCacheError:
        return False
    return entry.target_frames == target_frames and entry.dit_grid == dit_grid
