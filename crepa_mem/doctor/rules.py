"""What a log line means: the rules that recognise failures in training logs (PyTorch's out-of-memory
wordings, SimpleTuner's and crepa-mem's CREPA errors, NVML and driver errors, device mismatches) and the
traceback frames that say in which phase memory ran out. Pure text, no I/O: diagnose_logs streams the
log and feeds its lines here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

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


_OOM = re.compile(r"(?:CUDA|HIP|XPU) out of memory|MPS backend out of memory|CUDA error: out of memory"
                  r"|CUBLAS_STATUS_ALLOC_FAILED|TeacherOutOfMemoryError")
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
    ("driver_not_loaded", re.compile(r"NVMLError_DriverNotLoaded|Driver Not Loaded"
                                     r"|couldn't communicate with the NVIDIA driver"
                                     r"|Found no NVIDIA driver on your system"
                                     r"|Driver/library version mismatch"), "plain"),
    ("driver_too_old", re.compile(r"CUDA driver version is insufficient for CUDA runtime version"
                                  r"|NVIDIA driver on your system is too old"), "plain"),
    ("torch_without_cuda", re.compile(r"Torch not compiled with CUDA enabled"), "plain"),
    ("unknown_encoder", re.compile(r"Cannot find callable (\S+) in hubconf|unknown encoder '([^']+)'"), "name"),
    ("encoder_weights_missing", re.compile(r"EncoderNotAvailableError"), "plain"),
]
_NETWORK = re.compile(r"couldn't connect to|Cannot reach|LocalEntryNotFoundError|URLError"
                      r"|Temporary failure in name resolution|Max retries exceeded|offline mode"
                      r"|Network is unreachable|couldn't find (?:it|them) in the cached files")
TRIGGERS = ("out of memory", "outofmemory", "alloc_failed", "hidden states", "crepa", "same device", "meta tensor",
            "nvml", "nvidia driver", "nvidia-ml", "driver not loaded", "compiled with cuda", "driver version",
            "hubconf", "unknown encoder", "encodernotavailable", "dinov2")
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
    elif m := _MPS.search(text):
        d.update(wording="mps", allocated_bytes=_bytes(m[1], m[2]), total_bytes=_bytes(m[5], m[6]))
    if "TeacherOutOfMemoryError" in text:
        d["wording"] = "crepa_mem"
    return d


def _oom_event(text: str, frames: tuple) -> Event:
    d = oom_numbers(text)
    phase, where = classify_phase(frames)
    if phase == "unknown" and d["wording"] == "crepa_mem":
        phase = "encoder"  # raised by the teacher path when one frame per chunk is still too much
    d.update(phase=phase, where=where, exception=text.strip()[:400])
    key = ("oom", d.get("gpu_index"), d.get("tried_bytes"), d.get("total_bytes"), d.get("free_bytes"), d["wording"])
    return Event("oom", d, key=key, frames=short_frames(frames))


def oom_complete(text: str) -> bool:
    """Whether an OOM message has all its parts (a pasted message may be wrapped over lines)."""
    return "reserved by PyTorch" in text or "reserved in total by PyTorch" in text or "max allowed" in text \
        or "CUDA error: out of memory" in text or "ALLOC_FAILED" in text


def detect_events(text: str, frames: tuple = (), *, exception_line: bool = False) -> list[Event]:
    """Known failures on one line. `frames` are the traceback's (file, func, source) when the line
    is the exception line that ends a traceback."""
    in_frames = " ".join(f"{f} {fn} {src}" for f, fn, src in frames[-12:])
    network = exception_line and _NETWORK.search(text) and re.search(r"dinov2|hub\.py", in_frames)
    if not has_trigger(text.lower()) and not network:
        return []
    out: list[Event] = []
    if _OOM.search(text):
        out.append(_oom_event(text, frames))
    for code, pattern, kind in _RULES:
        m = pattern.search(text)
        if not m:
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
            d["offload_in_traceback"] = bool(re.search(r"ramtorch|accelerate/hooks|group_offloading|cpu_offload",
                                                       in_frames))
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
    if _NETWORK.search(text) and (re.search(r"dinov2", text, re.I)
                                  or re.search(r"dinov2|hub\.py|_load_encoder", in_frames)):
        repo = re.search(r"(facebook/dinov2[\w-]*|facebookresearch/dinov2)", text + " " + in_frames)
        out.append(Event("encoder_weights_missing", {"line": text.strip()[:400], "repo": repo[1] if repo else None},
                         key=("encoder_weights_missing",), frames=short_frames(frames)))
    return out


# ---------------------------------------------------------------------------- phase of an OOM

_VAE_FUNCS = {"_decode_latents", "iter_decoded_frames", "tiled_decode", "_temporal_tiled_decode", "decode", "_decode"}
_ENC_FUNCS = {"_encode_frames", "_forward_encoder", "_load_encoder", "forward_features", "encode_tokens",
              "prepare_images"}
_PROJ_FUNCS = {"_project_hidden_states", "project", "compute_loss", "frame_similarity", "align_tokens",
               "resample_tokens"}
_BACKWARD = ("_engine_run_backward", "run_backward")


def _frame_phase(file: str, func: str, src: str) -> str | None:
    f = file.replace("\\", "/").lower()
    crepa_file = "crepa" in f  # SimpleTuner's helpers/training/crepa.py or the crepa_mem package
    if "/autoencoders/" in f or "autoencoder_kl" in f:  # before the encoder rules: a VAE has an `encoder` too
        return "vae_decode"
    if "projector" in func.lower() or re.search(r"projector\(|_project_hidden_states", src) \
            or (crepa_file and func in _PROJ_FUNCS):
        return "projector"
    if "dinov2" in f or func in _ENC_FUNCS or re.search(r"_encode_frames|_forward_encoder|encode_tokens", src) \
            or (crepa_file and "self.encoder(" in src):
        return "encoder"
    if (func in _VAE_FUNCS and ("vae" in f or crepa_file)) \
            or re.search(r"vae\.decode\(|_decode_latents|iter_decoded_frames", src):
        return "vae_decode"
    if re.search(r"/transformers/transformer_|transformer_(wan|ltx|sana|kandinsky)", f) or func == "model_predict" \
            or func in _BACKWARD or re.search(r"\.backward\(|self\.transformer\(|self\.model\(", src):
        return "transformer"
    return None


def classify_phase(frames: Iterable[tuple[str, str, str]]) -> tuple[str, str | None]:
    """(phase, where): the innermost frame that belongs to a known phase decides. A VAE frame inside
    an `encode` call (latent caching) is not CREPA's decode: phase unknown, where 'vae_encode'."""
    frames = list(frames)
    for file, func, src in reversed(frames):
        phase = _frame_phase(file, func, src)
        if phase is None:
            continue
        if phase == "vae_decode" and not any("decode" in fn or "decode" in s for _, fn, s in frames):
            return "unknown", "vae_encode"
        where = f"{_basename(file)}:{func}"
        if phase == "transformer" and any(fn in (*_BACKWARD, "backward") for _, fn, _ in frames):
            where = "backward"
        return phase, where
    return "unknown", None


def _basename(path: str) -> str:
    return re.split(r"[/\\]", path)[-1]  # Windows tracebacks too


def short_frames(frames: tuple) -> list[str]:
    return [f"{_basename(f)}:{fn}" for f, fn, _ in frames[-6:]]
