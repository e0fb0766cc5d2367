import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from crepa_mem.teacher.store import FeatureStore
from crepa_mem.cli.app import app
from crepa_mem.testing import tiny_dinov2, tiny_vae

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_cache")
    tiny_vae("wan").save_pretrained(root / "vae")
    tiny_dinov2().save_pretrained(root / "enc")
    lat = root / "lat"
    (lat / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        torch.save(torch.randn(16, 3, 4, 4, generator=g), lat / f"{i}.pt")
    torch.save({"latents": torch.randn(16, 2, 4, 4, generator=g), "num_frames": 5}, lat / "sub" / "d.pt")
    return root


def _args(root, out, *extra):
    return ["cache", "build", "--latents", str(root / "lat"), "--out", str(out), "--encoder", str(root / "enc"),
            "--image-size", "70", "--vae", str(root / "vae"), "--device", "cpu", "--no-progress", *extra]


def test_build_json_then_resume_then_verify(setup, tmp_path):
    out = tmp_path / "store"
    res = runner.invoke(app, _args(setup, out, "--json", "--chunk", "2"))
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {k: report[k] for k in ("files", "samples", "written", "skipped", "entries", "ranks", "encoder_dim")} == \
        {"files": 4, "samples": 4, "written": 4, "skipped": 0, "entries": 4, "ranks": 1, "encoder_dim": 32}
    assert report["store_bytes"] == report["bytes_written"] > 0
    assert report["settings"]["encoder_image_size"] == 70 and report["settings"]["vae_class"] == "AutoencoderKLWan"
    again = json.loads(runner.invoke(app, _args(setup, out, "--json", "--chunk", "2")).stdout)
    assert (again["written"], again["skipped"]) == (0, 4)

    res = runner.invoke(app, ["cache", "verify", "--out", str(out), "--latents", str(setup / "lat"), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] == 4 and json.loads(res.stdout)["missing"] == []
    store = FeatureStore.open(out)
    victim = store.path_of(next(store.keys()))
    victim.write_bytes(victim.read_bytes()[:-10])
    res = runner.invoke(app, ["cache", "verify", "--out", str(out)])
    assert res.exit_code == 1 and "3/4 entries intact" in res.stdout and "truncated" in res.stdout


def test_build_human_summary(setup, tmp_path):
    res = runner.invoke(app, _args(setup, tmp_path / "store"))
    assert res.exit_code == 0, res.output
    assert "written" in res.stdout and "entries in the store" in res.stdout and "4" in res.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(res.stdout)


@pytest.mark.parametrize("change, message", [
    (("--latents", "missing-dir"), "--latents 'missing-dir' is not a directory"),
    (("--latents", "EMPTY"), "holds no latent files"),
    (("--encoder-dtype", "fp64"), "--encoder-dtype 'fp64' is invalid: valid is fp32 · bf16 · fp16"),
    (("--device", "tpu"), "--device 'tpu' is invalid"),
    (("--chunk", "0"), "--chunk 0 is invalid"),
    (("--vae", "missing-vae"), "--vae 'missing-vae' is not a directory"),
    (("--model", "wan-9"), "unknown model 'wan-9'"),
    (("--image-size", "10"), "--image-size 10 is invalid"),
    (("--encoder-path", "nope"), "--encoder-path 'nope' is invalid: valid is an existing local folder"),
    (("--encoder", "./missing"), "--encoder './missing' is invalid"),
    (("--true-grid",), "--true-grid needs --model"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, change, message):
    (tmp_path / "EMPTY").mkdir()
    args = _args(setup, tmp_path / "store")
    flag = change[0]
    value = change[1] if len(change) > 1 else None
    if value == "EMPTY":
        value = str(tmp_path / "EMPTY")
        message = f"--latents {value!r} " + message
    if flag in args and value is not None:
        args[args.index(flag) + 1] = value
    else:
        args += list(change)
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crepa-mem: error:") and message in lines[0], res.stderr


def test_settings_come_from_a_simpletuner_config(setup, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_family": "wan", "--crepa_enabled": "true", "crepa_encoder_image_size": 84,
                               "--crepa_mem_encoder_dtype": "bf16", "learning_rate": 1e-4}))
    args = [a for a in _args(setup, tmp_path / "store", "--json", "--config", str(cfg)) if a not in ("--image-size", "70")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    settings = json.loads(res.stdout)["settings"]
    assert (settings["encoder_image_size"], settings["encoder_dtype"]) == (84, "bf16")
    assert FeatureStore.open(tmp_path / "store").manifest["built_with"]["model"] == "wan-2.1-1.3b"


def test_existing_store_with_other_settings_is_refused_before_loading(setup, tmp_path):
    out = tmp_path / "store"
    assert runner.invoke(app, _args(setup, out)).exit_code == 0
    res = runner.invoke(app, _args(setup, out, "--encoder-dtype", "bf16"))
    assert res.exit_code == 1
    assert "encoder_dtype: cache has 'fp32', wanted 'bf16'" in res.stderr and len(res.stderr.splitlines()) == 1


def test_verify_bad_input(tmp_path):
    res = runner.invoke(app, ["cache", "verify", "--out", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "is not a directory" in res.stderr
    res = runner.invoke(app, ["cache", "verify", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "not a feature cache" in res.stderr


@pytest.mark.slow
def test_two_processes_split_the_work(setup, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): each rank writes its share, rank 0 reports all."""
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "crepa_mem.cli.app",
           *_args(setup, out, "--json")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["ranks"] == 2 and report["written"] == report["entries"] == 4 and report["files"] == 4
    store = FeatureStore.open(out)
    sources = {store.read(k).source for k in store.keys()}
    assert sources == {"0.pt", "1.pt", "2.pt", os.path.join("sub", "d.pt")}
    assert store.temp_files() == []


def test_an_out_path_with_markup_characters_is_printed_as_is(setup, tmp_path):
    out = tmp_path / "st[/]ore"
    res = runner.invoke(app, _args(setup, out))
    assert res.exit_code == 0, res.output
    assert "st[/]ore" in res.stdout.replace("\n", "")


@pytest.mark.parametrize("code, reason", [(30, "the filesystem is read-only"), (28, "the disk is full")])
def test_a_read_only_or_full_filesystem_is_one_line_exit_1(setup, tmp_path, monkeypatch, code, reason):
    from crepa_mem import fileio

    def refuse(path, data, **kw):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(fileio, "atomic_write", refuse)
    res = runner.invoke(app, _args(setup, tmp_path / "store"))
    assert res.exit_code == 1 and f"{reason} (errno {code})" in res.stderr and "store" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", [
    lambda m: m.pop("settings"),
    lambda m: m.update(encoder_dim="32"),
])
def test_a_damaged_manifest_is_one_line_in_verify_and_build(setup, tmp_path, damage):
    out = tmp_path / "store"
    assert runner.invoke(app, _args(setup, out)).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    damage(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for args in (["cache", "verify", "--out", str(out)], _args(setup, out)):
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and "manifest" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_verify_and_resume_after_a_header_bit_flip(setup, tmp_path):
    out = tmp_path / "store"
    assert runner.invoke(app, _args(setup, out)).exit_code == 0
    store = FeatureStore.open(out)
    victim = store.path_of(next(store.keys()))
    data = bytearray(victim.read_bytes())
    data[data.index(b'"frame_indices"') + 2] ^= 0x20  # a metadata key's name: used to be a KeyError
    victim.write_bytes(bytes(data))
    res = runner.invoke(app, ["cache", "verify", "--out", str(out)])
    assert res.exit_code == 1 and "3/4 entries intact" in res.stdout
    res = runner.invoke(app, [*_args(setup, out), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["repaired"] == 1
    assert runner.invoke(app, ["cache", "verify", "--out", str(out)]).exit_code == 0


def test_unloadable_weights_in_encoder_or_vae_folders_are_one_line(setup, tmp_path):
    import shutil

    enc = tmp_path / "enc"
    shutil.copytree(setup / "enc", enc)
    (enc / "model.safetensors").unlink()
    (enc / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a zip")
    res = runner.invoke(app, [*_args(setup, tmp_path / "a"), "--encoder", str(enc)])
    assert res.exit_code == 1 and "cannot be loaded" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    vae = tmp_path / "vae"
    shutil.copytree(setup / "vae", vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = runner.invoke(app, [*_args(setup, tmp_path / "b"), "--vae", str(vae)])
    assert res.exit_code == 2 and "weights cannot be loaded" in res.stderr and len(res.stderr.strip().splitlines()) == 1
