import warnings
import json
from pathlib import Path

import pytest

from crepa_mem import CrepaConfig, CrepaConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"  # copies of ../shared/fixtures/simpletuner


def test_reads_plain_and_cli_style_keys_and_ignores_the_rest():
    cfg = CrepaConfig.from_dict({"--crepa_lambda": "0.3", "crepa_enabled": "true", "learning_rate": 1e-4,
                                 "--crepa-adjacent-distance": 2})
    assert cfg.lambda_ == 0.3 and cfg.enabled and cfg.adjacent_distance == 2


def test_crepa_model_alias_is_read_first_and_canonicalised():
    cfg = CrepaConfig.from_dict({"crepa_model": "dinov2_s", "crepa_encoder": "dinov2_vitg14"})
    assert cfg.encoder == "dinov2_vits14"
    assert CrepaConfig.from_dict({"crepa_encoder": "dino_v2_g"}).encoder == "dinov2_vitg14"


def test_round_trip_through_to_dict():
    cfg = CrepaConfig(enabled=True, lambda_=0.2, encoder_tier="swap", encoder_dtype="bf16")
    assert CrepaConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_crepa_keys_are_kept_for_doctor():
    assert CrepaConfig.from_dict({"crepa_bogus": 1}).ignored_keys == ("crepa_bogus",)


@pytest.mark.parametrize("key,value,fragment", [
    ("crepa_adjacent_tau", 0, "> 0"),
    ("crepa_lambda", -1, "≥ 0"),
    ("crepa_adjacent_distance", -1, "≥ 0"),
    ("crepa_block_index", -2, "≥ 0"),
    ("crepa_encoder_image_size", 32, "≥ 64"),
    ("crepa_scheduler", "step", "constant"),
    ("crepa_power", 0.05, "≥ 0.1"),
    ("crepa_similarity_threshold", 1.5, "[0, 1]"),
    ("crepa_similarity_ema_decay", -0.1, "[0, 1]"),
    ("crepa_threshold_mode", "sometimes", "permanent"),
    ("crepa_mem_encoder_tier", "disk", "swap"),
    ("crepa_mem_encoder_dtype", "fp8", "bf16"),
    ("crepa_enabled", "maybe", "true or false"),
    ("crepa_block_index", "eight", "integer"),
])
def test_invalid_values_name_key_value_and_range(key, value, fragment):
    with pytest.raises(CrepaConfigError) as err:
        CrepaConfig.from_dict({key: value})
    assert isinstance(err.value, ValueError)
    text = str(err.value)
    assert key in text and repr(value).strip("'") in text and fragment in text


def test_cache_tier_needs_a_directory():
    with pytest.raises(CrepaConfigError, match="crepa_mem_feature_cache"):
        CrepaConfig(encoder_tier="cache", vae_tier="cache")


def test_enabled_without_block_index_is_an_error():
    with pytest.raises(CrepaConfigError, match="must be set"):
        CrepaConfig.from_dict({"crepa_enabled": True, "crepa_block_index": None})


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_reads_real_simpletuner_configs(path):
    data = json.loads(path.read_text())
    cfg = CrepaConfig.from_file(path)
    assert cfg.enabled == data.get("crepa_enabled", False)
    if "crepa_encoder" in data:
        assert cfg.encoder == data["crepa_encoder"]
        assert cfg.encoder_image_size == data["crepa_encoder_image_size"]


def test_from_file_bad_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(CrepaConfigError, match="JSON"):
        CrepaConfig.from_file(p)


def test_self_flow_is_refused_not_silently_run_as_encoder_mode():
    with pytest.raises(CrepaConfigError, match="self_flow is not supported"):
        CrepaConfig(feature_source="self_flow")


def test_cache_tier_covers_both_components():
    with pytest.raises(CrepaConfigError, match="replaces both"):
        CrepaConfig(encoder_tier="cache", vae_tier="gpu", feature_cache="/tmp/f")
    assert CrepaConfig(encoder_tier="cache", vae_tier="cache", feature_cache="/tmp/f").vae_tier == "cache"


def test_misspelled_keys_warn_once_with_the_closest_option(monkeypatch):
    from crepa_mem import config as config_module

    monkeypatch.setattr(config_module, "_WARNED", set())
    data = {"crepa_enabled": True, "crepa_block_index": 8, "crepa_mem_encoder_teir": "stream", "crepa_lamda": 0.5}
    with pytest.warns(config_module.UnknownKeyWarning) as seen:
        CrepaConfig.from_dict(data)
    messages = sorted(str(w.message) for w in seen)
    assert len(messages) == 2
    assert "did you mean crepa_lambda?" in messages[0] and "did you mean crepa_mem_encoder_tier?" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second read is silent
        CrepaConfig.from_dict(data)
        CrepaConfig.from_dict({"crepa_other_typo": 1}, warn_unknown=False)


def test_auto_tiers_and_lossy_rungs_are_options():
    cfg = CrepaConfig.from_dict({"crepa_mem_encoder_tier": "auto", "--crepa_mem_vae_tier": "auto",
                                 "crepa_mem_allow_lossy": "true"})
    assert cfg.auto_tiers and cfg.allow_lossy and not CrepaConfig().auto_tiers
    assert not CrepaConfig().allow_lossy and not CrepaConfig().reset_peak_stats
    with pytest.raises(CrepaConfigError, match="crepa_mem_vae_tier='automatic'.*auto"):
        CrepaConfig(vae_tier="automatic")
