"""`auto` tiers and the OOM ladder: the policy crepa_mem.teacher.ladder.TeacherRunner calls.

At the first teacher step (between the DiT's forward and its backward) the runner measures the compute
device; `AutoTiers.choose` turns that into a budget —

    free for the teacher = free (driver free + allocator reserved-unallocated) + the teacher's own modules
                           already on the device − backward_reserve_bytes(one DiT block's saved tensors from the
                           training model, or 10 % of allocated; trainable params' grads and Adam states)
    budget               = free for the teacher − AUTO_HEADROOM × total

— and takes the first rung of the planner's ladder that fits (crepa_mem.planning.ladder: exactly what
`plan()` chooses for that budget). The decision is logged once (logger "crepa_mem", one line with the
figures) and carried in every step's logs (`crepa_teacher_auto`, `crepa_teacher_rung`). Each process
decides for its own compute device, so under DDP every rank fits its own GPU. After an OOM
`step_down` gives the best rung estimated to need less than the one that failed.

The planner needs profiles; they are made from the modules the run really has: the VAE's class and
latent channels pick its profile (parameter counts taken from the module), the encoder's width and
depth check its catalog entry (or describe it), and the DiT's width and token grid come from the step.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

from torch import nn

from crepa_mem.config import AUTO_TIER, CrepaConfig
from crepa_mem.planning import ladder as L
from crepa_mem.planning import training as tr
from crepa_mem.planning.devices import DeviceInfo
from crepa_mem.profiles import EncoderProfile, ModelProfile, VaeProfile, get_encoder, list_models
from crepa_mem.teacher.ladder import TeacherContext, rung_label
from crepa_mem.teacher.path import encoder_dim, encoder_patch_size, vae_compression, vae_latent_channels
from crepa_mem.units import format_bytes

Trainable = Callable[[], tuple[int, int]]  # → (trainable parameters, their bytes)


def trainable_of(model: nn.Module) -> Trainable:
    """What the optimizer will hold gradients (and states) for, counted when the decision is made
    (PEFT and freezing happen after wrap)."""
    def count() -> tuple[int, int]:
        params = [p for p in model.parameters() if p.requires_grad]
        return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
    return count


# ------------------------------------------------------------------ profiles of the modules at hand
def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def vae_profile(vae: nn.Module) -> VaeProfile:
    """The catalog profile of this VAE class (LTX: 0.9.5 when timestep-conditioned), with this module's
    parameter counts; an unknown class gets a profile of its own (default calibration)."""
    cls, channels = type(vae).__name__, vae_latent_channels(vae)
    tc, sc = vae_compression(vae)
    known = {m.vae.name: m.vae for m in list_models()}
    matches = [v for v in known.values() if v.diffusers_class == cls and v.latent_channels == channels]
    if cls == "AutoencoderKLLTXVideo" and len(matches) > 1:
        want = "0.9.5" if getattr(vae.config, "timestep_conditioning", False) else "0.9.0"
        matches = [v for v in matches if want in v.name] or matches
    enc, total = _count(getattr(vae, "encoder", None)) + _count(getattr(vae, "quant_conv", None)), _count(vae)
    if matches:
        return dataclasses.replace(matches[0], params_encoder=enc, params_decoder=total - enc)
    return VaeProfile(name=cls, diffusers_class=cls, latent_channels=channels, temporal_compression=tc,
                      spatial_compression=sc, params_encoder=enc, params_decoder=total - enc,
                      decode_frames=tc if cls == "AutoencoderKLWan" else 0)


def encoder_profile(name: str, encoder: nn.Module) -> EncoderProfile:
    """The catalog entry when it describes this module (same width and depth), else one read from it."""
    cfg = getattr(encoder, "config", None)
    width, layers = encoder_dim(encoder), int(getattr(cfg, "num_hidden_layers", 0) or 0)
    try:
        known = get_encoder(name)
        if known.hidden_size == width and (not layers or known.num_layers == layers):
            return known
    except Exception:  # noqa: BLE001 - a hub id or a local folder: described from the module below
        pass
    swiglu = bool(getattr(cfg, "use_swiglu_ffn", False))
    inner = int(width * float(getattr(cfg, "mlp_ratio", 4)))
    inner = (int(inner * 2 / 3) + 7) // 8 * 8 if swiglu else inner
    return EncoderProfile(name=name, hub_id=name, hidden_size=width, num_layers=layers or 1,
                          num_heads=int(getattr(cfg, "num_attention_heads", 1) or 1), intermediate_size=inner,
                          mlp="swiglu" if swiglu else "mlp", params=_count(encoder),
                          patch_size=encoder_patch_size(encoder),
                          num_register_tokens=int(getattr(cfg, "num_register_tokens", 0) or 0))


def workload(ctx: TeacherContext, cfg: CrepaConfig) -> tuple[ModelProfile, dict[str, int]]:
    """A model profile for this run and the clip's (frames, height, width, batch) from the step's shapes."""
    if ctx.vae is None:
        raise ValueError("the auto tiers need the VAE to size the teacher step")
    vp = vae_profile(ctx.vae)
    b, _, t, h, w = ctx.latents_shape
    patch = 2
    if ctx.dit_tokens_per_frame:  # (h/p)(w/p) = P
        patch = max(1, round(math.sqrt(h * w / ctx.dit_tokens_per_frame)))
    shape = dict(frames=1 + vp.temporal_compression * (t - 1), height=h * vp.spatial_compression,
                 width=w * vp.spatial_compression, batch=b)
    model = ModelProfile(name=f"this run ({vp.name} VAE)", family="runtime", diffusers_class="", blocks_attr="",
                         num_blocks=0, hidden_size=int(ctx.hidden_size or 0), patch_size=(1, patch, patch), params=0,
                         vae=vp, recommended_block=cfg.block_index or 0, default_frames=shape["frames"],
                         default_height=shape["height"], default_width=shape["width"])
    return model, shape


def catalog_dit(ctx: TeacherContext) -> ModelProfile | None:
    """The catalog DiT this run trains, when its VAE and width identify one (for the training model)."""
    if ctx.vae is None or not ctx.hidden_size:
        return None
    vp = vae_profile(ctx.vae)
    return next((m for m in list_models() if m.vae.diffusers_class == vp.diffusers_class
                 and m.vae.latent_channels == vp.latent_channels and m.hidden_size == ctx.hidden_size
                 and m.family in tr.CALIBRATION), None)


def backward_working_bytes(ctx: TeacherContext, cfg: CrepaConfig) -> int | None:
    """The training model's backward working set for this step's shape; None when the DiT is not known."""
    dit = catalog_dit(ctx)
    if dit is None:
        return None
    _, shape = workload(ctx, cfg)
    return tr.block_backward_bytes(dit, **shape)


def _rank() -> str:
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK")
    return f" rank {rank}" if rank is not None else ""


class AutoTiers:
    """The teacher policy: `auto` at the first step, then the ladder on OOM (see the module docstring)."""

    def __init__(self, *, headroom: float = L.AUTO_HEADROOM, host_ram_bytes: int | None = None,
                 trainable: Trainable | None = None, h2d_bytes_per_s: int | None = None):
        self.headroom, self.host_ram_bytes, self.trainable = headroom, host_ram_bytes, trainable
        self.h2d_bytes_per_s = h2d_bytes_per_s
        self._cache: dict[tuple, tuple] = {}

    def rungs(self, cfg: CrepaConfig, ctx: TeacherContext, gpu: DeviceInfo, *, free_tiers: bool = False
              ) -> tuple[list[L.Rung], ModelProfile, EncoderProfile, dict]:
        """The ladder for this step's shapes. `free_tiers`: both tiers may move (the OOM ladder steps down
        from any configured tier); otherwise a tier that is not `auto` stays as configured."""
        if free_tiers:
            cfg = cfg.replace(encoder_tier=AUTO_TIER, vae_tier=AUTO_TIER)
        key = (ctx.latents_shape, ctx.dit_tokens_per_frame, cfg.encoder, cfg.encoder_image_size, cfg.encoder_dtype,
               cfg.spatial_align, cfg.allow_lossy, cfg.encoder_tier, cfg.vae_tier)
        if key not in self._cache:
            model, shape = workload(ctx, cfg)
            enc = encoder_profile(cfg.encoder, ctx.encoder)
            rungs = L.ladder(model, enc, cfg, gpu=gpu, host_ram_bytes=self.host_ram_bytes, **shape)
            self._cache[key] = (rungs, model, enc, shape)
        return self._cache[key]

    def budget(self, ctx: TeacherContext, cfg: CrepaConfig) -> dict[str, int] | None:
        """The measured figures and the budget they give; None on a device that reports no memory (CPU)."""
        r = ctx.reading
        if r.total_bytes is None or r.free_bytes is None:
            return None
        params, nbytes = self.trainable() if self.trainable is not None else (0, 0)
        reserve = L.backward_reserve_bytes(r.allocated_bytes, trainable_params=params, trainable_bytes=nbytes,
                                           optimizer_states_allocated=ctx.step > 0,
                                           working_bytes=backward_working_bytes(ctx, cfg))
        free = r.free_bytes + r.teacher_resident_bytes - reserve
        return dict(total_bytes=r.total_bytes, free_bytes=r.free_bytes, allocated_bytes=r.allocated_bytes,
                    reserved_bytes=r.reserved_bytes, teacher_resident_bytes=r.teacher_resident_bytes,
                    backward_reserve_bytes=reserve, free_for_teacher_bytes=free,
                    budget_bytes=L.budget_bytes(free, r.total_bytes, self.headroom))

    def _gpu(self, ctx: TeacherContext, figures: dict | None) -> DeviceInfo:
        total = figures["total_bytes"] if figures else 1 << 40
        free = figures["free_for_teacher_bytes"] if figures else total
        return DeviceInfo(index=None, name=str(ctx.device), uuid=None, total_bytes=total, free_bytes=free,
                          reserved_bytes=None, used_bytes=total - free, compute_capability=None, pcie_gen=None,
                          pcie_width=None, h2d_bytes_per_s=self.h2d_bytes_per_s, source="runtime")

    def choose(self, cfg: CrepaConfig, ctx: TeacherContext) -> tuple[CrepaConfig, dict[str, Any]]:
        figures = self.budget(ctx, cfg)
        rungs, model, _, shape = self.rungs(cfg, ctx, self._gpu(ctx, figures))
        if not rungs:
            raise ValueError("no teacher configuration is possible here (host RAM too small for swap/stream?)")
        f = format_bytes
        if figures is None:  # a CPU compute device: every tier is host memory, nothing to fit
            rung, why = rungs[0], f"{ctx.device} reports no device memory: the best rung"
        else:
            rung = L.choose(rungs, figures["budget_bytes"])
            why = (f"total {f(figures['total_bytes'])}, free {f(figures['free_bytes'])} (allocated "
                   f"{f(figures['allocated_bytes'])}, reserved {f(figures['reserved_bytes'])}), teacher already there "
                   f"{f(figures['teacher_resident_bytes'])}, backward reserve {f(figures['backward_reserve_bytes'])}, "
                   f"headroom {self.headroom:.0%} → budget {f(figures['budget_bytes'])}")
            if rung is None:  # nothing is estimated to fit: try the smallest, the ladder takes it from there
                rung = min(rungs, key=lambda r: r.peak_bytes)
                why += " (nothing is estimated to fit: the smallest rung)"
        chosen = L.apply(rung, cfg)
        summary = f"{rung_label(chosen)} (estimate {f(rung.peak_bytes)}{', lossy' if rung.lossy else ''})"
        line = f"crepa-mem auto{_rank()} on {ctx.device} at step {ctx.step}: {why}; chosen {summary}"
        return chosen, {"line": line, "summary": summary, "figures": figures, "settings": rung.settings,
                        "estimate_bytes": rung.peak_bytes, "model": model, "shape": shape}

    def step_down(self, cfg: CrepaConfig, ctx: TeacherContext, tried: list[CrepaConfig]) -> CrepaConfig | None:
        rungs, model, enc, shape = self.rungs(cfg, ctx, self._gpu(ctx, self.budget(ctx, cfg)), free_tiers=True)
        current = L.rung_of(rungs, cfg)
        failed = current.peak_bytes if current else L.estimate_of(model, enc, cfg, **shape).peak_bytes
        done = {r.key for c in tried if (r := L.rung_of(rungs, c)) is not None}
        nxt = L.next_rung(rungs, failed, done)
        return None if nxt is None else L.apply(nxt, cfg)
