"""crepa_mem.planning.choose: the planner weighs RamTorch and its resident chunks, and the host ways out."""
from crepa_mem.planning.devices import from_size
from crepa_mem.planning.planner import plan
from crepa_mem.units import GiB


def run(**kw):
    kw.setdefault("teacher_gpus", [])
    kw.setdefault("host_ram_bytes", 256 * GiB)
    return plan("wan-2.1-14b", from_size(24 * GiB, "24GiB"), **kw)


def test_stream_plans_name_their_engine_and_why():
    p = run(train_gib=17)
    s = p.settings
    assert s["crepa_mem_encoder_tier"] == "stream" and s["crepa_mem_stream_engine"] in ("group_offload", "ramtorch")
    assert any(r.startswith(f"crepa_mem_stream_engine={s['crepa_mem_stream_engine']}") for r in p.reasons)
    cfg = p.to_config()
    assert cfg.stream_engine == s["crepa_mem_stream_engine"] and cfg.stream_resident_chunks == s[
        "crepa_mem_stream_resident_chunks"]


def test_ramtorch_wins_with_resident_chunks_when_transfers_are_not_hidden():
    # ViT-g fp32 over a 1 GB/s link: its 4.2 GiB of copies outlast its compute, so every chunk kept saves time
    card = from_size(24 * GiB, "24GiB")
    card.h2d_bytes_per_s = 10**9
    p = plan("wan-2.1-14b", card, train_gib=17, host_ram_bytes=256 * GiB, teacher_gpus=[], feature_cache=False)
    s = p.settings
    assert s["crepa_mem_encoder_tier"] == "stream" and s["crepa_mem_stream_engine"] == "ramtorch"
    assert s["crepa_mem_stream_resident_chunks"] > 0 and p.fits
    assert any("chosen because fewer bytes moved" in r for r in p.reasons)
    one_more = plan("wan-2.1-14b", card, train_gib=17.5, host_ram_bytes=256 * GiB, teacher_gpus=[], feature_cache=False)
    assert one_more.settings["crepa_mem_stream_resident_chunks"] <= s["crepa_mem_stream_resident_chunks"]


def test_short_host_ram_offers_nvme_or_a_shared_copy():
    p = run(train_gib=17, host_ram_bytes=8 * GiB, local_ranks=8)
    s = p.settings
    assert p.fits and (s["crepa_mem_stream_nvme_path"] or s["crepa_mem_host_share_path"])
    assert p.host["node_bytes"] <= 8 * GiB
