"""`wrap`: the one call a trainer makes — capture hook + regularizer + projector registered on the model.

    crepa = crepa_mem.wrap(transformer, vae=vae, config="config.json")   # or plan=crepa_mem.plan(...)
    pred = transformer(**inputs)
    loss = diffusion_loss + crepa(latents, step=global_step)[0]

The projector is registered as `transformer.crepa_projector` (as SimpleTuner does) on the unwrapped
model, so optimizers built from `transformer.parameters()`, `accelerator.prepare`, PEFT
`modules_to_save=["crepa_projector"]` and checkpoints all see it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .capture import BlockCapture, hidden_size_of, unwrap
from .config import CrepaConfig
from .regularizer import CrepaRegularizer
from .tiers import module_device

PROJECTOR_FILE = "crepa_projector.safetensors"


def _as_config(config: CrepaConfig | Mapping[str, Any] | str | os.PathLike | None) -> CrepaConfig:
    if config is None:
        return CrepaConfig(enabled=True)
    if isinstance(config, CrepaConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return CrepaConfig.from_file(config)
    return CrepaConfig.from_dict(config)


class Crepa:
    """What `wrap` returns: call it after the transformer's forward to get (loss, logs)."""

    def __init__(self, transformer: nn.Module, regularizer: CrepaRegularizer, capture: BlockCapture):
        self.transformer, self.regularizer, self.capture = transformer, regularizer, capture

    @property
    def projector(self) -> nn.Module:
        return self.regularizer.projector

    @property
    def config(self) -> CrepaConfig:
        return self.regularizer.config

    def __call__(self, latents: Tensor | None = None, step: int = 0) -> tuple[Tensor | None, dict | None]:
        """CREPA loss of the latest forward. `latents`: the clean, normalised latents of that batch
        (unused in backbone mode, where the teacher block's output is the target)."""
        cap = self.capture
        grid = cap.grid
        teacher = cap.teacher_states if self.config.backbone_mode else None
        try:
            return self.regularizer.compute_loss(cap.hidden_states, latents, step, frame_features=teacher,
                                                 dit_grid=(grid[1], grid[2]) if grid else None)
        finally:
            cap.clear()  # the autograd graph keeps what backward needs; we drop our reference

    def save_projector(self, directory: str | os.PathLike) -> Path:
        """Writes crepa_projector.safetensors (keys 0.weight 0.bias 1.weight 1.bias) into `directory`."""
        from safetensors.torch import save_file

        path = Path(directory) / PROJECTOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.projector.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "crepa_mem": "projector"})
        return path

    def load_projector(self, directory_or_file: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        path = Path(directory_or_file)
        if path.is_dir():
            path = path / PROJECTOR_FILE
        self.projector.load_state_dict(load_file(str(path)))

    def remove(self) -> None:
        """Detach the hook and the projector from the model (idempotent)."""
        self.capture.remove()
        base = unwrap(self.transformer)
        if getattr(base, "crepa_projector", None) is self.projector:
            del base.crepa_projector


def wrap(transformer: nn.Module, *, vae: nn.Module | None = None, encoder: nn.Module | None = None,
         config: CrepaConfig | Mapping[str, Any] | str | os.PathLike | None = None, plan: Any = None,
         feature_cache: str | os.PathLike | None = None, device: torch.device | str | None = None,
         max_train_steps: int | None = None) -> Crepa:
    """Attach CREPA to a stock diffusers video transformer (Wan, LTX-Video, Sana-Video, Kandinsky 5)."""
    cfg = _as_config(config)
    if plan is not None:
        cfg = plan.to_config(cfg)
    if feature_cache is not None:
        cfg = cfg.replace(feature_cache=str(feature_cache), encoder_tier="cache", vae_tier="cache")
    base = unwrap(transformer)
    device = torch.device(device) if device is not None else module_device(base)
    teacher_block = None
    if cfg.backbone_mode:
        teacher_block = cfg.teacher_block_index if cfg.teacher_block_index is not None else cfg.block_index
    capture = BlockCapture(transformer, cfg.block_index, teacher_block_index=teacher_block)
    try:
        reg = CrepaRegularizer(cfg, hidden_size_of(transformer), encoder=encoder, vae=vae, device=device,
                               max_train_steps=max_train_steps)
    except BaseException:
        capture.remove()
        raise
    reg.projector.requires_grad_(True)
    base.crepa_projector = reg.projector  # nn.Module.__setattr__ registers it as a submodule
    return Crepa(transformer, reg, capture)
