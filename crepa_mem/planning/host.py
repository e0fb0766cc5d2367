"""Host memory per node: what the swap/stream tiers keep in (pinned) host RAM, times the ranks on the node.

No torch. The `swap` and `stream` tiers hold the teacher's weights in host memory in *every* rank: 8 ranks ×
ViT-g fp32 (4.5 GB) is 36 GB of pinned memory on one node, beside the trainer's own block swap and cached
latents. So host bytes are planned per node, as device bytes are planned per GPU:
- read: RAM (psutil if installed, else /proc/meminfo), the locked-memory limit (`ulimit -l`, RLIMIT_MEMLOCK,
  per process), the local ranks (LOCAL_WORLD_SIZE, as torchrun and accelerate set it), and WSL2 (whose VM
  sees only the RAM .wslconfig gives it, and where CUDA limits pinned memory: NVIDIA's CUDA-on-WSL guide);
- ways out, when the node's bytes do not fit: one host copy shared by the local ranks (a read-only mmap
  of a safetensors file, crepa_mem_host_share_path: page-cache pages every rank maps, pageable, so copies
  from it run at pageable speed), and RamTorch's NVMe tier (crepa_mem_stream_nvme_path: the masters on
  disk, one chunk of pinned staging in RAM).
"""
from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass, field

from crepa_mem.units import format_bytes

HOST_TIERS = ("swap", "stream")  # tiers whose masters live in host memory while the GPU computes
SHARE_TIERS = ("swap",)  # where a shared pageable copy can replace the pinned one (see teacher.host_share)


@dataclass(frozen=True)
class HostInfo:
    total_bytes: int | None
    available_bytes: int | None
    pinned_limit_bytes: int | None  # ulimit -l (soft), per process; None = unlimited or unknown
    local_ranks: int
    wsl: bool = False
    source: str = "unknown"

    def to_dict(self) -> dict:
        return asdict(self)


def _meminfo(path: str = "/proc/meminfo") -> tuple[int | None, int | None]:
    values = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values.get("MemTotal"), values.get("MemAvailable")


def _ram() -> tuple[int | None, int | None, str]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available), "psutil"
    except ImportError:
        total, avail = _meminfo()
        return total, avail, "/proc/meminfo" if total else "unknown"


def _memlock() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _is_wsl(path: str = "/proc/version") -> bool:
    try:
        with open(path) as f:
            return "microsoft" in f.read().lower()
    except OSError:
        return False


def local_ranks(env: dict | None = None) -> int:
    """Processes of this job on this node: LOCAL_WORLD_SIZE (torchrun, accelerate), else 1."""
    value = (os.environ if env is None else env).get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else 1


def read_host(*, ram_bytes: int | None = None, ranks: int | None = None) -> HostInfo:
    """This node's host memory; `ram_bytes` (--host-ram) replaces what is available, `ranks` the rank count."""
    total, avail, source = _ram()
    if ram_bytes is not None:
        avail, source = ram_bytes, "given"
    return HostInfo(total_bytes=total, available_bytes=avail, pinned_limit_bytes=_memlock(),
                    local_ranks=ranks or local_ranks(), wsl=_is_wsl(), source=source)


@dataclass
class HostPlan:
    """Host bytes of one configuration on this node."""
    pinned_per_rank: int = 0
    pageable_per_rank: int = 0
    shared_per_node: int = 0
    node_bytes: int = 0
    fits: bool = True
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_host(host: HostInfo | None, parts: list[tuple[str, int, str]]) -> HostPlan:
    """`parts`: (what, bytes per rank, how) with how = pinned · pageable · shared (one copy per node)."""
    p = HostPlan()
    for _what, nbytes, how in parts:
        if how == "pinned":
            p.pinned_per_rank += nbytes
        elif how == "shared":
            p.shared_per_node += nbytes
        else:
            p.pageable_per_rank += nbytes
    ranks = host.local_ranks if host else 1
    p.node_bytes = ranks * (p.pinned_per_rank + p.pageable_per_rank) + p.shared_per_node
    if host is None or not parts:
        return p
    f = format_bytes
    what = ", ".join(f"{w} {f(n)} {how}" for w, n, how in parts)
    if host.available_bytes is not None and p.node_bytes > host.available_bytes:
        p.fits = False
        p.reasons.append(f"host: {ranks} local rank(s) × ({what}) = {f(p.node_bytes)} > {f(host.available_bytes)} "
                         f"available on this node ({host.source})")
    if host.pinned_limit_bytes is not None and p.pinned_per_rank > host.pinned_limit_bytes:
        # a warning, as in `crepa-mem doctor`: CUDA's own pinned allocations may still succeed
        p.reasons.append(f"host: {f(p.pinned_per_rank)} pinned per rank > ulimit -l {f(host.pinned_limit_bytes)}: "
                         f"pinned allocations may fail or fall back to pageable copies (raise it: `ulimit -l "
                         f"unlimited`, docker --ulimit memlock=-1)")
    if p.fits:
        p.reasons.append(f"host: {ranks} local rank(s) × ({what}) = {f(p.node_bytes)} on this node"
                         + (f" of {f(host.available_bytes)} available" if host.available_bytes is not None else ""))
    if host.wsl and p.pinned_per_rank:
        p.reasons.append("host: WSL2: the VM has only the RAM .wslconfig gives it, and CUDA on WSL limits pinned "
                         "memory; prefer a shared pageable copy or the NVMe tier if pinned allocations fail")
    return p


def host_parts(*, encoder_tier: str, vae_tier: str, encoder_host_bytes: int, vae_bytes: int,
               encoder_way: str = "pinned") -> list[tuple[str, int, str]]:
    """(what, bytes per rank, how) for plan_host: the masters the swap/stream tiers keep on the host.
    `encoder_way`: pinned · shared (one read-only mapped copy per node) · nvme (RamTorch's staging only)."""
    parts = []
    if encoder_tier in HOST_TIERS:
        how = "shared" if encoder_way == "shared" else "pinned"
        parts.append(("encoder" + (" NVMe staging" if encoder_way == "nvme" else ""), encoder_host_bytes, how))
    if vae_tier in HOST_TIERS:
        parts.append(("VAE", vae_bytes, "pinned"))
    return parts
