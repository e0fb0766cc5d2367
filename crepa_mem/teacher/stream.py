"""The `stream` tier: weights stay on the CPU and go to the device one block at a time, prefetched.

The encoder (`BlockStream`, below): [embeddings, *encoder.layer, layernorm] as blocks, moved by torch
forward hooks, the next block prefetched on a CUDA side stream (`record_stream` on use). The teacher
runs it layer-major (`encode_layer_major`): every chunk of frames passes a layer before the next layer
is loaded, so its weights cross PCIe once per step whatever the chunk size (frame-major with chunk 1,
ViT-g fp32 moved 4.55 GB × 21 = 95.5 GB per step, ≈3.8 s at 25 GB/s against ≈1 s of its compute).
A plain `encoder(pixel_values=...)` call still works (each block in and out once per call). RamTorch's
`OffloadModel` is the encoder's second engine (ramtorch_engine.py), frame-major.

The VAE decoder: diffusers group offloading (`apply_group_offloading`, block level, one block per
group, a CUDA side stream with `record_stream` when CUDA exists). RamTorch's `OffloadModel` was measured
against it and not taken:
- Measured on the CPU (benchmarks/stream_engines.py, ViT-S/14, 8 frames at 224 px, 2 cores): both
  give outputs identical to the resident model and both run within noise of it (group offloading
  +0-1 %, RamTorch -4..+4 % across runs; RamTorch's copies degrade to clones there). Speed on the
  CPU does not decide it.
- On CUDA both keep ~two blocks on the device (the running one and the prefetched one) and both copy
  from pinned memory on a side stream, so neither wins on memory or overlap.
- `crepa-mem trace` measures through a TorchDispatchMode, which is thread-local: RamTorch's loader
  thread and its CUDA-only copy path would be invisible to it. Both engines here run on the calling
  thread, so the stream tier's footprint is measured, not assumed.
A torch.hub DINOv2 (run through `forward_features`, which bypasses the top-level hook that brings in
its embeddings) is refused for `stream`; crepa-mem's loader returns transformers' Dinov2Model.

The VAE: only the decoder is streamed (the teacher never encodes), down to each up block's resnets,
and Wan's causal cache waits on the host between decoder calls (wan_decode.HostCache);
its small top-level pieces (post_quant_conv, latent statistics) stay resident and the unused encoder
stays on the CPU. Against `swap` this saves the decoder's weights minus its two largest groups (bf16:
≈0.9 GB for Wan 2.2, ≈0.8 GB for LTX 0.9.5, ≈0.2 GB for HunyuanVideo, ≈0.1 GB for Wan 2.1; see
`stream_group_bytes`) but moves the decoder's weights once per decoder call: once per step for LTX
and HunyuanVideo, once per latent frame (and per tile when tiled) for Wan, which the side stream
hides only where decode compute per call outlasts the copy. `crepa-mem trace` measures the memory
and the traffic (`h2d_bytes`: Wan 2.1 tiled at 81 × 480 × 832, 315 calls × 147 MB ≈ 46 GB per step).
The decoder is not run block-major the way the encoder is: Wan's causal cache makes latent frame i's
pass through a block depend on frame i−1's at that block, so block-major order would hold every latent
frame's input to a block at once, the whole clip's activations at that block's resolution (≈0.3 GB
per latent frame at the last up block at 480 × 832 in bf16, ≈6 GB for 21): the memory the decode
phase exists to avoid. Its weights are small (Wan 2.1's decoder 147 MB in bf16), so where the traffic
cannot hide behind the decode, `swap` keeps the decoder resident for its own phase only and moves it
once per step; the planner weighs the two with `estimate.h2d_bytes` in its time model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from crepa_mem.errors import CrepaConfigError
from crepa_mem.teacher.placement import Placement, module_bytes, move_module, pinning_available, tensors_of

# Children of a DINOv2 / VAE decoder whose own children are the blocks to stream one at a time.
_DECODER_BLOCK_PARENTS = ("mid_block", "up_blocks", *map(str, range(8)))  # down to each up block's resnets
_VAE_UNUSED = ("encoder", "quant_conv")        # the teacher only decodes


def _is_vae(module: nn.Module) -> bool:
    return hasattr(module, "decoder") and hasattr(module, "decode")


class StreamPlacement(Placement):
    """Block-by-block weight streaming through diffusers group offloading hooks (installed once)."""

    def __init__(self, module: nn.Module, *, exec_device: torch.device | str):
        super().__init__(module, tier="stream", exec_device=exec_device)
        self.layers: BlockStream | None = None  # the encoder's own engine (layer-major); the VAE uses diffusers
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
            self.layers = BlockStream(encoder_blocks(module), self.exec_device, cuda=cuda)
            self.streamed = module
        self.prefetch = cuda

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        yield self.module  # the hooks move each block in and out as it runs

    def close(self) -> None:
        """Take the streaming hooks off (the weights stay where they are: on the host between forwards)."""
        if self.layers is not None:
            self.layers.remove()
            self.layers = None
            return
        from diffusers.hooks import HookRegistry

        for sub in self.streamed.modules():  # diffusers group offloading: its hooks hold the onload logic
            registry = getattr(sub, "_diffusers_hook", None)
            if isinstance(registry, HookRegistry):
                for name in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
                    registry.remove_hook(name, recurse=False)

    def groups(self) -> list[int]:
        """Bytes of each streamed group (for facts and for the trace's prefetch slot)."""
        if self.layers is not None:
            return [module_bytes(b) for b in self.layers.blocks]
        return stream_group_bytes(self.streamed)

    def facts(self) -> dict:
        engine = "crepa_mem.layer_major" if self.layers is not None else "diffusers.group_offloading"
        return {**super().facts(), "engine": engine, "prefetch": self.prefetch}

    def encode_layer_major(self, chunks: list[Callable[[], Tensor]]) -> list[Tensor]:
        """Every chunk of images through the embeddings, then every chunk through layer 1, then layer 2, …,
        then the final norm: each block's weights cross host → device once per call, whatever the chunk
        size. Same modules and the same chunks as the frame-major order, so the same outputs; what it
        costs is one layer's hidden states for all chunks at once (ViT-g fp32, 21 frames at 518: ≈177 MB).
        `chunks` make each chunk's pixel values when called (made one at a time, dropped once embedded)."""
        from crepa_mem.teacher.path import encoder_attention_mask

        blocks, run = self.layers.blocks, self.layers.held
        with run(blocks[0]) as embeddings:
            states = [embeddings(make()) for make in chunks]
        mask = encoder_attention_mask(self.module, states[0])
        for layer in blocks[1:-1]:
            with run(layer):
                for i, h in enumerate(states):
                    out = layer(h, mask)
                    states[i] = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        with run(blocks[-1]) as norm:
            return [norm(h) for h in states]


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """[embeddings, *encoder.layer, layernorm] of a transformers Dinov2(WithRegisters)Model."""
    blocks = [encoder.embeddings, *encoder.encoder.layer, encoder.layernorm]
    if sum(module_bytes(b) for b in blocks) != module_bytes(encoder):
        raise CrepaConfigError("crepa_mem_encoder_tier", "stream", valid="gpu · swap · device for this encoder",
                               hint=f"{type(encoder).__name__} has weights outside embeddings, layers and norm")
    return blocks


class BlockStream:
    """Blocks whose weights live on the host and come to the device for their forward (torch forward
    hooks), the next block prefetched on a CUDA side stream; `held(block)` keeps one there across calls.

    Why not diffusers group offloading here: its hooks move a block in and out on every call, so a
    layer-major pass (every chunk through one layer before the next) would still copy the weights once
    per chunk; and a CPU-only torch has no streams, so without CUDA the copies are plain and blocking."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, *, cuda: bool):
        self.blocks, self.device = blocks, device
        self.side = torch.cuda.Stream(device) if cuda else None
        self._host: dict[int, list[Tensor]] = {}      # id(block) → its host tensors while on the device
        self._ready: dict[int, object] = {}           # id(block) → CUDA event of its prefetch
        self._held: set[int] = set()
        self._next = {id(a): b for a, b in zip(blocks, blocks[1:])}
        self._handles = []
        for b in blocks:
            self._handles.append(b.register_forward_pre_hook(lambda m, _args: self._arrive(m)))
            self._handles.append(b.register_forward_hook(lambda m, _args, _out: self._leave(m)))

    def remove(self) -> None:
        """Take the hooks off; a block still on the device (an interrupted forward) gets its host weights back."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._held.clear()
        for block in self.blocks:
            self._leave(block)
        self._ready.clear()

    def _copy_in(self, block: nn.Module) -> None:
        if id(block) in self._host:
            return
        tensors = tensors_of(block)
        self._host[id(block)] = [t.data for t in tensors]
        if self.side is None:
            for t in tensors:
                t.data = t.data.to(self.device)
            return
        with torch.cuda.stream(self.side):
            for t in tensors:
                t.data = t.data.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.side)
        self._ready[id(block)] = event

    def _arrive(self, block: nn.Module) -> None:
        self._copy_in(block)
        event = self._ready.pop(id(block), None)
        if event is not None:  # made on the side stream, used on this one
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors_of(block):
                t.data.record_stream(current)
        following = self._next.get(id(block))
        if following is not None and self.side is not None:
            self._copy_in(following)  # prefetch while this block computes

    def _leave(self, block: nn.Module) -> None:
        if id(block) in self._held:
            return
        host = self._host.pop(id(block), None)
        if host is not None:  # frozen weights: the device copy is dropped, the host one put back
            for t, h in zip(tensors_of(block), host):
                t.data = h

    @contextmanager
    def held(self, block: nn.Module) -> Iterator[nn.Module]:
        self._arrive(block)
        self._held.add(id(block))
        try:
            yield block
        finally:
            self._held.discard(id(block))
            self._leave(block)


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
