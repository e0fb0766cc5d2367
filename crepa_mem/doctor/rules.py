"""What a log line means: the rules that recognise failures in training logs (PyTorch's out-of-memory
wordings on CUDA, ROCm and the cudaMallocAsync backend, pinned host allocations, SimpleTuner's and
crepa-mem's CREPA errors, NVML, driver and container-toolkit errors, torch.hub errors, device
mismatches). Pure text, no I/O: diagnose_logs streams the log and feeds its lines here; `phases`
reads the traceback frames.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from crepa_mem.doctor.phases import classify_phase, pinned_host_copy, short_frames

_SIZE = r"(\d+(?:\.\d+)?) ?(bytes|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\b"
_UNIT = {"bytes": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
         "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}  # PyTorch/MPS print binary units


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * _UNIT[unit.lower()])


# ---------------------------------------------------------------------------- events

@dataclass
class Event:
    """One recognised failure in the log; repeats are counted, not stored."""

    code: str
    data: dict[str, Any]
    key: tuple = ()
    line_no: int = 0
    frames: list[str] = field(default_factory=list)
    count: int = 1


_OOM = re.compile(r"(?:CUDA|HIP|XPU) out of memory|MPS backend out of memory|(?:CUDA|HIP) error: out of memory"
                  r"|CUBLAS_STATUS_ALLOC_FAILED|OutOfMemoryError|would exceed allowed memory|Allocation on device\s*$"
                  r"|CUDA_ERROR_OUT_OF_MEMORY|hipErrorOutOfMemory|cuda runtime error \(2\) : out of memory")
# a failed *host* allocation (page-locked memory for fast copies), not GPU memory
_HOST_TEXT = re.compile(r"cudaHostAlloc|cudaMallocHost|hipHostMalloc|pinned memory|pin memory thread|page-locked"
                        r"|CachingHostAllocator", re.I)
_HOST_FAIL = re.compile(r"(?:cudaHostAlloc|cudaMallocHost|hipHostMalloc|pinned memory|page-locked)[^\n]{0,120}?"
                        r"(?:fail|out of memory|unable|could not)|(?:fail|unable|could not)[^\n]{0,60}?"
                        r"(?:pinned|page-locked) (?:host )?memory", re.I)
_TRIED = re.compile(r"Tried to allocate " + _SIZE)
# PyTorch ≥ 2.1 ("capacty" is 2.1's own typo)
_NEW = re.compile(r"GPU (\d+) has a total capac(?:i)?ty of " + _SIZE + r" of which " + _SIZE + r" is free")
_ALLOCATED = re.compile(r"Of the allocated memory " + _SIZE + r" is allocated by PyTorch")
_UNALLOCATED = re.compile(_SIZE + r" is reserved by PyTorch but unallocated")
_THIS_PROC = re.compile(r"this process has " + _SIZE + r" memory in use")
_OTHER_PROC = re.compile(r"Process (\d+) has " + _SIZE + r" memory in use")
# PyTorch ≤ 2.0
_OLD = re.compile(r"\(GPU (\d+); " + _SIZE + r" total capacity; " + _SIZE + r" already allocated; " + _SIZE
                  + r" free;(?: " + _SIZE + r" allowed;)? " + _SIZE + r" reserved in total by PyTorch\)")
_OLDEST = re.compile(r"\(GPU (\d+); " + _SIZE + r" total capacity; " + _SIZE + r" already allocated; " + _SIZE
                     + r" free; " + _SIZE + r" cached\)")  # PyTorch <= 1.3
# the cudaMallocAsync backend (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync, ComfyUI's default on some setups)
_ASYNC = {key: re.compile(label + r"\s*:\s*" + _SIZE) for key, label in (
    ("allocated_bytes", r"Currently allocated"), ("tried_bytes", r"Requested"), ("total_bytes", r"Device limit"),
    ("free_bytes", r"Free \(according to CUDA\)"))}
_MPS = re.compile(r"MPS allocated: " + _SIZE + r", other allocations: " + _SIZE + r", max allowed: " + _SIZE)

_RULES: list[tuple[str, re.Pattern, str]] = [  # (code, pattern, kind) checked on every candidate line
    ("block_index_out_of_range", re.compile(r"CREPA requested hidden states from layer (-?\d+)"), "index"),
    ("block_index_out_of_range",
     re.compile(r"hidden states not returned(?:\D{0,40}?(?:block|layer)[ _]?(?:index )?(-?\d+))?", re.I), "index"),
    ("block_index_out_of_range", re.compile(r"CREPA is enabled but no intermediate hidden states"), "index"),
    ("unsupported_family", re.compile(r"CREPA cannot capture hidden states from (\w+)"), "name"),
    ("invalid_option", re.compile(r"(crepa_block_index) must be set when CREPA is enabled"), "unset"),
    ("invalid_option", re.compile(r"(crepa_adjacent_distance) must be non-negative"), "simple"),
    ("invalid_option", re.compile(r"(crepa_adjacent_tau) must be greater than zero"), "simple"),
    ("invalid_option", re.compile(r"(crepa(?:_mem)?_\w+)=(.{1,80}?) is invalid: valid is ([^(]+)"), "kv"),
    ("hidden_size_unknown", re.compile(r"unable to infer transformer hidden size", re.I), "plain"),
    ("device_mismatch", re.compile(r"Expected all tensors to be on the same device"), "devices"),
    ("device_mismatch", re.compile(r"Cannot copy out of meta tensor"
                                   r"|Tensor on device meta is not on the expected device"), "devices"),
    ("nvml_unavailable", re.compile(r"NVMLError_LibraryNotFound|NVML Shared Library Not Found"
                                    r"|libnvidia-ml\.so[.\d]*: cannot open"), "plain"),
    ("nvml_unknown_error", re.compile(r"Failed to initialize NVML: Unknown Error|NVMLError_Unknown\b"
                                      r"|nvml error: unknown error", re.I), "plain"),
    ("driver_library_mismatch", re.compile(r"Driver/library version mismatch|NVMLError_LibRmVersionMismatch"
                                           r"|NVML/RM version mismatch|Error 803: system has unsupported display "
                                           r"driver / cuda driver combination", re.I), "plain"),
    ("nvidia_smi_failed", re.compile(r"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver",
                                     re.I), "plain"),
    ("driver_not_loaded", re.compile(r"NVMLError_DriverNotLoaded|Driver Not Loaded|Found no NVIDIA driver on your "
                                     r"system", re.I), "plain"),
    ("driver_too_old", re.compile(r"CUDA driver version is insufficient for CUDA runtime version"
                                  r"|NVIDIA driver on your system is too old"), "plain"),
    ("torch_without_cuda", re.compile(r"Torch not compiled with CUDA enabled"), "plain"),
    # [\w.-]+ never matches a quoted source line's `{model}`: the name comes from the message only
    ("unknown_encoder", re.compile(r"Cannot find callable ([\w.-]+) in hubconf|unknown encoder '([^']+)'"), "name"),
    ("encoder_weights_missing", re.compile(r"EncoderNotAvailableError"), "plain"),
]
_GATES = {  # code → lower-case words one of which a line must hold before that code's patterns run
    "block_index_out_of_range": ("hidden states",), "unsupported_family": ("hidden states",),
    "invalid_option": ("must be", "greater than zero", "is invalid"), "hidden_size_unknown": ("hidden size",),
    "device_mismatch": ("same device", "meta"), "nvml_unavailable": ("nvml", "nvidia-ml"),
    "nvml_unknown_error": ("nvml",), "driver_library_mismatch": ("mismatch", "error 803"),
    "nvidia_smi_failed": ("nvidia-smi",), "driver_not_loaded": ("driver",), "driver_too_old": ("driver",),
    "torch_without_cuda": ("compiled with cuda",), "unknown_encoder": ("hubconf", "unknown encoder"),
    "encoder_weights_missing": ("encodernotavailable",),
}
_OOM_GATE = ("memory", "alloc")
_HOST_GATE = ("pinned", "page-locked", "hostalloc", "mallochost")
_NETWORK = re.compile(r"couldn't connect to|Cannot reach|LocalEntryNotFoundError|URLError"
                      r"|Temporary failure in name resolution|Max retries exceeded|offline mode"
                      r"|Network is unreachable|couldn't find (?:it|them) in the cached files")
TRIGGERS = ("out of memory", "outofmemory", "alloc_failed", "hidden states", "crepa", "same device", "meta tensor",
            "nvml", "nvidia driver", "nvidia-ml", "driver not loaded", "compiled with cuda", "driver version",
            "hubconf", "unknown encoder", "encodernotavailable", "dinov2", "allocation on device",
            "exceed allowed memory", "nvidia-smi", "display driver", "pin memory", "pinned", "cudahostalloc",
            "cudamallochost", "page-locked",
            "ramtorch", "offload", "swap", "wsl")
"""Lower-case words one of which every line a rule can match contains; lines (and whole blocks)
without any of them, and outside a traceback, are skipped unparsed."""


_TRIGGERS_B = tuple(w.encode() for w in TRIGGERS)


def has_trigger(lowered: str | bytes) -> bool:
    """Whether lower-cased text (str, or bytes: no decoding needed to skip a block) holds a trigger word."""
    return any(word in lowered for word in (_TRIGGERS_B if isinstance(lowered, bytes) else TRIGGERS))


_WRAPPER = re.compile(r"ChildFailedError|CalledProcessError|SystemExit|KeyboardInterrupt")


def is_wrapper_error(text: str) -> bool:
    """Launchers' own exceptions (torchrun, accelerate launch) that only repeat a child's failure."""
    return bool(_WRAPPER.search(text))


_EXCEPTION_LINE = re.compile(r"^\s*(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Warning|Failed"
                             r"|Failure|Fault)\w*(?::|\s*$)")


def looks_like_exception(text: str) -> bool:
    """`KeyError: 'x'`, `torch.OutOfMemoryError: …`, `pynvml.NVMLError_Unknown: …`: the line that ends a
    traceback, as opposed to a source line that lost its indentation in a paste."""
    return bool(_EXCEPTION_LINE.match(text))


OFFLOAD = re.compile(r"ramtorch|cpu_offload|group_offload|sequential_cpu_offload|offload_device|offloading\.py"
                     r"|blocks?_to_swap|block[ _-]?swap|swapping \d+ (?:transformer )?blocks|enable_block_swap"
                     r"|mmgp[/\\]offload", re.I)
WSL = re.compile(r"\bWSL2?\b|microsoft-standard|/mnt/[a-z]/|/usr/lib/wsl/", re.I)


def oom_numbers(text: str) -> dict[str, Any]:
    """The figures of PyTorch's out-of-memory message (any wording); keys end in _bytes."""
    d: dict[str, Any] = {"wording": "bare"}
    if m := _TRIED.search(text):
        d["tried_bytes"] = _bytes(*m.groups())
    if m := _NEW.search(text):
        d.update(wording="new", gpu_index=int(m[1]), total_bytes=_bytes(m[2], m[3]), free_bytes=_bytes(m[4], m[5]))
        if a := _ALLOCATED.search(text):
            d["allocated_bytes"] = _bytes(a[1], a[2])
        if u := _UNALLOCATED.search(text):
            d["reserved_unallocated_bytes"] = _bytes(u[1], u[2])
        if p := _THIS_PROC.search(text):
            d["process_bytes"] = _bytes(p[1], p[2])
        procs = [{"pid": int(p[1]), "used_bytes": _bytes(p[2], p[3])} for p in _OTHER_PROC.finditer(text)]
        if procs:
            d["processes"] = procs[:16]
    elif m := _OLD.search(text):
        g = m.groups()
        reserved = _bytes(g[9], g[10])
        d.update(wording="old", gpu_index=int(g[0]), total_bytes=_bytes(g[1], g[2]), allocated_bytes=_bytes(g[3], g[4]),
                 free_bytes=_bytes(g[5], g[6]), reserved_unallocated_bytes=max(0, reserved - _bytes(g[3], g[4])))
    elif m := _OLDEST.search(text):
        g = m.groups()
        d.update(wording="old", gpu_index=int(g[0]), total_bytes=_bytes(g[1], g[2]), allocated_bytes=_bytes(g[3], g[4]),
                 free_bytes=_bytes(g[5], g[6]), reserved_unallocated_bytes=_bytes(g[7], g[8]))
    elif m := _MPS.search(text):
        d.update(wording="mps", allocated_bytes=_bytes(m[1], m[2]), total_bytes=_bytes(m[5], m[6]))
    elif "would exceed allowed memory" in text:
        d["wording"] = "async"
        if g := re.search(r"Allocation on device (\d+)", text):
            d["gpu_index"] = int(g[1])
        d.update({k: _bytes(m[1], m[2]) for k, rx in _ASYNC.items() if (m := rx.search(text))})
    if "TeacherOutOfMemoryError" in text:
        d["wording"] = "crepa_mem"
    return d


def refine_oom(event: Event, frames: tuple) -> None:
    """Phase, place and kind of memory of an OOM event from (new) frames: a bare `CUDA error: out of
    memory` raised by pinning or a non-blocking device→host copy is a failed host allocation."""
    d = event.data
    if frames:
        phase, where = classify_phase(frames)
        if d.get("phase", "unknown") == "unknown" and (phase != "unknown" or where):
            d.update(phase=phase, where=where)
        event.frames = short_frames(frames)
    if _HOST_TEXT.search(d.get("exception", "")) or (d["wording"] in ("bare", "async") and pinned_host_copy(frames)):
        d["memory"] = "pinned_host"


def attach_frames(event: Event, frames: tuple) -> None:
    """Frames printed apart from their error (no header, or the message first) given to it."""
    if event.code == "oom":
        refine_oom(event, frames)
        return
    event.frames = short_frames(frames)
    if event.code == "device_mismatch":
        event.data["offload_in_traceback"] = _offload_in(frames)


def _offload_in(frames: tuple) -> bool:
    text = " ".join(f"{f} {fn} {src}" for f, fn, src in frames[-12:])
    return bool(re.search(r"ramtorch|accelerate/hooks|group_offloading|cpu_offload", text) or OFFLOAD.search(text))


def _oom_event(text: str, frames: tuple) -> Event:
    d = oom_numbers(text)
    d.update(phase="unknown", where=None, exception=text.strip()[:400])
    event = Event("oom", d)
    refine_oom(event, frames)
    if d["phase"] == "unknown" and d["wording"] == "crepa_mem":
        d["phase"] = "encoder"  # raised by the teacher path when one frame per chunk is still too much
    event.key = ("oom", d.get("gpu_index"), d.get("tried_bytes"), d.get("total_bytes"), d.get("free_bytes"),
                 d["wording"])
    return event


def oom_complete(text: str) -> bool:
    """Whether an OOM message has all its parts (a pasted message may be wrapped over lines)."""
    return "reserved by PyTorch" in text or "reserved in total by PyTorch" in text or "max allowed" in text \
        or "error: out of memory" in text or "ALLOC_FAILED" in text or "cached)" in text \
        or "Free (according to CUDA)" in text or bool(re.search(r"Allocation on device\s*$", text))


_DINOV2_HUB_NAME = re.compile(r"dinov2_vit[sblg]14(?:_reg)?(?:_lc|_ld|_dd|_ms)?")
_HUB_FRAME = re.compile(r"torch[/\\]hub\.py|hubconf\.py")


def _hub_events(text: str, in_frames: str, exception_line: bool) -> list[Event]:
    """torch.hub's own failures: a cache older than the model asked for, a directory without hubconf.py,
    GitHub's API rate limit; an error raised inside torch/hub.py or a hubconf.py is not a bad name."""
    d: dict[str, Any] = {"line": text.strip()[:400]}
    if (m := re.search(r"Cannot find callable ([\w.-]+) in hubconf", text)) and _DINOV2_HUB_NAME.fullmatch(m[1]):
        d.update(kind="stale_cache", name=m[1])
    elif re.search(r"hubconf\.py", text) and re.search(r"No such file|FileNotFoundError|not found", text, re.I):
        d["kind"] = "missing_hubconf"
        if p := re.search(r"'([^']*hubconf\.py)'", text):
            d["path"] = p[1]
    elif exception_line and _HUB_FRAME.search(in_frames) and re.search(r"rate limit exceeded|HTTP Error 40[13]", text):
        d["kind"] = "rate_limit"
    elif exception_line and _HUB_FRAME.search(in_frames) and looks_like_exception(text) \
            and "Cannot find callable" not in text and not _NETWORK.search(text):
        d["kind"] = "hubconf_failed"
    else:
        return []
    return [Event("encoder_hub_error", d, key=("encoder_hub_error", d["kind"], d.get("name")))]


RAISE = re.compile(r"\s*raise\b")


def detect_events(text: str, frames: tuple = (), *, exception_line: bool = False) -> list[Event]:
    """Known failures on one line. `frames` are the traceback's (file, func, source) when the line
    is the exception line that ends a traceback."""
    lowered = text.lower()
    if RAISE.match(text) or ("exception type" in lowered
                                           and re.search(r"Exception Type:\**\s*[\w.]+\s*$", text)):
        return []  # a quoted source line (`raise RuntimeError(f"… {model} …")`), or a type without its message
    hub_files = " ".join(f for f, _, _ in frames)
    hub_frames = exception_line and _HUB_FRAME.search(hub_files)
    in_frames = " ".join(f"{f} {fn} {src}" for f, fn, src in frames[-12:])
    network = exception_line and _NETWORK.search(text) and re.search(r"dinov2|hub\.py", in_frames)
    if not has_trigger(lowered) and not network and not hub_frames:
        return []
    out: list[Event] = []
    if (any(w in lowered for w in _OOM_GATE) and _OOM.search(text)) \
            or (any(w in lowered for w in _HOST_GATE) and _HOST_FAIL.search(text)):
        out.append(_oom_event(text, frames))
    hub = [] if out or not ("hubconf" in lowered or hub_frames) else _hub_events(text, hub_files, exception_line)
    for event in hub:
        event.frames = short_frames(frames)
    out += hub
    for code, pattern, kind in _RULES:
        if not any(w in lowered for w in _GATES[code]):
            continue
        m = pattern.search(text)
        if not m or (hub and code == "unknown_encoder"):
            continue
        d: dict[str, Any] = {"line": text.strip()[:400]}
        if kind == "index":
            value = next((g for g in m.groups() if g is not None), None)
            if value is None and (got := re.search(r"valid block indices are .{1,20}?, got (-?\d+)", text)):
                value = got[1]  # crepa-mem's CaptureError
            d["block_index"] = None if value is None else int(value)
            if n := re.search(r"(\w+) transformer has (\d+) blocks", text):  # crepa-mem's CaptureError says more
                d.update(family=n[1], num_blocks=int(n[2]))
            elif fam := re.search(r"helpers[/\\]models[/\\](\w+)[/\\]model\.py", in_frames):  # SimpleTuner's model file
                d["family"] = fam[1]
            key = (code, d["block_index"])
        elif kind in ("unset", "simple"):
            d.update(key=m[1], value=None if kind == "unset" else "?")
            key = (code, m[1])
        elif kind == "kv":
            d.update(key=m[1], value=m[2].strip("'\""), valid=m[3].strip().rstrip("."))
            key = (code, m[1], m[2])
        elif kind == "devices":
            devices = re.findall(r"\b(cuda:\d+|cuda|cpu|meta|mps)\b", text.split("same device")[-1])
            d["devices"] = sorted(set(devices))[:4]
            d["offload_in_traceback"] = _offload_in(frames)
            key = (code, tuple(d["devices"]))
        elif kind == "name":
            d["name"] = next((g for g in m.groups() if g), None)
            key = (code, d["name"])
        else:
            key = (code,)
        if code == "encoder_weights_missing" and "unknown encoder" in text:
            continue  # crepa-mem's EncoderNotAvailableError for a bad name: unknown_encoder covers it
        out.append(Event(code, d, key=key, frames=short_frames(frames)))
        if code == "block_index_out_of_range":
            break  # several wordings of the same error on one line: one event
    if (exception_line or "dinov2" in lowered) and _NETWORK.search(text) \
            and ("dinov2" in lowered or re.search(r"dinov2|hub\.py|_load_encoder", in_frames)):
        repo = re.search(r"(facebook/dinov2[\w-]*|facebookresearch/dinov2)", text + " " + in_frames)
        out.append(Event("encoder_weights_missing", {"line": text.strip()[:400], "repo": repo[1] if repo else None},
                         key=("encoder_weights_missing",), frames=short_frames(frames)))
    return out
