"""`wrap`: the one call a trainer makes — capture hook + regularizer + projector registered on the model.

    crepa = crepa_mem.wrap(transformer, vae=vae, config="config.json")   # or plan=crepa_mem.plan(...)
    pred = transformer(**inputs)
    loss = diffusion_loss + crepa(latents, step=global_step)[0]

The projector is registered as `transformer.crepa_projector` (as SimpleTuner does) on the unwrapped
model, so optimizers built from `transformer.parameters()`, `accelerator.prepare`, PEFT
`modules_to_save=["crepa_projector"]` and checkpoints all see it. Call `wrap` before
`accelerator.prepare`: DDP and FSDP only synchronise/shard parameters the model holds when they wrap it.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from crepa_mem.fileio import respect_umask
from crepa_mem.capture import BlockCapture, hidden_size_of, unwrap
from crepa_mem.config import AUTO_TIER, CrepaConfig
from crepa_mem.errors import CrepaConfigError, CrepaMemError
from crepa_mem.regularizer import CrepaRegularizer
from crepa_mem.teacher.placement import module_device

PROJECTOR_FILE = "crepa_projector.safetensors"


def training_device(model: nn.Module) -> torch.device:
    """Where training will run: the model's device once it is on an accelerator; before
    `accelerator.prepare` (model still on the CPU) this rank's GPU (LOCAL_RANK) when CUDA exists."""
    device = module_device(model)
    if device.type != "cpu" or not torch.cuda.is_available():
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def projector_state_dict(projector: nn.Module) -> dict[str, Tensor]:
    """Full projector weights on the CPU, keys 0.weight 0.bias 1.weight 1.bias. Under FSDP2 the shards
    are all-gathered: a collective, so every rank calls it (then one rank writes)."""
    module = projector
    module = getattr(module, "module", module) if type(module).__name__ == "FullyShardedDataParallel" else module
    state = {}
    for key, value in module.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[key] = value.detach().cpu().contiguous()
    return state


def save_projector(projector: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes `directory`/crepa_projector.safetensors, beside the LoRA weights."""
    from safetensors.torch import save_file

    path = Path(directory) / PROJECTOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(projector_state_dict(projector), str(path), metadata={"format": "pt", "crepa_mem": "projector"})
    return respect_umask(path)  # safetensors writes 0600


def load_projector(projector: nn.Module, directory_or_file: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    path = Path(directory_or_file)
    projector.load_state_dict(load_file(str(path / PROJECTOR_FILE if path.is_dir() else path)))


def resolve_config(config: CrepaConfig | Mapping[str, Any] | str | os.PathLike | None, plan: Any = None,
                   feature_cache: str | os.PathLike | None = None) -> CrepaConfig:
    """A config from what a trainer has (object, dict, file), with a plan's settings and a feature cache applied."""
    cfg = _as_config(config)
    if isinstance(plan, str) and plan == AUTO_TIER:  # decided at the first teacher step (integrations.auto)
        cfg = cfg.replace(encoder_tier=AUTO_TIER, vae_tier=AUTO_TIER)
    elif isinstance(plan, str):
        raise CrepaConfigError("plan", plan, valid='"auto" or a crepa_mem.plan(...) result')
    elif plan is not None:
        cfg = plan.to_config(cfg)
    if feature_cache is not None:
        cfg = cfg.replace(feature_cache=str(feature_cache), encoder_tier="cache", vae_tier="cache")
    return cfg


def _as_config(config: CrepaConfig | Mapping[str, Any] | str | os.PathLike | None) -> CrepaConfig:
    if config is None:
        return CrepaConfig(enabled=True)
    if isinstance(config, CrepaConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        return CrepaConfig.from_file(config)
    return CrepaConfig.from_dict(config)


def trained_projector(model: nn.Module, fallback: nn.Module | None = None) -> nn.Module | None:
    """The projector module that actually trains: what is registered as `crepa_projector` now.

    PEFT's `modules_to_save=["crepa_projector"]` replaces it with a ModulesToSaveWrapper whose active
    copy trains while the original is frozen; FSDP1 auto-wrap replaces it with its FSDP unit (calling the
    unit gathers the shards). Using the registered module keeps CREPA on the weights the optimizer steps.
    """
    module = getattr(unwrap(model), "crepa_projector", None)
    if module is None:
        return fallback
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) and active else active
        if active in copies:
            return copies[active]
    return module


_SHARDED = (
    "the CREPA projector's parameters are sharded (size {size} of {name}) when CREPA runs: the FSDP unit that "
    "holds them was resharded after the model's forward. Make crepa_projector an FSDP unit of its own (accelerate "
    "FSDP1: add Sequential to fsdp_transformer_layer_cls_to_wrap; FSDP2: fully_shard(model.crepa_projector) "
    "before the root), or keep it in an FSDP2 root unit, which is not resharded after forward"
)


def _check_not_sharded(projector: nn.Module) -> None:
    """A projector inside a resharded FSDP unit has empty (FSDP1) or DTensor (FSDP2) parameters; an FSDP
    unit of its own (FSDP1 wrapper, FSDP2 module) gathers them in its forward, so it is fine."""
    if type(projector).__name__ == "FullyShardedDataParallel" or hasattr(projector, "unshard"):
        return
    for name, param in projector.named_parameters():
        if param.numel() == 0 or type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor":
            raise CrepaMemError(_SHARDED.format(size=tuple(param.shape), name=name))


class Crepa:
    """What `wrap` returns: call it after the transformer's forward to get (loss, logs)."""

    def __init__(self, transformer: nn.Module, regularizer: CrepaRegularizer, capture: BlockCapture):
        self.transformer, self.regularizer, self.capture = transformer, regularizer, capture
        self._registered = regularizer.projector
        self._warned_no_grad = False
        self._removed = False

    @property
    def projector(self) -> nn.Module:
        """The projector that trains (see `trained_projector`); state-dict keys 0.weight … 1.bias."""
        return trained_projector(self.transformer, fallback=self._registered)

    @property
    def config(self) -> CrepaConfig:
        return self.regularizer.config

    def __call__(self, latents: Tensor | None = None, step: int = 0) -> tuple[Tensor | None, dict | None]:
        """CREPA loss of the latest forward. `latents`: the clean, normalised latents of that batch
        (unused in backbone mode, where the teacher block's output is the target)."""
        cap = self.capture
        self.regularizer.projector = projector = self.projector  # follow PEFT/FSDP replacing the module
        _check_not_sharded(projector)
        grid = cap.grid
        self._warn_if_detached(cap.hidden_states)
        teacher = cap.teacher_states if self.config.backbone_mode else None
        try:
            return self.regularizer.compute_loss(cap.hidden_states, latents, step, frame_features=teacher,
                                                 dit_grid=(grid[1], grid[2]) if grid else None)
        finally:
            cap.clear()  # the autograd graph keeps what backward needs; we drop our reference

    def _warn_if_detached(self, hidden: Tensor | None) -> None:
        """A forward under torch.no_grad() (or inference_mode) gives states without a graph: the loss
        still trains the projector, but nothing of it reaches the transformer. Said once."""
        if self._warned_no_grad or hidden is None or hidden.requires_grad or not torch.is_grad_enabled():
            return
        if any(p.requires_grad for p in unwrap(self.transformer).parameters() if p is not None):
            warnings.warn("CREPA: the transformer's hidden states have no autograd graph (was its forward run under "
                          "torch.no_grad() or inference_mode?): only the CREPA projector will train from this loss, "
                          "not the transformer", RuntimeWarning, stacklevel=3)
            self._warned_no_grad = True

    def save_projector(self, directory: str | os.PathLike) -> Path:
        """Writes crepa_projector.safetensors (keys 0.weight 0.bias 1.weight 1.bias) into `directory`."""
        return save_projector(self.projector, directory)

    def projector_state_dict(self) -> dict[str, Tensor]:
        return projector_state_dict(self.projector)

    def load_projector(self, directory_or_file: str | os.PathLike) -> None:
        load_projector(self.projector, directory_or_file)

    def remove(self) -> None:
        """Detach the hook and the projector from the model and stop the teacher's threads (idempotent: once
        removed, a later wrap()'s projector is never touched by this handle)."""
        if self._removed:
            return
        self._removed = True
        self.capture.remove()
        self.regularizer.close()
        base = unwrap(self.transformer)
        registered = getattr(base, "crepa_projector", None)
        if registered is not None and (registered is self._registered or self.projector is not self._registered):
            del base.crepa_projector


def _is_distributed_wrapper(model: nn.Module) -> bool:
    names = {cls.__name__ for cls in type(model).__mro__}
    return bool(names & {"DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"})


def _check_plan_fits_model(plan: Any, transformer: nn.Module) -> None:
    """A plan's memory figures hold for its own model's width only: say so when it was made for another
    model (a warning, not an error: its tiers and chunk still apply, as the example's --plan-model shows)."""
    planned = getattr(getattr(plan, "model", None), "hidden_size", None)
    if planned is None:
        return
    width = hidden_size_of(transformer)
    if planned != width:
        warnings.warn(f"the plan was made for {plan.model.name} ({planned} wide) but this transformer's blocks are "
                      f"{width} wide: its memory figures do not hold here; plan the checkpoint you train "
                      "(crepa_mem.plan('<its name>', gpu=...)). Its tiers and chunk are applied.",
                      RuntimeWarning, stacklevel=3)


def wrap(transformer: nn.Module, *, vae: nn.Module | None = None, encoder: nn.Module | None = None,
         config: CrepaConfig | Mapping[str, Any] | str | os.PathLike | None = None, plan: Any = None,
         feature_cache: str | os.PathLike | None = None, device: torch.device | str | None = None,
         max_train_steps: int | None = None, tier_policy: Any = None, memory_probe: Any = None) -> Crepa:
    """Attach CREPA to a stock diffusers video transformer (Wan, LTX-Video, Sana-Video, Kandinsky 5).

    plan: a crepa_mem.plan(...) result, or "auto" (tiers chosen at the first teacher step from the memory
    free then). Either way an OOM in the teacher step steps down the planner's ladder (`tier_policy`,
    default crepa_mem.integrations.auto.AutoTiers; `memory_probe` replaces the CUDA reading, for tests)."""
    _check_plan_fits_model(plan, transformer)
    cfg = resolve_config(config, plan, feature_cache)
    if _is_distributed_wrapper(transformer):
        warnings.warn("crepa_mem.integrations.wrap was called on a model already wrapped by DDP/FSDP: the projector it registers "
                      "is not synchronised or sharded by that wrapper. Call wrap() before accelerator.prepare().",
                      RuntimeWarning, stacklevel=2)
    base = unwrap(transformer)
    if getattr(base, "crepa_projector", None) is not None:  # a second hook and projector would fight over it
        raise CrepaMemError(f"wrap() was already called on this {type(base).__name__} (it has a crepa_projector): "
                            f"reuse the Crepa it returned, or call its .remove() before wrapping again")
    device = torch.device(device) if device is not None else training_device(base)
    teacher_block = None
    if cfg.backbone_mode:
        teacher_block = cfg.teacher_block_index if cfg.teacher_block_index is not None else cfg.block_index
    capture = BlockCapture(transformer, cfg.block_index, teacher_block_index=teacher_block)
    try:
        if tier_policy is None:
            from crepa_mem.integrations.auto import AutoTiers, trainable_of

            tier_policy = AutoTiers(trainable=trainable_of(base))
        reg = CrepaRegularizer(cfg, hidden_size_of(transformer), encoder=encoder, vae=vae, device=device,
                               max_train_steps=max_train_steps, tier_policy=tier_policy, memory_probe=memory_probe)
    except BaseException:
        capture.remove()
        raise
    reg.projector.requires_grad_(True)
    base.crepa_projector = reg.projector  # nn.Module.__setattr__ registers it as a submodule
    return Crepa(transformer, reg, capture)
