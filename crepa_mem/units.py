"""Byte units, size parsing and formatting: the only module that knows GiB from GB."""
from __future__ import annotations

import re

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": KB, "kib": KiB,
    "m": MiB, "mb": MB, "mib": MiB,
    "g": GiB, "gb": GB, "gib": GiB,
    "t": TiB, "tb": TB, "tib": TiB,
}

DTYPE_BYTES = {
    "fp32": 4, "float32": 4, "float": 4,
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2, "half": 2,
    "fp8": 1, "float8": 1, "int8": 1,
}


def parse_size(text: str) -> int:
    """'24GiB' → bytes. GPU marketing sizes ('24GB') are read as GiB, since cards are sold that way
    (an "RTX 4090 24GB" has 24 GiB); explicit decimal needs a fraction-free 'e9'-style number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 24GB, 24GiB, 80G, 512MiB)")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("gb", "tb", "mb"):  # cards: "24GB" means 24 GiB
        unit = unit[0] + "ib"
    return int(number * _UNITS[unit])


def format_bytes(n: int | float, binary: bool = True) -> str:
    """Human-readable bytes: 1536 MiB → '1.50 GiB'."""
    step, names = (1024, ["B", "KiB", "MiB", "GiB", "TiB"]) if binary else (1000, ["B", "kB", "MB", "GB", "TB"])
    value, i = float(n), 0
    sign = "-" if value < 0 else ""
    value = abs(value)
    while value >= step and i < len(names) - 1:
        value /= step
        i += 1
    return f"{sign}{value:.0f} {names[i]}" if i == 0 else f"{sign}{value:.2f} {names[i]}"


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype given by name ('bf16', 'float32', 'torch.float16')."""
    key = str(dtype).removeprefix("torch.").lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (valid: fp32, bf16, fp16)")
    return DTYPE_BYTES[key]
