"""The DiT's own training step, traced: the real diffusers transformer, full size, on fake tensors.

`trace_dit(model, …)` builds the family's diffusers class (WanTransformer3DModel, LTXVideoTransformer3DModel,
SanaVideoTransformer3DModel, Kandinsky5Transformer3DModel) from the checkpoint's config
(profiles `[model.x.dit]`) on the meta device, attaches a peft LoRA on SimpleTuner's default targets
(or trains every parameter), gives it fake storage, and runs forward → loss → backward → AdamW step
under the byte counter of crepa_mem.trace.runtime. The peak is the training step's device peak
without CREPA: weights, LoRA, inputs (latents, text embeddings), activations kept for backward (with or
without diffusers' gradient checkpointing), gradients and the optimizer state.

Why the fake device is the CPU here: a CPU-only torch cannot run autograd's backward over fake
*cuda* tensors (the engine asks the CUDA runtime for a device and stream), so this trace puts every
tensor on the fake CPU and counts that device; nothing else lives there. On a CPU the fused
attention is `_scaled_dot_product_flash_attention_for_cpu`, which keeps out + logsumexp like the
GPU's flash / memory-efficient kernels (no L×L score matrix), so attention's bytes match a GPU's.
Not modelled, as in the teacher trace: the CUDA context, cuBLAS workspaces, allocator fragmentation.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from crepa_mem.profiles import ModelProfile, get_model
from crepa_mem.trace.runtime import LiveBytes, _cuda_binding_shims

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# SimpleTuner 4.10's DEFAULT_LORA_TARGET per family (simpletuner/helpers/models/<family>/model.py).
LORA_TARGETS = {"wan": ["to_k", "to_q", "to_v", "to_out.0"], "ltxvideo": ["to_k", "to_q", "to_v", "to_out.0"],
                "sanavideo": ["to_k", "to_q", "to_v", "to_out.0"],
                "kandinsky5_video": ["to_key", "to_query", "to_value"]}
LAYER_KEY = {"kandinsky5_video": "num_visual_blocks"}  # constructor argument holding the block count


@dataclass
class DitTrace:
    peak_bytes: int
    """Device peak of the whole step (forward, backward, optimizer step)."""
    weights_bytes: int
    """Parameters (frozen base + trainable) and buffers, before the inputs arrive."""
    trainable_params: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    step_peak_bytes: int
    settings: dict[str, Any]
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dit_class(model: ModelProfile):
    import diffusers

    return getattr(diffusers, model.diffusers_class)


def dit_config(model: ModelProfile, num_layers: int | None = None) -> dict[str, Any]:
    """The checkpoint's constructor arguments, optionally with fewer blocks (for quick traces)."""
    if not model.dit.get("config"):
        raise ValueError(f"{model.name} has no [model.{model.name}.dit] config in its profile")
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in model.dit["config"].items()}
    if num_layers is not None:
        cfg[LAYER_KEY.get(model.family, "num_layers")] = num_layers
    return cfg


def build_on_meta(model: ModelProfile, *, lora_rank: int | None, num_layers: int | None = None) -> torch.nn.Module:
    """The full-size class on meta, with a peft LoRA of `lora_rank` (None: no adapter, full fine-tune)."""
    with torch.device("meta"):
        dit = dit_class(model)(**dit_config(model, num_layers))
    if lora_rank:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                           target_modules=LORA_TARGETS[model.family]), dit)
    return dit


def _materialize(dit: torch.nn.Module, dtype: torch.dtype, lora_dtype: torch.dtype, full: bool) -> int:
    """Fake CPU storage for every parameter and buffer; returns the trainable parameter count."""
    trainable = 0
    for mod_name, sub in dit.named_modules():
        is_lora = _is_lora_module(mod_name)
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            train = full or is_lora
            want = (lora_dtype if is_lora else dtype) if p.is_floating_point() else p.dtype
            sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=want), requires_grad=train)
            trainable += p.numel() if train else 0
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
        for name, t in list(vars(sub).items()):  # plain tensor attributes (Kandinsky 5's time freqs)
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                setattr(sub, name, torch.empty(t.shape, dtype=t.dtype))
    return trainable


def _is_lora_module(name: str) -> bool:
    """peft keeps an adapter's matrices in `<layer>.lora_A.<adapter>` / `<layer>.lora_B.<adapter>`."""
    return ".lora_A." in name or ".lora_B." in name


def dit_inputs(model: ModelProfile, *, frames: int, height: int, width: int, batch: int,
               dtype: torch.dtype) -> dict[str, Any]:
    """Forward keyword arguments as each family's trainer passes them (fake tensors; call under the mode)."""
    cfg, vae = model.dit["config"], model.vae
    B, T = batch, model.latent_frames(frames)
    h, w = height // vae.spatial_compression, width // vae.spatial_compression
    L = int(model.dit.get("text_tokens", 512))
    e = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt)  # noqa: E731
    if model.family == "wan":
        return dict(hidden_states=e(B, cfg["in_channels"], T, h, w), timestep=torch.full((B,), 500, dtype=torch.long),
                    encoder_hidden_states=e(B, L, cfg["text_dim"]), return_dict=False)
    if model.family == "sanavideo":
        return dict(hidden_states=e(B, cfg.get("in_channels", 16), T, h, w), timestep=torch.full((B,), 500, dtype=torch.long),
                    encoder_hidden_states=e(B, L, cfg["caption_channels"]), encoder_attention_mask=torch.ones(B, L),
                    return_dict=False)
    if model.family == "ltxvideo":
        return dict(hidden_states=e(B, T * h * w, cfg["in_channels"]), encoder_hidden_states=e(B, L, cfg["caption_channels"]),
                    timestep=torch.full((B,), 500, dtype=torch.long), encoder_attention_mask=torch.ones(B, L),
                    num_frames=T, height=h, width=w, return_dict=False)
    if model.family == "kandinsky5_video":
        pt, ph, pw = model.patch_size
        ch = 2 * cfg["in_visual_dim"] + 1 if cfg.get("visual_cond") else cfg["in_visual_dim"]
        return dict(hidden_states=e(B, T, h, w, ch), encoder_hidden_states=e(B, L, cfg["in_text_dim"]),
                    timestep=torch.full((B,), 500.0, dtype=dtype), pooled_projections=e(B, cfg["in_text_dim2"]),
                    visual_rope_pos=[torch.arange(T // pt), torch.arange(h // ph), torch.arange(w // pw)],
                    text_rope_pos=torch.arange(L), return_dict=False)
    raise ValueError(f"no DiT trace for family {model.family!r}")


def trace_dit(model: str | ModelProfile, *, frames: int | None = None, height: int | None = None,
              width: int | None = None, batch: int = 1, dtype: str = "bf16", lora_rank: int | None = 16,
              lora_dtype: str = "fp32", gradient_checkpointing: bool = True, optimizer: bool = True,
              num_layers: int | None = None, profiles_dir=None) -> DitTrace:
    """One training step of the DiT on fake tensors; `lora_rank=None` trains every parameter."""
    m = model if isinstance(model, ModelProfile) else get_model(model, profiles_dir)
    frames = m.default_frames if frames is None else frames
    height = m.default_height if height is None else height
    width = m.default_width if width is None else width
    m.check_shape(frames, height, width)
    settings = dict(model=m.name, frames=frames, height=height, width=width, batch=batch, dtype=dtype,
                    lora_rank=lora_rank, lora_dtype=lora_dtype, gradient_checkpointing=gradient_checkpointing,
                    optimizer="adamw" if optimizer else None, num_layers=num_layers)
    start = time.perf_counter()
    dit = build_on_meta(m, lora_rank=lora_rank, num_layers=num_layers)
    if gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = LiveBytes()
    with _cuda_binding_shims(), FakeTensorMode(allow_non_fake_inputs=False), tracker, _grad_enabled():
        trainable = _materialize(dit, DTYPES[dtype], DTYPES[lora_dtype], full=not lora_rank)
        weights = tracker.live_bytes("cpu")
        dit.train()
        params = [p for p in dit.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=False) if optimizer else None
        if opt is not None:  # a step before the traced one: Adam's state is alive through it, as in training
            for p in params:
                p.grad = torch.empty_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker.reset_peak()
        with tracker.phase("forward") as fwd:
            out = dit(**dit_inputs(m, frames=frames, height=height, width=width, batch=batch, dtype=DTYPES[dtype]))[0]
            loss = out.float().pow(2).mean()  # the flow-matching MSE's shape: fp32 copy of the prediction
        with tracker.phase("backward") as bwd:
            loss.backward()
            del out, loss
        with tracker.phase("step") as stp:
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        peak = tracker.peak_bytes("cpu")
    return DitTrace(peak_bytes=peak, weights_bytes=weights, trainable_params=trainable,
                    forward_peak_bytes=fwd.get("cpu", 0), backward_peak_bytes=bwd.get("cpu", 0),
                    step_peak_bytes=stp.get("cpu", 0), settings=settings, wall_s=time.perf_counter() - start)


@contextlib.contextmanager
def _grad_enabled():
    with torch.enable_grad():
        yield


def architecture_numbers(model: ModelProfile) -> dict[str, int]:
    """What crepa_mem.planning.training reads from `[model.x.dit]`, counted on the meta model:
    one block's parameters, the parameters outside the blocks, and Σ(in + out) of the LoRA target
    linears in one block and outside the blocks (LoRA parameters = rank × that)."""
    import torch.nn as nn

    dit = build_on_meta(model, lora_rank=None)
    blocks = getattr(dit, model.blocks_attr)
    block = sum(p.numel() for p in blocks[0].parameters())
    total = sum(p.numel() for p in dit.parameters())

    def lora_in_out(module: nn.Module) -> int:
        targets = LORA_TARGETS[model.family]
        return sum(m.in_features + m.out_features for n, m in module.named_modules()
                   if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets))

    per_block = lora_in_out(blocks[0])
    return dict(block_params=block, other_params=total - len(blocks) * block,
                lora_in_out_per_block=per_block, lora_in_out_other=lora_in_out(dit) - len(blocks) * per_block)
