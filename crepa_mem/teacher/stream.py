"""The `stream` tier: weights stay on the CPU and go to the device one block at a time, prefetched.

Engine: diffusers group offloading (`apply_group_offloading`, block level, one block per group, a
CUDA side stream with `record_stream` when CUDA exists). RamTorch's `OffloadModel` over
[embeddings, *encoder.layer, layernorm] is not the default (it is the encoder's second engine, ramtorch_engine.py):
- Measured on the CPU (benchmarks/stream_engines.py, ViT-S/14, 8 frames at 224 px, 2 cores): both
  give outputs identical to the resident model and both run within noise of it (group offloading
  +0-1 %, RamTorch -4..+4 % across runs; RamTorch's copies degrade to clones there). Speed on the
  CPU does not decide it.
- On CUDA both keep ~two blocks on the device (the running one and the prefetched one) and both copy
  from pinned memory on a side stream (RamTorch on a loader thread, diffusers from the hook of the
  block before), so neither wins on memory or overlap; REFERENCE §4, §6: ViT-g bf16 weights cross
  PCIe Gen4 in ~90 ms against ~150-600 ms of its compute, so either hides the transfer.
- Group offloading hooks the module in place, so `encoder(pixel_values=...)`, `.config` and
  crepa_mem.teacher.encode_tokens keep working unchanged, and the same engine streams the VAE
  decoder. RamTorch needs the model cut into chunks and called as `chunks(x)`: an adapter in place
  of the Dinov2Model, and nothing for a conv VAE (REFERENCE §4).
- `crepa-mem trace` measures through a TorchDispatchMode, which is thread-local: RamTorch's loader
  thread and its CUDA-only copy path would be invisible to it. Group offloading runs on the calling
  thread, so the stream tier's footprint is measured, not assumed.
A torch.hub DINOv2 (run through `forward_features`, which bypasses the top-level hook that brings in
its embeddings) is refused for `stream`; crepa-mem's loader returns transformers' Dinov2Model.

The VAE: only the decoder is streamed (the teacher never encodes), down to each up block's resnets;
its small top-level pieces (post_quant_conv, latent statistics) stay resident and the unused encoder
stays on the CPU. Against `swap` this saves the decoder's weights minus its two largest groups (bf16:
≈0.9 GB for Wan 2.2, ≈0.8 GB for LTX 0.9.5, ≈0.2 GB for HunyuanVideo, ≈0.1 GB for Wan 2.1; see
`stream_group_bytes`) but moves the decoder's weights once per decoder call: once per step for LTX
and HunyuanVideo, once per latent frame (and per tile when tiled) for Wan, which the side stream
hides only where decode compute per call outlasts the copy. `crepa-mem trace` measures the memory.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from crepa_mem.errors import CrepaConfigError
from crepa_mem.teacher.placement import Placement, move_module, pinning_available

# Children of a DINOv2 / VAE decoder whose own children are the blocks to stream one at a time.
_ENCODER_BLOCK_PARENTS = ("encoder",)          # transformers Dinov2Model(.encoder.layer[i])
_DECODER_BLOCK_PARENTS = ("mid_block", "up_blocks", *map(str, range(8)))  # down to each up block's resnets
_VAE_UNUSED = ("encoder", "quant_conv")        # the teacher only decodes


def _is_vae(module: nn.Module) -> bool:
    return hasattr(module, "decoder") and hasattr(module, "decode")


class StreamPlacement(Placement):
    """Block-by-block weight streaming through diffusers group offloading hooks (installed once)."""

    def __init__(self, module: nn.Module, *, exec_device: torch.device | str):
        super().__init__(module, tier="stream", exec_device=exec_device)
        from diffusers.hooks import apply_group_offloading

        cuda = self.exec_device.type == "cuda" and torch.cuda.is_available()
        options = dict(onload_device=self.exec_device, offload_device=torch.device("cpu"),
                       offload_type="block_level", num_blocks_per_group=1,
                       use_stream=cuda, record_stream=cuda, non_blocking=cuda)
        if _is_vae(module):
            decoder = module.decoder
            # Everything but the decoder: tiny pieces the decode path calls directly stay resident;
            # the encoder and quant_conv are never run by the teacher and stay on the CPU.
            for name, child in module.named_children():
                if name != "decoder":
                    move_module(child, "cpu" if name in _VAE_UNUSED else self.exec_device)
            for b in module.buffers(recurse=False):
                b.data = b.data.to(self.exec_device)
            move_module(decoder, "cpu", pin=cuda and pinning_available())
            apply_group_offloading(decoder, **options, block_modules=list(_DECODER_BLOCK_PARENTS),
                                   exclude_kwargs=list(getattr(module, "_skip_keys", None) or ()) or None)
            self.streamed = decoder
        else:
            if hasattr(module, "forward_features"):
                # torch.hub DINOv2 is run through forward_features, which bypasses the top-level hook
                # that brings its embeddings and final norm in; crepa-mem's loader gives transformers'.
                raise CrepaConfigError("crepa_mem_encoder_tier", "stream", valid="gpu · swap · device for a "
                                       "torch.hub DINOv2", hint="stream needs a transformers Dinov2Model, "
                                       "as crepa_mem.encoders.load_encoder returns")
            move_module(module, "cpu", pin=cuda and pinning_available())
            names = {n for n, _ in module.named_children()}
            blocks = [n for n in _ENCODER_BLOCK_PARENTS if n in names] or None
            apply_group_offloading(module, **options, block_modules=blocks)
            self.streamed = module
        self.prefetch = cuda

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        yield self.module  # the hooks move each block in and out as it runs

    def groups(self) -> list[int]:
        """Bytes of each streamed group (for facts and for the trace's prefetch slot)."""
        return stream_group_bytes(self.streamed)

    def facts(self) -> dict:
        return {**super().facts(), "engine": "diffusers.group_offloading", "prefetch": self.prefetch}


def stream_group_bytes(module: nn.Module) -> list[int]:
    """Weight bytes of every group diffusers made on `module` (one entry per hook's group)."""
    out, seen = [], set()
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is None or id(hook.group) in seen:
            continue
        seen.add(id(hook.group))
        tensors = {id(t): t for m in hook.group.modules for t in (*m.parameters(), *m.buffers())}
        tensors.update({id(t): t for t in (*hook.group.parameters, *hook.group.buffers)})
        out.append(sum(t.numel() * t.element_size() for t in tensors.values()))
    return out
