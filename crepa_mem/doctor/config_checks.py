"""Config checks: a SimpleTuner config.json (or crepa-mem's own) against REFERENCE §1.1's ranges, the
model's block count and VAE compression, the encoder catalog and the local weight caches.

Each crepa_* key is validated on its own, so three bad keys give three findings; cross-key rules
(CrepaConfig's full validation) run once every key is fine on its own. Nothing here downloads.
"""
from __future__ import annotations

import os
import re
from dataclasses import MISSING, fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from crepa_mem.config import CrepaConfig, canonical_encoder_name
from crepa_mem.doctor.findings import SUPPORTED_FAMILIES, Context, Finding
from crepa_mem.errors import CrepaConfigError, ProfileNotFoundError
from crepa_mem.integrations.simpletuner_options import SIMPLETUNER_VERSION, option_specs, refused_by_simpletuner

_FIELDS = {f.metadata["key"]: f for f in fields(CrepaConfig) if f.metadata.get("key")}
_KNOWN_KEYS = sorted([*_FIELDS, "crepa_model"])


def _default(key: str) -> Any:
    f = _FIELDS.get(key)
    return None if f is None or f.default is MISSING else f.default


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "on")


def _int(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        return None


# ---------------------------------------------------------------------------- option ranges

def _option_findings(cfg: dict[str, Any]) -> list[Finding]:
    crepa = {k: v for k, v in cfg.items() if k.startswith("crepa_")}
    out: list[Finding] = []
    bad: set[str] = set()
    for key, value in crepa.items():
        if key not in _FIELDS and key != "crepa_model":
            continue
        probe = {key: value}
        if key != "crepa_mem_feature_cache":  # the cache-dir rule is cross-key: judged below
            probe["crepa_mem_feature_cache"] = "."
        if key in ("crepa_mem_encoder_tier", "crepa_mem_vae_tier") and value == "cache":
            probe.update(crepa_mem_encoder_tier="cache", crepa_mem_vae_tier="cache")  # pairing: judged below
        try:
            CrepaConfig.from_dict(probe, warn_unknown=False)
        except CrepaConfigError as e:
            bad.add(key)
            out.append(_invalid(e))
    if not bad:
        try:
            parsed = CrepaConfig.from_dict(crepa, warn_unknown=False)  # doctor reports them itself
        except CrepaConfigError as e:
            out.append(_invalid(e))
        else:
            for key in parsed.ignored_keys:
                close = get_close_matches(key, _KNOWN_KEYS, n=1, cutoff=0.75)
                out.append(Finding(
                    "unknown_option", "warning",
                    f"{key} is not a CREPA option; crepa-mem ignores it.",
                    f'Rename it to "{close[0]}".' if close else "Remove it (see REFERENCE §1.1 for the options).",
                    {"key": key, "suggestion": close[0] if close else None}))
    return out


def _invalid(e: CrepaConfigError) -> Finding:
    default = _default(e.key)
    hint = f" ({e.hint})" if e.hint else ""
    return Finding(
        "invalid_option", "error",
        f"{e.key}={e.value!r} is outside its range: valid is {e.valid}{hint}.",
        f'Set "{e.key}" to {e.valid}' + (f" (default {default!r})." if default is not None else "."),
        {"key": e.key, "value": e.value, "valid": e.valid})


# ---------------------------------------------------------------------------- model-dependent checks

def _block_findings(cfg: dict[str, Any], ctx: Context, backbone: bool) -> list[Finding]:
    m = ctx.model
    out: list[Finding] = []
    student = _int(cfg.get("crepa_block_index", _default("crepa_block_index")))
    if m is not None and student is not None and student >= m.num_blocks:
        out.append(Finding(
            "block_index_out_of_range", "error",
            f"crepa_block_index={student} but {m.name} has {m.num_blocks} blocks (valid 0–{m.num_blocks - 1}); "
            "SimpleTuner fails with \"hidden states not returned\".",
            f'Set "crepa_block_index": {m.recommended_block} (the {m.family} recommendation; zero-based).',
            {"key": "crepa_block_index", "value": student, "valid_range": [0, m.num_blocks - 1],
             "recommended_block": m.recommended_block, "model": m.name}))
    if not backbone:
        return out
    teacher = _int(cfg.get("crepa_teacher_block_index"))
    deeper = min((student or 0) + 8, m.num_blocks - 1) if m else (student or 0) + 8
    if teacher is None:
        out.append(Finding(
            "backbone_teacher_missing", "warning",
            "Backbone mode is on but crepa_teacher_block_index is not set: the teacher defaults to the student "
            f"block ({student}), so the block is aligned to a detached copy of itself.",
            f'Set "crepa_teacher_block_index" to a deeper block, e.g. {deeper}'
            + (f" (valid {(student or -1) + 1}–{m.num_blocks - 1} for {m.name})." if m else "."),
            {"key": "crepa_teacher_block_index", "value": None, "student": student}))
    elif m is not None and teacher >= m.num_blocks:
        out.append(Finding(
            "backbone_teacher_missing", "error",
            f"crepa_teacher_block_index={teacher} but {m.name} has {m.num_blocks} blocks: the teacher block "
            "does not exist.",
            f'Set "crepa_teacher_block_index" to {deeper} (valid 0–{m.num_blocks - 1}, deeper than the student '
            f'{student}).',
            {"key": "crepa_teacher_block_index", "value": teacher, "valid_range": [0, m.num_blocks - 1]}))
    elif student is not None and teacher <= student:
        out.append(Finding(
            "backbone_teacher_not_deeper", "warning",
            f"The teacher block ({teacher}) is not deeper than the student block ({student}); backbone CREPA "
            "aligns a block to a later, more semantic one.",
            f'Set "crepa_teacher_block_index" above {student}, e.g. {deeper}.',
            {"student": student, "teacher": teacher}))
    return out


def _aligned_frames(n: int, tc: int) -> str:
    k = max(0, (n - 1) // tc)
    return ", ".join(str(1 + j * tc) for j in sorted({k, k + 1}) if 1 + j * tc > 0)


def _shape_findings(cfg: dict[str, Any], ctx: Context) -> list[Finding]:
    m = ctx.model
    if m is None:
        return []
    out: list[Finding] = []
    tc = m.vae.temporal_compression
    validation = _int(cfg.get("validation_num_video_frames"))
    for key, value in (("--frames", ctx.frames), ("validation_num_video_frames", validation)):
        if value is not None and (value < 1 or (value - 1) % tc):
            out.append(Finding(
                "frames_not_aligned", "warning",
                f"{key}={value} is not 1 + k×{tc}: {m.name}'s VAE compresses time by {tc}, so the last "
                f"{(value - 1) % tc} frame(s) are dropped or padded and latent/pixel frames no longer line up.",
                f"Use {_aligned_frames(value, tc)} frames.", {"key": key, "value": value, "temporal_compression": tc}))
    grid = m.vae.spatial_compression * m.patch_size[1]
    sizes: list[tuple[str, int]] = [("--height", ctx.height), ("--width", ctx.width)]
    for part in str(cfg.get("validation_resolution") or "").split(","):
        if mm := re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", part):
            sizes += [("validation_resolution width", int(mm[1])), ("validation_resolution height", int(mm[2]))]
    for key, value in sizes:
        if value is not None and value % grid:
            near = sorted({max(grid, value // grid * grid), (value // grid + 1) * grid})
            out.append(Finding(
                "resolution_not_aligned", "warning",
                f"{key}={value} is not a multiple of {grid} ({m.name}: VAE {m.vae.spatial_compression}× × patch "
                f"{m.patch_size[1]}); the DiT's token grid is cropped and CREPA's spatial alignment shifts.",
                f"Use {' or '.join(map(str, near))}.", {"key": key, "value": value, "multiple": grid}))
    return out


# ---------------------------------------------------------------------------- encoder

def hf_hub_cache() -> Path:
    """The Hugging Face hub cache this process would use (read from the environment at call time)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def torch_hub_dir() -> Path:
    env = os.environ
    home = env.get("TORCH_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return any(_truthy(os.environ.get(v, "")) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_encoder_files(hub_id: str, cache: Path) -> dict[str, str | None]:
    """{file: path in the cache or None} for the files `from_pretrained` needs (offline lookup)."""
    from huggingface_hub import try_to_load_from_cache

    def find(name: str) -> str | None:
        hit = try_to_load_from_cache(hub_id, name, cache_dir=str(cache))
        return hit if isinstance(hit, str) else None

    weights = find("model.safetensors") or find("pytorch_model.bin")
    return {"config.json": find("config.json"), "model.safetensors": weights}


def _encoder_findings(cfg: dict[str, Any], ctx: Context, enabled: bool, backbone: bool) -> list[Finding]:
    if backbone:
        return []
    raw = cfg.get("crepa_model") or cfg.get("crepa_encoder") or _default("crepa_encoder")
    name = canonical_encoder_name(str(raw))
    local = cfg.get("crepa_mem_encoder_path")
    if Path(name).expanduser().is_dir():
        local = local or name
    out: list[Finding] = []
    from crepa_mem.profiles import get_encoder
    try:
        enc = get_encoder(name)
    except ProfileNotFoundError as e:
        if local:
            return []
        return [Finding("unknown_encoder", "error", f"crepa_encoder={raw!r} is not a known DINOv2 encoder: {e}.",
                        'Set "crepa_encoder" to dinov2_vits14, dinov2_vitb14, dinov2_vitl14 or dinov2_vitg14 '
                        "(or a _reg variant, or a local directory).", {"key": "crepa_encoder", "value": raw})]
    size = _int(cfg.get("crepa_encoder_image_size"))
    if size is not None and size >= 64 and size % enc.patch_size:
        near = sorted({size // enc.patch_size * enc.patch_size, (size // enc.patch_size + 1) * enc.patch_size})
        out.append(Finding(
            "image_size_not_multiple_of_patch", "warning",
            f"crepa_encoder_image_size={size} is not a multiple of {enc.name}'s patch size {enc.patch_size}: "
            f"the last {size % enc.patch_size} pixel rows and columns fall outside every patch.",
            f'Set "crepa_encoder_image_size": {" or ".join(map(str, near))}.',
            {"key": "crepa_encoder_image_size", "value": size, "patch_size": enc.patch_size}))
    tiers = (cfg.get("crepa_mem_encoder_tier"), cfg.get("crepa_mem_vae_tier"))  # any JSON value, lists too
    if not enabled or "cache" in tiers:
        return out
    if local:
        p = Path(str(local)).expanduser()
        have = {n: (p / n).is_file() for n in ("config.json", "model.safetensors")}
        have["model.safetensors"] = have["model.safetensors"] or (p / "pytorch_model.bin").is_file()
        if not all(have.values()):
            missing = [n for n, ok in have.items() if not ok]
            out.append(Finding("encoder_weights_missing", "error",
                               f"crepa_mem_encoder_path {p} lacks {', '.join(missing)}.",
                               f"Save the encoder there with Dinov2Model.from_pretrained('{enc.hub_id}')"
                               f".save_pretrained('{p}') on a machine that has it.",
                               {"path": str(p), "missing": missing}))
        return out
    cache = hf_hub_cache()
    files = cached_encoder_files(enc.hub_id, cache)
    pth = torch_hub_dir() / "checkpoints" / f"{enc.name.replace('_reg', '_reg4')}_pretrain.pth"
    if all(files.values()) or pth.is_file():
        return out
    missing = [n for n, path in files.items() if path is None]
    where = cache / ("models--" + enc.hub_id.replace("/", "--"))
    offline = _offline()
    out.append(Finding(
        "encoder_weights_missing", "error" if offline else "warning",
        f"{enc.name}'s weights are not cached: {', '.join(missing)} of {enc.hub_id} would be at {where} "
        f"(crepa-mem / transformers), or {pth} (SimpleTuner's torch.hub)"
        + (", and the hub is switched off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE)." if offline
           else f"; they will be downloaded ({enc.params * 4 / 1e9:.1f} GB fp32) on first use, which fails offline."),
        f"On a machine with internet: `hf download {enc.hub_id}` (HF_HOME={cache.parent}), then copy the cache over; "
        'or set "crepa_mem_encoder_path" to a directory holding config.json and model.safetensors.',
        {"encoder": enc.name, "hub_id": enc.hub_id, "missing": missing, "hf_cache": str(where),
         "torch_hub_checkpoint": str(pth), "offline": offline}))
    return out


# ---------------------------------------------------------------------------- entry point

def check_config(ctx: Context) -> list[Finding]:
    """Every config finding for the context's config (and --frames/--height/--width)."""
    cfg = ctx.config
    has_crepa = any(k.startswith("crepa_") for k in cfg)
    enabled = _truthy(cfg.get("crepa_enabled", False)) or (has_crepa and "model_family" not in cfg
                                                           and "crepa_enabled" not in cfg)  # crepa-mem's own file
    backbone = _truthy(cfg.get("crepa_use_backbone_features")) or str(cfg.get("crepa_feature_source")) == "backbone"
    out: list[Finding] = []
    if ctx.model_family and ctx.model_family not in SUPPORTED_FAMILIES and enabled:
        out.append(Finding(
            "unsupported_family", "error",
            f"model_family={ctx.model_family!r} has no CREPA hooks in SimpleTuner: its transformer never returns "
            "hidden states, so CREPA fails or silently does nothing.",
            f"Train one of {', '.join(SUPPORTED_FAMILIES)}, or set \"crepa_enabled\": false.",
            {"model_family": ctx.model_family, "supported": list(SUPPORTED_FAMILIES)}))
    if ctx.model is None and ctx.model_note:
        out.append(Finding("model_unknown", "warning", f"The model is not in crepa-mem's catalog: {ctx.model_note}.",
                           "Pass --model (e.g. --model wan-2.1-14b) to check block indices and shapes.",
                           {"model_family": ctx.model_family}))
    out += _option_findings(cfg)
    out += _block_findings(cfg, ctx, backbone)
    out += _shape_findings(cfg, ctx)
    if has_crepa:
        out += _encoder_findings(cfg, ctx, enabled, backbone)
    if has_crepa and not enabled:
        explicit = "crepa_enabled" in cfg
        out = [Finding(f.code, "warning" if f.severity == "error" else f.severity, f.message, f.fix, f.details)
               for f in out]  # nothing fails while CREPA is off
        out.append(Finding(
            "crepa_disabled", "info" if explicit else "warning",
            "CREPA is off: " + ("crepa_enabled is false" if explicit
                                else "the config sets crepa_* options but not crepa_enabled"),
            'Set "crepa_enabled": true to train with CREPA.', {"explicit": explicit}))
    if "model_family" in cfg:  # a SimpleTuner config.json: its strict parser stops on a key it does not know
        out += _refused_findings(cfg)
    return out


def _refused_findings(cfg: dict[str, Any]) -> list[Finding]:
    patched = {s.key for s in option_specs()}
    out = []
    for key in refused_by_simpletuner(cfg):
        fix = ("Start SimpleTuner through `python -m crepa_mem.simpletuner` (it registers this option with "
               "SimpleTuner's parser)." if key in patched else f'Remove "{key}" (SimpleTuner knows no such option).')
        out.append(Finding(
            "simpletuner_refuses_option", "error",
            f"SimpleTuner {SIMPLETUNER_VERSION}'s config parser does not know {key}: it stops with "
            f"\"unrecognized arguments: --{key}=…\" before training.", fix,
            {"key": key, "value": cfg[key], "registered_by_patch": key in patched}))
    return out
