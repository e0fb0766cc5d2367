"""crepa-mem's options in SimpleTuner's own config parser, and what its unpatched parser refuses (no torch here).

SimpleTuner 4.10 turns config.json into `--key=value` arguments and parses them strictly with an argparse
parser built from its field registry: a key the registry does not know stops the run
("unrecognized arguments"). `register_with_simpletuner` adds crepa-mem's keys to that registry (so the
WebUI and `--help` know them) and, if the parser was already built, to the parser too, with types,
defaults and help taken from CrepaConfig. Names of SimpleTuner's options are facts about its interface,
kept here so `doctor` can judge a config without SimpleTuner installed; the tests check them against
the real 4.10.1 wheel.
"""
from __future__ import annotations

import ast
import inspect
import json
from dataclasses import MISSING, dataclass, fields
from typing import Any, Mapping

from crepa_mem import config as config_module
from crepa_mem.config import AUTO_TIER, ENCODER_DTYPES, TIERS, CrepaConfig

SIMPLETUNER_VERSION = "4.10.1"

SIMPLETUNER_KEYS = frozenset({
    "crepa_adjacent_distance", "crepa_adjacent_tau", "crepa_block_index", "crepa_cutoff_step", "crepa_decay_steps",
    "crepa_drop_vae_encoder", "crepa_enabled", "crepa_encoder", "crepa_encoder_frames_batch_size",
    "crepa_encoder_image_size", "crepa_feature_source", "crepa_lambda", "crepa_lambda_end",
    "crepa_normalize_by_frames", "crepa_normalize_neighbour_sum", "crepa_power", "crepa_scheduler",
    "crepa_self_flow", "crepa_self_flow_mask_ratio", "crepa_similarity_ema_decay", "crepa_similarity_threshold",
    "crepa_spatial_align", "crepa_teacher_block_index", "crepa_threshold_mode", "crepa_use_backbone_features",
    "crepa_use_tae", "crepa_warmup_steps", "irepa_enabled", "irepa_projector_kernel_size", "irepa_spatial_norm_alpha",
})
"""The crepa_*/irepa_* options SimpleTuner 4.10.1's parser registers."""

_CHOICES = {"crepa_mem_encoder_tier": (*TIERS, AUTO_TIER), "crepa_mem_vae_tier": (*TIERS, AUTO_TIER),
            "crepa_mem_encoder_dtype": ENCODER_DTYPES}
_EXTRA_HELP = {  # keys SimpleTuner's class reads but its parser does not register
    "crepa_model": "CREPA encoder name, read before crepa_encoder (SimpleTuner reads it; crepa-mem registers it).",
    "crepa_cumulative_neighbors": "CREPA: use every neighbour offset 1..d instead of exactly d.",
}


@dataclass(frozen=True)
class OptionSpec:
    key: str
    kind: str  # bool, int, float, str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


def _field_docs() -> dict[str, str]:
    """CrepaConfig's attribute docstrings (the one place the options are described)."""
    tree = ast.parse(inspect.getsource(config_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CrepaConfig")
    docs, last = {}, None
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) and last:
            docs[last] = " ".join(str(node.value.value).split())
            last = None
        else:
            last = None
    return docs


def option_specs() -> list[OptionSpec]:
    """Every key crepa-mem reads that SimpleTuner 4.10.1's parser would refuse, as a parser option."""
    docs = _field_docs()
    out = []
    for f in fields(CrepaConfig):
        key = f.metadata.get("key")
        if not key or key in SIMPLETUNER_KEYS:
            continue
        kind = str(f.type).replace(" | None", "")
        help_text = docs.get(f.name) or _EXTRA_HELP.get(key, key)
        out.append(OptionSpec(key, kind, None if f.default is MISSING else f.default, help_text, _CHOICES.get(key)))
    out.append(OptionSpec("crepa_model", "str", None, _EXTRA_HELP["crepa_model"]))
    return out


def refused_by_simpletuner(keys) -> list[str]:
    """crepa_*/irepa_* keys that unpatched SimpleTuner 4.10.1 refuses ("unrecognized arguments")."""
    return sorted(str(k).lstrip("-").replace("-", "_") for k in keys
                  if str(k).lstrip("-").replace("-", "_").startswith(("crepa_", "irepa_"))
                  and str(k).lstrip("-").replace("-", "_") not in SIMPLETUNER_KEYS)


def register_with_simpletuner() -> list[str]:
    """Adds every OptionSpec to SimpleTuner's field registry and, if already built, its cached parser.
    Returns the keys added (none the second time). Needs SimpleTuner importable."""
    from simpletuner.helpers.configuration import cmd_args
    from simpletuner.simpletuner_sdk.server.services.field_registry import types as st_types
    from simpletuner.simpletuner_sdk.server.services.field_registry.registry import field_registry

    parser = getattr(cmd_args, "_ARG_PARSER_CACHE", None)
    known = {a.dest for a in parser._actions} if parser is not None else set()
    added = []
    for spec in option_specs():
        field = field_registry.get_field(spec.key) or _config_field(st_types, spec)
        if field_registry.get_field(spec.key) is None:
            field_registry._add_field(field)
            added.append(spec.key)
        if parser is not None and spec.key not in known:
            cmd_args._add_argument_from_field(parser, field)
    return added


def _config_field(t, spec: OptionSpec):
    kind = {"bool": t.FieldType.CHECKBOX, "int": t.FieldType.NUMBER, "float": t.FieldType.NUMBER}.get(spec.kind)
    if spec.choices:
        kind = t.FieldType.SELECT
    parser_type = {"int": t.ParserType.INTEGER, "float": t.ParserType.FLOAT}.get(spec.kind)
    deps = [] if spec.key == "crepa_model" else [t.FieldDependency(field="crepa_enabled", operator="equals", value=True)]
    return t.ConfigField(
        name=spec.key, arg_name=f"--{spec.key}", ui_label="CREPA: " + spec.key.removeprefix("crepa_").replace("_", " "),
        field_type=kind or t.FieldType.TEXT, tab="training", section="loss_functions", default_value=spec.default,
        choices=[{"value": c, "label": c} for c in spec.choices] if spec.choices else None, dependencies=deps,
        help_text=f"{spec.help} [crepa-mem]", importance=t.ImportanceLevel.EXPERIMENTAL, parser_type=parser_type,
        order=30)


# ---------------------------------------------------------------------------- config.json edits

def merge_config(existing: Mapping[str, Any], planned: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`planned` merged into `existing`: other keys untouched, a planned None removes the key, a student
    block already in the file stays (it is the user's choice, not a memory setting). Returns the merged
    mapping and one line per change."""
    merged = dict(existing)
    changes = []
    for key, value in planned.items():
        if key == "crepa_block_index" and existing.get(key) is not None:
            continue
        if value is None:
            if key in merged:
                changes.append(f"removed {key} (was {json.dumps(merged.pop(key))})")
            continue
        if key not in existing:
            changes.append(f"added {key}={json.dumps(value)}")
        elif existing[key] != value:
            changes.append(f"changed {key}: {json.dumps(existing[key])} → {json.dumps(value)}")
        merged[key] = value
    return merged, changes


# ---------------------------------------------------------------------------- modes only SimpleTuner implements

SIMPLETUNER_OWN_CHECKS = frozenset({"crepa_block_index", "crepa_adjacent_distance", "crepa_adjacent_tau",
                                    "crepa_feature_source"})
"""Keys whose bad values SimpleTuner's own class refuses too: crepa-mem raises for them as well."""


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "on", "y")


def handover_reason(raw: Mapping[str, Any]) -> str | None:
    """The option (as `key=value`) of a config SimpleTuner 4.10.1 runs and crepa-mem does not implement, or
    None. `raw` holds SimpleTuner's option values (its parsed namespace as a mapping)."""
    for key in ("irepa_enabled", "crepa_use_tae", "crepa_self_flow"):
        if _truthy(raw.get(key)):
            return f"{key}=true"
    source = str(raw.get("crepa_feature_source") or "").strip().lower()
    if source in ("self_flow", "selfflow"):
        return f"crepa_feature_source={source}"
    encoder = str(raw.get("crepa_model") or raw.get("crepa_encoder") or "").lower()
    if "qwen" in encoder and "vl" in encoder:  # SimpleTuner's own test for a Qwen-VL encoder
        return f"crepa_encoder={raw.get('crepa_model') or raw.get('crepa_encoder')} (a Qwen-VL encoder)"
    return None
