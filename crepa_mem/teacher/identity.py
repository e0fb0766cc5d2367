"""What made a feature cache: the settings that change the teacher features, and the weights themselves.

A cache is only as right as the weights it was built with. Class + config + dtype cannot tell two VAEs
with the same config apart, and an encoder *name* cannot tell two folders apart, so the build records a
content fingerprint of each state dict (`weights_fingerprint`, computed once per build or open) and every
later build-resume and training run that has the weights at hand compares it; when they are not at hand
(the documented cache setup loads neither) that is said once, with how to check.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crepa_mem.config import CrepaConfig
from crepa_mem.errors import FeatureCacheError
from crepa_mem.teacher.store import FeatureStore, settings_diff, tensor_bytes

# Bump when the teacher path's arithmetic changes (decode, frame selection, resize, normalisation,
# token choice): every cache built before then becomes a settings mismatch instead of a silent drift.
TEACHER_RECIPE = "crepa-mem-teacher/1"
FRAME_SELECTION = "linspace(0, F-1, T').long() when F > T', else all F"
# Settings the training config can be checked against (the VAE ones need the VAE itself).
CONFIG_KEYS = ("teacher_recipe", "encoder", "encoder_image_size", "encoder_dtype", "true_grid",
               "vae_tiling", "vae_tile_size", "frame_selection")
VAE_KEYS = ("vae_class", "vae_config_sha256", "vae_dtype", "vae_weights_sha256")
ENCODER_KEYS = ("encoder_weights_sha256",)
# The decode never touches the VAE's encoder half (SimpleTuner may even drop it): not part of its identity.
_DECODE_UNUSED = ("encoder.", "quant_conv.")
_VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_diffusers_version",
             "_use_default_values", "_commit_hash")


def _config_sha(config: dict) -> str:
    clean = {k: v for k, v in config.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(module: nn.Module, dtype: torch.dtype | None = None, skip: tuple[str, ...] = ()) -> str:
    """sha256 over the state dict (names, shapes, bytes), floating tensors cast to `dtype` first so a
    trainer's fp32 copy and the build's bf16 load of the same weights agree."""
    h = hashlib.sha256(b"crepa-mem-weights/1")
    for name, t in sorted(module.state_dict().items()):
        if name.startswith(skip) or not isinstance(t, torch.Tensor):
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        h.update(f"|{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def encoder_identity(name: str) -> str:
    """What the encoder *is called*: a hub id for a known name or hub id; for a local directory, a
    fingerprint of its config and weight files (sizes and the first/last MiB), so a moved folder still
    matches. The weights themselves are `encoder_weights_sha256`."""
    path = Path(name)
    if path.is_dir():
        h = hashlib.sha256()
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            try:
                h.update(_config_sha(json.loads(cfg_file.read_text())).encode())
            except (ValueError, UnicodeDecodeError, AttributeError):
                h.update(cfg_file.read_bytes())  # unreadable configs still fingerprint by their bytes
        for weights in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")):
            size = weights.stat().st_size
            h.update(f"{weights.name}:{size}".encode())
            with open(weights, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
        return f"dir:{h.hexdigest()[:32]}"
    from crepa_mem.errors import ProfileNotFoundError
    from crepa_mem.teacher.encoders import hub_id_for

    try:
        return hub_id_for(name)
    except ProfileNotFoundError:
        return name


def teacher_settings(cfg: CrepaConfig) -> dict[str, Any]:
    """The config's settings that change the teacher features (the keys of CONFIG_KEYS)."""
    return {
        "teacher_recipe": TEACHER_RECIPE,
        "encoder": encoder_identity(cfg.encoder),
        "encoder_image_size": None if cfg.true_grid else int(cfg.encoder_image_size),
        "encoder_dtype": cfg.encoder_dtype,
        "true_grid": bool(cfg.true_grid),
        "vae_tiling": bool(cfg.vae_tiling),
        "vae_tile_size": cfg.vae_tile_size if cfg.vae_tiling else None,
        "frame_selection": FRAME_SELECTION,
    }


def vae_settings(vae: nn.Module, hash_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What the VAE is (class + config + decoder weights, hashed as `hash_dtype`) and the dtype it decodes in."""
    from crepa_mem.teacher.path import module_dtype

    dtype = module_dtype(vae)
    return {"vae_class": type(vae).__name__, "vae_config_sha256": _config_sha(dict(vae.config)),
            "vae_dtype": str(dtype).removeprefix("torch."),
            "vae_weights_sha256": weights_fingerprint(vae, hash_dtype or dtype, skip=_DECODE_UNUSED)}


def encoder_settings(encoder: nn.Module, cfg: CrepaConfig) -> dict[str, Any]:
    from crepa_mem.teacher.encoders import DTYPES

    return {"encoder_weights_sha256": weights_fingerprint(encoder, DTYPES[cfg.encoder_dtype])}


def check_settings(store: FeatureStore, cfg: CrepaConfig, *, vae: nn.Module | None = None,
                   encoder: nn.Module | None = None, hint: str, warn_unchecked: bool = False) -> None:
    """FeatureCacheError naming every setting in which the store differs from `cfg` (and the weights
    at hand); with `warn_unchecked`, a warning naming the weights that could not be compared."""
    wanted, keys = teacher_settings(cfg), list(CONFIG_KEYS)
    unchecked = []
    for part, module, names, make in (("VAE", vae, VAE_KEYS, lambda m: vae_settings(m, _dtype_of(store, m))),
                                      ("encoder", encoder, ENCODER_KEYS, lambda m: encoder_settings(m, cfg))):
        if module is not None:
            wanted.update(make(module))
            keys += names
        else:
            unchecked.append(part)
    diff = settings_diff(store.settings, wanted, keys)
    if diff:
        raise FeatureCacheError(f"feature cache {str(store.root)!r} was built with other settings "
                                f"({'; '.join(diff)}): {hint}")
    if warn_unchecked and unchecked:
        shas = ", ".join(f"{p} {str(store.settings.get(k, '?'))[:12]}…" for p, k in
                         (("VAE", "vae_weights_sha256"), ("encoder", "encoder_weights_sha256")) if p in unchecked)
        warnings.warn(f"feature cache {str(store.root)!r}: the {' and '.join(unchecked)} weights it was built "
                      f"with ({shas}) were not checked, since they were not passed; pass vae=/encoder= to the "
                      f"regularizer or wrap() to compare them (hashed once, not kept)", RuntimeWarning, stacklevel=3)


def _dtype_of(store: FeatureStore, vae: nn.Module) -> torch.dtype | None:
    """Hash a trainer's VAE in the dtype the cache decoded in, so only the weights are compared here
    (a different decode dtype is `vae_dtype`'s mismatch, named as such)."""
    dtype = getattr(torch, str(store.settings.get("vae_dtype", "")), None)
    return dtype if isinstance(dtype, torch.dtype) else None
