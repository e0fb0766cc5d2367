"""The real SimpleTuner 4.10.1, for the tests: its wheel fetched once from the package index into a cache
folder, unpacked, and imported on this Python (3.11) with the package `__init__`s that pull in what its
config parser and ModelFoundation never use bypassed. Nothing of SimpleTuner (AGPL-3.0) is copied into
this project: the code is read at run time from the wheel.

Bypassed, each for a stated reason:
- `simpletuner.simpletuner_sdk.server/__init__`: builds the FastAPI WebUI app; its `services.field_registry`
  subpackage (which the parser is built from) is imported for real.
- `torchvision` when it does not import: SimpleTuner imports `torchvision.transforms` at module level for
  its data pipeline; the PyPI CPU machine has no torchvision build matching its torch. The CREPA call
  sites do not use it (an attribute looked up on the empty module would raise).
- the model registry's family list, limited to the families tested: building the field registry imports
  every one of SimpleTuner's 44 model modules, most needing packages beyond the test extra.
"""
from __future__ import annotations

import fcntl
import importlib
import importlib.machinery
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

VERSION = "4.10.1"
FAMILIES = ("wan", "ltxvideo", "sanavideo")


def cache_dir() -> Path:
    root = os.environ.get("CREPA_MEM_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "crepa-mem")
    path = Path(root) / f"simpletuner-{VERSION}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def unpacked() -> Path:
    """The unpacked wheel (downloaded the first time; later sessions reuse the cache)."""
    folder = cache_dir()
    root, done = folder / "site", folder / "site" / ".complete"
    with open(folder / ".lock", "w") as lock:  # pytest -n 2: one process downloads, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        wheels = sorted(folder.glob(f"simpletuner-{VERSION}-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.12",
                   "--only-binary=:all:", f"simpletuner=={VERSION}", "-d", str(folder), "-q"]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            wheels = sorted(folder.glob(f"simpletuner-{VERSION}-*.whl"))
            if run.returncode != 0 or not wheels:
                last = (run.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.skip(f"the SimpleTuner {VERSION} wheel could not be fetched from the package index: {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(root)
        done.write_text(wheels[0].name)
    return root


def _shell(name: str, path: Path | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)] if path else []
    module.__spec__, module.__path__ = spec, spec.submodule_search_locations
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def simpletuner() -> Path:
    """Makes the real SimpleTuner importable here; returns the folder it is imported from."""
    root = unpacked()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    st = importlib.import_module("simpletuner")
    if not str(getattr(st, "__file__", "")).startswith(str(root)):
        pytest.skip(f"another simpletuner is imported here ({st.__file__})")
    server = "simpletuner.simpletuner_sdk.server"
    if server not in sys.modules:
        importlib.import_module("simpletuner.simpletuner_sdk")
        _shell(server, root / "simpletuner" / "simpletuner_sdk" / "server")
    try:
        importlib.import_module("torchvision.transforms")
    except Exception:  # noqa: BLE001 - a torchvision whose C++ ops do not match torch raises RuntimeError
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _shell("torchvision")
        _shell("torchvision.transforms")
    from simpletuner.helpers.models.registry import ModelRegistry

    ModelRegistry._load_metadata()
    ModelRegistry._metadata = {k: v for k, v in ModelRegistry._metadata.items() if k in FAMILIES}
    return root
