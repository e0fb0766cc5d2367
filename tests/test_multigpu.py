"""Multi-process training on a CPU (gloo): DDP under `accelerate launch`, and FSDP through torch.

Every run trains the same tiny Wan LoRA + CREPA for 2 SGD steps; N processes with batch 1 each must give
the projector (and LoRA) of 1 process on the concatenated batch. SGD, not Adam: Adam's first step is
~lr·sign(g) and would hide a wrong gradient scale.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from test_example import load_example

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--steps", "2", "--optimizer", "sgd", "--lr", "0.05", "--seed", "3"]
FILES = ("crepa_projector.safetensors", "pytorch_lora_weights.safetensors")
# README lines these tests run verbatim (plus their options), so tests/test_readme.py does not launch them again
README_DDP = "accelerate launch --multi_gpu --num_processes 2 examples/train_wan_lora.py --plan-model wan"
README_FSDP = "torchrun --nproc_per_node 2 examples/train_wan_fsdp.py --fsdp 2:root,1:own"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("ACCELERATE_USE_FSDP", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _launch(readme_line: str, launcher_options: list[str], *args: str) -> subprocess.CompletedProcess:
    """The README's command line as written, the launcher's options after its own, the script's at the end.
    The launcher is the module behind its console script, run by this interpreter (a venv without the
    scripts would otherwise find another Python's `accelerate` on PATH)."""
    words = shlex.split(readme_line)
    cut = words.index("launch") + 1 if words[0] == "accelerate" else 1
    launcher = {"accelerate": "accelerate.commands.accelerate_cli", "torchrun": "torch.distributed.run"}[words[0]]
    return _run([sys.executable, "-m", launcher, *words[1:cut], *launcher_options, *words[cut:], *args])


def _assert_same_weights(reference: Path, other: Path) -> None:
    from safetensors.torch import load_file

    for name in FILES:
        a, b = load_file(str(reference / name)), load_file(str(other / name))
        assert a.keys() == b.keys(), name
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}:{key}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """1 process, batch 2 (the concatenation of both ranks' clips); also checks the weights moved."""
    from safetensors.torch import load_file

    from test_example import initial_weights

    out = tmp_path_factory.mktemp("one_process")
    example = load_example()
    example.train(example.parse_args([*TRAIN, "--batch-size", "2", "--save-dir", str(out)]))
    _, projector0 = initial_weights(example, TRAIN)
    moved = load_file(str(out / FILES[0]))["1.weight"] - projector0["1.weight"]
    assert moved.abs().max() > 1e-4  # a real update, so equality below is not trivial
    return out


def test_ddp_two_processes_equal_one_process_on_the_concatenated_batch(reference, tmp_path):
    """DDP over gloo; each rank plans the teacher for its own GPU (LOCAL_RANK; the default card on a CPU)."""
    proc = _launch(README_DDP, ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                "--main_process_port", str(_free_port())],
                   *TRAIN, "--batch-size", "1", "--save-dir", str(tmp_path))
    assert "2 process(es) on cpu" in proc.stdout
    for rank in (0, 1):
        assert f"[rank {rank}] planned wan for this rank's GPU" in proc.stdout
    _assert_same_weights(reference, tmp_path)


def test_fsdp_through_torch_on_cpu_shards_the_projector_and_matches(reference, tmp_path):
    """One launch, two sharded runs. FSDP2 with the projector in the root unit, as accelerate's fsdp_version 2
    wraps the model (blocks + root; FSDP2 keeps the root unsharded from forward to backward): the projector
    is a DTensor shard per rank. FSDP1 with the projector as its own unit (FSDP1 reshards the root after
    forward). Both see full block outputs, and both give the update of 1 process on the whole batch."""
    proc = _launch(README_FSDP, ["--master_port", str(_free_port())], *TRAIN, "--save-dir", str(tmp_path))
    assert "FSDP2 on cpu; projector held as DTensor shard (16, 32) of (32, 32) (unit: root)" in proc.stdout
    assert "FSDP1 on cpu; projector held as FullyShardedDataParallel" in proc.stdout
    assert proc.stdout.count("captured block output (1, 3, 25, 32) (full width 32)") == 4
    _assert_same_weights(reference, tmp_path / "fsdp2-root")
    _assert_same_weights(reference, tmp_path / "fsdp1-own")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "FSDP through accelerate needs 2 accelerator devices: accelerate 1.15's AcceleratorState turns FSDP on only "
    "for MULTI_GPU/NPU/XPU/... distributed types, never MULTI_CPU, so `accelerate launch --use_fsdp` on a CPU "
    "trains with DDP; the same fully_shard calls are tested on CPU through torch above"))
def test_fsdp2_through_accelerate_on_two_gpus(reference, tmp_path):
    launcher = shutil.which("accelerate") or "accelerate"
    _run([launcher, "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
          "--fsdp_transformer_layer_cls_to_wrap", "WanTransformerBlock",
          str(ROOT / "examples" / "train_wan_lora.py"), *TRAIN, "--batch-size", "1", "--save-dir", str(tmp_path)])
    _assert_same_weights(reference, tmp_path)
