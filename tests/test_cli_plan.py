"""`crepa-mem plan`, `gpus` and `profiles` driven through the real typer app (and one subprocess)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
import sys
from types import SimpleNamespace

import pynvml
import pytest
from typer.testing import CliRunner

from crepa_mem.cli.app import app
from crepa_mem.config import CrepaConfig
from crepa_mem.units import GiB

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_plan_prints_tables_and_exits_0_when_it_fits():
    r = invoke("plan", "--model", "wan", "--gpu", "rtx4090")
    assert r.exit_code == 0, r.output
    for word in ("rtx4090", "budget for CREPA", "encoder_weights", "crepa_encoder", "dinov2_vitg14", "why"):
        assert word in r.stdout


def test_plan_json_has_the_documented_keys():
    r = invoke("plan", "--model", "wan-2.1-14b", "--gpu", "h100", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {"gpu", "model", "fits", "settings", "tiers", "estimate", "reasons"} <= set(d)
    assert d["fits"] is True and d["model"]["name"] == "wan-2.1-14b" and d["gpu"]["name"] == "h100-sxm"
    assert d["estimate"]["total_bytes"] == max(d["estimate"]["phases"].values())
    assert all(isinstance(v, int) for v in d["estimate"]["components"].values())


def test_plan_that_does_not_fit_exits_3_and_still_prints_json():
    r = invoke("plan", "--model", "wan-2.1-14b", "--gpu", "24GB", "--train-gib", "23", "--json")
    assert r.exit_code == 3
    d = json.loads(r.stdout)
    assert d["fits"] is False and d["reasons"][-1].startswith("nothing fits")


def test_plan_options_reach_the_planner(tmp_path):
    r = invoke("plan", "--model", "ltxvideo", "--gpu", "12GiB", "--frames", "49", "--height", "480", "--width", "704",
               "--batch", "2", "--headroom", "0.2", "--host-ram", "64GiB", "--train-gib", "1", "--json")
    assert r.exit_code in (0, 3), r.output
    d = json.loads(r.stdout)
    assert (d["shape"]["frames"], d["shape"]["height"], d["shape"]["width"], d["shape"]["batch"]) == (49, 480, 704, 2)
    assert d["budget"]["headroom_bytes"] == int(0.2 * 12 * GiB) and d["budget"]["train_bytes"] == GiB


def test_write_gives_a_config_crepaconfig_reads(tmp_path):
    out = tmp_path / "crepa.json"
    r = invoke("plan", "--model", "wan-2.1-14b", "--gpu", "8GB", "--train-gib", "0", "--write", str(out), "--json")
    assert r.exit_code == 0, r.output
    settings = json.loads(r.stdout)["settings"]
    cfg = CrepaConfig.from_file(out)
    written = cfg.to_dict()
    assert cfg.enabled and all(written[k] == v for k, v in settings.items())
    assert "wrote" in r.stderr


@pytest.mark.parametrize("args, words", [
    (("--model", "wann"), ["unknown model 'wann'", "did you mean wan"]),
    (("--model", "wan", "--gpu", "rtx4099"), ["unknown GPU", "rtx4090"]),
    (("--model", "wan", "--frames", "80"), ["--frames 80", "1 + k×4", "77, 81"]),
    (("--model", "wan", "--height", "500"), ["--height 500", "multiple of 16"]),
    (("--model", "wan", "--host-ram", "lots"), ["--host-ram", "not a size"]),
    (("--model", "wan", "--batch", "0"), ["--batch 0"]),
    (("--model", "wan", "--train-gib", "-3"), ["--train-gib -3.0", "≥ 0"]),
    (("--model", "wan", "--gpu", "-24GiB"), ["--gpu '-24GiB'", "positive size"]),
    (("--model", "wan", "--gpu", "100000TiB"), ["--gpu '100000TiB'", "1GiB to 4TiB"]),
    (("--model", "wan", "--gpu", "24"), ["--gpu '24'", "(24GiB)"]),
    (("--model", "wan", "--frames", "x"), ["'--frames'", "crepa-mem plan --help"]),  # typer's own, one line too
    (("--model", "wan", "--json", "true"), ["flags take no value"]),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    r = invoke("plan", "--gpu", "rtx4090", *args) if "--gpu" not in args else invoke("plan", *args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output
    for w in words:
        assert w in lines[0]


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    mem = pynvml.c_nvmlMemory_v2_t(pynvml.nvmlMemory_v2, 24 * GiB, GiB // 4, 20 * GiB, 4 * GiB - GiB // 4)
    for name, fn in {"nvmlInit": lambda: None, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: 1,
                     "nvmlDeviceGetHandleByIndex": lambda i: i, "nvmlDeviceGetName": lambda h: "NVIDIA GeForce RTX 4090",
                     "nvmlDeviceGetUUID": lambda h: "GPU-1234", "nvmlDeviceGetMemoryInfo": lambda h, version=None: mem,
                     "nvmlDeviceGetCudaComputeCapability": lambda h: (8, 9),
                     "nvmlDeviceGetMaxPcieLinkGeneration": lambda h: 4, "nvmlDeviceGetMaxPcieLinkWidth": lambda h: 16,
                     "nvmlDeviceGetComputeRunningProcesses": lambda h: [SimpleNamespace(pid=7, usedGpuMemory=3 * GiB)],
                     "nvmlDeviceGetMigMode": lambda h: (0, 0)}.items():
        monkeypatch.setattr(pynvml, name, fn)


def test_gpus_and_plan_auto_with_nvml(one_gpu):
    r = invoke("gpus", "--json")
    assert r.exit_code == 0, r.output
    (g,) = json.loads(r.stdout)["gpus"]
    assert g["uuid"] == "GPU-1234" and g["free_bytes"] == 20 * GiB and g["processes"] == [{"pid": 7, "used_bytes": 3 * GiB}]
    r = invoke("gpus")
    assert r.exit_code == 0 and "RTX 4090" in r.stdout and "Gen4 x16" in r.stdout
    d = json.loads(invoke("plan", "--model", "wan", "--json").stdout)  # --gpu auto
    # 3.75 GiB in use is less than the model predicts for Wan 1.3B at 81 frames: the prediction counts
    t = d["training"]
    assert d["gpu"]["uuid"] == "GPU-1234" and t["source"] == "model" and t["total_bytes"] > 4 * GiB
    assert d["budget"]["budget_bytes"] == 24 * GiB - GiB // 4 - t["total_bytes"] - int(0.1 * 24 * GiB)
    d = json.loads(invoke("plan", "--model", "wan", "--frames", "1", "--height", "256", "--width", "256",
                          "--lora-rank", "4", "--json").stdout)  # a tiny workload: what is in use is larger
    assert d["training"]["source"] == "live GPU" and d["budget"]["budget_bytes"] == 20 * GiB - int(0.1 * 24 * GiB)


def test_no_gpu_is_said_in_one_line_and_plans_for_the_default_card(monkeypatch):
    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    r = invoke("plan", "--model", "wan", "--gpu", "auto")
    assert r.exit_code == 0 and r.stderr.count("\n") == 1 and "no GPU found" in r.stderr and "rtx4090" in r.stderr
    r = invoke("gpus", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["gpus"] == [] and "no GPU found" in json.loads(r.stdout)["note"]


def test_profiles_command(tmp_path):
    r = invoke("profiles", "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["families"]["wan"] == "wan-2.1-1.3b" and any(g["name"] == "h200" for g in d["gpus"])
    (tmp_path / "x.toml").write_text('[gpu.mycard]\nmemory_gib = 12\npcie_gen = 4\npcie_width = 16\nbf16_tflops = 1.0\n')
    r = invoke("profiles", "--profiles", str(tmp_path))
    assert r.exit_code == 0 and "mycard" in r.stdout and "wan-2.1-1.3b *" in r.stdout
    d = json.loads(invoke("plan", "--model", "wan", "--gpu", "mycard", "--profiles", str(tmp_path), "--json").stdout)
    assert d["gpu"]["total_bytes"] == 12 * GiB


def test_plan_path_imports_no_torch_diffusers_or_transformers():
    code = ("import sys, json\n"
            "from crepa_mem.cli.app import app\n"
            "try:\n    app(['plan', '--model', 'wan', '--gpu', 'rtx4090', '--json'])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'ramtorch') if m in sys.modules]\n"
            "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY=\n" in r.stderr + "\n" and json.loads(r.stdout)["fits"] is True


def test_train_gib_nan_is_one_line_exit_2():
    res = runner.invoke(app, ["plan", "--model", "wan", "--gpu", "24GiB", "--train-gib", "nan"])
    assert res.exit_code == 2 and "--train-gib nan" in res.stderr


def test_json_into_a_full_disk_is_one_line_exit_1():
    import os

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    exe = Path(sys.executable).with_name("crepa-mem")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "crepa_mem.cli.app"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*cmd, "plan", "--model", "wan", "--gpu", "24GiB", "--json"], stdout=full,
                              stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == \
        ["crepa-mem: error: cannot write 'standard output': the disk is full (errno 28)"]


def test_write_is_atomic_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import os

    out = tmp_path / "crepa.json"
    out.write_text('{"crepa_enabled": true}\n')

    def killed(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", killed)
    r = invoke("plan", "--model", "wan-2.1-14b", "--gpu", "8GB", "--write", str(out))
    assert r.exit_code == 1 and "the disk is full" in r.stderr
    assert out.read_text() == '{"crepa_enabled": true}\n' and [p.name for p in tmp_path.iterdir()] == ["crepa.json"]


def test_plan_config_reads_the_training_from_a_simpletuner_config():
    from pathlib import Path

    cfg = Path(__file__).parent / "fixtures" / "simpletuner" / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json"
    r = invoke("plan", "--config", str(cfg), "--gpu", "rtx4090", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model"]["name"] == "wan-2.1-1.3b" and d["training"]["source"] == "config"
    assert d["budget"]["train_bytes"] == d["training"]["total_bytes"] > 0
    r = invoke("plan", "--model", "wan-2.1-14b", "--gpu", "rtx4090", "--json")  # bf16 14B alone exceeds 24 GB
    assert r.exit_code == 3 and json.loads(r.stdout)["fits"] is False
    assert any(x.startswith("training alone does not fit") for x in json.loads(r.stdout)["reasons"])
    r = invoke("plan", "--model", "wan", "--gpu", "rtx4090")
    assert "training uses" in r.stdout and "from model" in r.stdout
