"""The teacher step under a memory policy: tiers decided at the first teacher step (`auto`), and a
ladder down on out-of-memory. Legend: B batch, C latent channels, T latent frames, h×w latent grid.

What to choose and which rung comes next is the policy's business (it calls the planner, two floors
up: crepa_mem.integrations.auto injects it). This module only measures, places, runs and retries:

- `TeacherRunner.features` runs the teacher path; at the first call with `auto` tiers it reads the
  compute device's memory (`MemoryReading`: mem_get_info, memory_allocated/reserved) and asks the
  policy for a configuration, then keeps it for the run.
- An OOM inside the step (torch.OutOfMemoryError, or the path's own TeacherOutOfMemoryError after its
  chunk back-off) drops every reference the failed attempt held, puts the teacher's weights back on the
  host, asks the policy for the next rung, re-places the VAE and encoder for it and retries the step.
  The lower rung is kept for the rest of the run. With no rung left it raises, naming each rung tried.
- The chunk the path's own back-off reached is kept too (the next steps start from it).

Peak measurement does not reset CUDA's peak statistics (a trainer's own `max_memory_allocated` stays
intact) unless `crepa_mem_reset_peak_stats` asks: `peak_bytes` is the process peak after the teacher
step minus what was allocated when it began — exact when the teacher step set a new process peak
(`peak_exact`), otherwise an upper bound of the teacher's own peak.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from crepa_mem.config import AUTO_TIER, CrepaConfig
from crepa_mem.errors import CrepaConfigError, TeacherOutOfMemoryError
from crepa_mem.teacher.encoders import DTYPES
from crepa_mem.teacher.path import TeacherFeatures, TeacherPath, _is_oom
from crepa_mem.teacher.placement import Placement, host_copy, module_bytes, module_device, move_module
from crepa_mem.teacher.tiers import place
from crepa_mem.teacher.vae import prepare_vae


# ------------------------------------------------------------------ measuring
@dataclass(frozen=True)
class MemoryReading:
    """The compute device's memory at one moment; None where the device cannot tell (a CPU)."""

    device: str
    total_bytes: int | None
    free_bytes: int | None
    """What this process can still allocate: the driver's free memory plus the allocator's reserved but
    unallocated bytes (the caching allocator hands those out first)."""
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    teacher_resident_bytes: int = 0
    """Bytes of the teacher's own modules found on the device (counted again by every rung's estimate)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cuda_reading(device: torch.device) -> MemoryReading:
    """torch.cuda.mem_get_info + memory_allocated/reserved on a CUDA device; totals None elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return MemoryReading(str(device), None, None)
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    return MemoryReading(str(device), int(total), int(free + reserved - allocated), int(allocated), int(reserved))


Probe = Callable[[torch.device], MemoryReading]


@dataclass
class TeacherContext:
    """What a policy knows when it decides: the batch's shape, the modules, the measured memory."""

    latents_shape: tuple[int, ...]                 # (B, C, T, h, w)
    target_frames: int
    dit_tokens_per_frame: int | None
    encoder: nn.Module
    vae: nn.Module | None
    device: torch.device
    reading: MemoryReading
    step: int = 0
    hidden_size: int | None = None                 # the student block's width (the loss phase's size)


class TeacherPolicy(Protocol):
    def choose(self, cfg: CrepaConfig, ctx: TeacherContext) -> tuple[CrepaConfig, dict[str, Any]]:
        """The configuration for the run (cfg may hold `auto` tiers), and a record of why."""

    def step_down(self, cfg: CrepaConfig, ctx: TeacherContext, tried: list[CrepaConfig]) -> CrepaConfig | None:
        """The next rung below `cfg` after it ran out of memory, or None when there is none."""


def rung_label(cfg: CrepaConfig) -> str:
    """One line naming a teacher configuration (the per-step `crepa_teacher_rung`)."""
    chunk = cfg.frames_per_chunk or "all"
    parts = [f"encoder={cfg.encoder_tier}", f"vae={cfg.vae_tier}", f"chunk={chunk}", f"dtype={cfg.encoder_dtype}"]
    if cfg.vae_tiling:
        parts.append("vae_tiling")
    if cfg.drop_vae_encoder:
        parts.append("drop_vae_encoder")
    if not cfg.spatial_align:
        parts.append("pooled")
    return " ".join(parts)


# ------------------------------------------------------------------ placing and releasing
def release(placement: Placement | None) -> None:
    """Undo a placement: stream hooks removed, every weight back on the host (frees the device)."""
    if placement is None:
        return
    placement.close()  # stream hooks, RamTorch's loader threads and NVMe scratch file go with it
    move_module(placement.module, "cpu")


def changes_the_vae(cfg: CrepaConfig) -> bool:
    """Whether placing the VAE on cfg's tier moves its weights, tiles it or drops its encoder."""
    return cfg.vae_tier != "gpu" or cfg.vae_tiling or cfg.drop_vae_encoder


def place_vae(vae: nn.Module, cfg: CrepaConfig, device: torch.device) -> Placement:
    if not cfg.vae_tiling and getattr(vae, "use_tiling", False) and hasattr(vae, "disable_tiling"):
        vae.disable_tiling()  # a rung without tiling after one with it (a lossy level restarts the knobs)
    return place(prepare_vae(vae, cfg), cfg.vae_tier, compute_device=device, teacher_device=cfg.teacher_device)


def build_path(encoder: nn.Module, vae: nn.Module | None, cfg: CrepaConfig, device: torch.device,
               on_chunk: Callable[[int], None] | None = None) -> TeacherPath:
    """The encoder and VAE placed on cfg's tiers, in a TeacherPath with cfg's chunk and image size."""
    if AUTO_TIER in (cfg.encoder_tier, cfg.vae_tier):
        raise CrepaConfigError("crepa_mem_encoder_tier" if cfg.encoder_tier == AUTO_TIER else "crepa_mem_vae_tier",
                               AUTO_TIER, valid="a tier chosen by the auto policy before placing")
    enc_place = place(encoder, cfg.encoder_tier, compute_device=device, teacher_device=cfg.teacher_device,
                      dtype=DTYPES[cfg.encoder_dtype], stream_engine=cfg.stream_engine,
                      resident_chunks=cfg.stream_resident_chunks, nvme_path=cfg.stream_nvme_path)
    if cfg.host_share_path:  # one host copy per node: every local rank maps the same file
        from crepa_mem.teacher.host_share import map_host_copy

        map_host_copy(encoder, cfg.host_share_path)
    try:
        vae_place = None if vae is None else place_vae(vae, cfg, device)
    except BaseException:  # e.g. OOM moving the VAE in: leave nothing placed behind
        release(enc_place)
        if vae is not None:
            move_module(vae, "cpu")
        raise
    return TeacherPath(vae=vae_place, encoder=enc_place, image_size=cfg.encoder_image_size, compute_device=device,
                       frames_per_chunk=cfg.frames_per_chunk, true_grid=cfg.true_grid, on_chunk=on_chunk,
                       stage_features=cfg.loss_chunk > 0)


# ------------------------------------------------------------------ running
def _out_of_memory(err: BaseException) -> bool:
    """The path's own OOM error, torch's, or the RuntimeErrors CUDA/cuBLAS raise for the same thing."""
    return isinstance(err, TeacherOutOfMemoryError) or _is_oom(err)


@dataclass
class LadderRecord:
    decision: dict[str, Any] | None = None
    tried: list[str] = field(default_factory=list)      # rungs that ran out of memory, in order
    steps_down: int = 0


class TeacherRunner:
    """The teacher path with its configuration decided at the first step and stepped down on OOM."""

    def __init__(self, cfg: CrepaConfig, *, encoder: nn.Module, vae: nn.Module | None, compute_device,
                 policy: TeacherPolicy | None = None, probe: Probe | None = None,
                 on_chunk: Callable[[int], None] | None = None, on_decision: Callable[[str], None] | None = None,
                 hidden_size: int | None = None):
        if cfg.auto_tiers and policy is None:
            raise CrepaConfigError("crepa_mem_encoder_tier" if cfg.encoder_tier == AUTO_TIER else "crepa_mem_vae_tier",
                                   AUTO_TIER, valid="gpu · swap · stream · device · cache here",
                                   hint="`auto` is decided by crepa_mem.wrap, CrepaHooks or the SimpleTuner drop-in; "
                                        "for a bare CrepaRegularizer pass tier_policy=crepa_mem.integrations.auto."
                                        "AutoTiers()")
        self.config, self.policy, self.probe = cfg, policy, probe or cuda_reading
        self.encoder_module, self.vae_module = encoder, vae
        self.compute_device = torch.device(compute_device)
        self.on_chunk, self.on_decision, self.hidden_size = on_chunk, on_decision, hidden_size
        self.record = LadderRecord()
        self._tried: list[CrepaConfig] = []
        self._pending: str | None = None  # an OOM while placing the configured tiers, stepped down at the first step
        self.path: TeacherPath | None = None
        self._vae_shared, self._vae_copy = False, None
        if not cfg.auto_tiers:
            try:  # placed now, so the modules are where the configuration says from the start
                self.path = build_path(encoder, vae, cfg, self.compute_device, on_chunk)
            except Exception as err:  # noqa: BLE001 - only out-of-memory is stepped down
                if policy is None or not _out_of_memory(err):
                    raise
                self._pending = _describe(err)

    # the TeacherPath surface the regularizer and the SimpleTuner drop-in read
    @property
    def encoder(self) -> Placement | None:
        return None if self.path is None else self.path.encoder

    @property
    def vae(self) -> Placement | None:
        return None if self.path is None else self.path.vae

    def set_vae(self, vae: nn.Module, *, shared: bool = False) -> None:
        """A VAE handed over after construction (SimpleTuner passes its own to every call). `shared`: the
        trainer keeps using this object where it put it, so a rung that moves, tiles or trims the VAE works
        on a host copy of its own (made once, when a rung first needs it) and the trainer's never moves."""
        if self.path is not None and self.path.vae is not None:
            self._release_vae(self.path.vae)
        self.vae_module, self._vae_shared, self._vae_copy = vae, shared, None
        if self.path is not None:
            self.path.vae = place_vae(self._vae_for(self.config), self.config, self.compute_device)

    def _vae_for(self, cfg: CrepaConfig) -> nn.Module | None:
        if not self._vae_shared or not changes_the_vae(cfg):
            return self.vae_module
        if self._vae_copy is None:
            self._vae_copy = host_copy(self.vae_module)
        return self._vae_copy

    def _release_vae(self, placement: Placement) -> None:
        if self._vae_shared and placement.module is self.vae_module:
            placement.close()  # the trainer's own VAE stays where the trainer put it
        else:
            release(placement)

    def context(self, latents: Tensor, target_frames: int, dit_tokens: int | None, step: int) -> TeacherContext:
        reading = self.probe(self.compute_device)
        # a shared VAE stays on the device whatever the rung: it frees nothing (the estimate counts it again)
        mine = (self.encoder_module, self._vae_copy if self._vae_shared else self.vae_module)
        resident = sum(module_bytes(m) for m in mine if m is not None and module_device(m) == self.compute_device)
        reading = MemoryReading(**{**reading.to_dict(), "teacher_resident_bytes": resident})
        return TeacherContext(tuple(latents.shape), target_frames, dit_tokens, self.encoder_module, self.vae_module,
                              self.compute_device, reading, step, self.hidden_size)

    def features(self, latents: Tensor, target_frames: int, dit_grid: tuple[int, int] | None = None, *,
                 step: int = 0, dit_tokens_per_frame: int | None = None) -> TeacherFeatures:
        if self.record.decision is None and self.config.auto_tiers:
            self._decide(latents, target_frames, dit_tokens_per_frame, step)
        if self._pending is not None:
            failure, self._pending = self._pending, None
            self._step_down(failure, latents, target_frames, dit_tokens_per_frame, step)
        while True:
            failure = None
            try:
                if self.path is None:  # placing a rung can run out of memory too: it is part of the attempt
                    self.path = build_path(self.encoder_module, self._vae_for(self.config), self.config,
                                           self.compute_device, self.on_chunk)
                result = measured(self.compute_device, self.config.reset_peak_stats,
                                  lambda: self.path.features(latents, target_frames, dit_grid))
            except Exception as err:  # noqa: BLE001 - only out-of-memory is stepped down
                if self.policy is None or not _out_of_memory(err):  # no ladder: the path's own message stands
                    raise
                failure = _describe(err)
            if failure is None:
                return self._finish(result)
            # Outside the except block: the traceback (and the failed attempt's tensors) is gone.
            self._step_down(failure, latents, target_frames, dit_tokens_per_frame, step)

    # ------------------------------------------------------------------ internals
    def _decide(self, latents, target_frames, dit_tokens, step) -> None:
        ctx = self.context(latents, target_frames, dit_tokens, step)
        cfg, decision = self.policy.choose(self.config, ctx)
        self.record.decision = decision
        self._apply(cfg)
        if self.on_decision is not None and decision.get("line"):
            self.on_decision(decision["line"])

    def _apply(self, cfg: CrepaConfig) -> None:
        """Take `cfg` for the run; its placement is made by the next attempt."""
        self._release()
        self.config = cfg

    def _release(self) -> None:
        if self.path is not None:
            release(self.path.encoder)
            if self.path.vae is not None:
                self._release_vae(self.path.vae)
            self.path = None
        _free_device(self.compute_device)

    def _step_down(self, failure: str, latents, target_frames, dit_tokens, step) -> None:
        self.record.tried.append(f"{rung_label(self.config)} ({failure})")
        self._tried.append(self.config)
        self._release()  # the failed rung's weights leave the device before anything is measured
        nxt = self.policy.step_down(self.config, self.context(latents, target_frames, dit_tokens, step),
                                    list(self._tried))
        if nxt is None:
            raise TeacherOutOfMemoryError(
                "CREPA's teacher ran out of memory on every rung of the ladder; tried: "
                + "; ".join(self.record.tried) + ". Run `crepa-mem doctor --log <this log>` (or `crepa-mem plan`) "
                "for a configuration that fits" + ("" if self.config.allow_lossy else
                                                    ", or allow lossy rungs with crepa_mem_allow_lossy: true"))
        self.record.steps_down += 1
        self._apply(nxt)

    def _finish(self, result: TeacherFeatures) -> TeacherFeatures:
        if result.stats.get("retries") and self.config.frames_per_chunk != result.stats["chunk_frames"]:
            # the path's own back-off found a chunk that fits: start the next steps from it
            self.config = self.config.replace(encoder_frames_batch_size=int(result.stats["chunk_frames"]))
            self.path.frames_per_chunk = self.config.frames_per_chunk
        result.stats["rung"] = rung_label(self.config)
        result.stats["ladder_steps"] = self.record.steps_down
        if self.record.decision is not None:
            result.stats["auto"] = self.record.decision.get("summary", "")
        return result


def measured(device: torch.device, reset_peak_stats: bool, run: Callable[[], TeacherFeatures]) -> TeacherFeatures:
    """`run()` with the CUDA allocator's peak of it in stats (`peak_bytes`, `peak_exact`; see the module doc).
    CUDA's peak statistics are reset only when asked (crepa_mem_reset_peak_stats, `crepa-mem bench`)."""
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda:
        if reset_peak_stats:
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        peak_before = torch.cuda.max_memory_allocated(device)
    result = run()
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result.stats["peak_bytes"] = int(peak - before)
        result.stats["peak_exact"] = bool(reset_peak_stats or peak > peak_before)
    return result


def _describe(err: BaseException) -> str:
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def _free_device(device: torch.device) -> None:
    """Collect the failed attempt's tensors (cycles through frames) and return cached blocks to the driver."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
