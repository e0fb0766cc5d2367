"""CrepaRegularizer: SimpleTuner's CREPA loss with the teacher computed in streamed, tiered chunks.

Legend: B batch, T' DiT frames, P DiT tokens per frame, D width.
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from crepa_mem.config import CrepaConfig
from crepa_mem.errors import CrepaConfigError, ShapeError
from crepa_mem.loss import (LambdaSchedule, align_temporal, align_tokens, build_projector, chunked_frame_scores,
                   feature_side, frame_similarity, per_video_objective, project)
from crepa_mem.teacher.ladder import TeacherRunner, measured
from crepa_mem.teacher.path import TeacherFeatures, encoder_dim


_logger = logging.getLogger("crepa_mem")


def _log_decision(line: str) -> None:
    _logger.info(line)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def all_finite(t: Tensor) -> bool:
    """No NaN/Inf in `t`, from its min and max (both propagate NaN): `torch.isfinite(t).all()` would make
    an |t| copy and three bool masks of t's size (≈ 840 MB for Wan 14B's hidden states at 81×480×832)."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


class CrepaRegularizer:
    """Projector + teacher + schedule. `compute_loss` returns (loss, logs) like SimpleTuner's."""

    def __init__(self, config: CrepaConfig | Mapping[str, Any], hidden_size: int, encoder: nn.Module | None = None,
                 vae: nn.Module | None = None, *, device: torch.device | str | None = None, plan: Any = None,
                 max_train_steps: int | None = None, teacher: Any = None, tier_policy: Any = None,
                 memory_probe: Any = None):
        cfg = config if isinstance(config, CrepaConfig) else CrepaConfig.from_dict(config)
        if plan is not None:
            cfg = plan.to_config(cfg)
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise CrepaConfigError("hidden_size", hidden_size, valid="a positive integer",
                                   hint="CREPA enabled but unable to infer transformer hidden size.")
        self.config, self.hidden_size = cfg, hidden_size
        self.device = torch.device(device) if device is not None else default_device()
        self.teacher = teacher
        if cfg.backbone_mode:
            dim = hidden_size
        elif teacher is not None:
            dim = teacher.encoder_dim
        elif cfg.feature_cache is not None and "cache" in (cfg.encoder_tier, cfg.vae_tier):
            from crepa_mem.teacher.cache import FeatureCacheTeacher  # no encoder and no VAE in memory

            self.teacher = FeatureCacheTeacher.open(cfg.feature_cache, cfg, compute_device=self.device, vae=vae,
                                                  encoder=encoder)
            dim = self.teacher.encoder_dim
        else:
            if encoder is None:
                from crepa_mem.teacher.encoders import load_encoder

                encoder = load_encoder(cfg.encoder, path=cfg.encoder_path, dtype=cfg.encoder_dtype)
            encoder.eval().requires_grad_(False)
            dim = encoder_dim(encoder)
            # tier_policy (crepa_mem.integrations.auto): `auto` tiers at the first step, a ladder on OOM
            self.teacher = TeacherRunner(cfg, encoder=encoder, vae=vae, compute_device=self.device, policy=tier_policy,
                                         probe=memory_probe, on_decision=_log_decision, hidden_size=hidden_size)
        self.encoder_dim = dim
        self.projector = build_projector(hidden_size, dim).to(self.device)
        self.schedule = LambdaSchedule(
            lambda_=cfg.lambda_, scheduler=cfg.scheduler, warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps,
            cutoff_step=cfg.cutoff_step, lambda_end=cfg.lambda_end, power=cfg.power,
            similarity_threshold=cfg.similarity_threshold, similarity_ema_decay=cfg.similarity_ema_decay,
            threshold_mode=cfg.threshold_mode, max_train_steps=max_train_steps)
        self._warned_nonfinite = False
        self._schedule_lock = threading.Lock()

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, hidden_states: Tensor, latents: Tensor | None, step: int = 0, *,
                     frame_features: Tensor | None = None,
                     dit_grid: tuple[int, int] | None = None) -> tuple[Tensor | None, dict | None]:
        """hidden_states (B, T', P, D) from the student block; latents the clean normalised (B, C, T, h, w);
        or `frame_features` (B, T', P, D) from the teacher block in backbone mode."""
        cfg = self.config
        if cfg.lambda_ == 0:
            return None, None  # SimpleTuner: weight 0 → no loss, no logs
        if hidden_states is None:
            raise ValueError("CREPA is enabled but no intermediate hidden states were provided.")
        if hidden_states.ndim not in (3, 4):
            raise ShapeError(f"hidden states must be (B, T', P, D), got {tuple(hidden_states.shape)}")
        # The projector may have been moved with the model (accelerator.prepare) after we were built:
        # compute where it is now.
        device = next(self.projector.parameters()).device
        teacher_grid = dit_grid
        facts: dict[str, Any] = {}
        staged = False  # features on the host, copied frame window by frame window (the chunked loss only)
        if frame_features is not None:
            features = frame_features.detach().to(device).float()
            if features.ndim == 3:
                features = features.unsqueeze(2)
        else:
            if latents is None:
                raise ValueError("CREPA requires the clean latents (or frame_features in backbone mode).")
            if latents.ndim != 5 or latents.shape[0] != hidden_states.shape[0]:
                raise ShapeError(f"latents {tuple(latents.shape)} do not match hidden states "
                                 f"{tuple(hidden_states.shape)}: expected latents (B, C, T, h, w) with the same B")
            if self.teacher is None:
                raise ValueError("no teacher: backbone mode needs frame_features, otherwise pass an encoder/VAE")
            # The teacher runs first, with no autograd graph alive yet: the projector's saved tensors and
            # output (≈1.5 GB for Wan 14B) would otherwise sit on the device through the whole teacher step.
            result: TeacherFeatures = self._teacher_features(latents, hidden_states.shape[1], dit_grid, step,
                                                             hidden_states.shape[2] if hidden_states.ndim == 4 else None)
            features, teacher_grid, staged = result.features, result.grid, result.staged
            if cfg.loss_chunk <= 0:  # the chunks cast their own frames (loss.FeatureSide); the whole loss needs all
                features = features.to(device).float()
            facts = {f"crepa_teacher_{k}": v for k, v in result.stats.items()}
            del result  # a features copy in the stored dtype would otherwise live through the loss
            cfg = self.config  # an auto decision or a lossy rung (pooled alignment) may have changed it
        # An fp16 overflow step (GradScaler skips it) or a bad teacher input: no loss, and the schedule's
        # EMA never sees the NaN, so the cutoff still works for the rest of the run.
        bad = [name for name, t in (("hidden states", hidden_states), ("teacher features", features))
               if not all_finite(t)]
        if bad:
            return self._skip(" and ".join(bad), facts)
        if features.shape[0] != hidden_states.shape[0]:
            raise ShapeError(f"teacher features {tuple(features.shape)} and hidden states "
                             f"{tuple(hidden_states.shape)} have different batch sizes")
        grids = (dit_grid, teacher_grid) if (cfg.true_grid and dit_grid and teacher_grid) else (None, None)
        similarity = dict(distance=cfg.adjacent_distance, tau=cfg.adjacent_tau, cumulative=cfg.cumulative_neighbors,
                          normalize_neighbour_sum=cfg.normalize_neighbour_sum)
        if cfg.loss_chunk > 0:  # frame chunks recomputed in backward: one chunk's activations at a time
            side = feature_side(features, tuple(hidden_states.shape), spatial_align=cfg.spatial_align,
                                projected_grid=grids[0], feature_grid=grids[1], device=device, staged=staged)
            del features  # the side holds them, in their own dtype, where they are
            total, self_sim = chunked_frame_scores(self.projector, hidden_states.to(device), side, cfg.loss_chunk,
                                                   spatial_align=cfg.spatial_align, projected_grid=grids[0],
                                                   feature_grid=grids[1], **similarity)
        else:
            projected = project(self.projector, hidden_states.to(device))
            projected, features = align_temporal(projected, features)
            projected, features = align_tokens(projected, features, spatial_align=cfg.spatial_align,
                                               projected_grid=grids[0], feature_grid=grids[1])
            p = nn.functional.normalize(projected, dim=-1)
            y = nn.functional.normalize(features, dim=-1)
            total, self_sim = frame_similarity(p, y, **similarity)
        objective = per_video_objective(total, cfg.normalize_by_frames)
        score = total.mean().detach().item()
        if not math.isfinite(score):
            return self._skip("the alignment score", facts)
        with self._schedule_lock:  # callers in several threads: each score folds into the EMA once
            weight, cutoff = self.schedule(step, score)
            ema = self.schedule.ema
        loss = -objective.mean() * weight
        logs = {
            "crepa_loss": loss.detach().item(),
            "crepa_alignment_score": score,
            "crepa_similarity_self": self_sim.mean().detach().item(),
            "crepa_weight": weight,
            "crepa_cutoff": cutoff,
        }
        if cfg.similarity_threshold is not None:
            logs["crepa_alignment_score_ema"] = ema
        logs.update(facts)
        return loss, logs

    def _skip(self, what: str, facts: dict) -> tuple[None, dict]:
        if not self._warned_nonfinite:
            warnings.warn(f"CREPA: {what} contain NaN/Inf; skipping the CREPA loss for such steps "
                          f"(logged as crepa_skipped)", RuntimeWarning, stacklevel=3)
            self._warned_nonfinite = True
        return None, {"crepa_skipped": True, **facts}

    def _teacher_features(self, latents: Tensor, target_frames: int, dit_grid, step: int = 0,
                          dit_tokens: int | None = None) -> TeacherFeatures:
        if isinstance(self.teacher, TeacherRunner):  # measures its own peak (without resetting CUDA's statistics)
            result = self.teacher.features(latents, target_frames, dit_grid, step=step, dit_tokens_per_frame=dit_tokens)
            self.config = self.teacher.config
        else:
            result = measured(self.device, self.config.reset_peak_stats,
                              lambda: self.teacher.features(latents, target_frames, dit_grid))
        for part in ("encoder", "vae"):  # a feature-cache teacher has neither attribute; a TeacherPath may lack a VAE
            placed = getattr(self.teacher, part, None)
            if placed is not None:  # tier, device, and the tier's own facts (pinned host memory, stream engine)
                for key, value in placed.facts().items():
                    result.stats.setdefault(f"{part}_{key}", value)
            else:
                result.stats.setdefault(f"{part}_tier", "none" if hasattr(self.teacher, part) else "cache")
        return result

    def close(self) -> None:
        """Release what the teacher's tiers hold beyond their modules (RamTorch's threads); idempotent."""
        for part in ("encoder", "vae"):
            placed = getattr(self.teacher, part, None)
            if placed is not None and hasattr(placed, "close"):
                placed.close()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"projector": self.projector.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.projector.load_state_dict(state["projector"])
        schedule = dict(state.get("schedule", {}))
        ema = schedule.get("ema")
        if ema is not None and not (isinstance(ema, (int, float)) and math.isfinite(ema)):
            warnings.warn(f"CREPA: the checkpoint's alignment-score EMA is {ema!r}; starting it afresh",
                          RuntimeWarning, stacklevel=2)
            schedule["ema"] = None  # a NaN EMA would keep the similarity cutoff from ever firing
        self.schedule.load_state_dict(schedule)
