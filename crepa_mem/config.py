"""CrepaConfig: every CREPA option, validated once; SimpleTuner's keys and aliases in one place.

SimpleTuner writes keys plain (`crepa_lambda`) and users often write them CLI-style
(`--crepa_lambda`); both are read. crepa-mem's own options start with `crepa_mem_`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from crepa_mem.errors import CrepaConfigError

TIERS = ("gpu", "swap", "stream", "device", "cache")
AUTO_TIER = "auto"  # chosen at the first teacher step from the memory free then (crepa_mem.integrations.auto)
ENCODER_DTYPES = ("fp32", "bf16", "fp16")
SCHEDULERS = ("constant", "linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")
FEATURE_SOURCES = ("encoder", "backbone", "self_flow")
STREAM_ENGINES = ("group_offload", "ramtorch")

# SimpleTuner's encoder aliases (crepa.py); anything else passes through unchanged.
ENCODER_ALIASES = {
    "dino_v2_g": "dinov2_vitg14", "dinov2_g": "dinov2_vitg14", "dinov2-vitg14": "dinov2_vitg14",
    "dino_v2_s": "dinov2_vits14", "dinov2_s": "dinov2_vits14",
    "dinov2-vitb14": "dinov2_vitb14",
}


def canonical_encoder_name(name: str) -> str:
    """SimpleTuner's alias table applied to an encoder name."""
    key = str(name).strip()
    return ENCODER_ALIASES.get(key.lower(), key)


def _key(name: str, *, mem: bool = False) -> dict:
    return {"key": ("crepa_mem_" if mem else "crepa_") + name}


@dataclass(frozen=True, kw_only=True)
class CrepaConfig:
    """All CREPA options. Field docs name the config key and the valid range."""

    enabled: bool = field(default=False, metadata=_key("enabled"))
    """crepa_enabled."""
    block_index: int | None = field(default=8, metadata=_key("block_index"))
    """crepa_block_index: student DiT block, 0 ≤ i < block count of the family."""
    lambda_: float = field(default=0.5, metadata=_key("lambda"))
    """crepa_lambda: loss weight, ≥ 0."""
    adjacent_distance: int = field(default=1, metadata=_key("adjacent_distance"))
    """crepa_adjacent_distance: neighbour offset d, ≥ 0 (0 = per-frame REPA)."""
    adjacent_tau: float = field(default=1.0, metadata=_key("adjacent_tau"))
    """crepa_adjacent_tau: neighbour weight exp(-k/tau), > 0."""
    cumulative_neighbors: bool = field(default=False, metadata=_key("cumulative_neighbors"))
    normalize_neighbour_sum: bool = field(default=False, metadata=_key("normalize_neighbour_sum"))
    normalize_by_frames: bool = field(default=True, metadata=_key("normalize_by_frames"))
    spatial_align: bool = field(default=True, metadata=_key("spatial_align"))
    encoder: str = field(default="dinov2_vitg14", metadata=_key("encoder"))
    """crepa_encoder (alias crepa_model, read first): DINOv2 name, hub id or local directory."""
    encoder_image_size: int = field(default=518, metadata=_key("encoder_image_size"))
    """crepa_encoder_image_size: ≥ 64, a multiple of 14 expected."""
    encoder_frames_batch_size: int = field(default=-1, metadata=_key("encoder_frames_batch_size"))
    """crepa_encoder_frames_batch_size: frames per teacher chunk; ≤ 0 → all at once."""
    drop_vae_encoder: bool = field(default=False, metadata=_key("drop_vae_encoder"))
    use_backbone_features: bool = field(default=False, metadata=_key("use_backbone_features"))
    feature_source: str = field(default="encoder", metadata=_key("feature_source"))
    teacher_block_index: int | None = field(default=None, metadata=_key("teacher_block_index"))
    scheduler: str = field(default="constant", metadata=_key("scheduler"))
    warmup_steps: int = field(default=0, metadata=_key("warmup_steps"))
    decay_steps: int = field(default=0, metadata=_key("decay_steps"))
    cutoff_step: int = field(default=0, metadata=_key("cutoff_step"))
    lambda_end: float = field(default=0.0, metadata=_key("lambda_end"))
    power: float = field(default=1.0, metadata=_key("power"))
    similarity_threshold: float | None = field(default=None, metadata=_key("similarity_threshold"))
    similarity_ema_decay: float = field(default=0.99, metadata=_key("similarity_ema_decay"))
    threshold_mode: str = field(default="permanent", metadata=_key("threshold_mode"))

    # crepa-mem's own options
    encoder_tier: str = field(default="gpu", metadata=_key("encoder_tier", mem=True))
    """crepa_mem_encoder_tier: where DINOv2 lives and runs: gpu, swap, stream, device, cache, or auto."""
    vae_tier: str = field(default="gpu", metadata=_key("vae_tier", mem=True))
    """crepa_mem_vae_tier: where the VAE lives and runs: gpu, swap, stream, device, cache, or auto."""
    allow_lossy: bool = field(default=False, metadata=_key("allow_lossy", mem=True))
    """crepa_mem_allow_lossy: `auto` and the OOM ladder may take lossy rungs (bf16 encoder, pooled alignment)."""
    stream_engine: str = field(default="group_offload", metadata=_key("stream_engine", mem=True))
    """crepa_mem_stream_engine: the encoder's `stream` engine: group_offload (diffusers) or ramtorch."""
    stream_resident_chunks: int = field(default=0, metadata=_key("stream_resident_chunks", mem=True))
    """crepa_mem_stream_resident_chunks: RamTorch chunks kept on the device for good (its `pin`), ≥ 0."""
    stream_nvme_path: str | None = field(default=None, metadata=_key("stream_nvme_path", mem=True))
    """crepa_mem_stream_nvme_path: RamTorch's NVMe tier: the encoder's masters in this scratch file, not in RAM."""
    host_share_path: str | None = field(default=None, metadata=_key("host_share_path", mem=True))
    """crepa_mem_host_share_path: a safetensors file every local rank maps read-only: one host copy of a `swap` encoder."""
    teacher_device: str | None = field(default=None, metadata=_key("teacher_device", mem=True))
    """crepa_mem_teacher_device: the other device of the `device` tier ("cpu", "cuda:1"); default cpu."""
    encoder_dtype: str = field(default="fp32", metadata=_key("encoder_dtype", mem=True))
    """crepa_mem_encoder_dtype: fp32 (SimpleTuner), bf16 or fp16."""
    reset_peak_stats: bool = field(default=False, metadata=_key("reset_peak_stats", mem=True))
    """crepa_mem_reset_peak_stats: debug: reset CUDA's peak statistics at each teacher step (exact teacher peak,
    but a trainer's own max_memory_allocated then only sees the time since the teacher step)."""
    loss_chunk: int = field(default=-1, metadata=_key("loss_chunk", mem=True))
    """crepa_mem_loss_chunk: DiT frames per loss chunk, recomputed in backward (same loss); ≤ 0 → all at once."""
    vae_tiling: bool = field(default=False, metadata=_key("vae_tiling", mem=True))
    """crepa_mem_vae_tiling: spatial tiling of the VAE decode (vae.enable_tiling)."""
    vae_tile_size: int | None = field(default=None, metadata=_key("vae_tile_size", mem=True))
    """crepa_mem_vae_tile_size: tile edge in pixels (≥ 64) when tiling; None = the VAE's default."""
    feature_cache: str | None = field(default=None, metadata=_key("feature_cache", mem=True))
    """crepa_mem_feature_cache: directory of precomputed teacher features (`crepa-mem cache build`)."""
    true_grid: bool = field(default=False, metadata=_key("true_grid", mem=True))
    """crepa_mem_true_grid: opt-in 2-D resampling on the DiT's real h'×w' grid."""
    encoder_path: str | None = field(default=None, metadata=_key("encoder_path", mem=True))
    """crepa_mem_encoder_path: local directory holding the encoder's weights (from_pretrained)."""

    ignored_keys: tuple[str, ...] = field(default=(), compare=False, metadata={"key": None})
    """crepa_* keys that were given but are not known (kept for `doctor`)."""

    def __post_init__(self) -> None:
        _validate(self)

    # ---------------------------------------------------------------- readers
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, warn_unknown: bool = True) -> "CrepaConfig":
        """Reads SimpleTuner keys (plain or `--crepa_x`); keys not about CREPA are ignored. An unknown
        crepa_* / crepa_mem_* key (a typo, mostly) warns once per process, with the closest known key."""
        by_key = {f.metadata["key"]: f for f in fields(cls) if f.metadata.get("key")}
        normalised: dict[str, Any] = {}
        for raw_key, value in data.items():
            key = str(raw_key).lstrip("-").replace("-", "_")
            normalised[key] = value
        # crepa_model is SimpleTuner's older name for the encoder and is read first.
        if "crepa_model" in normalised and normalised["crepa_model"] not in (None, ""):
            normalised["crepa_encoder"] = normalised.pop("crepa_model")
        normalised.pop("crepa_model", None)
        kwargs: dict[str, Any] = {}
        ignored = []
        for key, value in normalised.items():
            if not key.startswith("crepa_"):
                continue
            f = by_key.get(key)
            if f is None:
                ignored.append(key)
                continue
            kwargs[f.name] = _coerce(key, value, f.type)
        if warn_unknown:
            _warn_unknown(ignored, list(by_key))
        return cls(**kwargs, ignored_keys=tuple(sorted(ignored)))

    @classmethod
    def from_file(cls, path: str | Path) -> "CrepaConfig":
        """A SimpleTuner config.json (or crepa-mem's own, as written by `plan --write`)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise CrepaConfigError("config file", str(p), valid="an existing JSON file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CrepaConfigError("config file", str(p), valid=f"JSON ({e})") from None
        except RecursionError:
            raise CrepaConfigError("config file", str(p), valid="JSON nested less deeply") from None
        if not isinstance(data, dict):
            raise CrepaConfigError("config file", str(p), valid="a JSON object of crepa_* keys")
        return cls.from_dict(data)

    # ---------------------------------------------------------------- writers
    def to_dict(self) -> dict[str, Any]:
        """The config as SimpleTuner-style keys (plus crepa_mem_* keys); from_dict reads it back."""
        return {f.metadata["key"]: getattr(self, f.name) for f in fields(self) if f.metadata.get("key")}

    def replace(self, **changes: Any) -> "CrepaConfig":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- derived
    @property
    def backbone_mode(self) -> bool:
        return self.use_backbone_features or self.feature_source == "backbone"

    @property
    def auto_tiers(self) -> bool:
        """A tier is `auto`: the teacher is placed at the first teacher step."""
        return AUTO_TIER in (self.encoder_tier, self.vae_tier)

    @property
    def frames_per_chunk(self) -> int | None:
        """Frames per teacher chunk; None = all at once."""
        return self.encoder_frames_batch_size if self.encoder_frames_batch_size > 0 else None


_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f"}


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Config values may be strings (CLI-style args); turn them into the field's type."""
    optional = "None" in annotation
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        raise CrepaConfigError(key, value, valid=f"a value of type {annotation}")
    base = annotation.replace(" | None", "")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if base == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "." in value else int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            return str(value)
    except (TypeError, ValueError):
        raise CrepaConfigError(key, value, valid={"bool": "true or false", "int": "an integer",
                                                  "float": "a number"}.get(base, base)) from None
    return value


class UnknownKeyWarning(UserWarning):
    """A crepa_* key that no option reads (SimpleTuner ignores it too)."""


_WARNED: set[str] = set()


def _warn_unknown(keys: list[str], known: list[str]) -> None:
    from difflib import get_close_matches

    for key in keys:
        if key in _WARNED:
            continue
        _WARNED.add(key)
        close = get_close_matches(key, known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else " (see `crepa-mem doctor --config FILE`)"
        warnings.warn(f"{key} is not a CREPA option and is ignored{hint}", UnknownKeyWarning, stacklevel=3)


def _validate(c: CrepaConfig) -> None:
    """Every range of REFERENCE §1.1, plus crepa-mem's own options."""

    def need(ok: bool, key: str, value: Any, valid: str) -> None:
        if not ok:
            raise CrepaConfigError(key, value, valid=valid)

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    if c.block_index is None and c.enabled:
        raise CrepaConfigError("crepa_block_index", None, valid="an integer ≥ 0",
                               hint="crepa_block_index must be set when CREPA is enabled")
    need(c.block_index is None or c.block_index >= 0, "crepa_block_index", c.block_index, "an integer ≥ 0")
    need(finite(c.lambda_) and c.lambda_ >= 0, "crepa_lambda", c.lambda_, "a number ≥ 0")
    need(c.adjacent_distance >= 0, "crepa_adjacent_distance", c.adjacent_distance, "an integer ≥ 0")
    need(finite(c.adjacent_tau) and c.adjacent_tau > 0, "crepa_adjacent_tau", c.adjacent_tau, "a number > 0")
    object.__setattr__(c, "encoder", canonical_encoder_name(c.encoder))
    need(bool(c.encoder), "crepa_encoder", c.encoder, "a DINOv2 name such as dinov2_vitg14")
    need(c.encoder_image_size >= 64, "crepa_encoder_image_size", c.encoder_image_size, "an integer ≥ 64 (a multiple of 14)")
    need(c.feature_source in FEATURE_SOURCES, "crepa_feature_source", c.feature_source, " · ".join(FEATURE_SOURCES))
    if c.feature_source == "self_flow":
        raise CrepaConfigError("crepa_feature_source", c.feature_source, valid="encoder · backbone",
                               hint="self_flow is not supported by crepa-mem")
    need(c.teacher_block_index is None or c.teacher_block_index >= 0,
         "crepa_teacher_block_index", c.teacher_block_index, "an integer ≥ 0")
    need(c.scheduler in SCHEDULERS, "crepa_scheduler", c.scheduler, " · ".join(SCHEDULERS))
    for name in ("warmup_steps", "decay_steps", "cutoff_step"):
        need(getattr(c, name) >= 0, f"crepa_{name}", getattr(c, name), "an integer ≥ 0")
    need(finite(c.lambda_end) and c.lambda_end >= 0, "crepa_lambda_end", c.lambda_end, "a number ≥ 0")
    need(finite(c.power) and c.power >= 0.1, "crepa_power", c.power, "a number ≥ 0.1")
    need(c.similarity_threshold is None or (finite(c.similarity_threshold) and 0 <= c.similarity_threshold <= 1),
         "crepa_similarity_threshold", c.similarity_threshold, "a number in [0, 1] or null")
    need(finite(c.similarity_ema_decay) and 0 <= c.similarity_ema_decay <= 1,
         "crepa_similarity_ema_decay", c.similarity_ema_decay, "a number in [0, 1]")
    need(c.threshold_mode in THRESHOLD_MODES, "crepa_threshold_mode", c.threshold_mode, " · ".join(THRESHOLD_MODES))
    tiers = (*TIERS, AUTO_TIER)
    need(c.encoder_tier in tiers, "crepa_mem_encoder_tier", c.encoder_tier, " · ".join(tiers))
    need(c.vae_tier in tiers, "crepa_mem_vae_tier", c.vae_tier, " · ".join(tiers))
    need(c.stream_engine in STREAM_ENGINES, "crepa_mem_stream_engine", c.stream_engine, " · ".join(STREAM_ENGINES))
    need(c.stream_resident_chunks >= 0, "crepa_mem_stream_resident_chunks", c.stream_resident_chunks, "an integer ≥ 0")
    need(c.stream_nvme_path is None or c.stream_engine == "ramtorch", "crepa_mem_stream_nvme_path",
         c.stream_nvme_path, "null unless crepa_mem_stream_engine is ramtorch (RamTorch's NVMe tier)")
    need(c.host_share_path is None or c.encoder_tier == "swap", "crepa_mem_host_share_path", c.host_share_path,
         "null unless crepa_mem_encoder_tier is swap (the shared copy is pageable; stream engines pin their own)")
    need(c.encoder_dtype in ENCODER_DTYPES, "crepa_mem_encoder_dtype", c.encoder_dtype, " · ".join(ENCODER_DTYPES))
    need(c.vae_tile_size is None or c.vae_tile_size >= 64, "crepa_mem_vae_tile_size", c.vae_tile_size, "an integer ≥ 64 or null")
    if (c.encoder_tier == "cache") != (c.vae_tier == "cache"):  # cached features replace both components
        raise CrepaConfigError("crepa_mem_vae_tier" if c.encoder_tier == "cache" else "crepa_mem_encoder_tier",
                               c.vae_tier if c.encoder_tier == "cache" else c.encoder_tier,
                               valid="cache as well: a feature cache replaces both the encoder and the VAE")
    need(not (c.encoder_tier == "cache" or c.vae_tier == "cache") or c.feature_cache is not None,
         "crepa_mem_feature_cache", c.feature_cache, "a directory when a tier is `cache`")
