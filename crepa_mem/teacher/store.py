"""The on-disk feature store: one safetensors file per latent plus a JSON manifest of the settings.

Layout of a store directory:
    manifest.json                       settings that change the features, their sha256, encoder width
    entries/ab/<key>.safetensors        tensor "features" (T_sel, N, D) + metadata (checksum, frames, grid)

`key` is the sha256 of a latent's dtype, shape and bytes (`latent_key`), so an entry can only ever be
found for the very tensor it was computed from. Every write goes to a temp file in the same folder and
is moved into place with os.replace, so a killed build leaves either the old state or the whole new
entry, never half of one; a checksum of the tensor bytes and metadata catches corruption and truncation on read.

Concurrent builds: the manifest is created atomically (os.link of a finished temp file: the first build
wins, a later one with other settings is refused, never half-adopted), every entry is stamped with the
settings sha256 of the build that computed it, and temp files are named after their owner (rank, pid,
host), so a starting build only removes temps whose owner is gone — never those of a live build.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from crepa_mem import fileio
from crepa_mem.errors import FeatureCacheError

FORMAT = "crepa-mem-feature-cache"
FORMAT_VERSION = 2  # 2: weights fingerprints and encoder_dim inside the checksummed settings
MANIFEST = "manifest.json"
ENTRIES = "entries"
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"  # + "r{rank}-p{pid}@{host}~": the owner, so only a dead owner's temps are removed
STALE_SECONDS = 3600  # a temp of another host lives for one entry's write; an hour old means its build died
_OWNER = re.compile(r"^\.tmp-r(\d+)-p(\d+)@([^~]*)~")
_KEY_DOMAIN = b"crepa-mem-latent/1"
_ENTRY_KEY = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------ hashing
def tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a tensor on the CPU (bf16/fp8 too: viewed as uint8, no numpy dtype needed)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def latent_key(latent_CThw: Tensor) -> str:
    """Content hash of one sample's latent: dtype + shape + bytes (the trainer's exact tensor)."""
    h = hashlib.sha256(_KEY_DOMAIN)
    h.update(f"|{str(latent_CThw.dtype).removeprefix('torch.')}|{tuple(latent_CThw.shape)}|".encode())
    h.update(tensor_bytes(latent_CThw))
    return h.hexdigest()


def tensor_checksum(t: Tensor, meta: Mapping[str, str] | None = None) -> str:
    """sha256 of the tensor bytes and, when given, of every other metadata field (a flipped frame index
    is as wrong as a flipped feature)."""
    h = hashlib.sha256(tensor_bytes(t))
    if meta is not None:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return h.hexdigest()


def settings_sha(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------ atomic files
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def temp_prefix(rank: int = 0) -> str:
    return f"{TMP_PREFIX}r{rank}-p{os.getpid()}@{_host()}~"


def atomic_write(path: Path, data: bytes, *, rank: int = 0) -> None:
    """Write `data` to `path` via an owner-named temp file in the same folder (fileio.atomic_write)."""
    fileio.atomic_write(path, data, prefix=temp_prefix(rank))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def temp_is_stale(path: Path, now: float | None = None) -> bool:
    """Its owner is a dead process of this host, or it is older than STALE_SECONDS (another host, or a
    name without an owner)."""
    m = _OWNER.match(path.name)
    if m and m.group(3) == _host():
        return int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2)))
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_SECONDS


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_BLOCK = 8 << 20  # bytes read (and hashed) per call: what a verify holds, never the whole entry


def _read_streamed(path: Path, into: Callable[[tuple, torch.dtype], Tensor] | None) -> tuple[dict, Tensor | None,
                                                                                                tuple, "hashlib._Hash"]:
    """One safetensors entry read as a stream: the header, then the tensor's bytes straight into
    `into(shape, dtype)` (a contiguous CPU tensor; None: into one reused block, for a verify), hashed block by
    block as they arrive. Returns (metadata, tensor or None, shape, sha256 of the tensor bytes so far).
    ValueError for anything that is not exactly one "features" tensor filling the rest of the file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError("header runs past the end of the file")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(meta, dict):
            raise ValueError("no __metadata__ in the header")
        info = header.get("features")
        if set(header) != {"features"} or not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise ValueError(f"tensors {sorted(header)!r}, not one 'features' tensor of a float dtype")
        dtype, shape, offsets = _DTYPES[info["dtype"]], info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets != [0, nbytes] or size != 8 + n + nbytes:
            raise ValueError(f"data offsets {offsets!r} and file size {size} do not hold {tuple(shape)} {dtype}")
        h = hashlib.sha256()
        out = into(tuple(shape), dtype) if into is not None else None
        if out is not None:
            view = memoryview(out.view(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        else:
            block = memoryview(bytearray(min(_BLOCK, nbytes)))
        done = 0
        while done < nbytes:
            k = min(_BLOCK, nbytes - done)
            part = view[done:done + k] if out is not None else block[:k]
            if f.readinto(part) != k:
                raise ValueError("tensor bytes end early")
            h.update(part)
            done += k
    return meta, out, tuple(shape), h


def _meta_checksum(h: "hashlib._Hash", meta: Mapping[str, str]) -> str:
    """`tensor_checksum`'s digest, given the sha256 of the tensor bytes."""
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return h.hexdigest()


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
        self.encoder_dim: int = manifest["encoder_dim"]

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, root: str | os.PathLike) -> "FeatureStore":
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise FeatureCacheError(f"feature cache {str(root)!r} does not exist: build it with "
                                    f"`crepa-mem cache build --latents DIR --out {root}`")
        try:
            manifest = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise FeatureCacheError(f"{str(root)!r} is not a feature cache (no {MANIFEST}): build it with "
                                    f"`crepa-mem cache build --latents DIR --out {root}`") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise FeatureCacheError(f"manifest {str(path)!r} is corrupt ({type(e).__name__}); "
                                    f"delete {str(root)!r} and build it again") from None
        _check_manifest(manifest, path)
        return cls(root, manifest)

    @classmethod
    def create(cls, root: str | os.PathLike, settings: Mapping[str, Any], *, encoder_dim: int,
               info: Mapping[str, Any] | None = None, rank: int = 0) -> "FeatureStore":
        """A new store, or the existing one at `root` if it was built with the same settings (resume).

        Every build process may call this: the manifest it writes is the same bytes on every rank, and
        only the first one to link it into place creates the store (an atomic os.link), so two builds
        that start together can never stamp entries under each other's settings.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise FeatureCacheError(f"--out {str(root)!r} is a file, not a directory")
        settings = {**settings, "encoder_dim": int(encoder_dim)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "settings": settings,
                    "settings_sha": settings_sha(settings), "encoder_dim": int(encoder_dim),
                    "built_with": dict(info or {})}
        if not (root / MANIFEST).exists():
            data = (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=root, prefix=temp_prefix(rank), suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, root / MANIFEST)  # fails if another build created it first
                    fileio.fsync_dir(root)
                except FileExistsError:
                    pass
            finally:
                Path(tmp).unlink(missing_ok=True)
        store = cls.open(root)
        diff = settings_diff(store.settings, settings)
        if diff:
            raise FeatureCacheError(f"feature cache {str(root)!r} holds features built with other settings "
                                    f"({'; '.join(diff)}): use a new --out directory or delete this one")
        (root / ENTRIES).mkdir(exist_ok=True)
        return store

    # ---------------------------------------------------------------- paths
    def path_of(self, key: str) -> Path:
        return self.root / ENTRIES / key[:2] / f"{key}{SUFFIX}"

    def keys(self) -> Iterator[str]:
        for p in sorted((self.root / ENTRIES).glob(f"*/*{SUFFIX}")):
            key = p.name[: -len(SUFFIX)]
            if _ENTRY_KEY.match(key) and p.parent.name == key[:2]:  # temps and stray files are never entries
                yield key

    def temp_files(self, rank: int | None = None) -> list[Path]:
        prefix = TMP_PREFIX if rank is None else f"{TMP_PREFIX}r{rank}-"
        return sorted(p for p in self.root.rglob(f"{prefix}*") if p.is_file())

    def remove_stale_temps(self) -> int:
        """Temp files a killed build left behind, of any rank (a smaller world leaves higher ranks'),
        never one a live build is writing (see `temp_is_stale`), never a finished entry."""
        now, removed = time.time(), 0
        for p in self.temp_files():
            if temp_is_stale(p, now):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---------------------------------------------------------------- write / read
    def write(self, key: str, features_TND: Tensor, *, frame_indices: list[int], pixel_frames: int,
              target_frames: int, grid: tuple[int, int], dit_grid: tuple[int, int] | None,
              source: str = "", rank: int = 0) -> int:
        """Store one latent's features atomically; returns the bytes written."""
        from safetensors.torch import save

        feats = features_TND.detach().to("cpu").contiguous()
        meta = {"settings_sha": self.settings_sha, "key": key,
                "frame_indices": json.dumps(list(map(int, frame_indices))), "pixel_frames": str(int(pixel_frames)),
                "target_frames": str(int(target_frames)), "grid": json.dumps(list(grid)),
                "dit_grid": json.dumps(list(dit_grid) if dit_grid else None), "source": source}
        meta["checksum"] = tensor_checksum(feats, meta)
        data = save({"features": feats}, metadata=meta)
        atomic_write(self.path_of(key), data, rank=rank)
        return len(data)

    def has(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def read(self, key: str, into: Callable[[tuple, torch.dtype], Tensor] | None = None) -> Entry:
        """The entry for `key`; FeatureCacheError if it is missing, corrupt, truncated or stale. Its bytes go
        straight from the file into one tensor (`into(shape, dtype)`, e.g. a slice of a batch buffer, or a new
        one), checksummed as they arrive: no second buffer of the entry."""
        return self._load(key, into or (lambda shape, dtype: torch.empty(shape, dtype=dtype)))

    def _load(self, key: str, into) -> Entry:
        path = self.path_of(key)
        repair = "run `crepa-mem cache build` again with the same --out to rewrite it"
        try:
            meta, feats, shape, h = _read_streamed(path, into)
        except FileNotFoundError:
            raise FeatureCacheError(f"feature cache {str(self.root)!r} has no entry {key[:16]}…") from None
        except FeatureCacheError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
            raise FeatureCacheError(f"feature-cache entry {str(path)!r} is corrupt or truncated "
                                    f"({type(e).__name__}: {str(e)[:120]}); {repair}") from None
        if not all(isinstance(v, str) for v in meta.values()) or meta.get("checksum") != _meta_checksum(h, meta):
            raise FeatureCacheError(f"feature-cache entry {str(path)!r} is corrupt (checksum mismatch); {repair}")
        if meta.get("settings_sha") != self.settings_sha or meta.get("key") != key:
            raise FeatureCacheError(f"feature-cache entry {str(path)!r} was built with other settings than "
                                    f"this cache's manifest (stale); {repair}")
        try:  # checksummed, yet a type check keeps a hand-made entry from raising anything but this
            frames, dit_grid, grid = (json.loads(meta[k]) for k in ("frame_indices", "dit_grid", "grid"))
            entry = Entry(key=key, features=feats, frame_indices=_ints(frames, "frame_indices"),
                          pixel_frames=int(meta["pixel_frames"]), target_frames=int(meta["target_frames"]),
                          grid=tuple(_ints(grid, "grid", 2)),
                          dit_grid=tuple(_ints(dit_grid, "dit_grid", 2)) if dit_grid is not None else None,
                          source=str(meta.get("source", "")), nbytes=path.stat().st_size)
        except (KeyError, ValueError, TypeError) as e:
            raise FeatureCacheError(f"feature-cache entry {str(path)!r} has damaged metadata "
                                    f"({type(e).__name__}: {str(e)[:120]}); {repair}") from None
        if len(shape) != 3 or shape[-1] != self.encoder_dim:
            raise FeatureCacheError(f"feature-cache entry {str(path)!r} holds features {shape}, but the "
                                    f"manifest says (frames, tokens, {self.encoder_dim}); {repair}")
        return entry

    def verify(self, key: str) -> str | None:
        """None if the entry reads back intact, else why not (read block by block, nothing of it kept)."""
        try:
            self._load(key, None)
        except FeatureCacheError as e:
            return str(e)
        return None


def _ints(value: Any, name: str, length: int | None = None) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value) or \
            (length is not None and len(value) != length):
        raise ValueError(f"{name} is {value!r}, not a list of integers")
    return value


def _check_manifest(manifest: Any, path: Path) -> None:
    """Every field the store reads, with the type it must have: one line naming what is wrong."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FeatureCacheError(f"{str(path)!r} is not a crepa-mem feature-cache manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FeatureCacheError(f"feature cache {str(path.parent)!r} has format version "
                                f"{manifest.get('format_version')!r}; this crepa-mem reads {FORMAT_VERSION}: "
                                f"delete it and build it again")
    settings, dim = manifest.get("settings"), manifest.get("encoder_dim")
    if not isinstance(settings, dict):
        raise FeatureCacheError(f"manifest {str(path)!r} has no settings object; delete the cache and build it again")
    if manifest.get("settings_sha") != settings_sha(settings):
        raise FeatureCacheError(f"manifest {str(path)!r} was edited (settings do not match their sha256); "
                                f"delete the cache and build it again")
    if type(dim) is not int or dim <= 0 or settings.get("encoder_dim") != dim:
        raise FeatureCacheError(f"manifest {str(path)!r} has encoder_dim {dim!r} (settings say "
                                f"{settings.get('encoder_dim')!r}); valid is the same positive integer in both: "
                                f"delete the cache and build it again")


def settings_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any], keys=None) -> list[str]:
    """'key: cache has X, wanted Y' for every setting that differs (only `keys` when given)."""
    names = sorted(set(stored) | set(wanted)) if keys is None else keys
    return [f"{k}: cache has {stored.get(k)!r}, wanted {wanted.get(k)!r}"
            for k in names if stored.get(k) != wanted.get(k)]
