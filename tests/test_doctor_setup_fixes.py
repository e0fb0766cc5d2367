"""Setup findings: each of NVML's failures with its own fix, torch.hub's errors, bad encoder names, pinned host
memory, tensors on two devices — through the real log scanner where a log is the input."""
from __future__ import annotations

import pytest

from crepa_mem.doctor.diagnose import Context
from crepa_mem.doctor.logs import findings_from_scan, scan_log
from crepa_mem.doctor.setup_fixes import DINOV2_NAMES, NVML_TEXTS, setup_finding
from crepa_mem.profiles import get_encoder


def _one(lines):
    (f,) = findings_from_scan(scan_log(lines), Context())
    return f


def test_every_nvml_failure_has_a_fix_of_its_own():
    fixes = [fix for _, fix in NVML_TEXTS.values()]
    assert len(set(fixes)) == len(fixes)
    assert "create-dev-char-symlinks" in NVML_TEXTS["nvml_unknown_error"][1]
    assert "Reboot" in NVML_TEXTS["driver_library_mismatch"][1]
    assert "dkms" in NVML_TEXTS["nvidia_smi_failed"][1]
    assert "modprobe" in NVML_TEXTS["driver_not_loaded"][1]


def test_dinov2_names_are_the_catalog_encoders():
    assert all(get_encoder(name).name == name for name in DINOV2_NAMES)


@pytest.mark.parametrize("name", ["dinov2_vitl16", "dinov2_vits14_reg"])
def test_unknown_encoder_never_lists_the_name_it_rejects(name):
    (f,) = setup_finding("unknown_encoder", {"name": name}, "", {})
    assert f"'{name}'" in f.message and name not in f.fix.replace(f"{name}_", "")


def test_stale_hub_cache_reloads_the_name_it_could_not_find():
    f = _one(["RuntimeError: Cannot find callable dinov2_vitb14_reg in hubconf"])
    assert f.code == "encoder_hub_error" and "'dinov2_vitb14_reg', force_reload=True" in f.fix


def test_pinned_host_oom_mentions_wsl_only_when_the_log_does():
    frames = ['  File "/t/utils/data/_utils/pin_memory.py", line 58, in pin_memory',
              "    return data.pin_memory(device)", "RuntimeError: CUDA error: out of memory"]
    plain = _one(frames)
    wsl = _one(["Linux host 5.15.167.4-microsoft-standard-WSL2 #1 SMP x86_64 GNU/Linux", "Traceback (most recent call "
                "last):", *frames])
    assert plain.code == wsl.code == "pinned_memory_limited"
    assert "WSL2" not in plain.message + plain.fix and "WSL2" in wsl.message and "WSL2" in wsl.fix
    assert plain.details["source"] == "log"


def test_device_mismatch_blames_offload_only_when_the_log_shows_it():
    line = ("RuntimeError: Expected all tensors to be on the same device, but found at least two devices, cuda:0 "
            "and cpu!")
    bug = _one([line])
    assert "placement bug" in bug.message and "offload" not in bug.fix.lower()
    swapped = _one(["INFO: enable swap 20 blocks to CPU, blocks_to_swap=20", line])
    assert "offload" in swapped.message and "ramtorch_target_modules" in swapped.fix
