"""crepa_mem.planning.host: host RAM, ulimit -l and local ranks read; host bytes planned per node."""
import resource

import pytest

from crepa_mem.planning import host as H
from crepa_mem.planning.planner import plan
from crepa_mem.planning.devices import from_size
from crepa_mem.units import GiB


def test_read_host_reads_ram_memlock_and_local_ranks(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    h = H.read_host()
    assert h.local_ranks == 8 and h.total_bytes and 0 < h.available_bytes <= h.total_bytes
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert h.pinned_limit_bytes == (None if soft == resource.RLIM_INFINITY else soft)
    assert H.read_host(ram_bytes=5 * GiB, ranks=2) .available_bytes == 5 * GiB
    assert H.local_ranks({"LOCAL_WORLD_SIZE": "x"}) == 1 and H.local_ranks({}) == 1


def test_meminfo_fallback_without_psutil(monkeypatch, tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:    8192 kB\n")
    assert H._meminfo(str(info)) == (16384 * 1024, 8192 * 1024)
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)  # import psutil → ImportError
    total, avail, source = H._ram()
    assert source == "/proc/meminfo" and total and avail


def test_wsl_is_told_from_proc_version(tmp_path):
    v = tmp_path / "version"
    v.write_text("Linux version 5.15.153.1-microsoft-standard-WSL2")
    assert H._is_wsl(str(v)) and not H._is_wsl(str(tmp_path / "missing"))


def test_node_bytes_multiply_private_copies_and_count_a_shared_one_once():
    host = H.HostInfo(total_bytes=64 * GiB, available_bytes=40 * GiB, pinned_limit_bytes=None, local_ranks=8)
    private = H.plan_host(host, H.host_parts(encoder_tier="swap", vae_tier="gpu", encoder_host_bytes=5 * GiB,
                                             vae_bytes=GiB))
    assert private.node_bytes == 40 * GiB and private.fits
    tight = H.HostInfo(64 * GiB, 39 * GiB, None, 8)
    p = H.plan_host(tight, H.host_parts(encoder_tier="swap", vae_tier="swap", encoder_host_bytes=5 * GiB,
                                        vae_bytes=GiB))
    assert not p.fits and p.node_bytes == 48 * GiB and "8 local rank(s)" in p.reasons[0]
    shared = H.plan_host(tight, H.host_parts(encoder_tier="swap", vae_tier="gpu", encoder_host_bytes=5 * GiB,
                                             vae_bytes=GiB, encoder_way="shared"))
    assert shared.fits and shared.node_bytes == 5 * GiB and shared.pinned_per_rank == 0


def test_pinned_limit_and_wsl_are_warnings():
    host = H.HostInfo(64 * GiB, 60 * GiB, pinned_limit_bytes=64 * 1024, local_ranks=1, wsl=True)
    p = H.plan_host(host, H.host_parts(encoder_tier="stream", vae_tier="gpu", encoder_host_bytes=GiB, vae_bytes=0))
    assert p.fits and any("ulimit -l" in r for r in p.reasons) and any("WSL2" in r for r in p.reasons)


def test_host_ram_counts_per_node_in_the_plan():
    card = from_size(24 * GiB, "24GiB")
    one = plan("wan-2.1-14b", card, train_gib=17, host_ram_bytes=12 * GiB, local_ranks=1, teacher_gpus=[],
               feature_cache=False)  # a chunked-loss cache would fit with no host copy at all
    assert one.fits and one.tiers["encoder"] in ("swap", "stream")
    eight = plan("wan-2.1-14b", card, train_gib=17, host_ram_bytes=12 * GiB, local_ranks=8, teacher_gpus=[],
                 feature_cache=False)
    assert eight.host["local_ranks"] == 8 and eight.host["node_bytes"] <= 12 * GiB
    # 8 private copies of the fp32 encoder do not fit 12 GiB: one shared copy or RamTorch's NVMe tier does
    assert eight.fits and (eight.settings["crepa_mem_host_share_path"] or eight.settings["crepa_mem_stream_nvme_path"])
    assert one.settings["crepa_mem_host_share_path"] is None and one.settings["crepa_mem_stream_nvme_path"] is None
    assert eight.to_dict()["host"]["node_bytes"] == eight.host["node_bytes"]
