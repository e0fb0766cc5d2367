"""GPU inspection: NVML through pynvml (optional), torch.cuda only as an opt-in fallback, or the catalog.

No torch at import time, and none on the plan path: torch is imported only when the caller passes
`allow_torch=True` (the `gpus` command) and NVML is unusable.

Selectors: "auto" (the GPU this process would use: LOCAL_RANK into CUDA_VISIBLE_DEVICES), "all",
an index ("1" or "cuda:1", counted among the visible GPUs like cuda:N), a catalog name ("rtx4090")
or a size ("24GB", "24GiB": a hypothetical card with that much free memory).
NVML indices are physical and ignore CUDA_VISIBLE_DEVICES, so visible devices are matched by UUID
(REFERENCE §5); integer entries of CUDA_VISIBLE_DEVICES are read in PCI bus order (NVML's order).
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass, field

from crepa_mem.errors import CrepaConfigError
from crepa_mem.units import GB, parse_size

# Host→device bandwidth: spec GB/s per lane × lanes × efficiency. Efficiency from REFERENCE §6:
# Gen4 x16 measured ≈ 25 of 31.5 GB/s spec; Gen5 x16 ≈ 35 of 63 GB/s spec.
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
PCIE_EFFICIENCY = {1: 0.79, 2: 0.79, 3: 0.79, 4: 25 / 31.5, 5: 35 / 63, 6: 35 / 63}
MAX_INDEX = 64  # "--gpu 3" is an index; "--gpu 4090" a catalog name
MIN_CARD_BYTES, MAX_CARD_BYTES = 2**30, 4 * 2**40  # sizes outside are typos (100000TiB), not cards
DEFAULT_GPU = "rtx4090"  # planned for when no GPU is found (the most common consumer training card)


@dataclass
class DeviceInfo:
    index: int | None
    """Physical (NVML) index; None for catalog/size entries."""
    name: str
    uuid: str | None
    total_bytes: int
    free_bytes: int
    reserved_bytes: int | None
    used_bytes: int | None
    compute_capability: str | None
    pcie_gen: int | None
    pcie_width: int | None
    h2d_bytes_per_s: int | None
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    source: str = "nvml"
    """nvml · torch · catalog · size"""
    note: str = ""
    cuda_index: int | None = None
    """Index as this process sees it (cuda:N) when visible, else None."""
    bf16_tflops: float | None = None
    catalog_name: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["processes"] = [{"pid": pid, "used_bytes": used} for pid, used in self.processes]
        return d


def h2d_bandwidth(pcie_gen: int | None, pcie_width: int | None) -> int | None:
    """Estimated sustained host→device bytes/s of a PCIe link."""
    if not pcie_gen or not pcie_width:
        return None
    gen = min(max(int(pcie_gen), 1), 6)
    return int(PCIE_LANE_GBPS[gen] * pcie_width * PCIE_EFFICIENCY[gen] * GB)


# ---------------------------------------------------------------------------- catalog / size

def from_catalog(name: str, profiles_dir=None, note: str = "") -> DeviceInfo:
    from crepa_mem.profiles import get_gpu

    g = get_gpu(name, profiles_dir)
    return DeviceInfo(index=None, name=g.name, uuid=None, total_bytes=g.memory_bytes, free_bytes=g.memory_bytes,
                      reserved_bytes=None, used_bytes=0, compute_capability=None, pcie_gen=g.pcie_gen,
                      pcie_width=g.pcie_width, h2d_bytes_per_s=h2d_bandwidth(g.pcie_gen, g.pcie_width),
                      source="catalog", note=note or "catalog card, nothing in use", bf16_tflops=g.bf16_tflops,
                      catalog_name=g.name)


def from_size(size_bytes: int, text: str) -> DeviceInfo:
    return DeviceInfo(index=None, name=f"{text} GPU", uuid=None, total_bytes=size_bytes, free_bytes=size_bytes,
                      reserved_bytes=None, used_bytes=0, compute_capability=None, pcie_gen=4, pcie_width=16,
                      h2d_bytes_per_s=h2d_bandwidth(4, 16), source="size",
                      note="a card of this size; PCIe Gen4 x16 assumed")


# ---------------------------------------------------------------------------- NVML

def _nvml_devices(profiles_dir=None) -> tuple[list[DeviceInfo], str]:
    """Every physical GPU NVML sees (MIG instances included), or ([], why not)."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return [], f"NVML unavailable ({e})"
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            out.append(_read_device(pynvml, handle, i, profiles_dir))
            out.extend(_read_mig(pynvml, handle, i, out[-1], profiles_dir))
        return out, ("" if out else "NVML sees no GPU")
    except pynvml.NVMLError as e:
        return [], f"NVML query failed ({e})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(fn, *args):
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _memory(pynvml, handle):
    """NVML memory v2 (with `reserved`), v1 when the driver lacks v2."""
    try:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        return int(m.total), int(m.free), int(m.reserved), int(m.used)
    except pynvml.NVMLError_FunctionNotFound:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(m.total), int(m.free), None, int(m.used)


def _read_device(pynvml, handle, index: int, profiles_dir=None, name: str | None = None) -> DeviceInfo:
    from crepa_mem.profiles import match_gpu

    name = name or _text(pynvml.nvmlDeviceGetName(handle))
    total, free, reserved, used = _memory(pynvml, handle)
    cc = _optional(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
    gen = _optional(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle)
    width = _optional(pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle)
    procs = _optional(pynvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
    catalog = match_gpu(name, profiles_dir)
    return DeviceInfo(
        index=index, name=name, uuid=_text(pynvml.nvmlDeviceGetUUID(handle)), total_bytes=total, free_bytes=free,
        reserved_bytes=reserved, used_bytes=used, compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
        pcie_gen=gen, pcie_width=width, h2d_bytes_per_s=h2d_bandwidth(gen, width),
        processes=[(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory)) for p in procs],
        source="nvml", bf16_tflops=catalog.bf16_tflops if catalog else None,
        catalog_name=catalog.name if catalog else None)


def _read_mig(pynvml, handle, index: int, parent: DeviceInfo, profiles_dir=None) -> list[DeviceInfo]:
    """MIG instances of a GPU in MIG mode (their own UUIDs and memory); [] otherwise."""
    mode = _optional(pynvml.nvmlDeviceGetMigMode, handle)
    if not mode or not mode[0]:
        return []
    out = []
    for j in range(_optional(pynvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0):
        mig = _optional(pynvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, j)
        if mig is None:
            continue
        info = _read_device(pynvml, mig, index, profiles_dir, name=f"{parent.name} MIG {j}")
        info.pcie_gen, info.pcie_width, info.h2d_bytes_per_s = parent.pcie_gen, parent.pcie_width, parent.h2d_bytes_per_s
        info.bf16_tflops, info.catalog_name, info.note = None, None, f"MIG instance {j} of GPU {index}"
        out.append(info)
    return out


# ---------------------------------------------------------------------------- visibility

def _visible(devices: list[DeviceInfo]) -> tuple[list[DeviceInfo], str]:
    """Devices in CUDA order for this process (CUDA_VISIBLE_DEVICES applied, matched by UUID)."""
    whole = [d for d in devices if not (d.note or "").startswith("MIG")]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    torch_uuids = _torch_uuids()
    if env is None:
        chosen, note = whole, ""
    else:
        chosen, missing = [], []
        for entry in [e.strip() for e in env.split(",") if e.strip()]:
            if entry.isdigit():
                hit = next((d for d in whole if d.index == int(entry)), None)
            else:  # GPU-uuid or MIG-uuid, possibly a unique prefix
                key = entry.lower()
                hit = next((d for d in devices if d.uuid and d.uuid.lower().startswith(key)), None)
            if hit is None:
                missing.append(entry)
                break  # CUDA stops enumerating at the first invalid entry
            chosen.append(hit)
        note = f"CUDA_VISIBLE_DEVICES entry {missing[0]!r} matches no GPU" if missing else ""
    if torch_uuids is not None:  # exact CUDA order when torch is already loaded in this process
        by_uuid = {(d.uuid or "").lower().removeprefix("gpu-"): d for d in devices}
        exact = [by_uuid.get(u) for u in torch_uuids]
        if all(exact):
            chosen = exact
    for cuda_index, d in enumerate(chosen):
        d.cuda_index = cuda_index
    return chosen, note


def _torch_uuids() -> list[str] | None:
    """CUDA's own device UUIDs, only if torch is already imported (never imported here)."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return None
        return [str(torch.cuda.get_device_properties(i).uuid).lower() for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not break inspection
        return None


def _torch_devices() -> tuple[list[DeviceInfo], str]:
    """torch.cuda.mem_get_info fallback (imports torch: only on explicit request)."""
    try:
        import torch
    except ImportError:
        return [], "torch is not installed"
    if not torch.cuda.is_available():
        return [], "torch sees no CUDA device"
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        p = torch.cuda.get_device_properties(i)
        out.append(DeviceInfo(index=None, name=p.name, uuid=f"GPU-{p.uuid}", total_bytes=int(total),
                              free_bytes=int(free), reserved_bytes=None, used_bytes=int(total - free),
                              compute_capability=f"{p.major}.{p.minor}", pcie_gen=None, pcie_width=None,
                              h2d_bytes_per_s=None, source="torch", note="NVML unavailable; torch.cuda.mem_get_info",
                              cuda_index=i))
    return out, ""


# ---------------------------------------------------------------------------- public API

def inspect_gpus(selector: str = "auto", *, profiles_dir=None, allow_torch: bool = False) -> list[DeviceInfo]:
    """The GPUs a selector names ([] when "auto"/"all" find none; see `why_no_gpu`)."""
    sel = str(selector).strip()
    low = sel.lower()
    is_index = re.fullmatch(r"cuda:\d+", low) or (low.isdigit() and int(low) < MAX_INDEX)
    if low not in ("auto", "all") and not is_index:
        if re.match(r"[-+]\s*\.?\d", low):
            raise CrepaConfigError("--gpu", sel, valid="a positive size such as 24GiB, auto, an index or a catalog name")
        if low[:1].isdigit() and not low.isdigit():  # "24GB", "24GiB", "80g"
            try:
                size = parse_size(sel)
            except ValueError:
                size = None
            if size is not None:
                if not MIN_CARD_BYTES <= size <= MAX_CARD_BYTES:
                    raise CrepaConfigError("--gpu", sel, valid="a card size from 1GiB to 4TiB, e.g. 24GiB")
                return [from_size(size, sel)]
        return [from_catalog(sel, profiles_dir)]  # "rtx4090", "4090", or ProfileNotFoundError
    devices, why = _nvml_devices(profiles_dir)
    if not devices and allow_torch:
        devices, why2 = _torch_devices()
        why = why if devices else f"{why}; {why2}"
    _LAST_WHY[0] = why
    if not devices:
        if is_index:  # a bare "24" is more often a size without its unit than a GPU index
            unit = f"a size with its unit ({sel}GiB), " if low.isdigit() else ""
            raise CrepaConfigError("--gpu", sel, valid=f"{unit}auto or a catalog name; no GPU index {sel} here "
                                                        f"({why})")
        return []
    visible, note = _visible(devices) if devices[0].source == "nvml" else (devices, "")
    if note:
        _LAST_WHY[0] = note
    if low == "all":
        return devices
    if low == "auto":
        if not visible:  # CUDA_VISIBLE_DEVICES hides every GPU from this process
            _LAST_WHY[0] = note or f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} hides every GPU"
            return []
        rank = os.environ.get("LOCAL_RANK", "0")
        k = int(rank) if rank.isdigit() else 0
        if k >= len(visible):
            raise CrepaConfigError("LOCAL_RANK", rank, valid=f"0..{len(visible) - 1} ({len(visible)} visible GPU(s))")
        return [visible[k]]
    k = int(low.removeprefix("cuda:"))
    if k >= len(visible):
        raise CrepaConfigError("--gpu", sel, valid=f"an index 0..{len(visible) - 1} among the visible GPUs, "
                                                  "auto, all, a catalog name or a size such as 24GB")
    return [visible[k]]


_LAST_WHY = [""]


def why_no_gpu() -> str:
    """Why the last auto/all inspection found nothing (or a CUDA_VISIBLE_DEVICES mismatch)."""
    return _LAST_WHY[0]


def resolve_gpu(selector: str = "auto", *, profiles_dir=None) -> DeviceInfo:
    """One device for the planner: the selected GPU, or the catalog's default card when none is found."""
    found = inspect_gpus(selector, profiles_dir=profiles_dir)
    if found:
        return found[0]
    return from_catalog(DEFAULT_GPU, profiles_dir,
                        note=f"no GPU found ({why_no_gpu() or 'none visible'}); planning for a {DEFAULT_GPU}")


def other_visible_gpus(current: DeviceInfo, *, profiles_dir=None) -> list[DeviceInfo]:
    """Visible GPUs other than `current` (candidates for the teacher's `device` tier)."""
    if current.source not in ("nvml", "torch"):
        return []
    devices, _ = _nvml_devices(profiles_dir) if current.source == "nvml" else _torch_devices()
    visible, _ = _visible(devices) if current.source == "nvml" else (devices, "")
    return [d for d in visible if d.uuid != current.uuid]


__all__ = ["DeviceInfo", "inspect_gpus", "resolve_gpu", "other_visible_gpus", "why_no_gpu", "h2d_bandwidth",
           "from_catalog", "from_size", "DEFAULT_GPU"]
