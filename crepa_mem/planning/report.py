"""Plans (and device / profile listings) as plain dicts with stable keys: what `--json` prints.

Bytes stay raw integers in keys ending in `_bytes`; formatting happens only in cli/_output.py.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from crepa_mem.planning.devices import DeviceInfo
    from crepa_mem.planning.planner import Plan
    from crepa_mem.profiles import EncoderProfile, GpuProfile, ModelProfile


def gpu_to_dict(d: "DeviceInfo") -> dict[str, Any]:
    return d.to_dict()


def model_to_dict(m: "ModelProfile") -> dict[str, Any]:
    v = m.vae
    return {
        "name": m.name, "family": m.family, "hub_id": m.hub_id, "diffusers_class": m.diffusers_class,
        "blocks_attr": m.blocks_attr, "num_blocks": m.num_blocks, "hidden_size": m.hidden_size,
        "patch_size": list(m.patch_size), "params": m.params, "recommended_block": m.recommended_block,
        "default_shape": {"frames": m.default_frames, "height": m.default_height, "width": m.default_width},
        "vae": {"name": v.name, "diffusers_class": v.diffusers_class, "latent_channels": v.latent_channels,
                "temporal_compression": v.temporal_compression, "spatial_compression": v.spatial_compression,
                "params_encoder": v.params_encoder, "params_decoder": v.params_decoder},
        "aliases": list(m.aliases), "simpletuner_flavours": list(m.simpletuner_flavours),
    }


def encoder_to_dict(e: "EncoderProfile") -> dict[str, Any]:
    d = asdict(e)
    d["aliases"] = list(e.aliases)
    return d


def gpu_profile_to_dict(g: "GpuProfile") -> dict[str, Any]:
    d = asdict(g)
    d["aliases"] = list(g.aliases)
    return d


def plan_to_dict(plan: "Plan") -> dict[str, Any]:
    """The `crepa-mem plan --json` document (keys fixed by issue 4, extras after them)."""
    e = plan.estimate.to_dict()
    return {
        "gpu": gpu_to_dict(plan.gpu),
        "model": model_to_dict(plan.model),
        "fits": plan.fits,
        "settings": dict(plan.settings),
        "tiers": dict(plan.tiers),
        "estimate": {"total_bytes": e["total_bytes"], "components": e["components"],
                     "peak_phase": e["peak_phase"], "phases": e["phases"]},
        "reasons": list(plan.reasons),
        "shape": dict(plan.shape),
        "budget": dict(plan.budget),
        "costs": [dict(c) for c in plan.costs],
        "step_overhead_s": plan.step_overhead_s,
        "quality_level": plan.quality_level,
        "teacher_gpu": gpu_to_dict(plan.teacher_gpu) if plan.teacher_gpu else None,
        "host": dict(plan.host),  # this node's RAM, ulimit -l, local ranks, and the plan's host bytes
        "training": plan.training.to_dict() if plan.training else None,
        "fastest": dict(plan.fastest) if plan.fastest else None,
        "cache_build_command": plan.cache_build_command,
    }
