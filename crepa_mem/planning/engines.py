"""The encoder's two `stream` engines in bytes: on the device, moved host → device per step, held on the host.

No torch. Legend: L encoder layers, k resident chunks, w RamTorch's window, c encoder calls per step
(ceil(teacher frames / frame chunk)).

| engine          | device weights during `encode`         | between teacher steps | moved per step           |
|-----------------|----------------------------------------|-----------------------|--------------------------|
| `group_offload` | 2 layers (running + prefetched)        | nothing               | c × all weights          |
| `ramtorch`      | (w + 1) largest streamed chunks        | k resident chunks     | c × streamed chunks only |

RamTorch cuts DINOv2 into L + 2 chunks [embeddings, *layers, layernorm] and keeps k of them, evenly
spaced, on the device for good (crepa_mem.teacher.ramtorch_engine; the "+ 1" is the chunk its compute
thread still holds while the next loads). So k trades device bytes (resident, alive through the
training step too) for PCIe bytes; k = L + 2 is the `gpu` tier.
"""
from __future__ import annotations

import math

from crepa_mem.planning import estimate as est
from crepa_mem.profiles import EncoderProfile
from crepa_mem.units import dtype_bytes

STREAM_ENGINES = ("group_offload", "ramtorch")
RAMTORCH_WINDOW = 2  # RamTorch's default window, what crepa_mem.teacher.ramtorch_engine uses


def chunk_bytes(encoder: EncoderProfile, dtype: str) -> list[int]:
    """Bytes of RamTorch's chunks of this DINOv2: embeddings, each layer, the final LayerNorm."""
    b = dtype_bytes(dtype)
    layer = est.encoder_layer_params(encoder) * b
    return [est.encoder_embed_params(encoder) * b, *[layer] * encoder.num_layers, 2 * encoder.hidden_size * b]


def resident_indices(n: int, k: int) -> set[int]:
    """The k evenly spaced chunks RamTorch keeps on the device (ramtorch.offload_simulator.evenly_pinned)."""
    k = max(0, min(k, n))
    return {i * n // k for i in range(k)} if k else set()


def ramtorch_bytes(encoder: EncoderProfile, dtype: str, resident: int,
                   window: int = RAMTORCH_WINDOW) -> dict[str, int]:
    """{resident_bytes, window_bytes, streamed_bytes}: device bytes always, device bytes while encoding
    (on top), and the host bytes of the streamed chunks' masters (= bytes moved per encoder call)."""
    sizes = chunk_bytes(encoder, dtype)
    pinned = resident_indices(len(sizes), resident)
    streamed = sorted((s for i, s in enumerate(sizes) if i not in pinned), reverse=True)
    return {"resident_bytes": sum(sizes[i] for i in pinned), "window_bytes": sum(streamed[:window + 1]),
            "streamed_bytes": sum(streamed)}


def with_ramtorch(e: est.Estimate, encoder: EncoderProfile, dtype: str, resident: int) -> est.Estimate:
    """`e` (an estimate with the encoder on `stream`) with RamTorch's device bytes in place of group
    offloading's: the window during `encode`, the resident chunks in every phase."""
    b = ramtorch_bytes(encoder, dtype, resident)
    terms = [t for t in e.terms if t.name != "encoder_weights"]
    terms.append(est.Term("encoder_weights", b["window_bytes"], "encode"))
    if b["resident_bytes"]:
        terms.append(est.Term("encoder_resident_chunks", b["resident_bytes"], "resident"))
    return est.Estimate(terms, inputs={**e.inputs, "stream_engine": "ramtorch", "resident_chunks": resident})


def encoder_calls(teacher_frames: int, frames_per_chunk: int) -> int:
    return 1 if frames_per_chunk <= 0 else math.ceil(teacher_frames / frames_per_chunk)


def moved_bytes(encoder: EncoderProfile, dtype: str, engine: str, resident: int, calls: int) -> int:
    """Encoder weight bytes that cross PCIe per training step on the `stream` tier: RamTorch streams its chunks
    once per encoder call; the default engine runs layer-major (crepa_mem.teacher.stream.BlockStream), so each
    layer crosses once per step whatever the number of calls."""
    if engine == "ramtorch":
        return calls * ramtorch_bytes(encoder, dtype, resident)["streamed_bytes"]
    return encoder.params * dtype_bytes(dtype)


def host_bytes(encoder: EncoderProfile, dtype: str, engine: str, resident: int, nvme: bool) -> int:
    """Host bytes of the encoder's masters per rank on the `stream` tier (pinned when CUDA exists).
    RamTorch's NVMe tier keeps only one chunk's pinned staging buffer in RAM."""
    if engine != "ramtorch":
        return encoder.params * dtype_bytes(dtype)
    if nvme:
        return max(chunk_bytes(encoder, dtype))
    return ramtorch_bytes(encoder, dtype, resident)["streamed_bytes"]
