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

import sys
from dataclasses import fields
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from crepa_mem.config import CrepaConfig
from crepa_mem.errors import CrepaMemError

__all__ = ["CrepaRegularizer", "config_from_simpletuner", "patch_simpletuner"]

_TARGET = "simpletuner.helpers.training.crepa"


def _nullable_keys() -> set[str]:
    """Config keys whose field accepts None (crepa_block_index, crepa_similarity_threshold, …)."""
    return {f.metadata["key"] for f in fields(CrepaConfig) if f.metadata.get("key") and "None" in str(f.type)}


def config_from_simpletuner(config: Any) -> CrepaConfig:
    """CrepaConfig from SimpleTuner's config (an argparse Namespace, any attribute object, or a dict).

    SimpleTuner reads most options as `getattr(config, key, default) or default`, so a None there means
    "the default"; keys that may legitimately be None (crepa_block_index, …) keep it, and crepa_lambda None
    is 0 (SimpleTuner: `float(... or 0.0)`).
    """
    raw = dict(config) if isinstance(config, Mapping) else dict(vars(config))
    nullable = _nullable_keys()
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if not name.startswith("crepa_"):
            continue
        if value is None and name == "crepa_lambda":
            value = 0.0
        if value is None and name not in nullable:
            continue
        data[name] = value
    return CrepaConfig.from_dict(data)


class CrepaRegularizer:
    """SimpleTuner's `CrepaRegularizer(config, accelerator, hidden_size, *, model_foundation, max_train_steps)`.

    Extra keywords (not in SimpleTuner): `plan` (a crepa_mem Plan for this rank's GPU) and `encoder` (an
    already loaded DINOv2, e.g. in tests; otherwise it is loaded by name from the local cache).
    """

    def __init__(self, config: Any, accelerator: Any, hidden_size: int, *, model_foundation: Any = None,
                 max_train_steps: int | None = None, plan: Any = None, encoder: nn.Module | None = None):
        self.config = config
        self.device = torch.device(accelerator.device)
        self.hidden_size = hidden_size
        self.model_foundation = model_foundation
        self.max_train_steps = max_train_steps or None
        cfg = config_from_simpletuner(config)
        self.crepa_config = plan.to_config(cfg) if plan is not None else cfg
        cfg = self.crepa_config
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
        self.mode = mode
        self._image_mode = getattr(mode, "name", str(mode)).upper().endswith("IMAGE")
        self.encoder = encoder
        self.encoder_dim: int | None = None
        self.projector: nn.Module | None = None
        self._regularizer = None  # crepa_mem.regularizer.CrepaRegularizer, built by attach_to_model
        self._model: nn.Module | None = None  # the model the projector is registered on
        self._calls = 0

    # ------------------------------------------------------------------ SimpleTuner's public surface
    def attach_to_model(self, model: nn.Module) -> None:
        """Builds the teacher (encoder on its tier) and registers the projector as `model.crepa_projector`."""
        if not self.enabled:
            return
        if self.block_index is None:
            raise ValueError("crepa_block_index must be set when CREPA is enabled.")
        if self._regularizer is None:
            from crepa_mem.regularizer import CrepaRegularizer as Core

            self._regularizer = Core(self.crepa_config, self.hidden_size, encoder=self.encoder, vae=None,
                                     device=self.device, max_train_steps=self.max_train_steps)
            self.projector = self._regularizer.projector
            self.encoder_dim = self._regularizer.encoder_dim
            teacher = self._regularizer.teacher
            self.encoder = getattr(getattr(teacher, "encoder", None), "module", None)
            setattr(model, "crepa_projector", self.projector)  # optimizer, prepare and checkpoints see it
            self._model = model
        self.projector.to(device=self.device, dtype=torch.float32)

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
        if self.projector is None or self._regularizer is None:
            raise RuntimeError("CREPA projector was not initialised on the diffusion model.")
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
        return self._regularizer.compute_loss(hidden_states, latents, int(step),
                                              frame_features=frame_features if self.use_backbone_features else None)

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
        from crepa_mem.teacher.path import TeacherPath

        teacher = self._regularizer.teacher
        if not isinstance(teacher, TeacherPath):  # a feature cache: no pixels needed
            return
        if vae is None and self.model_foundation is not None and hasattr(self.model_foundation, "get_vae"):
            vae = self.model_foundation.get_vae()
        if vae is None:
            if teacher.vae is not None:
                return
            raise ValueError("CREPA requires a VAE to decode latents back to pixel space.")
        if teacher.vae is not None and teacher.vae.module is vae:
            return
        from crepa_mem.teacher.vae import prepare_vae
        from crepa_mem.teacher.tiers import place

        cfg = self.crepa_config
        teacher.vae = place(prepare_vae(vae, cfg), cfg.vae_tier, compute_device=self.device,
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
    original = getattr(target, "CrepaRegularizer", None)
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
