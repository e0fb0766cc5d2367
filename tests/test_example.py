"""examples/train_wan_lora.py end to end: a real diffusers + accelerate + peft LoRA loop with CREPA."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_wan_lora.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_wan_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def initial_weights(example, argv: list[str]) -> tuple[dict, dict]:
    """The LoRA and projector a run starts from (same builders, same seed), built without training."""
    from crepa_mem import wrap

    args = example.parse_args(argv)
    transformer, vae, encoder = example.build_models(args)
    crepa = wrap(transformer, vae=vae, encoder=encoder, config=example.crepa_config(args), device="cpu")
    return example.lora_state(transformer), crepa.projector_state_dict()


def run_example(*argv: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(EXAMPLE), *argv], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_twenty_steps_on_a_fixed_batch(tmp_path):
    from safetensors.torch import load_file

    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    argv = ["--steps", "20", "--fixed-batch", "--seed", "0"]
    proc = run_example(*argv, "--json-log", str(log), "--save-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(20))
    for r in rows:
        for key in ("diffusion_loss", "crepa_loss", "crepa_alignment_score"):
            assert math.isfinite(r[key]), r
        assert r["crepa_loss"] < 0 and r["processes"] == 1
        assert r["teacher_peak_bytes"] is None and r["teacher_memory"] == "not measured on CPU"
        assert r["encoder_tier"] == "gpu" and r["chunk_frames"] == 2
    scores = [r["crepa_alignment_score"] for r in rows]
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.1, scores
    assert scores[-1] > scores[0]
    # the per-step line a user reads
    assert "crepa_alignment_score" in proc.stdout and "teacher memory: n/a on CPU" in proc.stdout

    lora0, projector0 = initial_weights(load_example(), argv)
    lora1 = load_file(str(out / "pytorch_lora_weights.safetensors"))
    projector1 = load_file(str(out / "crepa_projector.safetensors"))
    assert set(projector1) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert not torch.allclose(projector1["1.weight"], projector0["1.weight"])
    stripped = {k.removeprefix("transformer."): v for k, v in lora1.items()}
    assert stripped.keys() == lora0.keys()
    assert any(not torch.allclose(stripped[k], lora0[k]) for k in lora0 if "lora_B" in k)


def test_bad_option_value_is_one_line_and_exit_2(capsys):
    example = load_example()
    assert example.main(["--steps", "1", "--image-size", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crepa_encoder_image_size=20" in err[0] and "≥ 64" in err[0]


def test_data_is_global_and_sliced_per_rank():
    """N processes × batch b see exactly the clips 1 process × batch N·b sees (what DDP equality rests on)."""
    example = load_example()
    one = example.global_batch(example.parse_args(["--batch-size", "2"]), step=3, world=1)
    two = example.global_batch(example.parse_args(["--batch-size", "1"]), step=3, world=2)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)
    fixed = example.parse_args(["--fixed-batch"])
    torch.testing.assert_close(example.global_batch(fixed, 0, 1)["noise"], example.global_batch(fixed, 9, 1)["noise"])
