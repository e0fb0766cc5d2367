"""Suite-wide settings and shared fixtures.

One intra-op thread per test process (pytest -n 2 runs two of them on two cores; tiny models are slower
with more threads on a shared, loaded machine)."""
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ENCODER_REPOS = ["facebook/dinov2-small", "facebook/dinov2-large", "facebook/dinov2-giant"]


def prime_hf_cache(cache: Path, repo: str, files=("config.json", "model.safetensors")) -> Path:
    """The hub cache layout `from_pretrained` reads offline: refs/main → snapshots/<commit>/<file>."""
    commit = "0" * 40
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name in files:
        (snap / name).write_text("{}")
    return snap


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """HF and torch.hub caches in tmp_path, empty; tests prime what they need."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def primed(caches):
    """The caches, holding the DINOv2 files the config fixtures name (so only their own faults show)."""
    from crepa_mem.doctor.config_checks import hf_hub_cache

    for repo in ENCODER_REPOS:
        prime_hf_cache(hf_hub_cache(), repo)
    return caches
