"""One host copy of a frozen teacher for all local ranks: its weights as read-only views of a mapped safetensors file.

`swap` keeps the encoder's weights in host memory in every rank (8 ranks × ViT-g fp32 ≈ 36 GB of pinned
memory on one node). Mapped from one file instead, the weights are page-cache pages that every process on
the node maps: the node holds them once (each rank's RSS still counts them, its PSS splits them; see
benchmarks/host_share.py). The pages are pageable, so copies to the GPU run at pageable speed, not pinned.
The first rank to get here writes the file (under a lock file, atomically: a temporary file then a rename),
every rank then maps that same file; a file whose tensors do not match the module is rewritten.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch
from torch import nn

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each tensor once (tied weights keep their first name)."""
    out, seen = {}, set()
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None


def _matches(header: dict | None, tensors: dict[str, torch.Tensor]) -> bool:
    if header is None:
        return False
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    inv = {v: k for k, v in _DTYPES.items()}
    return entries.keys() == tensors.keys() and all(
        entries[k]["shape"] == list(t.shape) and entries[k]["dtype"] == inv.get(t.dtype) for k, t in tensors.items())


def write_host_copy(module: nn.Module, path: str | os.PathLike) -> Path:
    """The module's weights as a safetensors file at `path` (kept if it already matches)."""
    from safetensors.torch import save_file

    path, tensors = Path(path), _named_tensors(module)
    if _matches(_header(path), tensors):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One writer at a time, and a second look under the lock: ranks that each wrote and renamed their own
    # file would map different inodes, and the node would hold one copy per rank again.
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _matches(_header(path), tensors):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp),
                      metadata={"crepa_mem": "host copy"})
            os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    return path


def map_host_copy(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Point the module's CPU tensors at read-only views of `path` (written first if needed); returns it.

    Tensors already on another device (resident on the GPU) are left alone. The views must never be
    written to (they are read-only pages): the teacher is frozen and its tiers only copy from them."""
    tensors = _named_tensors(module)
    path = write_host_copy(module, path)
    header = _header(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # torch warns that the buffer is not writable: that is the point
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(mapped, dtype=torch.uint8)
    start = 8 + struct.unpack("<Q", mapped[:8])[0]
    for name, t in tensors.items():
        if t.device.type != "cpu":
            continue
        entry = header[name]
        lo, hi = entry["data_offsets"]
        view = data[start + lo:start + hi].view(_DTYPES[entry["dtype"]]).view(entry["shape"])
        t.data = view
    return module
