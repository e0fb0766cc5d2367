"""Config checks: the fixture configs, ranges key by key, block/teacher indices, shapes, encoder caches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import prime_hf_cache

from crepa_mem.doctor.diagnose import Context, _resolve_model, read_config
from crepa_mem.doctor.config_checks import cached_encoder_files, check_config, hf_hub_cache, torch_hub_dir
from crepa_mem.profiles import get_model

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
SIMPLETUNER = Path(__file__).parent / "fixtures" / "simpletuner"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["configs"]
def _check(cfg: dict, model: str | None = None, **ctx) -> list:
    profile, family, note = _resolve_model(model, cfg)
    return check_config(Context(model=profile, model_family=family, model_note=note, config=cfg, **ctx))


def _codes(findings) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in findings:
        out.setdefault(f.code, set()).add(f.severity)
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_configs(name, primed):
    want = EXPECTED[name]
    findings = _check(read_config(FIXTURES / name))
    assert _codes(findings) == {c: {s} for c, s in want["codes"].items()}
    for code, n in want.get("count", {}).items():
        assert sum(f.code == code for f in findings) == n


@pytest.mark.parametrize("path", sorted(SIMPLETUNER.glob("*.json")), ids=lambda p: p.name)
def test_real_simpletuner_configs_are_clean(path, primed):
    assert _check(read_config(path)) == []


def test_each_bad_key_is_its_own_finding(primed):
    findings = _check(read_config(FIXTURES / "config_bad_options.json"))
    by_key = {f.details["key"]: f for f in findings}
    assert set(by_key) == {"crepa_lambda", "crepa_adjacent_tau", "crepa_similarity_threshold", "crepa_scheduler",
                           "crepa_warmup_steps"}
    assert by_key["crepa_lambda"].details["value"] == -1.0
    assert by_key["crepa_lambda"].details["valid"] == "a number ≥ 0"
    assert "crepa_lambda" in by_key["crepa_lambda"].message and "≥ 0" in by_key["crepa_lambda"].message
    assert "default 0.5" in by_key["crepa_lambda"].fix


def test_cross_key_rule_after_single_keys_pass(primed):
    findings = _check({"crepa_enabled": True, "crepa_block_index": None})
    (f,) = [f for f in findings if f.code == "invalid_option"]
    assert f.details["key"] == "crepa_block_index" and "must be set" in f.message
    findings = _check({"crepa_enabled": True, "crepa_mem_encoder_tier": "cache", "crepa_mem_vae_tier": "cache"})
    assert [f.details["key"] for f in findings if f.code == "invalid_option"] == ["crepa_mem_feature_cache"]


def test_wrong_types_are_invalid_options(primed):
    findings = _check({"crepa_enabled": True, "crepa_lambda": "lots", "crepa_spatial_align": "maybe"})
    assert sorted(f.details["key"] for f in findings if f.code == "invalid_option") == ["crepa_lambda",
                                                                                         "crepa_spatial_align"]


def test_block_index_against_each_family(primed):
    for family, flavour, blocks, recommended in [("wan", "t2v-480p-14b-2.1", 40, 8), ("ltxvideo", "0.9.5", 28, 8),
                                                 ("sanavideo", "2b-480p", 20, 10),
                                                 ("kandinsky5_video", "t2v-pro-sft-5s-hd", 60, 8)]:
        cfg = {"model_family": family, "model_flavour": flavour, "crepa_enabled": True, "crepa_block_index": blocks,
               "crepa_encoder": "dinov2_vits14", "crepa_encoder_image_size": 224}
        (f,) = _check(cfg)
        assert f.code == "block_index_out_of_range" and f.severity == "error"
        assert f.details["valid_range"] == [0, blocks - 1]
        assert f'"crepa_block_index": {recommended}' in f.fix
        assert _check({**cfg, "crepa_block_index": blocks - 1}) == []


def test_model_flag_overrides_the_config(primed):
    cfg = {"model_family": "wan", "crepa_enabled": True, "crepa_block_index": 35}
    assert [f.code for f in _check(cfg)] == ["block_index_out_of_range"]  # default checkpoint: 1.3B, 30 blocks
    assert _check(cfg, model="wan-2.1-14b") == []


def test_unknown_flavour_is_a_warning_not_a_crash(primed):
    findings = _check({"model_family": "wan", "model_flavour": "t2v-99b", "crepa_enabled": True})
    assert [(f.code, f.severity) for f in findings] == [("model_unknown", "warning")]


def test_backbone_teacher_not_deeper(primed):
    cfg = {"model_family": "wan", "crepa_enabled": True, "crepa_block_index": 12, "crepa_feature_source": "backbone",
           "crepa_teacher_block_index": 4}
    assert [f.code for f in _check(cfg)] == ["backbone_teacher_not_deeper"]


def test_frames_flag_and_validation_frames(primed):
    m = get_model("wan-2.1-1.3b")
    findings = check_config(Context(model=m, frames=80, config={}))
    (f,) = findings
    assert f.code == "frames_not_aligned" and f.details["key"] == "--frames" and "77, 81" in f.fix
    assert check_config(Context(model=m, frames=81, height=480, width=832, config={})) == []
    (f,) = check_config(Context(model=m, height=484, config={}))
    assert f.code == "resolution_not_aligned" and "480 or 496" in f.fix


def test_encoder_missing_online_is_warning_offline_is_error(caches, monkeypatch):
    cfg = read_config(SIMPLETUNER / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json")
    (f,) = _check(cfg)
    assert (f.code, f.severity) == ("encoder_weights_missing", "warning")
    assert f.details["missing"] == ["config.json", "model.safetensors"]
    assert f.details["hf_cache"] == str(caches / "hf" / "hub" / "models--facebook--dinov2-giant")
    assert str(caches / "hf" / "hub") in f.message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (f,) = _check(cfg)
    assert (f.code, f.severity) == ("encoder_weights_missing", "error")


def test_encoder_half_cached_names_the_missing_file(caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prime_hf_cache(hf_hub_cache(), "facebook/dinov2-giant", files=("config.json",))
    (f,) = _check(read_config(SIMPLETUNER / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json"))
    assert f.details["missing"] == ["model.safetensors"]
    files = cached_encoder_files("facebook/dinov2-giant", hf_hub_cache())
    assert files["config.json"].endswith("config.json") and files["model.safetensors"] is None


def test_torch_hub_checkpoint_counts_as_cached(caches):
    ckpt = torch_hub_dir() / "checkpoints" / "dinov2_vitg14_pretrain.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert _check(read_config(SIMPLETUNER / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json")) == []


def test_local_encoder_path(caches, tmp_path):
    local = tmp_path / "dinov2-small"
    local.mkdir()
    cfg = {"crepa_enabled": True, "crepa_encoder": "dinov2_vits14", "crepa_mem_encoder_path": str(local)}
    (f,) = _check(cfg)
    assert f.code == "encoder_weights_missing" and f.details["missing"] == ["config.json", "model.safetensors"]
    (local / "config.json").write_text("{}")
    (local / "model.safetensors").write_bytes(b"")
    assert _check(cfg) == []


def test_feature_cache_tier_needs_no_encoder_weights(caches):
    cfg = {"crepa_enabled": True, "crepa_mem_encoder_tier": "cache", "crepa_mem_vae_tier": "cache",
           "crepa_mem_feature_cache": "feats/"}
    assert _check(cfg) == []


def test_disabled_crepa_downgrades_errors(primed):
    cfg = {"model_family": "wan", "crepa_enabled": False, "crepa_block_index": 99}
    findings = _check(cfg)
    assert [(f.code, f.severity) for f in findings] == [("block_index_out_of_range", "warning"),
                                                        ("crepa_disabled", "info")]


def test_unsupported_family_only_matters_when_enabled(primed):
    assert [f.code for f in _check({"model_family": "flux", "crepa_enabled": True})] == ["unsupported_family"]
    assert _check({"model_family": "flux"}) == []
