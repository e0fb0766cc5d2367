"""A SimpleTuner config.json → the training model's inputs, and plans from it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from crepa_mem.errors import CrepaConfigError
from crepa_mem.planning.planner import plan
from crepa_mem.planning.training_config import training_inputs

WAN = Path(__file__).parent / "fixtures" / "simpletuner" / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json"


def _training(t) -> dict:
    return {**{k: v for k, v in t.kwargs.items() if k != "batch"}, "source": "config"}


def test_simpletuner_wan_fixture():
    t = training_inputs(WAN)
    assert t.model.name == "wan-2.1-1.3b" and (t.frames, t.height, t.width) == (81, 480, 832)
    k = t.kwargs
    assert k["lora_rank"] == 16 and k["optimizer"] == "adamw_bf16" and k["gradient_checkpointing"] is True
    assert k["ramtorch_percent"] == 100 and k["batch"] == 1 and k["precision"] == "no_change"


def test_plan_from_the_fixture(tmp_path):
    t = training_inputs(WAN)
    p = plan(t.model, "rtx4090", frames=t.frames, height=t.height, width=t.width, host_ram_bytes=64 * 2**30,
             teacher_gpus=[], training=_training(t))
    assert p.training.source == "config" and p.fits
    assert "weights" in p.training.components and p.to_dict()["training"]["total_bytes"] == p.budget["train_bytes"]
    cfg = json.loads(WAN.read_text())
    cfg.update(ramtorch=False, gradient_checkpointing=False, train_batch_size=2)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    t2 = training_inputs(tmp_path / "c.json")
    q = plan(t2.model, "rtx4090", batch=2, host_ram_bytes=64 * 2**30, teacher_gpus=[], training=_training(t2))
    assert q.training.total_bytes > p.training.total_bytes and not q.fits  # training alone no longer fits
    assert any(r.startswith("training alone does not fit") for r in q.reasons)


def test_bad_configs_are_bad_input(tmp_path):
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(CrepaConfigError, match="JSON object"):
        training_inputs(tmp_path / "x.json")
    with pytest.raises(CrepaConfigError, match="model_family"):
        training_inputs({"lora_rank": 4})
    with pytest.raises(CrepaConfigError, match="validation_resolution"):
        training_inputs({"model_family": "wan", "validation_resolution": "big"})
