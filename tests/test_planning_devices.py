"""GPU inspection through pynvml, with pynvml's functions monkeypatched (REFERENCE §5): no real NVML."""
from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from crepa_mem.planning import devices
from crepa_mem.errors import CrepaConfigError, ProfileNotFoundError
from crepa_mem.units import GB, GiB

CARDS = [  # physical NVML order
    dict(name="NVIDIA GeForce RTX 4090", uuid="GPU-aaaa1111", total=24 * GiB, reserved=300 * 2**20, free=20 * GiB,
         cc=(8, 9), gen=4, width=16, procs=[(4242, 3 * GiB)]),
    dict(name="NVIDIA H100 80GB HBM3", uuid="GPU-bbbb2222", total=80 * GiB, reserved=500 * 2**20, free=79 * GiB,
         cc=(9, 0), gen=5, width=16, procs=[]),
]


@pytest.fixture
def nvml(monkeypatch):
    """Two GPUs behind pynvml's real API names; returns a dict of knobs the tests flip."""
    state = {"init_error": None, "v2": True, "mig": None}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def init():
        if state["init_error"] is not None:
            raise pynvml.NVMLError(state["init_error"])

    def memory(h, version=None):
        c = CARDS[h] if isinstance(h, int) else state["mig"]
        used = c["total"] - c["free"] - c["reserved"]
        if version is None:
            return pynvml.c_nvmlMemory_t(c["total"], c["free"], used + c["reserved"])
        if not state["v2"]:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return pynvml.c_nvmlMemory_v2_t(version, c["total"], c["reserved"], c["free"], used)

    def field(key):
        return lambda h: (CARDS[h] if isinstance(h, int) else state["mig"])[key]

    def mig_mode(h):
        if state["mig"] is None or h != 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return (1, 1)

    patches = {
        "nvmlInit": init, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: len(CARDS),
        "nvmlDeviceGetHandleByIndex": lambda i: i, "nvmlDeviceGetName": field("name"),
        "nvmlDeviceGetUUID": field("uuid"), "nvmlDeviceGetMemoryInfo": memory,
        "nvmlDeviceGetCudaComputeCapability": field("cc"), "nvmlDeviceGetMaxPcieLinkGeneration": field("gen"),
        "nvmlDeviceGetMaxPcieLinkWidth": field("width"),
        "nvmlDeviceGetComputeRunningProcesses":
            lambda h: [SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in field("procs")(h)],
        "nvmlDeviceGetMigMode": mig_mode, "nvmlDeviceGetMaxMigDeviceCount": lambda h: 1,
        "nvmlDeviceGetMigDeviceHandleByIndex": lambda h, j: "mig0",
    }
    for name, fn in patches.items():
        monkeypatch.setattr(pynvml, name, fn)
    return state


def test_all_lists_every_gpu_with_memory_pcie_and_processes(nvml):
    a, b = devices.inspect_gpus("all")
    assert (a.name, a.uuid, a.index, a.cuda_index) == ("NVIDIA GeForce RTX 4090", "GPU-aaaa1111", 0, 0)
    assert a.total_bytes == 24 * GiB and a.free_bytes == 20 * GiB and a.reserved_bytes == 300 * 2**20
    assert a.used_bytes == 4 * GiB - 300 * 2**20
    assert a.compute_capability == "8.9" and (a.pcie_gen, a.pcie_width) == (4, 16)
    assert a.h2d_bytes_per_s == pytest.approx(25 * GB, rel=0.01)  # Gen4 x16 measured, REFERENCE §6
    assert b.h2d_bytes_per_s == pytest.approx(35 * GB, rel=0.01)  # Gen5 x16
    assert a.processes == [(4242, 3 * GiB)] and a.source == "nvml"
    assert a.catalog_name == "rtx4090" and a.bf16_tflops == 165.2 and b.catalog_name == "h100-sxm"


def test_auto_follows_local_rank(nvml, monkeypatch):
    assert devices.inspect_gpus("auto")[0].uuid == "GPU-aaaa1111"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.inspect_gpus("auto")[0].uuid == "GPU-bbbb2222"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(CrepaConfigError, match="LOCAL_RANK"):
        devices.inspect_gpus("auto")


@pytest.mark.parametrize("visible", ["GPU-bbbb2222", "GPU-bbbb", "1", "1,0"])
def test_cuda_visible_devices_is_mapped_by_uuid_or_index(nvml, monkeypatch, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    d = devices.inspect_gpus("auto")[0]
    assert (d.uuid, d.index, d.cuda_index) == ("GPU-bbbb2222", 1, 0)
    assert devices.inspect_gpus("cuda:0")[0].uuid == "GPU-bbbb2222"


def test_invalid_visible_entry_stops_enumeration(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,GPU-ffff,1")
    assert [d.uuid for d in devices.inspect_gpus("0")] == ["GPU-aaaa1111"]
    with pytest.raises(CrepaConfigError, match="0..0"):
        devices.inspect_gpus("1")
    assert "GPU-ffff" in devices.why_no_gpu()


def test_empty_visible_list_means_no_gpu(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.inspect_gpus("auto") == [] and "hides every GPU" in devices.why_no_gpu()
    assert devices.resolve_gpu("auto").source == "catalog"


def test_memory_v1_fallback(nvml):
    nvml["v2"] = False
    d = devices.inspect_gpus("0")[0]
    assert d.reserved_bytes is None and d.total_bytes == 24 * GiB and d.free_bytes == 20 * GiB


def test_mig_instances_are_listed_and_selectable(nvml, monkeypatch):
    nvml["mig"] = dict(name="unused", uuid="MIG-cccc3333", total=10 * GiB, reserved=0, free=9 * GiB, cc=(9, 0),
                       gen=None, width=None, procs=[])
    found = devices.inspect_gpus("all")
    assert [d.uuid for d in found] == ["GPU-aaaa1111", "GPU-bbbb2222", "MIG-cccc3333"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-cccc3333")
    d = devices.inspect_gpus("auto")[0]
    assert d.total_bytes == 10 * GiB and d.pcie_gen == 5 and "MIG" in d.note


@pytest.mark.parametrize("error", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_without_nvml_auto_finds_nothing_and_the_planner_gets_the_default_card(nvml, error):
    nvml["init_error"] = error
    assert devices.inspect_gpus("auto") == []
    assert "NVML unavailable" in devices.why_no_gpu()
    d = devices.resolve_gpu("auto")
    assert d.source == "catalog" and d.name == devices.DEFAULT_GPU and d.note.startswith("no GPU found")
    with pytest.raises(CrepaConfigError, match="NVML unavailable"):
        devices.inspect_gpus("1")


def test_catalog_names_and_sizes(nvml):
    (d,) = devices.inspect_gpus("RTX 4090")
    assert d.source == "catalog" and d.free_bytes == d.total_bytes == 24564 * 2**20 and d.bf16_tflops == 165.2
    assert devices.inspect_gpus("4090")[0].name == "rtx4090"
    (s,) = devices.inspect_gpus("24GB")
    assert s.source == "size" and s.total_bytes == s.free_bytes == 24 * GiB
    assert devices.inspect_gpus("24GiB")[0].total_bytes == 24 * GiB
    with pytest.raises(ProfileNotFoundError, match="rtx4090"):
        devices.inspect_gpus("rtx4099")


def test_other_visible_gpus(nvml):
    first = devices.inspect_gpus("auto")[0]
    (other,) = devices.other_visible_gpus(first)
    assert other.uuid == "GPU-bbbb2222" and other.cuda_index == 1
    assert devices.other_visible_gpus(devices.inspect_gpus("rtx4090")[0]) == []


def test_to_dict_is_plain(nvml):
    d = devices.inspect_gpus("0")[0].to_dict()
    assert d["processes"] == [{"pid": 4242, "used_bytes": 3 * GiB}] and d["total_bytes"] == 24 * GiB


def test_h2d_bandwidth():
    assert devices.h2d_bandwidth(None, 16) is None
    assert devices.h2d_bandwidth(4, 8) == pytest.approx(devices.h2d_bandwidth(4, 16) / 2, rel=1e-6)
