"""crepa_mem.planning.choose: the planner weighs RamTorch and its resident chunks, and the host ways out."""
import dataclasses

from crepa_mem.planning.devices import from_size
from crepa_mem.profiles import get_encoder, get_model
from crepa_mem.planning.planner import plan
from crepa_mem.units import GiB


def run(**kw):
    kw.setdefault("teacher_gpus", [])
    kw.setdefault("host_ram_bytes", 256 * GiB)
    return plan("wan-2.1-14b", from_size(24 * GiB, "24GiB"), **kw)


def test_stream_plans_name_their_engine_and_why():
    p = run(train_gib=17, feature_cache=False)  # a chunked-loss cache would fit too, and win on time
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
    p = run(train_gib=17, host_ram_bytes=8 * GiB, local_ranks=8, feature_cache=False)
    s = p.settings
    assert p.fits and (s["crepa_mem_stream_nvme_path"] or s["crepa_mem_host_share_path"])
    assert p.host["node_bytes"] <= 8 * GiB


def test_the_loss_chunk_is_taken_before_any_lossy_rung_and_written():
    """24 GiB with 20 GiB for training: the whole loss phase (≈ 2 GiB) does not fit beside a streamed fp32
    ViT-g, its chunks do: the top teacher stays, chunked, with the recomputation's time in the plan."""
    from crepa_mem.planning.step_time import loss_recompute_seconds

    p = run(train_gib=20, feature_cache=False)
    s = p.settings
    assert p.fits and p.quality_level == 0 and (s["crepa_encoder"], s["crepa_mem_encoder_dtype"]) == ("dinov2_vitg14",
                                                                                                     "fp32")
    assert s["crepa_mem_loss_chunk"] in (8, 4, 2, 1)
    assert p.estimate.phase_bytes["loss"] <= p.budget["budget_bytes"]
    whole = [r for r in p.reasons if r.startswith(f"crepa_mem_loss_chunk={s['crepa_mem_loss_chunk']}:")]
    assert len(whole) == 1 and "loss and gradient equal within 1e-6" in whole[0]
    cost = next(c for c in p.costs if c["setting"] == "crepa_mem_loss_chunk")
    assert cost["overhead_s"] == round(loss_recompute_seconds(p.model, get_encoder("dinov2_vitg14"), frames=81,
                                                              height=480, width=832, batch=1,
                                                              chunk=s["crepa_mem_loss_chunk"], bf16_tflops=None), 4)
    assert p.to_config().loss_chunk == s["crepa_mem_loss_chunk"]
    roomy = run(train_gib=8, feature_cache=False)  # the whole loss fits: no recomputation
    assert roomy.settings["crepa_mem_loss_chunk"] == -1


def test_a_loss_chunk_is_offered_only_where_the_loss_phase_sets_the_peak():
    from crepa_mem.planning import choose
    from crepa_mem.planning.planner import Candidate, Level, _Ctx, _evaluate

    ctx = _Ctx(get_model("wan-2.1-14b"), from_size(24 * GiB, "24GiB"), 81, 480, 832, 1, 2 * GiB, None, {}, 0.1)
    level = Level("dinov2_vitg14", 518, "fp32", True)
    evaluate = lambda c: _evaluate(ctx, c)  # noqa: E731
    resident = Candidate(level)  # the encoder's activations set the peak, not the loss
    assert evaluate(resident)[0].peak_phase != "loss" and choose.loss_twin(ctx, resident, evaluate) is None
    cached = Candidate(dataclasses.replace(level, cache=True), "cache", "cache")
    twin = choose.loss_twin(ctx, cached, evaluate)
    assert twin.loss_chunk == 8 and evaluate(twin)[1] and not evaluate(cached)[1]
