"""Live machine checks: NVML and the driver, a CPU-only torch on a GPU machine, memory other processes
hold on the GPUs, pinned-memory and host-RAM limits for the CPU tiers, and package versions.

Every probe goes through `MachineProbe`, so tests replace any of them; pynvml's own functions may
also be monkeypatched (REFERENCE §5). torch is imported only when NVML reports a GPU. On a machine
without a GPU the checks say so in info findings and never raise.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from crepa_mem.doctor.findings import Context, Finding
from crepa_mem.doctor.setup_fixes import NVML_TEXTS
from crepa_mem.units import GiB, format_bytes

MIN_VERSIONS = {
    "torch": ("2.4", "crepa-mem's floor (torch.OutOfMemoryError, FakeTensorMode tracing)"),
    "diffusers": ("0.36", "Sana-Video and Kandinsky 5 transformers first ship in diffusers 0.36"),
    "transformers": ("4.48", "Dinov2Model / Dinov2WithRegistersModel as crepa-mem loads them"),
    "accelerate": ("1.0", "cpu_offload_with_hook behind the swap tier"),
    "ramtorch": ("1.11", "OffloadModel, the maintained streaming engine behind the stream tier"),
}
PINNED_TIERS = ("swap", "stream")
"""Tiers that keep a pinned host copy of the weights (fast H2D copies)."""
HOST_TIERS = ("swap", "stream", "device")
RAM_HEADROOM = 0.10


# ---------------------------------------------------------------------------- probes

def _import_pynvml():
    import pynvml
    return pynvml


def _torch_build() -> dict[str, Any]:
    """torch's version and the CUDA/HIP it was built for (imports torch: only called with a GPU present)."""
    import torch
    return {"version": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)}


def _memlock() -> tuple[int, int]:
    import resource
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none)."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if m := re.match(r"(\w+):\s+(\d+)\s*kB", line):
                out[m[1]] = int(m[2]) * 1024
    except OSError:
        pass
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _gpu_device_nodes() -> bool:
    """Signs of NVIDIA hardware that do not need NVML: device nodes or the driver's proc entry."""
    return Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


@dataclass
class MachineProbe:
    """Where the machine facts come from; tests swap any field."""

    nvml: Callable[[], Any] = _import_pynvml
    torch_build: Callable[[], dict[str, Any]] = _torch_build
    memlock: Callable[[], tuple[int, int]] = _memlock
    meminfo: Callable[[], dict[str, int]] = _meminfo
    version: Callable[[str], str | None] = _version
    gpu_device_nodes: Callable[[], bool] = _gpu_device_nodes
    pid: int = field(default_factory=os.getpid)


# ---------------------------------------------------------------------------- GPUs

def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _gpu_findings(probe: MachineProbe) -> tuple[list[Finding], int]:
    """NVML findings and the number of GPUs NVML sees (0 when it cannot see any)."""
    hardware = probe.gpu_device_nodes()
    try:
        pynvml = probe.nvml()
    except ImportError:
        return [Finding("nvml_unavailable", "warning" if hardware else "info",
                        "pynvml (nvidia-ml-py) is not installed, so GPU memory cannot be inspected.",
                        "pip install nvidia-ml-py", {"reason": "pynvml missing"})], 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound as e:
        sev = "error" if hardware else "info"
        msg = ("The NVIDIA management library (libnvidia-ml.so) is not on this machine"
               + (" although NVIDIA devices are present." if hardware else ": no NVIDIA GPU or driver here, so "
                  "only CPU-side checks ran."))
        fix = ("Install the NVIDIA driver (nvidia-smi must run); in a container, start it with --gpus all (NVIDIA "
               "container toolkit)." if hardware else "Run doctor on the training machine to check its GPUs.")
        return [Finding("nvml_unavailable", sev, msg, fix, {"error": str(e), "hardware": hardware})], 0
    except pynvml.NVMLError_DriverNotLoaded as e:
        return [Finding("driver_not_loaded", "error" if hardware else "warning",
                        "The NVIDIA library is installed but the driver is not loaded: CUDA cannot see any GPU.",
                        "Load the driver (`sudo modprobe nvidia`, or reboot after a driver update) until `nvidia-smi` "
                        "lists the GPU.", {"error": str(e), "hardware": hardware})], 0
    except pynvml.NVMLError as e:
        # NVML's other failures each have their own cause: a container that lost its GPUs, a driver updated
        # under a loaded kernel module
        code = {getattr(pynvml, "NVMLError_Unknown", ()): "nvml_unknown_error",
                getattr(pynvml, "NVMLError_LibRmVersionMismatch", ()): "driver_library_mismatch"}.get(type(e))
        if code:
            msg, fix = NVML_TEXTS[code]
            return [Finding(code, "error", f"{msg}: NVML said \"{e}\".", fix,
                            {"error": str(e), "hardware": hardware})], 0
        return [Finding("nvml_unavailable", "error" if hardware else "warning", f"NVML failed to start: {e}.",
                        "Check `nvidia-smi`; \"Driver/library version mismatch\" clears with a reboot.",
                        {"error": str(e), "hardware": hardware})], 0
    out: list[Finding] = []
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        gpus, held = [], []
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append({"index": i, "name": _text(pynvml.nvmlDeviceGetName(h)), "total_bytes": int(mem.total),
                         "free_bytes": int(mem.free)})
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h) or []
            except pynvml.NVMLError:
                procs = []
            for p in procs:
                if int(p.pid) != probe.pid:
                    used = getattr(p, "usedGpuMemory", None)
                    held.append({"gpu": i, "pid": int(p.pid), "used_bytes": None if used is None else int(used)})
    except pynvml.NVMLError as e:
        return [Finding("nvml_unavailable", "warning", f"NVML started but a query failed: {e}.",
                        "Check `nvidia-smi`.", {"error": str(e)})], 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    listing = "; ".join(f"GPU {g['index']} {g['name']}: {format_bytes(g['free_bytes'])} free of "
                        f"{format_bytes(g['total_bytes'])}" for g in gpus) or "none"
    out.append(Finding("gpus", "info", f"NVML sees {count} GPU(s): {listing}.", "Nothing to change.", {"gpus": gpus}))
    if held:
        total = sum(p["used_bytes"] or 0 for p in held)
        out.append(Finding(
            "gpu_memory_held_by_other_process", "warning",
            f"{len(held)} other process(es) hold {format_bytes(total)} of GPU memory: "
            + ", ".join(f"pid {p['pid']} on GPU {p['gpu']}"
                        + (f" ({format_bytes(p['used_bytes'])})" if p["used_bytes"] else "") for p in held[:8]) + ".",
            "If none of them is your training, stop them (nvidia-smi lists them) or pick another GPU with "
            "CUDA_VISIBLE_DEVICES; `crepa-mem plan --gpu auto` budgets only the memory that is free.",
            {"processes": held, "held_bytes": total}))
    return out, count


def _torch_findings(probe: MachineProbe, gpu_count: int) -> list[Finding]:
    if gpu_count == 0:
        return []
    try:
        build = probe.torch_build()
    except ImportError:
        return []  # reported by the version check
    if build.get("cuda") is None and build.get("hip") is None:
        return [Finding("torch_without_cuda", "error",
                        f"torch {build.get('version')} is a CPU-only build, but NVML sees {gpu_count} GPU(s): training "
                        "would run on the CPU or fail with \"Torch not compiled with CUDA enabled\".",
                        "Install a CUDA build of torch matching the driver, e.g. pip install torch --index-url "
                        "https://download.pytorch.org/whl/cu124", build)]
    return [Finding("torch_build", "info", f"torch {build.get('version')} built for "
                    f"{'CUDA ' + str(build['cuda']) if build.get('cuda') else 'ROCm ' + str(build.get('hip'))}.",
                    "Nothing to change.", build)]


# ---------------------------------------------------------------------------- host memory

def _host_bytes(ctx: Context) -> tuple[int, int, list[str]]:
    """(pinned bytes, host bytes, what) the config's CPU tiers keep in host memory."""
    from crepa_mem.profiles import get_encoder
    from crepa_mem.errors import ProfileNotFoundError
    cfg = ctx.config
    pinned = host = 0
    what = []
    enc_tier = str(cfg.get("crepa_mem_encoder_tier", "gpu"))
    vae_tier = str(cfg.get("crepa_mem_vae_tier", "gpu"))
    teacher_dev = str(cfg.get("crepa_mem_teacher_device") or "cpu")
    if enc_tier in HOST_TIERS and (enc_tier != "device" or teacher_dev == "cpu"):
        try:
            enc = get_encoder(str(cfg.get("crepa_model") or cfg.get("crepa_encoder") or "dinov2_vitg14"))
            n = enc.params * (4 if str(cfg.get("crepa_mem_encoder_dtype", "fp32")) == "fp32" else 2)
        except ProfileNotFoundError:
            n = 0
        host += n
        pinned += n if enc_tier in PINNED_TIERS else 0
        what.append(f"encoder on `{enc_tier}` ({format_bytes(n)})")
    if vae_tier in HOST_TIERS and (vae_tier != "device" or teacher_dev == "cpu") and ctx.model is not None:
        n = ctx.model.vae.params * 2  # bf16 VAE weights
        host += n
        pinned += n if vae_tier in PINNED_TIERS else 0
        what.append(f"VAE on `{vae_tier}` ({format_bytes(n)})")
    return pinned, host, what


def _memory_findings(ctx: Context, probe: MachineProbe) -> list[Finding]:
    import resource
    out: list[Finding] = []
    soft, _hard = probe.memlock()
    unlimited = soft in (resource.RLIM_INFINITY, -1)
    pinned, host, what = _host_bytes(ctx)
    limit = "unlimited" if unlimited else format_bytes(soft)
    if pinned and not unlimited and soft < pinned:
        out.append(Finding(
            "pinned_memory_limited", "warning",
            f"ulimit -l (locked memory) is {limit}, but the chosen tiers pin {format_bytes(pinned)} of host memory "
            f"({', '.join(what)}): pinned allocations may fail or fall back to slow pageable copies.",
            "Raise the limit: `ulimit -l unlimited` (limits.conf memlock), or `docker run --ulimit memlock=-1`.",
            {"memlock_bytes": soft, "pinned_bytes": pinned}))
    elif not unlimited and soft < GiB:
        out.append(Finding(
            "pinned_memory_limited", "info",
            f"ulimit -l (locked memory) is {limit}; the config keeps no pinned weights, but the swap/stream tiers "
            "would pin the teacher's weights (up to 4.5 GB for dinov2_vitg14 in fp32).",
            "Before using the swap/stream tiers: `ulimit -l unlimited` or `docker run --ulimit memlock=-1`.",
            {"memlock_bytes": soft, "pinned_bytes": pinned}))
    info = probe.meminfo()
    available = info.get("MemAvailable")
    if host and available is not None and available < host * (1 + RAM_HEADROOM):
        out.append(Finding(
            "pinned_memory_limited", "warning",
            f"Host RAM available is {format_bytes(available)} but the CPU tiers keep {format_bytes(host)} there "
            f"({', '.join(what)}) on top of the trainer's own use.",
            'Free host memory, or keep a component on the GPU ("crepa_mem_encoder_tier": "gpu") and shrink it '
            'instead ("crepa_mem_encoder_dtype": "bf16", a smaller encoder); `crepa-mem plan` weighs this.',
            {"mem_available_bytes": available, "host_bytes": host}))
    return out


# ---------------------------------------------------------------------------- versions

def _parse(v: str) -> tuple:
    try:
        from packaging.version import Version
        return (Version(v).release,)
    except Exception:  # noqa: BLE001 - packaging missing or an odd local version: compare the digits
        return (tuple(int(x) for x in re.findall(r"\d+", v)[:3]),)


def _version_findings(ctx: Context, probe: MachineProbe) -> list[Finding]:
    found = {name: probe.version(name) for name in MIN_VERSIONS}
    out = [Finding("package_versions", "info",
                   "Installed: " + ", ".join(f"{n} {v or 'missing'}" for n, v in found.items()) + ".",
                   "Nothing to change.", {"versions": found})]
    wants_ramtorch = _truthy(ctx.config.get("ramtorch")) or "stream" in (
        ctx.config.get("crepa_mem_encoder_tier"), ctx.config.get("crepa_mem_vae_tier"))
    for name, (minimum, why) in MIN_VERSIONS.items():
        v = found[name]
        if v is None:
            needed = name != "ramtorch" or wants_ramtorch
            out.append(Finding("package_missing", "warning" if needed else "info", f"{name} is not installed ({why}).",
                               f"pip install '{name}>={minimum}'", {"package": name, "minimum": minimum}))
        elif _parse(v) < _parse(minimum):
            out.append(Finding("package_outdated", "warning", f"{name} {v} is older than {minimum}: {why}.",
                               f"pip install -U '{name}>={minimum}'",
                               {"package": name, "version": v, "minimum": minimum}))
    return out


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "on")


def check_machine(ctx: Context | None = None, probe: MachineProbe | None = None) -> list[Finding]:
    """Every live-machine finding; safe on machines without a GPU, NVML or torch."""
    ctx = ctx or Context()
    probe = probe or MachineProbe()
    gpu, count = _gpu_findings(probe)
    return gpu + _torch_findings(probe, count) + _memory_findings(ctx, probe) + _version_findings(ctx, probe)


__all__ = ["MIN_VERSIONS", "MachineProbe", "check_machine"]
