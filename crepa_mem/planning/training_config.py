"""A trainer's config.json → the inputs of the training-memory model (`plan --config`). No torch.

Reads SimpleTuner 4.10's keys, written plain or CLI-style (`--key`): `model_family` / `model_flavour`
(REFERENCE §2.3), `model_type` (lora · full), `lora_rank`, `base_model_precision`, `optimizer`,
`gradient_checkpointing`, `train_batch_size`, `ramtorch` + `ramtorch_transformer_percent` (+
`ramtorch_target_modules`: only patterns reaching the blocks offload them), and the shape from
`validation_num_video_frames` / `validation_resolution` ("WxH"; the training clips' shape lives in the
dataloader config, which a flag overrides). musubi-tuner's `blocks_to_swap` and a
`group_offload` flag are read too. Defaults are SimpleTuner's: LoRA rank 16, adamw_bf16, no
checkpointing, batch 1, no_change precision.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crepa_mem.errors import CrepaConfigError
from crepa_mem.profiles import ModelProfile, model_from_simpletuner

TRUE = ("1", "true", "yes", "on")


@dataclass
class TrainingInputs:
    model: ModelProfile
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of training.training_bytes (batch, precision, lora_rank, optimizer, …)."""
    path: str = ""


def _flag(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in TRUE


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON object with `--key` spellings normalised to `key`; bad files are bad input."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise CrepaConfigError("--config", str(path), valid="an existing config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrepaConfigError("--config", str(path), valid=f"a JSON object ({e})") from None
    if not isinstance(raw, dict):
        raise CrepaConfigError("--config", str(path), valid="a JSON object of trainer keys")
    return {str(k).lstrip("-"): v for k, v in raw.items()}


def _int(cfg: dict, key: str, default: int | None) -> int | None:
    if cfg.get(key) in (None, ""):
        return default
    try:
        return int(cfg[key])
    except (TypeError, ValueError):
        raise CrepaConfigError(key, cfg[key], valid="an integer") from None


def training_inputs(config: str | Path | dict, profiles_dir=None) -> TrainingInputs:
    """Everything training_bytes needs from a SimpleTuner (or musubi-style) config."""
    cfg = read_config(config) if not isinstance(config, dict) else {str(k).lstrip("-"): v for k, v in config.items()}
    if not cfg.get("model_family"):
        raise CrepaConfigError("model_family", cfg.get("model_family"),
                               valid="wan · ltxvideo · sanavideo · kandinsky5_video (in the config, or pass --model)")
    model = model_from_simpletuner(cfg["model_family"], cfg.get("model_flavour"), profiles_dir)
    frames = _int(cfg, "validation_num_video_frames", None)
    height = width = None
    res = cfg.get("validation_resolution")
    if res:
        try:
            w, h = (int(x) for x in str(res).lower().split(",")[0].split("x"))
            width, height = w, h
        except ValueError:
            raise CrepaConfigError("validation_resolution", res, valid="WIDTHxHEIGHT, e.g. 832x480") from None
    model_type = str(cfg.get("model_type", "lora")).lower()
    if model_type not in ("lora", "full"):
        raise CrepaConfigError("model_type", cfg.get("model_type"), valid="lora · full")
    rank = _int(cfg, "lora_rank", 16) if model_type == "lora" else None
    ramtorch = _flag(cfg.get("ramtorch", False))
    percent = float(cfg.get("ramtorch_transformer_percent") or 100) if ramtorch else 0.0
    targets = str(cfg.get("ramtorch_target_modules") or "")
    if ramtorch and targets and not any(t.strip().startswith(("blocks", "transformer_blocks", "visual_transformer",
                                                               "*")) for t in targets.split(",")):
        percent = 0.0  # patterns that never reach the DiT blocks offload none of their weights
    kwargs = dict(batch=_int(cfg, "train_batch_size", 1), precision=cfg.get("base_model_precision", "no_change"),
                  lora_rank=rank, optimizer=cfg.get("optimizer", "adamw_bf16"),
                  gradient_checkpointing=_flag(cfg.get("gradient_checkpointing", False)),
                  ramtorch_percent=percent, blocks_to_swap=_int(cfg, "blocks_to_swap", 0) or 0,
                  group_offload=_flag(cfg.get("group_offload", cfg.get("enable_group_offload", False))))
    if str(cfg.get("mixed_precision", "bf16")).lower() == "no" and kwargs["precision"] in ("no_change", None):
        kwargs["precision"] = "fp32"
    return TrainingInputs(model=model, frames=frames, height=height, width=width, kwargs=kwargs,
                          path=str(config) if not isinstance(config, dict) else "")
