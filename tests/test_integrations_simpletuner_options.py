"""crepa-mem's options in SimpleTuner 4.10.1's own config parser: the real parser, read from its wheel."""
from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest

from crepa_mem.config import CrepaConfig
from crepa_mem.integrations.simpletuner_options import (SIMPLETUNER_KEYS, handover_reason, merge_config,
                                                        option_specs, refused_by_simpletuner)

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"
WAN = FIXTURES / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json"


@pytest.fixture
def st(monkeypatch):
    """The real SimpleTuner, with a field registry and parser of this test's own (patching edits them)."""
    import simpletuner_real

    simpletuner_real.simpletuner()
    from simpletuner.helpers.configuration import cmd_args
    from simpletuner.simpletuner_sdk.server.services import field_registry as package
    from simpletuner.simpletuner_sdk.server.services.field_registry import registry

    fresh = registry.FieldRegistry()
    monkeypatch.setattr(registry, "field_registry", fresh)
    monkeypatch.setattr(package, "field_registry", fresh)
    monkeypatch.setattr(cmd_args, "_ARG_PARSER_CACHE", None)
    return cmd_args


def _keys_crepa_mem_reads() -> set[str]:
    return {f.metadata["key"] for f in fields(CrepaConfig) if f.metadata.get("key")} | {"crepa_model"}


def test_every_key_crepa_mem_reads_is_simpletuners_or_registered_by_the_patch():
    registered = {s.key for s in option_specs()}
    assert _keys_crepa_mem_reads() <= SIMPLETUNER_KEYS | registered
    assert not registered & SIMPLETUNER_KEYS
    assert {"crepa_cumulative_neighbors", "crepa_model", "crepa_mem_encoder_tier"} <= registered
    assert all(s.help and s.kind in ("bool", "int", "float", "str") for s in option_specs())


def test_the_names_match_simpletuner_4_10_1s_registry(st):
    from simpletuner.simpletuner_sdk.server.services.field_registry import registry

    theirs = {n for n in registry.field_registry._fields if n.startswith(("crepa_", "irepa_"))}
    assert theirs == SIMPLETUNER_KEYS


REQUIRED = ["--model_family=wan", "--model_type=lora", "--optimizer=adamw_bf16", "--output_dir=out",
            "--data_backend_config=backends.json"]


def test_unpatched_simpletuner_refuses_crepa_mem_keys_and_the_patched_one_parses_them(st, capsys):
    import crepa_mem.integrations.simpletuner as drop_in

    args = ["--crepa_mem_encoder_tier=stream", "--crepa_cumulative_neighbors", "--crepa_model=dinov2_vits14", *REQUIRED]
    with pytest.raises(SystemExit):
        st.get_argument_parser().parse_args(args)
    assert "unrecognized arguments: --crepa_mem_encoder_tier=stream --crepa_cumulative_neighbors" in capsys.readouterr().err
    assert refused_by_simpletuner([a.split("=")[0] for a in args]) == sorted(
        ["crepa_cumulative_neighbors", "crepa_mem_encoder_tier", "crepa_model"])
    drop_in.patch_simpletuner()  # the parser is built already: the patch adds to it as well
    ns = st.get_argument_parser().parse_args([*args, "--crepa_mem_vae_tile_size=256", "--crepa_mem_vae_tiling=false"])
    assert (ns.crepa_mem_encoder_tier, ns.crepa_cumulative_neighbors, ns.crepa_model) == ("stream", True, "dinov2_vits14")
    assert (ns.crepa_mem_vae_tile_size, ns.crepa_mem_vae_tiling, ns.crepa_mem_vae_tier) == (256, False, "gpu")
    from simpletuner.simpletuner_sdk.server.services.field_registry import registry

    field = registry.field_registry.get_field("crepa_mem_encoder_tier")
    assert field.tab == "training" and "[crepa-mem]" in field.help_text  # the WebUI lists it


def test_a_wan_lora_config_with_plan_write_merged_in_passes_simpletuners_parser(st, tmp_path, monkeypatch, capsys):
    """The issue's end-to-end: SimpleTuner's Wan LoRA config.json, `crepa-mem plan --write` merged into it,
    SimpleTuner's own load_json_config → parse_cmdline_args after patching, then the drop-in with the tiers."""
    from accelerate import Accelerator
    from typer.testing import CliRunner

    from crepa_mem.cli.app import app
    from crepa_mem.integrations.simpletuner import CrepaRegularizer, patch_simpletuner
    from crepa_mem.testing import tiny_dinov2, tiny_transformer

    config = tmp_path / "config.json"
    shutil.copy(WAN, config)
    before = json.loads(config.read_text())
    r = CliRunner().invoke(app, ["plan", "--model", "wan-2.1-1.3b", "--gpu", "8GB", "--train-gib", "5", "--no-feature-cache",
                                 "--host-ram", "64GiB", "--write", str(config), "--json"])
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    merged = json.loads(config.read_text())
    assert {k: v for k, v in merged.items() if k not in settings} == {k: v for k, v in before.items()
                                                                      if k not in settings}
    assert "merged into" in r.stderr and "need the patched SimpleTuner" in r.stderr
    (tmp_path / "backends.json").write_text("[]")
    merged["data_backend_config"] = str(tmp_path / "backends.json")
    merged["output_dir"] = str(tmp_path / "out")
    merged["ramtorch"] = False  # SimpleTuner's own check: ramtorch needs a CUDA device, this machine has none
    config.write_text(json.dumps(merged))
    monkeypatch.setenv("CONFIG_PATH", str(config))
    from simpletuner.helpers.configuration import json_file

    cli_args = json_file.load_json_config()
    with pytest.raises(SystemExit):  # unpatched: what a user of the README's old snippet saw
        st.parse_cmdline_args(cli_args, exit_on_error=True)
    refused = capsys.readouterr().err.split("unrecognized arguments:")[-1].split()
    assert refused and all(a.startswith("--crepa_mem_") for a in refused)  # crepa-mem's keys, nothing else
    st._ARG_PARSER_CACHE = None
    patch_simpletuner()
    ns = st.parse_cmdline_args(json_file.load_json_config(), exit_on_error=True)
    assert ns.model_family == "wan" and ns.crepa_enabled is True
    reg = CrepaRegularizer(ns, Accelerator(cpu=True), 32, encoder=tiny_dinov2(), max_train_steps=ns.max_train_steps)
    planned = {k: v for k, v in settings.items() if v is not None and k != "crepa_block_index"}
    assert {k: reg.crepa_config.to_dict()[k] for k in planned} == planned
    reg.attach_to_model(tiny_transformer("wan"))
    assert reg._regularizer.teacher.encoder.tier == settings["crepa_mem_encoder_tier"]


def test_merge_keeps_every_other_key_and_says_what_changed():
    existing = {"learning_rate": 1e-4, "crepa_block_index": 10, "crepa_mem_vae_tier": "gpu",
                "crepa_mem_teacher_device": "cuda:1", "crepa_lambda": 0.3}
    planned = {"crepa_block_index": 8, "crepa_mem_vae_tier": "swap", "crepa_mem_teacher_device": None,
               "crepa_mem_encoder_tier": "swap", "crepa_lambda": 0.3}
    merged, changes = merge_config(existing, planned)
    assert merged == {"learning_rate": 1e-4, "crepa_block_index": 10, "crepa_mem_vae_tier": "swap",
                      "crepa_lambda": 0.3, "crepa_mem_encoder_tier": "swap"}
    assert changes == ['changed crepa_mem_vae_tier: "gpu" → "swap"', 'removed crepa_mem_teacher_device (was "cuda:1")',
                       'added crepa_mem_encoder_tier="swap"']


def test_plan_write_into_a_new_file_writes_just_the_keys(tmp_path):
    from typer.testing import CliRunner

    from crepa_mem.cli.app import app

    out = tmp_path / "new.json"
    r = CliRunner().invoke(app, ["plan", "--model", "wan", "--gpu", "24GB", "--write", str(out), "--json"])
    assert r.exit_code in (0, 3), r.output
    settings = json.loads(r.stdout)["settings"]
    assert json.loads(out.read_text()) == {k: v for k, v in settings.items() if v is not None}
    (tmp_path / "bad.json").write_text("[1, 2]")
    r = CliRunner().invoke(app, ["plan", "--model", "wan", "--gpu", "24GB", "--write", str(tmp_path / "bad.json")])
    assert r.exit_code == 2 and "not a JSON object" in r.stderr and (tmp_path / "bad.json").read_text() == "[1, 2]"


@pytest.mark.parametrize("raw, reason", [
    ({"irepa_enabled": True}, "irepa_enabled=true"),
    ({"crepa_use_tae": "true"}, "crepa_use_tae=true"),
    ({"crepa_feature_source": "self_flow"}, "crepa_feature_source=self_flow"),
    ({"crepa_self_flow": True}, "crepa_self_flow=true"),
    ({"crepa_encoder": "qwen3_vl"}, "crepa_encoder=qwen3_vl (a Qwen-VL encoder)"),
    ({"crepa_encoder": "dinov2_vitg14", "crepa_feature_source": "backbone"}, None),
])
def test_handover_reasons(raw, reason):
    assert handover_reason(raw) == reason
