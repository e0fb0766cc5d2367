"""The on-disk feature store: one safetensors file per latent plus a JSON manifest of the settings.

Layout of a store directory:
    manifest.json                       settings that change the features, their sha256, encoder width
    entries/ab/<key>.safetensors        tensor "features" (T_sel, N, D) + metadata (checksum, frames, grid)

`key` is the sha256 of a latent's dtype, shape and bytes (`latent_key`), so an entry can only ever be
found for the very tensor it was computed from. Every write goes to a temp file in the same folder and
is moved into place with os.replace, so a killed build leaves either the old state or the whole new
entry, never half of one; a checksum of the tensor bytes catches corruption and truncation on read.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from crepa_mem.errors import FeatureCacheError

FORMAT = "crepa-mem-feature-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENTRIES = "entries"
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"  # + "r{rank}-": each build process only ever removes its own leftovers
_KEY_DOMAIN = b"crepa-mem-latent/1"


# ------------------------------------------------------------------ hashing
def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a tensor on the CPU (bf16/fp8 too: viewed as uint8, no numpy dtype needed)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def latent_key(latent_CThw: Tensor) -> str:
    """Content hash of one sample's latent: dtype + shape + bytes (the trainer's exact tensor)."""
    h = hashlib.sha256(_KEY_DOMAIN)
    h.update(f"|{str(latent_CThw.dtype).removeprefix('torch.')}|{tuple(latent_CThw.shape)}|".encode())
    h.update(_tensor_bytes(latent_CThw))
    return h.hexdigest()


def tensor_checksum(t: Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def settings_sha(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------ atomic files
def atomic_write(path: Path, data: bytes, *, rank: int = 0) -> None:
    """Write `data` to `path` via a temp file in the same folder + fsync + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}r{rank}-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer (8-byte little-endian header length, then JSON)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header runs past the end of the file")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


# ------------------------------------------------------------------ entries
@dataclass
class Entry:
    """One latent's teacher features, as stored."""

    key: str
    features: Tensor                 # (T_sel, N, D) on the CPU, in the encoder's output dtype
    frame_indices: list[int]
    pixel_frames: int
    target_frames: int
    grid: tuple[int, int]
    dit_grid: tuple[int, int] | None
    source: str
    nbytes: int


class FeatureStore:
    """A store directory: manifest + entries. `open` reads an existing one; `create` makes or resumes one."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = Path(root), manifest
        self.settings: dict = manifest["settings"]
        self.settings_sha: str = manifest["settings_sha"]
        self.encoder_dim: int = int(manifest["encoder_dim"])

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, root: str | os.PathLike) -> "FeatureStore":
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise FeatureCacheError(f"feature cache {str(root)!r} does not exist: build it with "
                                    f"`crepa-mem cache build --latents DIR --out {root}`")
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise FeatureCacheError(f"{str(root)!r} is not a feature cache (no {MANIFEST}): build it with "
                                    f"`crepa-mem cache build --latents DIR --out {root}`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FeatureCacheError(f"manifest {str(path)!r} is corrupt ({e}); rebuild the cache") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise FeatureCacheError(f"{str(path)!r} is not a crepa-mem feature-cache manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise FeatureCacheError(f"feature cache {str(root)!r} has format version "
                                    f"{manifest.get('format_version')!r}; this crepa-mem reads {FORMAT_VERSION}: "
                                    f"rebuild it")
        if manifest.get("settings_sha") != settings_sha(manifest.get("settings", {})):
            raise FeatureCacheError(f"manifest {str(path)!r} was edited (settings do not match their sha256); "
                                    f"rebuild the cache")
        return cls(root, manifest)

    @classmethod
    def create(cls, root: str | os.PathLike, settings: Mapping[str, Any], *, encoder_dim: int,
               info: Mapping[str, Any] | None = None, rank: int = 0) -> "FeatureStore":
        """A new store, or the existing one at `root` if it was built with the same settings (resume).

        Every build process may call this: the manifest it writes is the same bytes on every rank.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise FeatureCacheError(f"--out {str(root)!r} is a file, not a directory")
        if (root / MANIFEST).exists():
            store = cls.open(root)
            diff = settings_diff(store.settings, settings)
            if diff:
                raise FeatureCacheError(f"feature cache {str(root)!r} holds features built with other settings "
                                        f"({'; '.join(diff)}): use a new --out directory or delete this one")
            return store
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": dict(settings),
                    "settings_sha": settings_sha(settings), "encoder_dim": int(encoder_dim),
                    "built_with": dict(info or {})}
        atomic_write(root / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode(),
                     rank=rank)
        (root / ENTRIES).mkdir(exist_ok=True)
        return cls.open(root)

    # ---------------------------------------------------------------- paths
    def path_of(self, key: str) -> Path:
        return self.root / ENTRIES / key[:2] / f"{key}{SUFFIX}"

    def keys(self) -> Iterator[str]:
        for p in sorted((self.root / ENTRIES).glob(f"*/*{SUFFIX}")):
            if not p.name.startswith("."):
                yield p.name[: -len(SUFFIX)]

    def temp_files(self, rank: int | None = None) -> list[Path]:
        prefix = TMP_PREFIX if rank is None else f"{TMP_PREFIX}r{rank}-"
        return sorted(p for p in self.root.rglob(f"{prefix}*") if p.is_file())

    def remove_stale_temps(self, rank: int = 0) -> int:
        """Temp files a killed build of this rank left behind (never a finished entry)."""
        stale = self.temp_files(rank)
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    # ---------------------------------------------------------------- write / read
    def write(self, key: str, features_TND: Tensor, *, frame_indices: list[int], pixel_frames: int,
              target_frames: int, grid: tuple[int, int], dit_grid: tuple[int, int] | None,
              source: str = "", rank: int = 0) -> int:
        """Store one latent's features atomically; returns the bytes written."""
        from safetensors.torch import save

        feats = features_TND.detach().to("cpu").contiguous()
        meta = {"checksum": tensor_checksum(feats), "settings_sha": self.settings_sha, "key": key,
                "frame_indices": json.dumps(list(map(int, frame_indices))), "pixel_frames": str(int(pixel_frames)),
                "target_frames": str(int(target_frames)), "grid": json.dumps(list(grid)),
                "dit_grid": json.dumps(list(dit_grid) if dit_grid else None), "source": source}
        data = save({"features": feats}, metadata=meta)
        atomic_write(self.path_of(key), data, rank=rank)
        return len(data)

    def has(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def read(self, key: str) -> Entry:
        """The entry for `key`; FeatureCacheError if it is missing, corrupt, truncated or stale."""
        from safetensors.torch import load

        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FeatureCacheError(f"feature cache {str(self.root)!r} has no entry {key[:16]}…") from None
        try:
            meta = _safetensors_metadata(data)
            feats = load(data)["features"]
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
            raise FeatureCacheError(f"feature-cache entry {str(path)!r} is corrupt or truncated ({e}); "
                                    f"run `crepa-mem cache build` again with the same --out to rewrite it") from None
        if meta.get("checksum") != tensor_checksum(feats):
            raise FeatureCacheError(f"feature-cache entry {str(path)!r} is corrupt (checksum mismatch); "
                                    f"run `crepa-mem cache build` again with the same --out to rewrite it")
        if meta.get("settings_sha") != self.settings_sha or meta.get("key") != key:
            raise FeatureCacheError(f"feature-cache entry {str(path)!r} was built with other settings than "
                                    f"this cache's manifest (stale); rebuild the cache")
        dit_grid = json.loads(meta["dit_grid"])
        return Entry(key=key, features=feats, frame_indices=json.loads(meta["frame_indices"]),
                     pixel_frames=int(meta["pixel_frames"]), target_frames=int(meta["target_frames"]),
                     grid=tuple(json.loads(meta["grid"])), dit_grid=tuple(dit_grid) if dit_grid else None,
                     source=meta.get("source", ""), nbytes=len(data))

    def verify(self, key: str) -> str | None:
        """None if the entry reads back intact, else why not."""
        try:
            self.read(key)
        except FeatureCacheError as e:
            return str(e)
        return None


def settings_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any], keys=None) -> list[str]:
    """'key: cache has X, wanted Y' for every setting that differs (only `keys` when given)."""
    names = sorted(set(stored) | set(wanted)) if keys is None else keys
    return [f"{k}: cache has {stored.get(k)!r}, wanted {wanted.get(k)!r}"
            for k in names if stored.get(k) != wanted.get(k)]
