"""CREPA for hook-style trainers: musubi-tuner's extension seams, diffusion-pipe, ai-toolkit, finetrainers.

Such trainers offer three points, and CrepaHooks fills each:

| trainer point                                   | CrepaHooks                                            |
|-------------------------------------------------|-------------------------------------------------------|
| after the transformer is loaded (forward hooks) | `CrepaHooks(transformer, vae=…, config=…)`            |
| extra trainable parameters (optimizer groups)   | `.trainable_params()` / `.extra_trainable_params(groups, lr=…)` |
| extra loss after the model's forward            | `loss + hooks.extra_loss(latents, step)[0]`           |

A stock diffusers video transformer (Wan, LTX-Video, Sana-Video, Kandinsky 5) goes through `crepa_mem.wrap`.
A trainer's own DiT (musubi-tuner's WanModel, …) names its block list (`blocks="blocks"`) and width
(`hidden_size=`); its tokens must be frame-major raster order (B, T'·h'·w', D), the token grid coming from
the clean latents' shape and `patch_size`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from crepa_mem.capture import ForwardScopedHooks, _family_of, unwrap
from crepa_mem.errors import CaptureError

__all__ = ["CrepaHooks"]


class _BlockOutput:
    """Keeps one block's output from the latest model forward (capture's forward-scoped hooks, so recomputation
    under gradient checkpointing never overwrites it)."""

    def __init__(self, model: nn.Module, block: nn.Module):
        self.output: Tensor | None = None
        self._hooks = ForwardScopedHooks(model, {0: block}, on_forward=self._reset, on_block=self._keep)

    def _reset(self, module, args, kwargs) -> None:
        self.output = None

    def _keep(self, index: int, output) -> None:
        if self.output is None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.output = out if isinstance(out, Tensor) else None

    def remove(self) -> None:
        self._hooks.remove()
        self.output = None


def _trainer_config(config: Any) -> Any:
    """Trainers keep options on an argparse Namespace: read its crepa_* attributes (SimpleTuner's rules)."""
    from collections.abc import Mapping

    from crepa_mem.config import CrepaConfig

    if config is None or isinstance(config, (CrepaConfig, Mapping, str, os.PathLike)):
        return config
    from crepa_mem.integrations.simpletuner import config_from_simpletuner

    return config_from_simpletuner(config)


class CrepaHooks:
    """One object per training run; see the module docstring for where each method plugs in."""

    def __init__(self, transformer: nn.Module, vae: nn.Module | None = None, config: Any = None, *,
                 encoder: nn.Module | None = None, plan: Any = None, feature_cache: str | os.PathLike | None = None,
                 device: torch.device | str | None = None, max_train_steps: int | None = None,
                 blocks: str | Sequence[nn.Module] | None = None, hidden_size: int | None = None,
                 patch_size: tuple[int, int, int] = (1, 2, 2)):
        from crepa_mem.integrations.wrap import resolve_config, training_device, wrap

        config = _trainer_config(config)
        self.transformer = transformer
        self.last_logs: dict = {}
        self._crepa = None
        self._capture: _BlockOutput | None = None
        if blocks is None and _family_of(unwrap(transformer)) is not None:
            self._crepa = wrap(transformer, vae=vae, encoder=encoder, config=config, plan=plan,
                               feature_cache=feature_cache, device=device, max_train_steps=max_train_steps)
            self.config, self.regularizer = self._crepa.config, self._crepa.regularizer
            return
        # a trainer's own DiT: the block list and width are named by the caller
        from crepa_mem.regularizer import CrepaRegularizer

        cfg = resolve_config(config, plan, feature_cache)
        if cfg.backbone_mode:
            raise CaptureError("backbone mode (crepa_use_backbone_features) needs the teacher block too: it is "
                               "supported for diffusers transformers only; use the encoder mode here")
        if blocks is None or hidden_size is None:
            raise CaptureError(f"{type(transformer).__name__} is not a diffusers video transformer crepa-mem knows: "
                               "pass blocks= (the block-list attribute or the list) and hidden_size= (its width)")
        block_list = getattr(transformer, blocks) if isinstance(blocks, str) else blocks
        n = len(block_list)
        if cfg.block_index is None or not 0 <= cfg.block_index < n:
            raise CaptureError(f"hidden states not returned: {type(transformer).__name__} has {n} blocks, valid "
                               f"block indices are 0..{n - 1}, got {cfg.block_index!r}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.config = cfg
        device = torch.device(device) if device is not None else training_device(transformer)
        from crepa_mem.integrations.auto import AutoTiers, trainable_of  # `auto` tiers and the OOM ladder

        self.regularizer = CrepaRegularizer(cfg, int(hidden_size), encoder=encoder, vae=vae, device=device,
                                            max_train_steps=max_train_steps,
                                            tier_policy=AutoTiers(trainable=trainable_of(transformer)))
        self.regularizer.projector.requires_grad_(True)
        transformer.crepa_projector = self.regularizer.projector
        self._capture = _BlockOutput(transformer, block_list[cfg.block_index])

    # ------------------------------------------------------------------ trainer points
    @property
    def projector(self) -> nn.Module:
        return self._crepa.projector if self._crepa is not None else self.regularizer.projector

    def trainable_params(self) -> list[nn.Parameter]:
        """The projector's parameters (LayerNorm + Linear, fp32): add them to the optimizer."""
        return [p for p in self.projector.parameters() if p.requires_grad]

    def extra_trainable_params(self, trainable_params: list, lr: float | None = None) -> list:
        """musubi-tuner's `extra_trainable_params` seam: the param-group list plus one group for the projector."""
        group: dict[str, Any] = {"params": self.trainable_params()}
        if lr is not None:
            group["lr"] = lr
        return [*trainable_params, group]

    def extra_loss(self, latents: Tensor | None, step: int = 0, *,
                   grid: tuple[int, int, int] | None = None) -> tuple[Tensor, dict]:
        """CREPA loss of the latest forward, to add to the trainer's loss; `latents` are the clean,
        normalised latents (B, C, T, H, W) of that batch. Returns a zero tensor when the schedule gives no loss."""
        if self._crepa is not None:
            loss, logs = self._crepa(latents, step=step)
        else:
            loss, logs = self._generic_loss(latents, step, grid)
        self.last_logs = logs or {}
        if loss is None:
            loss = self.projector_zero()
        return loss, self.last_logs

    def projector_zero(self) -> Tensor:
        """A zero that still belongs to the graph (keeps DDP's every-parameter-used contract)."""
        return sum(p.sum() for p in self.trainable_params()) * 0.0

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `directory`/crepa_projector.safetensors (the same file `wrap` writes)."""
        from crepa_mem.integrations.wrap import save_projector

        return save_projector(self.projector, directory)

    def load(self, directory_or_file: str | os.PathLike) -> None:
        from crepa_mem.integrations.wrap import load_projector

        load_projector(self.projector, directory_or_file)

    def remove(self) -> None:
        """Take the hooks and the projector off the model (idempotent)."""
        if self._crepa is not None:
            self._crepa.remove()
            return
        self.regularizer.close()  # the teacher's threads (RamTorch's loader), if any
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if getattr(self.transformer, "crepa_projector", None) is self.regularizer.projector:
            del self.transformer.crepa_projector

    # ------------------------------------------------------------------ internals
    def _generic_loss(self, latents: Tensor | None, step: int, grid: tuple[int, int, int] | None):
        hidden = self._capture.output if self._capture is not None else None
        if hidden is None:
            raise CaptureError(f"hidden states not returned: block {self.config.block_index} did not run in the "
                               "latest forward of the model (call extra_loss after the forward)")
        self._capture.output = None  # the autograd graph keeps what backward needs
        if grid is None:
            if latents is None:
                raise CaptureError("the token grid is unknown: pass grid=(T', h', w') or the latents")
            t, h, w = latents.shape[-3:]
            pt, ph, pw = self.patch_size
            grid = (t // pt, h // ph, w // pw)
        tokens = grid[0] * grid[1] * grid[2]
        if hidden.ndim != 3 or hidden.shape[1] < tokens:
            raise CaptureError(f"block output {tuple(hidden.shape)} does not hold the (B, {tokens}, D) tokens of "
                               f"grid {grid}")
        hidden = hidden[:, :tokens].reshape(hidden.shape[0], grid[0], grid[1] * grid[2], hidden.shape[-1])
        return self.regularizer.compute_loss(hidden, latents, step, dit_grid=(grid[1], grid[2]))
