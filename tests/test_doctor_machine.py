"""Machine checks with pynvml monkeypatched (REFERENCE §5) and injected probes; and the real CPU-only run."""
from __future__ import annotations

import resource

import pynvml
import pytest

from crepa_mem.doctor.diagnose import Context
from crepa_mem.doctor.machine import MIN_VERSIONS, MachineProbe, check_machine
from crepa_mem.profiles import get_model
from crepa_mem.units import GiB, MiB

GOOD_VERSIONS = {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.23.0", "accelerate": "1.15.0",
                 "ramtorch": "1.11.0"}


def _raise(code):
    def f(*args, **kwargs):
        raise pynvml.NVMLError(code)
    return f


def probe(**kw) -> MachineProbe:
    """A probe with a healthy host (unlimited memlock, 64 GiB RAM, good versions) unless overridden."""
    base = dict(memlock=lambda: (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
                meminfo=lambda: {"MemTotal": 64 * GiB, "MemAvailable": 60 * GiB},
                version=GOOD_VERSIONS.get, gpu_device_nodes=lambda: False,
                torch_build=lambda: {"version": "2.13.0+cu128", "cuda": "12.8", "hip": None}, pid=1000)
    base.update(kw)
    return MachineProbe(**base)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two NVML GPUs; GPU 1 runs a process of pid 4242 (ours is 1000) holding 6 GiB."""
    names = [b"NVIDIA GeForce RTX 4090", b"NVIDIA H100 80GB HBM3"]
    totals = [24 * GiB, 80 * GiB]
    procs = [[pynvml.c_nvmlProcessInfo_t(pid=1000, usedGpuMemory=2 * GiB)],
             [pynvml.c_nvmlProcessInfo_t(pid=4242, usedGpuMemory=6 * GiB)]]
    calls = []

    def mem(handle, version=None):
        m = pynvml.c_nvmlMemory_t()
        m.total, m.used = totals[handle], procs[handle][0].usedGpuMemory
        m.free = m.total - m.used
        return m

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: names[h])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", mem)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda h: procs[h])
    return calls


def _by_code(findings):
    return {f.code: f for f in findings}


def test_library_not_found_on_a_cpu_machine_is_info(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    found = _by_code(check_machine(Context(), probe()))
    assert found["nvml_unavailable"].severity == "info"
    assert "torch_without_cuda" not in found and "torch_build" not in found  # no GPU: torch is not imported


def test_library_not_found_with_nvidia_devices_is_error(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    f = _by_code(check_machine(Context(), probe(gpu_device_nodes=lambda: True)))["nvml_unavailable"]
    assert f.severity == "error" and f.details["hardware"] is True


def test_driver_not_loaded(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    f = _by_code(check_machine(Context(), probe(gpu_device_nodes=lambda: True)))["driver_not_loaded"]
    assert f.severity == "error" and "modprobe" in f.fix


def test_other_nvml_error_is_reported(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVML_ERROR_NO_PERMISSION))
    f = _by_code(check_machine(Context(), probe()))["nvml_unavailable"]
    assert f.severity == "warning" and "Insufficient Permissions" in f.message


@pytest.mark.parametrize("error, code, needle", [
    ("NVML_ERROR_UNKNOWN", "nvml_unknown_error", "create-dev-char-symlinks"),  # a container that lost its GPUs
    ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", "driver_library_mismatch", "Reboot"),
])
def test_nvml_failures_each_have_their_own_finding(monkeypatch, error, code, needle):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(getattr(pynvml, error)))
    found = _by_code(check_machine(Context(), probe()))
    assert "nvml_unavailable" not in found
    assert found[code].severity == "error" and needle in found[code].fix


def test_pynvml_missing():
    def missing():
        raise ImportError("No module named 'pynvml'")
    f = _by_code(check_machine(Context(), probe(nvml=missing)))["nvml_unavailable"]
    assert f.severity == "info" and "nvidia-ml-py" in f.fix


def test_gpus_and_memory_held_by_other_process(fake_gpus):
    found = _by_code(check_machine(Context(), probe()))
    assert [g["name"] for g in found["gpus"].details["gpus"]] == ["NVIDIA GeForce RTX 4090", "NVIDIA H100 80GB HBM3"]
    held = found["gpu_memory_held_by_other_process"]
    assert held.severity == "warning"
    assert held.details["processes"] == [{"gpu": 1, "pid": 4242, "used_bytes": 6 * GiB}]  # pid 1000 is ours
    assert "4242" in held.message and "6.00 GiB" in held.message
    assert fake_gpus == ["init", "shutdown"]


def test_torch_without_cuda_on_a_gpu_machine(fake_gpus):
    cpu_torch = probe(torch_build=lambda: {"version": "2.13.0+cpu", "cuda": None, "hip": None})
    f = _by_code(check_machine(Context(), cpu_torch))["torch_without_cuda"]
    assert f.severity == "error" and "2.13.0+cpu" in f.message and "download.pytorch.org" in f.fix
    ok = _by_code(check_machine(Context(), probe()))
    assert "torch_without_cuda" not in ok and ok["torch_build"].details["cuda"] == "12.8"


STREAM = {"crepa_enabled": True, "crepa_encoder": "dinov2_vitg14", "crepa_mem_encoder_tier": "stream",
          "crepa_mem_vae_tier": "swap"}


def test_pinned_memory_limited_by_ulimit(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    ctx = Context(model=get_model("wan-2.1-14b"), config=STREAM)
    f = _by_code(check_machine(ctx, probe(memlock=lambda: (8 * MiB, 8 * MiB))))["pinned_memory_limited"]
    assert f.severity == "warning" and "8.00 MiB" in f.message and "memlock" in f.fix
    enc = 1_136_480_768 * 4  # dinov2_vitg14 fp32 weights (profiles/encoders.toml)
    vae = get_model("wan-2.1-14b").vae.params * 2
    assert f.details["pinned_bytes"] == enc + vae
    unlimited = check_machine(ctx, probe())
    assert "pinned_memory_limited" not in _by_code(unlimited)


def test_small_memlock_without_cpu_tiers_is_only_info(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    f = _by_code(check_machine(Context(config={"crepa_enabled": True}), probe(memlock=lambda: (64 * 1024, 64 * 1024))))
    assert f["pinned_memory_limited"].severity == "info"


def test_host_ram_too_small_for_cpu_tiers(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    ctx = Context(model=get_model("wan-2.1-14b"), config={**STREAM, "crepa_mem_encoder_tier": "device"})
    small = probe(meminfo=lambda: {"MemTotal": 8 * GiB, "MemAvailable": 3 * GiB})
    f = _by_code(check_machine(ctx, small))["pinned_memory_limited"]
    assert f.severity == "warning" and f.details["mem_available_bytes"] == 3 * GiB
    assert f.details["host_bytes"] > 3 * GiB


def test_versions_outdated_and_missing(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _raise(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    old = {**GOOD_VERSIONS, "diffusers": "0.35.2", "ramtorch": None}
    found = check_machine(Context(config={"ramtorch": True}), probe(version=old.get))
    by = {(f.code, f.details.get("package")): f for f in found}
    assert by[("package_outdated", "diffusers")].severity == "warning"
    assert "0.36" in by[("package_outdated", "diffusers")].message
    assert by[("package_missing", "ramtorch")].severity == "warning"  # the config asks for RamTorch
    assert by[("package_versions", None)].details["versions"]["diffusers"] == "0.35.2"
    quiet = check_machine(Context(), probe(version=old.get))
    assert {(f.code, f.severity) for f in quiet if f.code == "package_missing"} == {("package_missing", "info")}


def test_good_versions_give_only_the_info():
    found = [f for f in check_machine(Context(), probe(nvml=lambda: (_ for _ in ()).throw(ImportError())))
             if f.code.startswith("package")]
    assert [f.code for f in found] == ["package_versions"]
    assert set(found[0].details["versions"]) == set(MIN_VERSIONS)


def test_real_machine_never_raises_and_reports():
    """Whatever this machine is (CI: no GPU, no NVML library), the checks return findings, no exception."""
    found = check_machine(Context(config={"crepa_enabled": True}))
    codes = {f.code for f in found}
    assert "package_versions" in codes
    assert codes & {"gpus", "nvml_unavailable", "driver_not_loaded"}
    assert all(f.severity in ("error", "warning", "info") for f in found)
