"""Pure memory model of the DiT's own training step (what training uses on the GPU without CREPA). No torch.

Public entry point (issue 11; issue 12's run-time tiers call it):

    training_bytes(model, *, frames, height, width, batch=1, precision="bf16", lora_rank=16,
                   optimizer="adamw", gradient_checkpointing=True, ramtorch_percent=0.0,
                   blocks_to_swap=0, group_offload=False, text_tokens=None, lora_dtype="fp32",
                   cuda_context=True, profiles_dir=None) -> TrainingEstimate

    model      a ModelProfile or a profile name ("wan-2.1-14b", "wan", …)
    precision  the frozen base weights: bf16 · fp16 · fp32 · fp8 · int8 · int4 · nf4, or SimpleTuner's
               `base_model_precision` spelling (no_change, int8-quanto, fp8-torchao, nf4-bnb, …)
    lora_rank  rank of a LoRA on SimpleTuner's default targets; None or 0 = full fine-tune
    optimizer  adamw (fp32 states) · adamw_bf16 · adamw8bit · prodigy · sgd · adafactor, or a SimpleTuner name
    ramtorch_percent   SimpleTuner `ramtorch` + `ramtorch_transformer_percent` (0-100): that share of the
               blocks' Linear weights lives in pinned host memory and is streamed in per layer
    blocks_to_swap     musubi-tuner `--blocks_to_swap N`: N blocks live on the host, swapped in per use
    group_offload      diffusers `apply_group_offloading(block_level, num_blocks_per_group=1, use_stream=True)`

    TrainingEstimate(total_bytes, source, terms, inputs); `terms` is [TrainingTerm(name, bytes, note)],
    total_bytes their sum, source "model" here ("config" when the inputs came from a config.json).

Terms: cuda_context, weights (base, at its precision, less what offload keeps on the host),
offload_buffers (layers in flight), lora_weights + grads + optimizer_state (or the full model's grads
and states), inputs (latents and text embeddings), activations (what the forward keeps for backward:
every block's with gradient checkpointing off; each block's input plus one block recomputed with it on).

Activations are the only fitted part: bytes = Σ c·feature over the features [N·D, N·F, Lt·D] (N DiT
tokens, D width, F FFN width, Lt text tokens, all × batch), per block and fixed, per family, fitted
by `python benchmarks/dit_calibration.py --fit` on `crepa-mem trace --dit` traces of the real diffusers
classes; `python benchmarks/dit_calibration.py` compares whole checkpoints with the trace (README).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from crepa_mem.errors import CrepaConfigError
from crepa_mem.profiles import ModelProfile, get_model
from crepa_mem.units import GiB, MiB, dtype_bytes

# Bytes per weight at each base precision. Quantized: quanto/torchao int8 and fp8 keep 1 byte plus a
# per-channel scale (< 0.1 %); int4/nf4 keep half a byte plus a bf16 scale (and zero point) per group
# of 64-128 weights (≈ 0.03 byte/weight).
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.53, "nf4": 0.53,
                   "int2": 0.28}
# Optimizer state bytes per trainable parameter (grads are counted separately, in the parameter dtype):
# AdamW keeps exp_avg + exp_avg_sq (fp32: 8; SimpleTuner's adamw_bf16: both in bf16, 4); 8-bit Adam
# (bitsandbytes / torchao) 1 byte each + a blockwise fp32 absmax per 256; Prodigy four fp32 buffers.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_bf16": 4.0, "adamw8bit": 2.03, "prodigy": 16.0, "sgd": 0.0,
                         "adafactor": 0.05, "lion": 4.0}
# The CUDA context and the kernels torch loads (outside the caching allocator, so outside any trace):
# ≈ 300-600 MB with CUDA ≥ 11.7 lazy module loading on Ampere/Hopper (PyTorch forum and issue reports of
# nvidia-smi after `torch.cuda.init()`); the upper end is taken. Not measured on this project's machines.
CUDA_CONTEXT_BYTES = 512 * MiB

# Activation coefficients (bytes per feature [N·D, N·F, Lt·D]) per family: block = one DiT block's
# saved tensors (no_gc) or its checkpointed input (gc); fixed = everything outside the blocks (gc: plus
# the one block recomputed in backward). Fitted: `python benchmarks/dit_calibration.py --fit`.
CALIBRATION: dict[str, dict[str, dict[str, list[float]]]] = {  # [N·D, N·F, Lt·D] coefficients, bytes
    "wan": {"no_gc": {"block": [60.336, 2.0, 16.111], "fixed": [-1.422, 4.0, -5.336]},
             "gc": {"block": [2.0, 0.0, 0.0], "fixed": [62.919, 6.001, 12.785]}},
    "ltxvideo": {"no_gc": {"block": [4.02, 16.079, 16.119], "fixed": [1.167, 4.669, -4.015]},
                  "gc": {"block": [0.118, 0.471, 0.0], "fixed": [5.423, 21.691, 14.123]}},
    "sanavideo": {"no_gc": {"block": [74.253, 16.01, 18.58], "fixed": [-1.659, 4.0, -2.059]},
                   "gc": {"block": [2.0, 0.0, 0.0], "fixed": [72.596, 20.01, 18.536]}},
    "kandinsky5_video": {"no_gc": {"block": [52.468, 2.001, 16.195], "fixed": [-1.693, 3.996, 86.967]},
                          "gc": {"block": [2.0, 0.0, 0.0], "fixed": [54.683, 6.001, 18.482]}},
}
# fp32 compute (fp32 base weights) over bf16, [no_gc, gc]: far below 2× because the bf16 run already keeps
# fp32 copies (peft casts each LoRA input to the fp32 adapter dtype; norms and gates run in fp32).
# 3-block traces at 17×480×832 (same script, --fit).
FP32_FACTOR = {"wan": [1.197, 1.329], "ltxvideo": [1.075, 1.206], "sanavideo": [1.344, 1.4],
               "kandinsky5_video": [1.269, 1.374]}

SOURCES = ("model", "config", "--train-gib", "live GPU")  # where a plan's training figure comes from


@dataclass(frozen=True)
class TrainingTerm:
    name: str
    bytes: int
    note: str = ""


@dataclass
class TrainingEstimate:
    terms: list[TrainingTerm]
    source: str = "model"
    inputs: dict = field(default_factory=dict)
    total_bytes: int = 0

    def __post_init__(self) -> None:
        self.total_bytes = sum(t.bytes for t in self.terms)

    @property
    def components(self) -> dict[str, int]:
        return {t.name: t.bytes for t in self.terms}

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "source": self.source,
                "terms": {t.name: t.bytes for t in self.terms}, "inputs": dict(self.inputs)}


# ---------------------------------------------------------------------------- names → canonical

def canonical_precision(value: str | None) -> str:
    """SimpleTuner's base_model_precision (and plain dtype names) → a PRECISION_BYTES key."""
    v = str(value or "no_change").strip().lower()
    if v in ("no_change", "none", "bf16", "bfloat16", ""):
        return "bf16"
    if v in ("fp16", "float16"):
        return "fp16"
    if v in ("fp32", "float32"):
        return "fp32"
    for key in ("int8", "fp8", "int4", "nf4", "int2"):
        if v.startswith(key):
            return key
    raise CrepaConfigError("base_model_precision", value,
                           valid="no_change · bf16 · fp16 · fp32 · int8-quanto/-torchao · fp8-quanto/-torchao · "
                                 "int4-quanto/-torchao · nf4-bnb · int2-quanto")


def canonical_optimizer(value: str | None) -> str:
    """An optimizer name (SimpleTuner's `optimizer`, musubi's `optimizer_type`) → an OPTIMIZER_STATE_BYTES key."""
    v = str(value or "adamw").strip().lower().replace("-", "_")
    if "8bit" in v or "8_bit" in v:
        return "adamw8bit"
    for key, hits in (("prodigy", ("prodigy",)), ("adafactor", ("adafactor",)), ("lion", ("lion",)),
                      ("sgd", ("sgd",)), ("adamw_bf16", ("adamw_bf16", "adam_bfloat16", "adamw_bfloat16"))):
        if any(h in v for h in hits):
            return key
    if "adam" in v:
        return "adamw"
    raise CrepaConfigError("optimizer", value, valid=" · ".join(OPTIMIZER_STATE_BYTES) + " (or a SimpleTuner name)")


# ---------------------------------------------------------------------------- pieces (all pure)

def ffn_width(model: ModelProfile) -> int:
    """The FFN's hidden width F of one block (diffusers: Wan ffn_dim, K5 ff_dim, Sana mlp_ratio·D, LTX 4·D)."""
    cfg, d = model.dit.get("config", {}), model.hidden_size
    if model.family == "wan":
        return int(cfg.get("ffn_dim", 4 * d))
    if model.family == "kandinsky5_video":
        return int(cfg.get("ff_dim", 4 * d))
    if model.family == "sanavideo":
        return int(float(cfg.get("mlp_ratio", 2.5)) * d)
    return 4 * d


def text_tokens(model: ModelProfile, override: int | None = None) -> int:
    return int(override if override is not None else model.dit.get("text_tokens", 512))


def activation_features(model: ModelProfile, *, frames: int, height: int, width: int, batch: int = 1,
                        text_len: int | None = None) -> list[float]:
    """[N·D, N·F, Lt·D]: the quantities activation bytes are linear in."""
    n = batch * model.latent_frames(frames) * model.tokens_per_frame(height, width)
    lt = batch * text_tokens(model, text_len)
    d = model.hidden_size
    return [float(n * d), float(n * ffn_width(model)), float(lt * d)]


def activation_bytes(model: ModelProfile, *, frames: int, height: int, width: int, batch: int = 1,
                     gradient_checkpointing: bool = True, compute_dtype: str = "bf16",
                     text_len: int | None = None) -> int:
    """Bytes the forward keeps for backward at its peak (bf16 compute; fp32 compute: FP32_FACTOR)."""
    coef = CALIBRATION.get(model.family)
    if coef is None:
        raise CrepaConfigError("model family", model.family, valid=" · ".join(CALIBRATION))
    c = coef["gc" if gradient_checkpointing else "no_gc"]
    f = activation_features(model, frames=frames, height=height, width=width, batch=batch, text_len=text_len)
    per_block = sum(a * x for a, x in zip(c["block"], f))
    fixed = sum(a * x for a, x in zip(c["fixed"], f))
    factor = FP32_FACTOR[model.family][int(gradient_checkpointing)] if compute_dtype == "fp32" else 1.0
    return int((model.num_blocks * per_block + fixed) * factor)


def block_backward_bytes(model: ModelProfile, *, frames: int, height: int, width: int, batch: int = 1,
                         text_len: int | None = None) -> int:
    """The backward's working set beyond what the forward left allocated: one block's saved tensors, as the
    block recomputed under gradient checkpointing holds them (without checkpointing, the gradient buffers
    of the block being differentiated are of the same size). Bf16 compute."""
    coef = CALIBRATION.get(model.family)
    if coef is None:
        raise CrepaConfigError("model family", model.family, valid=" · ".join(CALIBRATION))
    f = activation_features(model, frames=frames, height=height, width=width, batch=batch, text_len=text_len)
    return int(sum(a * x for a, x in zip(coef["no_gc"]["block"], f)))


def input_bytes(model: ModelProfile, *, frames: int, height: int, width: int, batch: int = 1,
                compute_dtype: str = "bf16", text_len: int | None = None) -> tuple[int, int, int]:
    """(latent inputs: noisy latents + target, cached text embeddings, text width) for one batch."""
    cfg, vae = model.dit.get("config", {}), model.vae
    lat = batch * vae.latent_channels * model.latent_frames(frames) * (height // vae.spatial_compression) * \
        (width // vae.spatial_compression)
    text_dim = int(cfg.get("text_dim") or cfg.get("caption_channels") or cfg.get("in_text_dim") or 4096)
    b = dtype_bytes(compute_dtype)
    return 2 * lat * b, batch * text_tokens(model, text_len) * text_dim * b, text_dim


def base_params(model: ModelProfile) -> tuple[int, int]:
    """(parameters in the blocks, parameters outside them): exact counts from the profile's dit table."""
    dit = model.dit
    if "block_params" in dit:
        return model.num_blocks * int(dit["block_params"]), int(dit.get("other_params", 0))
    return int(model.params * 0.97), model.params - int(model.params * 0.97)  # a user profile without them


def lora_params(model: ModelProfile, rank: int) -> int:
    """rank × Σ(in + out) over the target linears (SimpleTuner's default targets)."""
    dit = model.dit
    per_block = int(dit.get("lora_in_out_per_block", 16 * model.hidden_size))
    return rank * (model.num_blocks * per_block + int(dit.get("lora_in_out_other", 0)))


# ---------------------------------------------------------------------------- the model

def training_bytes(model: ModelProfile | str, *, frames: int | None = None, height: int | None = None,
                   width: int | None = None, batch: int = 1, precision: str = "bf16", lora_rank: int | None = 16,
                   optimizer: str = "adamw", gradient_checkpointing: bool = True, ramtorch_percent: float = 0.0,
                   blocks_to_swap: int = 0, group_offload: bool = False, text_len: int | None = None,
                   lora_dtype: str = "fp32", cuda_context: bool = True, source: str = "model",
                   profiles_dir=None) -> TrainingEstimate:
    """Bytes the DiT's training step holds on its GPU at its peak, without CREPA (module docstring)."""
    m = model if isinstance(model, ModelProfile) else get_model(model, profiles_dir)
    frames = m.default_frames if frames is None else int(frames)
    height = m.default_height if height is None else int(height)
    width = m.default_width if width is None else int(width)
    m.check_shape(frames, height, width)
    prec, opt = canonical_precision(precision), canonical_optimizer(optimizer)
    if batch < 1:
        raise CrepaConfigError("train_batch_size", batch, valid="an integer ≥ 1")
    if not 0 <= ramtorch_percent <= 100:
        raise CrepaConfigError("ramtorch_transformer_percent", ramtorch_percent, valid="0-100")
    if not 0 <= blocks_to_swap < m.num_blocks:
        raise CrepaConfigError("blocks_to_swap", blocks_to_swap, valid=f"0-{m.num_blocks - 1} for {m.name}")
    full = not lora_rank
    if full and prec not in ("bf16", "fp16", "fp32"):
        raise CrepaConfigError("base_model_precision", precision, valid="bf16/fp16/fp32 for a full fine-tune "
                               "(quantized weights cannot be trained; use LoRA)")
    compute = "fp32" if prec == "fp32" else "bf16"
    wb = PRECISION_BYTES[prec]
    block_p, other_p = base_params(m)
    per_block_p = block_p // m.num_blocks
    terms: list[TrainingTerm] = []

    def add(name: str, nbytes: float, note: str = "") -> None:
        if nbytes > 0:
            terms.append(TrainingTerm(name, int(nbytes), note))

    if cuda_context:
        add("cuda_context", CUDA_CONTEXT_BYTES, "CUDA context + kernels, outside the allocator")

    # -- weights: what offload leaves on the device, plus the layers it has in flight
    on_device_blocks, buffers, how = float(block_p), 0.0, ""
    if ramtorch_percent > 0:  # SimpleTuner RamTorch: that share of the blocks' Linear layers on the host
        on_device_blocks = block_p * (1 - ramtorch_percent / 100)
        buffers = 2 * _largest_linear(m) * wb  # ramtorch bounces one layer while the next is prefetched
        how = f"ramtorch {ramtorch_percent:g}% of block Linear weights in pinned host memory"
    elif blocks_to_swap:
        on_device_blocks = per_block_p * (m.num_blocks - blocks_to_swap)
        buffers = per_block_p * wb  # musubi swaps one block in while another runs
        how = f"blocks_to_swap {blocks_to_swap}: {blocks_to_swap} of {m.num_blocks} blocks on the host"
    elif group_offload:
        on_device_blocks = 0
        buffers = 2 * per_block_p * wb  # the running group and the one its side stream prefetches
        how = "diffusers group offloading (block_level, 1 block per group, use_stream): 2 blocks on the device"
    add("weights", (on_device_blocks + other_p) * (wb if not full else dtype_bytes(compute)),
        f"{prec} base weights" + (f"; {how}" if how else ""))
    add("offload_buffers", buffers, how)

    # -- what trains: parameters, gradients, optimizer state
    state_b = OPTIMIZER_STATE_BYTES[opt]
    if full:
        trainable = block_p + other_p
        add("grads", trainable * dtype_bytes(compute), f"{trainable:,} parameters, {compute}")
        add("optimizer_state", trainable * state_b, f"{opt}: {state_b:g} bytes/parameter")
    else:
        lp = lora_params(m, int(lora_rank))
        lb = dtype_bytes(lora_dtype)
        add("lora_weights", lp * lb, f"rank {lora_rank}: {lp:,} parameters, {lora_dtype}")
        add("lora_grads", lp * lb)
        add("optimizer_state", lp * state_b, f"{opt}: {state_b:g} bytes/parameter")

    # -- inputs: the latents and the cached text embeddings of the batch (SimpleTuner caches both;
    # its text encoder is off the GPU while training)
    lat_b, text_b, text_dim = input_bytes(m, frames=frames, height=height, width=width, batch=batch,
                                          compute_dtype=compute, text_len=text_len)
    add("inputs", lat_b, "noisy latents + target")
    add("text_embeddings", text_b, f"{text_tokens(m, text_len)} tokens × {text_dim}")

    add("activations", activation_bytes(m, frames=frames, height=height, width=width, batch=batch,
                                        gradient_checkpointing=gradient_checkpointing, compute_dtype=compute,
                                        text_len=text_len),
        "gradient checkpointing: block inputs + one block recomputed" if gradient_checkpointing
        else "every block's saved tensors")
    inputs = dict(model=m.name, frames=frames, height=height, width=width, batch=batch, precision=prec,
                  lora_rank=lora_rank or None, optimizer=opt, gradient_checkpointing=gradient_checkpointing,
                  ramtorch_percent=ramtorch_percent, blocks_to_swap=blocks_to_swap, group_offload=group_offload)
    return TrainingEstimate(terms, source=source, inputs=inputs)


def training_use(model: ModelProfile, gpu, *, frames: int, height: int, width: int, batch: int = 1,
                 train_gib: float | None = None, training: dict | None = None) -> TrainingEstimate:
    """What a plan takes training to use: --train-gib if given, else the model (`training` holds
    training_bytes' keywords, plus "source": "config" when they came from a config.json); on a live GPU
    (NVML) the larger of the model and what is in use now, so planning before training starts still
    counts the DiT."""
    if train_gib is not None:
        return TrainingEstimate([TrainingTerm("train_gib", int(train_gib * GiB), "given with --train-gib")],
                                source="--train-gib")
    kw = dict(training or {})
    source = kw.pop("source", "model")
    predicted = training_bytes(model, frames=frames, height=height, width=width, batch=batch, source=source, **kw)
    if getattr(gpu, "source", None) != "nvml":
        return predicted
    in_use = int(gpu.used_bytes or 0)
    predicted.inputs["in_use_bytes"] = in_use
    if in_use <= predicted.total_bytes:
        return predicted
    return TrainingEstimate([TrainingTerm("in_use", in_use, "in use on the GPU now (NVML)")], source="live GPU",
                            inputs={**predicted.inputs, "predicted_bytes": predicted.total_bytes,
                                    "predicted_source": source})


def _largest_linear(m: ModelProfile) -> int:
    return m.hidden_size * ffn_width(m)
