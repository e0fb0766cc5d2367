"""crepa_mem.planning.ladder: plan()'s search as one ordered list, best first."""
import pytest

from crepa_mem.config import CrepaConfig
from crepa_mem.planning import ladder as L
from crepa_mem.planning.devices import from_size
from crepa_mem.planning.planner import plan
from crepa_mem.profiles import get_encoder, get_model
from crepa_mem.units import GiB

WAN14 = dict(frames=81, height=480, width=832)
HOST = 1 << 40
AUTO = CrepaConfig(enabled=True, encoder_tier="auto", vae_tier="auto")


def _rungs(cfg=AUTO, model="wan-2.1-14b", **kw):
    return L.ladder(get_model(model), get_encoder(cfg.encoder), cfg, gpu=from_size(80 * GiB, "80GiB"),
                    host_ram_bytes=HOST, **{**WAN14, **kw})


@pytest.mark.parametrize("model", ["wan-2.1-14b", "ltxvideo-2b"])
def test_the_first_fitting_rung_is_plans_choice_for_every_budget(model):
    m = get_model(model)
    shape = dict(frames=m.default_frames, height=m.default_height, width=m.default_width)
    rungs = _rungs(model=model, **shape)
    compared = 0
    for quarter_gib in range(2, 120, 4):  # 0.5 … 29.5 GiB
        gpu = from_size(quarter_gib * GiB // 4, "x")
        p = plan(m, gpu, teacher_gpus=[], host_ram_bytes=HOST, headroom=0.1, train_gib=0, feature_cache=False,
                 may_drop_vae_encoder=False, **shape)
        rung = L.choose(rungs, L.budget_bytes(gpu.free_bytes, gpu.total_bytes, 0.1))
        if p.fits and p.quality_level == 0:
            compared += 1
            assert rung is not None and {k: p.settings[k] for k in rung.settings} == rung.settings, quarter_gib
        else:  # plan had to lower the quality (or nothing fits): no lossless runtime rung fits either
            assert rung is None
    assert compared >= 10


def test_rungs_are_in_preference_order_and_lossy_ones_need_allow_lossy():
    rungs = _rungs()
    assert rungs[0].settings["crepa_mem_encoder_tier"] == rungs[0].settings["crepa_mem_vae_tier"] == "gpu"
    assert rungs[0].settings["crepa_encoder_frames_batch_size"] == -1 and not any(r.lossy for r in rungs)
    assert not any(r.settings["crepa_drop_vae_encoder"] for r in rungs)  # the trainer may still encode with it
    lossy = _rungs(AUTO.replace(allow_lossy=True))
    assert lossy[:len(rungs)] == rungs and any(r.settings["crepa_mem_encoder_dtype"] == "bf16" for r in lossy)
    assert any(not r.settings["crepa_spatial_align"] for r in lossy) and all(r.lossy for r in lossy[len(rungs):])


def test_a_fixed_tier_stays_fixed():
    rungs = _rungs(AUTO.replace(vae_tier="swap"))
    assert {r.settings["crepa_mem_vae_tier"] for r in rungs} == {"swap"}
    assert len({r.settings["crepa_mem_encoder_tier"] for r in rungs}) == 3


def test_the_walk_down_ends_at_the_first_rung_that_fits_from_any_start():
    rungs = _rungs()
    budget = 6 * GiB
    target = L.choose(rungs, budget)
    for start in rungs[: rungs.index(target)]:
        failed, tried, current = start.peak_bytes, {start.key}, start
        while current.peak_bytes > budget:  # "really fits" taken as the estimate here
            current = L.next_rung(rungs, failed, tried)
            tried.add(current.key)
            failed = min(failed, current.peak_bytes) if current.peak_bytes > budget else failed
        assert current == target


def test_apply_and_rung_of_round_trip():
    rungs = _rungs()
    for rung in rungs[::17]:
        applied = L.apply(rung, AUTO.replace(block_index=12))
        assert applied.block_index == 12 and L.rung_of(rungs, applied) == rung


def test_backward_reserve_counts_the_margin_gradients_and_optimizer_states_before_the_first_step():
    assert L.backward_reserve_bytes(10 * GiB) == int(L.BACKWARD_MARGIN * 10 * GiB)
    with_grads = L.backward_reserve_bytes(10 * GiB, trainable_params=1000, trainable_bytes=2000)
    assert with_grads == int(L.BACKWARD_MARGIN * 10 * GiB) + 2000
    first = L.backward_reserve_bytes(10 * GiB, trainable_params=1000, trainable_bytes=2000,
                                     optimizer_states_allocated=False)
    assert first == with_grads + 1000 * L.ADAM_STATE_BYTES_PER_PARAM
    assert L.budget_bytes(20 * GiB, 80 * GiB, 0.05) == 20 * GiB - 4 * GiB
