"""SimpleTuner drop-in: SimpleTuner 4.10's `CrepaRegularizer` interface, backed by crepa-mem's tiers.

SimpleTuner builds its regularizer in `VideoModelFoundation._init_crepa_regularizer`:

    reg = CrepaRegularizer(config, accelerator, hidden_size, model_foundation=self, max_train_steps=...)
    reg.attach_to_model(model)                      # registers model.crepa_projector
    reg.wants_hidden_states()                       # the transformer then returns crepa_hidden_states
    loss, logs = reg.compute_loss(hidden_states=..., latents=..., vae=..., frame_features=..., step=...)

This class answers the same calls with the same errors and the same loss (REFERENCE §1), but the teacher
runs through crepa-mem: frames selected before encoding, chunked encoding with OOM back-off, and the
`crepa_mem_*` keys of the same config.json choosing tiers (swap / stream / device / cache) for the DINOv2
encoder and the VAE. Patch it in before SimpleTuner builds its model:

    python -m crepa_mem.simpletuner <the arguments of simpletuner/train.py>
    # or, in your own launcher:  import crepa_mem.simpletuner as s; s.patch_simpletuner()

Hidden states come from SimpleTuner's own capture (shaped (B, T', P, D)), so no hook is added here.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import fields
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from crepa_mem.config import CrepaConfig
from crepa_mem.errors import CrepaConfigError, CrepaMemError
from crepa_mem.integrations.simpletuner_options import SIMPLETUNER_OWN_CHECKS, handover_reason

__all__ = ["CrepaRegularizer", "config_from_simpletuner", "patch_simpletuner"]

_TARGET = "simpletuner.helpers.training.crepa"
logger = logging.getLogger("crepa_mem.simpletuner")
_ORIGINAL = "SimpleTunerCrepaRegularizer"  # where patch_simpletuner keeps SimpleTuner's own class, in _TARGET
# SimpleTuner reads these as `value or default`: a falsy value means the default
_OR_DEFAULTS = {"crepa_encoder_image_size": 518, "crepa_encoder_frames_batch_size": -1, "crepa_power": 1.0}
_FEATURE_SOURCE_ALIASES = {"external": "encoder", "internal": "backbone"}


def _nullable_keys() -> set[str]:
    """Config keys whose field accepts None (crepa_block_index, crepa_similarity_threshold, …)."""
    return {f.metadata["key"] for f in fields(CrepaConfig) if f.metadata.get("key") and "None" in str(f.type)}


def config_from_simpletuner(config: Any) -> CrepaConfig:
    """CrepaConfig from SimpleTuner's config (an argparse Namespace, any attribute object, or a dict).

    SimpleTuner reads most options as `getattr(config, key, default) or default`, so a None there means
    "the default"; keys that may legitimately be None (crepa_block_index, …) keep it, and crepa_lambda None
    is 0 (SimpleTuner: `float(... or 0.0)`).
    """
    raw = _as_mapping(config)
    nullable = _nullable_keys()
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if not name.startswith("crepa_"):
            continue
        if value is None and name == "crepa_lambda":
            value = 0.0
        if name in _OR_DEFAULTS and not value:
            value = _OR_DEFAULTS[name]
        if name == "crepa_feature_source" and value is not None:
            value = _FEATURE_SOURCE_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
        if value is None and name not in nullable:
            continue
        data[name] = value
    small = data.get("crepa_encoder_image_size")
    if small is not None and 0 < int(small) < 64:  # SimpleTuner accepts any size; crepa-mem's floor is 64
        cfg = CrepaConfig.from_dict({**data, "crepa_encoder_image_size": 64})
        object.__setattr__(cfg, "encoder_image_size", int(small))  # the size SimpleTuner would use
        return cfg
    return CrepaConfig.from_dict(data)


def _as_mapping(config: Any) -> dict:
    return dict(config) if isinstance(config, Mapping) else dict(vars(config))


def _simpletuner_class() -> type | None:
    """SimpleTuner's own CrepaRegularizer: the one patch_simpletuner replaced, or the one still in place."""
    module = sys.modules.get(_TARGET)
    current = getattr(module, _ORIGINAL, None) or getattr(module, "CrepaRegularizer", None)
    return current if current is not None and current is not CrepaRegularizer else None


def _handover(config: Any) -> str | None:
    """Why this config must run on SimpleTuner's own class (a mode, or a value only it accepts), or None."""
    raw = _as_mapping(config)
    if not raw.get("crepa_enabled"):
        return None
    reason = handover_reason(raw)
    if reason is None:
        try:
            config_from_simpletuner(config)
        except CrepaConfigError as err:
            if err.key in SIMPLETUNER_OWN_CHECKS or not err.key.startswith("crepa_") or err.key.startswith("crepa_mem_"):
                return None  # refused by SimpleTuner too, or a crepa-mem option: raised by __init__
            reason = f"{err.key}={err.value!r}"
    return reason


class CrepaRegularizer:
    """SimpleTuner's `CrepaRegularizer(config, accelerator, hidden_size, *, model_foundation, max_train_steps)`.

    Extra keywords (not in SimpleTuner): `plan` (a crepa_mem Plan for this rank's GPU, or "auto") and `encoder` (an
    already loaded DINOv2, e.g. in tests; otherwise it is loaded by name from the local cache).
    """

    def __new__(cls, config: Any, accelerator: Any, hidden_size: int, *, model_foundation: Any = None,
                max_train_steps: int | None = None, plan: Any = None, encoder: nn.Module | None = None):
        reason = _handover(config)
        if reason is None:
            return super().__new__(cls)
        original = _simpletuner_class()
        if original is None:
            raise CrepaMemError(f"{reason} is implemented by SimpleTuner's own CREPA class only, and SimpleTuner is "
                                "not patched here: run it through `python -m crepa_mem.simpletuner`")
        logger.warning("crepa-mem: %s is not implemented by crepa-mem; SimpleTuner's own CREPA regularizer runs "
                       "this config (no crepa_mem_* tiers)", reason)
        return original(config, accelerator, hidden_size, model_foundation=model_foundation,
                        max_train_steps=max_train_steps or 0)

    def __init__(self, config: Any, accelerator: Any, hidden_size: int, *, model_foundation: Any = None,
                 max_train_steps: int | None = None, plan: Any = None, encoder: nn.Module | None = None):
        self.config = config
        self.device = torch.device(accelerator.device)
        self.hidden_size = hidden_size
        self.model_foundation = model_foundation
        self.max_train_steps = max_train_steps or None
        cfg = config_from_simpletuner(config)
        from crepa_mem.integrations.wrap import resolve_config  # a Plan, or "auto" (tiers chosen at the first step)

        self.crepa_config = resolve_config(cfg, plan)
        cfg = self.crepa_config
        if cfg.encoder_image_size < 64:
            logger.warning("crepa_encoder_image_size=%s is below 64 (accepted, as SimpleTuner does): a DINOv2 with "
                           "14-px patches sees %d patch(es) per side", cfg.encoder_image_size, cfg.encoder_image_size // 14)
        # the attributes SimpleTuner's model code reads (e.g. `crepa_regularizer.block_index`)
        self.enabled = cfg.enabled
        self.block_index = cfg.block_index
        self.teacher_block_index = cfg.teacher_block_index
        self.use_backbone_features = cfg.backbone_mode
        self.distance, self.tau = cfg.adjacent_distance, cfg.adjacent_tau
        self.base_weight = cfg.lambda_
        self.encoder_name, self.encoder_image_size = cfg.encoder, cfg.encoder_image_size
        self.encoder_frames_batch_size = cfg.encoder_frames_batch_size
        self.normalize_by_frames, self.spatial_align = cfg.normalize_by_frames, cfg.spatial_align
        self.cumulative_neighbors = cfg.cumulative_neighbors
        mode = getattr(model_foundation, "crepa_mode", None)
        if mode is None:  # SimpleTuner's default, when its module is there to name it
            mode = getattr(getattr(sys.modules.get(_TARGET), "CrepaMode", None), "VIDEO", None)
        self.mode = mode
        self._image_mode = getattr(mode, "name", str(mode)).upper().endswith("IMAGE")
        self.encoder = encoder
        self.encoder_dim: int | None = None
        self.projector: nn.Module | None = None
        self._regularizer = None  # crepa_mem.regularizer.CrepaRegularizer, built by attach_to_model
        self._model: nn.Module | None = None  # the model the projector is registered on
        self._calls = 0
        self._vae_source: nn.Module | None = None  # SimpleTuner's VAE that the teacher's VAE stands for
        self.teacher_facts: dict[str, Any] = {}  # the last step's non-numeric teacher facts (tiers, devices)

    # ------------------------------------------------------------------ SimpleTuner's public surface
    def attach_to_model(self, model: nn.Module) -> None:
        """Builds the teacher (encoder on its tier) and registers the projector as `model.crepa_projector`."""
        if not self.enabled:
            return
        if self.block_index is None:
            raise ValueError("crepa_block_index must be set when CREPA is enabled.")
        if self._regularizer is None:
            self._build()
            setattr(model, "crepa_projector", self.projector)  # optimizer, prepare and checkpoints see it
            self._model = model
        self.projector.to(device=self.device, dtype=torch.float32)

    def _build(self) -> None:
        """The teacher (encoder on its tier) and schedule, around the projector (SimpleTuner keeps one
        assigned before attach_to_model, and computes with one assigned without it)."""
        from crepa_mem.integrations.auto import AutoTiers, trainable_of  # `auto` tiers and the OOM ladder
        from crepa_mem.regularizer import CrepaRegularizer as Core

        def trainable() -> tuple[int, int]:
            return trainable_of(self._model)() if self._model is not None else (0, 0)

        self._regularizer = Core(self.crepa_config, self.hidden_size, encoder=self.encoder, vae=None,
                                 device=self.device, max_train_steps=self.max_train_steps,
                                 tier_policy=AutoTiers(trainable=trainable))
        if self.projector is None:
            self.projector = self._regularizer.projector
        self._regularizer.projector = self.projector
        self.encoder_dim = self._regularizer.encoder_dim
        self.encoder = getattr(getattr(self._regularizer.teacher, "encoder", None), "module", None)

    def wants_hidden_states(self) -> bool:
        return self.enabled

    def compute_loss(self, hidden_states: Tensor | None, latents: Tensor | None, vae: nn.Module | None = None,
                     *, frame_features: Tensor | None = None, step: int | None = None,
                     ) -> tuple[Tensor | None, dict | None]:
        """(loss, logs) as SimpleTuner's. `step` is the optimizer step (the schedule's clock); when a trainer
        does not pass it, calls are counted instead."""
        if not self.enabled:
            return None, None
        if hidden_states is None:
            raise ValueError("CREPA is enabled but no intermediate hidden states were provided.")
        if self.use_backbone_features:
            if frame_features is None:
                raise ValueError("CREPA backbone feature mode requires frame_features from the model.")
            if frame_features.ndim == 3:  # SimpleTuner: (B, N, D) → one frame
                frame_features = frame_features.unsqueeze(1)
        elif latents is None:
            raise ValueError("CREPA requires access to clean latents for decoding.")
        if self.projector is None:
            raise RuntimeError("CREPA projector was not initialised on the diffusion model.")
        if self._regularizer is None:
            self._build()
        if self.base_weight == 0:
            return None, None
        if not self.use_backbone_features:
            self._ensure_vae(vae)
        if hidden_states.ndim == 3 and self._image_mode:  # IMAGE mode: (B, S, D) is one frame of S tokens
            hidden_states = hidden_states.unsqueeze(1)
        if step is None:
            step = self._calls
        self._calls += 1
        if self._model is not None:  # PEFT modules_to_save trains a copy registered in its place: use that
            from crepa_mem.integrations.wrap import trained_projector

            self.projector = trained_projector(self._model, fallback=self.projector)
        self._regularizer.projector = self.projector
        loss, logs = self._regularizer.compute_loss(hidden_states, latents, int(step),
                                                    frame_features=frame_features if self.use_backbone_features else None)
        return self._as_simpletuner(loss, logs)

    def _as_simpletuner(self, loss: Tensor | None, logs: dict | None) -> tuple[Tensor | None, dict | None]:
        """SimpleTuner 4.10's outputs: no loss at zero scheduled weight (warm-up step 0, cutoff, threshold),
        so the projector gets no gradient at all; the similarity EMA logged every step; only numbers
        in the logs (trackers get them as aux_loss/…)."""
        if not logs:
            return loss, logs
        self.teacher_facts = {k: v for k, v in logs.items() if not isinstance(v, (bool, int, float))}
        logs = {k: v for k, v in logs.items() if k not in self.teacher_facts}
        ema = self._regularizer.schedule.ema
        if ema is not None and "crepa_weight" in logs:
            logs["crepa_alignment_score_ema"] = ema
        if logs.get("crepa_weight") == 0:
            logs.update(crepa_loss=0.0, crepa_weight=0.0, crepa_cutoff=True)
            return None, logs
        return loss, logs

    # ------------------------------------------------------------------ state (checkpoint/resume)
    def state_dict(self) -> dict:
        return {} if self._regularizer is None else self._regularizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._regularizer is not None and state:
            self._regularizer.load_state_dict(state)

    # ------------------------------------------------------------------ internals
    def _ensure_vae(self, vae: nn.Module | None) -> None:
        """SimpleTuner hands the VAE to every call (or offers it through model_foundation.get_vae());
        it is placed on its tier the first time, and again only if a different VAE arrives."""
        from crepa_mem.teacher.ladder import TeacherRunner, changes_the_vae
        from crepa_mem.teacher.path import TeacherPath

        teacher = self._regularizer.teacher
        if not isinstance(teacher, (TeacherPath, TeacherRunner)):  # a feature cache: no pixels needed
            return
        if vae is None and self.model_foundation is not None and hasattr(self.model_foundation, "get_vae"):
            vae = self.model_foundation.get_vae()
        known = teacher.vae_module if isinstance(teacher, TeacherRunner) else teacher.vae
        if vae is None:
            if known is not None:
                return
            raise ValueError("CREPA requires a VAE to decode latents back to pixel space.")
        if known is not None and self._vae_source is vae:
            return
        from crepa_mem.teacher.placement import host_copy
        from crepa_mem.teacher.tiers import place
        from crepa_mem.teacher.vae import prepare_vae

        cfg = self.crepa_config
        # SimpleTuner validates and caches with this same VAE object, where it put it: a tier that moves
        # weights (or tiling, or dropping the encoder) works on a host copy of its own, never on SimpleTuner's.
        self._vae_source = vae
        if isinstance(teacher, TeacherRunner):  # placed on its tier (decided at the first step for `auto`)
            teacher.set_vae(vae, shared=True)  # a rung that moves it works on a host copy (see set_vae)
            return
        own = host_copy(vae) if changes_the_vae(cfg) else vae
        teacher.vae = place(prepare_vae(own, cfg), cfg.vae_tier, compute_device=self.device,
                            teacher_device=cfg.teacher_device)


def patch_simpletuner() -> list[str]:
    """Replace SimpleTuner's CrepaRegularizer with this one; returns the names rebound.

    Rebinds the class in `simpletuner.helpers.training.crepa` and in every already imported SimpleTuner
    module that did `from ...crepa import CrepaRegularizer` (models/common.py does). Call it before the
    trainer builds its model. Raises CrepaMemError (one line, what to do) when SimpleTuner is not importable.
    """
    try:
        import importlib

        target = importlib.import_module(_TARGET)
    except ImportError as err:
        raise CrepaMemError(
            f"SimpleTuner is not importable here ({err}): install SimpleTuner in the environment that trains, "
            "then run `python -m crepa_mem.integrations.simpletuner <simpletuner/train.py arguments>` (or call "
            "crepa_mem.simpletuner.patch_simpletuner() before SimpleTuner builds its model)") from err
    try:
        from crepa_mem.integrations.simpletuner_options import register_with_simpletuner

        register_with_simpletuner()  # before SimpleTuner builds (or re-reads) its argument parser
    except ImportError as err:
        logger.warning("crepa-mem: SimpleTuner's config parser is not importable (%s); crepa_mem_* keys in "
                       "config.json would be refused", err)
    original = getattr(target, "CrepaRegularizer", None)
    if original is not None and original is not CrepaRegularizer:
        setattr(target, _ORIGINAL, original)  # the hand-over (modes crepa-mem does not implement) builds it
    patched = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "simpletuner" or name.startswith("simpletuner.")):
            continue
        current = getattr(module, "CrepaRegularizer", None)
        if current is CrepaRegularizer or (current is not None and current is original):
            setattr(module, "CrepaRegularizer", CrepaRegularizer)
            patched.append(f"{name}.CrepaRegularizer")
    return sorted(patched)


def main(argv: list[str] | None = None) -> None:
    """`python -m crepa_mem.simpletuner …`: patch, then run simpletuner/train.py as __main__ with the same args."""
    import runpy

    try:
        names = patch_simpletuner()
    except CrepaMemError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"crepa-mem: CREPA regularizer patched into {', '.join(names)}", file=sys.stderr)
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("simpletuner.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
