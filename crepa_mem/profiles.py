"""Model, VAE, GPU and encoder profiles read from TOML (tomllib); no torch.

The built-in files live in the repository's `profiles/` folder (installed as the data package
`crepa_mem._profiles_data`). A user adds or overrides entries without touching code: every `*.toml`
in a directory given by `profiles_dir` (CLI `--profiles DIR`) or by the environment variable
`CREPA_MEM_PROFILES` (several directories separated by os.pathsep) is read after the built-ins;
an entry with a known name updates that entry field by field, a new name adds one.

File layout (any file may hold any table):
    [family.wan]            default = "wan-2.1-1.3b", aliases = [...]
    [vae."wan-2.1"]         diffusers_class, latent_channels, temporal_compression, ...
    [model."wan-2.1-14b"]   family, diffusers_class, blocks_attr, num_blocks, hidden_size, vae = "wan-2.1", ...
    [gpu.rtx4090]           memory_bytes (or memory_gib), pcie_gen, pcie_width, bf16_tflops, aliases
    [encoder.dinov2_vitg14] hub_id, hidden_size, num_layers, num_heads, intermediate_size, mlp, params
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from crepa_mem.config import canonical_encoder_name
from crepa_mem.errors import CrepaConfigError, ProfileNotFoundError
from crepa_mem.units import GiB

ENV_VAR = "CREPA_MEM_PROFILES"
SECTIONS = ("family", "vae", "model", "gpu", "encoder")


@dataclass(frozen=True)
class VaeProfile:
    name: str
    diffusers_class: str
    latent_channels: int
    temporal_compression: int
    spatial_compression: int
    params_encoder: int
    params_decoder: int
    decode_frames: int = 0
    """Pixel frames the decoder works on at once without tiling: 4 = one latent frame at a time with a
    causal cache (Wan), 0 = all frames in one call (LTX), 17 = temporal tiles (HunyuanVideo)."""
    decode_elems: float = 0.0
    """Live activation elements per decoded pixel-frame at the decoder's peak; 0 = estimate.CALIBRATION."""
    tile_sample_min: int = 256
    """Spatial tile edge in pixels under `vae.enable_tiling()` (the class default)."""
    tile_sample_stride: int = 192
    stream_block_params: int = 0
    """Parameters of the decoder's largest group under diffusers' block-level group offloading (the `stream`
    tier's prefetch slot); 0 = unknown (estimate.CALIBRATION's fraction of the decoder)."""
    aliases: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return self.params_encoder + self.params_decoder


@dataclass(frozen=True)
class ModelProfile:
    name: str
    family: str
    diffusers_class: str
    blocks_attr: str
    num_blocks: int
    hidden_size: int
    patch_size: tuple[int, int, int]
    params: int
    vae: VaeProfile
    recommended_block: int
    default_frames: int
    default_height: int
    default_width: int
    aliases: tuple[str, ...] = ()
    simpletuner_flavours: tuple[str, ...] = ()
    hub_id: str = ""
    dit: dict = field(default_factory=dict, hash=False, compare=False)
    """[model.x.dit]: `config` (the diffusers transformer's constructor arguments), `text_tokens`."""

    def latent_frames(self, frames: int) -> int:
        """Latent frames T for F pixel frames (F = 1 + tc·(T − 1))."""
        return 1 + (frames - 1) // self.vae.temporal_compression

    def tokens_per_frame(self, height: int, width: int) -> int:
        """DiT tokens per latent frame, P = (H / sc / ph) · (W / sc / pw)."""
        sc = self.vae.spatial_compression
        return (height // sc // self.patch_size[1]) * (width // sc // self.patch_size[2])

    def check_shape(self, frames: int, height: int, width: int) -> None:
        """Raises CrepaConfigError explaining why a training shape cannot be encoded by this VAE/DiT."""
        tc = self.vae.temporal_compression
        grid = self.vae.spatial_compression * self.patch_size[1]
        if frames < 1 or (frames - 1) % tc:
            lo = 1 + max(0, (frames - 1) // tc) * tc
            raise CrepaConfigError("frames", frames, valid=f"1 + k×{tc} for {self.name} (e.g. {lo}, {lo + tc})",
                                   hint=f"the {self.vae.name} VAE compresses time by {tc}")
        for key, value in (("height", height), ("width", width)):
            if value < grid or value % grid:
                near = max(grid, round(value / grid) * grid)
                raise CrepaConfigError(key, value, valid=f"a multiple of {grid} for {self.name} (e.g. {near})",
                                       hint=f"spatial compression {self.vae.spatial_compression} × patch {self.patch_size[1]}")


@dataclass(frozen=True)
class GpuProfile:
    name: str
    memory_bytes: int
    pcie_gen: int
    pcie_width: int
    bf16_tflops: float
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncoderProfile:
    name: str
    hub_id: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    mlp: str
    params: int
    patch_size: int = 14
    num_register_tokens: int = 0
    aliases: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- loading

def builtin_dir() -> Path:
    """The installed data package, or the repository's profiles/ folder in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_profiles_data", here.parent / "profiles"):
        if (candidate / "models.toml").is_file():
            return candidate
    raise FileNotFoundError(f"built-in profiles not found next to {here}")


def user_dirs(profiles_dir: str | os.PathLike | Iterable | None = None) -> tuple[Path, ...]:
    """Directories from the environment, then the explicit argument (later wins)."""
    dirs: list[Path] = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    items = [profiles_dir] if isinstance(profiles_dir, (str, os.PathLike)) else list(profiles_dir or ())
    for item in items:
        dirs.extend(Path(p) for p in os.fspath(item).split(os.pathsep) if p)
    return tuple(dirs)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CrepaConfigError("profile file", str(path), valid=f"valid TOML ({e})") from None


@lru_cache(maxsize=16)
def _tables(dirs: tuple[Path, ...]) -> dict[str, dict[str, dict[str, Any]]]:
    """Merged raw tables {section: {name: fields}} of the built-ins and then every user dir."""
    merged: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SECTIONS}
    files = sorted(builtin_dir().glob("*.toml"))
    for d in dirs:
        if not d.is_dir():
            raise CrepaConfigError("profiles directory", str(d), valid="an existing directory of *.toml files")
        files += sorted(d.glob("*.toml"))
    for path in files:
        data = _read(path)
        for section, entries in data.items():
            if section not in merged or not isinstance(entries, dict):
                raise CrepaConfigError(f"table [{section}] in {path}", section, valid=", ".join(SECTIONS))
            for name, values in entries.items():
                _check_entry(section, name, values, path)
                entry = merged[section].setdefault(name, {})
                for a, b in (("memory_gib", "memory_bytes"), ("memory_bytes", "memory_gib")):
                    if a in values:  # the two spellings of a GPU's memory: the later file wins
                        entry.pop(b, None)
                entry.update(values)  # field-level override
    return merged


# Fields that must be > 0 (every other number must be ≥ 0); types come from the profile dataclasses.
_POSITIVE = {"latent_channels", "temporal_compression", "spatial_compression", "num_blocks", "hidden_size",
             "patch_size", "memory_bytes", "memory_gib", "num_layers", "num_heads", "intermediate_size",
             "tile_sample_min", "tile_sample_stride", "default_frames", "default_height", "default_width"}
_SCHEMA_CLASSES = {"vae": "VaeProfile", "model": "ModelProfile", "gpu": "GpuProfile", "encoder": "EncoderProfile"}
_EXTRA_FIELDS = {"model": {"vae": "str"}, "gpu": {"memory_gib": "float"},
                 "family": {"default": "str", "aliases": "tuple[str, ...]"}}


def _schema(section: str) -> dict[str, str]:
    cls = globals().get(_SCHEMA_CLASSES.get(section, ""))
    types = {f.name: str(f.type) for f in fields(cls)} if cls else {}
    types.update(_EXTRA_FIELDS.get(section, {}))
    types.pop("name", None)
    return types


def _check_entry(section: str, name: str, values: Any, path: Path) -> None:
    """Types and ranges of one TOML entry, checked once when the file is read: one line naming the file,
    the key, the value and what is valid (never a '24' * GiB string, never a negative card)."""
    where = f"[{section}.{name}] in {path}"
    if not isinstance(values, dict):
        raise CrepaConfigError(where, values, valid="a table of fields")
    for key, value in values.items():
        kind = _schema(section).get(key)
        if kind is None:
            continue  # unknown keys are ignored, as before
        ok, valid = _valid_value(key, kind, value)
        if not ok:
            raise CrepaConfigError(f"{key} of {where}", value if len(repr(value)) < 80 else f"{repr(value)[:77]}...",
                                   valid=valid)


def _valid_value(key: str, kind: str, value: Any) -> tuple[bool, str]:
    low = 1 if key in _POSITIVE else 0
    if kind == "int":
        return type(value) is int and value >= low, f"an integer ≥ {low}"
    if kind == "float":
        ok = type(value) in (int, float) and value == value and value != float("inf") and value >= low
        return ok and (value > 0 or not low), f"a number {'> 0' if low else '≥ 0'}"
    if kind == "str":
        return isinstance(value, str) and bool(value), "a non-empty string"
    if kind.startswith("tuple[str"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
    if kind.startswith("tuple[int"):
        n = kind.count("int") if "..." not in kind else None
        ok = isinstance(value, list) and all(type(v) is int and v >= low for v in value)
        return ok and (n is None or len(value) == n), f"a list of {n or 'some'} integers ≥ {low}"
    return True, ""


def _norm(name: str) -> str:
    """Matching key: case-insensitive, ignoring spaces, dashes, underscores and slashes."""
    return re.sub(r"[^a-z0-9.]", "", str(name).lower())


def _build(cls, name: str, raw: dict[str, Any], **extra: Any):
    known = {f.name for f in fields(cls)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known}
    values.update(extra, name=name)
    try:
        return cls(**values)
    except TypeError as e:
        raise CrepaConfigError(f"{cls.__name__[:-7].lower()} profile", name, valid=f"all required fields ({e})") from None


def _index(section: str, dirs: tuple[Path, ...]) -> dict[str, str]:
    """Normalised name or alias → entry name."""
    out: dict[str, str] = {}
    for name, raw in _tables(dirs)[section].items():
        for key in (name, *raw.get("aliases", ()), raw.get("hub_id", "")):
            if key:
                out.setdefault(_norm(key), name)
    return out


def _lookup(section: str, kind: str, name: str, dirs: tuple[Path, ...]) -> str:
    hit = _index(section, dirs).get(_norm(name))
    if hit is None:
        raise ProfileNotFoundError(kind, str(name), _tables(dirs)[section].keys())
    return hit


# ---------------------------------------------------------------------------- public API

def get_vae(name: str, profiles_dir=None) -> VaeProfile:
    dirs = user_dirs(profiles_dir)
    key = _lookup("vae", "VAE", name, dirs)
    return _build(VaeProfile, key, _tables(dirs)["vae"][key])


def get_model(name: str, profiles_dir=None) -> ModelProfile:
    """A checkpoint ('wan-2.1-14b', an alias or hub id) or a family ('wan' → its default checkpoint)."""
    dirs = user_dirs(profiles_dir)
    tables = _tables(dirs)
    families = {_norm(f): f for f in tables["family"]}
    for fam, raw in tables["family"].items():
        families.update({_norm(a): fam for a in raw.get("aliases", ())})
    fam = families.get(_norm(name))
    if fam is not None and _norm(name) not in _index("model", dirs):
        name = tables["family"][fam]["default"]
    try:
        key = _lookup("model", "model", name, dirs)
    except ProfileNotFoundError:
        raise ProfileNotFoundError("model", str(name), [*tables["model"], *tables["family"]]) from None
    raw = dict(tables["model"][key])
    vae = get_vae(raw.pop("vae"), profiles_dir)
    raw["patch_size"] = tuple(raw.get("patch_size", (1, 2, 2)))
    return _build(ModelProfile, key, raw, vae=vae)


def model_from_simpletuner(model_family: str, model_flavour: str | None = None, profiles_dir=None) -> ModelProfile:
    """SimpleTuner's `model_family` / `model_flavour` (REFERENCE §2.3) → the checkpoint's profile."""
    dirs = user_dirs(profiles_dir)
    tables = _tables(dirs)
    family = str(model_family).strip().lower()
    if family not in tables["family"]:
        raise ProfileNotFoundError("model_family", str(model_family), tables["family"].keys())
    if not model_flavour:
        return get_model(tables["family"][family]["default"], profiles_dir)
    flavours = {}
    for name, raw in tables["model"].items():
        if raw.get("family") == family:
            flavours.update({str(f).lower(): name for f in raw.get("simpletuner_flavours", ())})
    key = flavours.get(str(model_flavour).strip().lower())
    if key is None:
        raise ProfileNotFoundError(f"{family} model_flavour", str(model_flavour), flavours.keys())
    return get_model(key, profiles_dir)


def get_gpu(name: str, profiles_dir=None) -> GpuProfile:
    """'rtx4090', 'RTX 4090', 'NVIDIA GeForce RTX 4090' (NVML's name) or an alias such as 'h100'."""
    dirs = user_dirs(profiles_dir)
    stripped = _strip_vendor(name)
    key = _lookup("gpu", "GPU", stripped if _norm(stripped) in _index("gpu", dirs) else name, dirs)
    raw = dict(_tables(dirs)["gpu"][key])
    if "memory_bytes" not in raw and "memory_gib" in raw:
        raw["memory_bytes"] = int(raw["memory_gib"] * GiB)
    return _build(GpuProfile, key, raw)


def match_gpu(device_name: str, profiles_dir=None) -> GpuProfile | None:
    """The catalog entry for a name NVML reports, or None when the card is not in the catalog."""
    try:
        return get_gpu(device_name, profiles_dir)
    except ProfileNotFoundError:
        return None


def _strip_vendor(name: str) -> str:
    return re.sub(r"^\s*(nvidia\s+)?(geforce\s+)?", "", str(name), flags=re.I)


def get_encoder(name: str, profiles_dir=None) -> EncoderProfile:
    """A DINOv2 name (SimpleTuner aliases too), a `_reg` variant, or a hub id."""
    dirs = user_dirs(profiles_dir)
    key = _lookup("encoder", "encoder", canonical_encoder_name(name), dirs)
    return _build(EncoderProfile, key, _tables(dirs)["encoder"][key])


def list_models(profiles_dir=None) -> list[ModelProfile]:
    return [get_model(n, profiles_dir) for n in _tables(user_dirs(profiles_dir))["model"]]


def list_gpus(profiles_dir=None) -> list[GpuProfile]:
    return [get_gpu(n, profiles_dir) for n in _tables(user_dirs(profiles_dir))["gpu"]]


def list_encoders(profiles_dir=None) -> list[EncoderProfile]:
    return [get_encoder(n, profiles_dir) for n in _tables(user_dirs(profiles_dir))["encoder"]]


def family_defaults(profiles_dir=None) -> dict[str, str]:
    """Family → its default checkpoint name."""
    return {f: raw["default"] for f, raw in _tables(user_dirs(profiles_dir))["family"].items()}
