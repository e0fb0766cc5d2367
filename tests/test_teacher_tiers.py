"""Tiers: where weights live between and during teacher steps.

On a CPU-only machine the real cross-device moves are checked on a fake `cuda:0` (crepa_mem.trace.runtime):
the tiers' own code runs unchanged, and the live bytes on the fake GPU show where the weights are.
"""
import pytest
import torch

from crepa_mem.errors import CrepaConfigError
from crepa_mem.testing import devices_of, meta_dinov2, tiny_dinov2
from crepa_mem.teacher.placement import Placement, module_bytes, move_module
from crepa_mem.teacher.tiers import SwapPlacement, place
from crepa_mem.trace.runtime import FAKE_GPU, fake_gpu, materialize


@pytest.mark.parametrize("tier", ["gpu", "swap", "stream", "device"])
def test_place_returns_the_tier_and_where_inputs_go(tier):
    enc = tiny_dinov2()
    p = place(enc, tier, compute_device="cpu", teacher_device="cpu")
    assert isinstance(p, Placement) and p.tier == tier and p.exec_device == torch.device("cpu")
    facts = p.facts()
    assert facts["tier"] == tier and facts["device"] == "cpu"
    with p.active() as m:
        assert m is enc
        out = m(pixel_values=torch.randn(1, 3, 28, 28)).last_hidden_state
    assert out.shape == (1, 5, 32)


def test_unknown_and_cache_tiers_are_config_errors():
    with pytest.raises(CrepaConfigError, match="valid is gpu"):
        place(tiny_dinov2(), "ram", compute_device="cpu")
    with pytest.raises(CrepaConfigError, match="feature_cache"):
        place(tiny_dinov2(), "cache", compute_device="cpu")


def test_move_module_keeps_parameter_objects_ties_and_integer_buffers():
    lin = torch.nn.Linear(4, 4)
    seq = torch.nn.Sequential(lin, torch.nn.Linear(4, 4))
    seq[1].weight = lin.weight  # tied
    seq.register_buffer("steps", torch.arange(3))
    ids = [id(p) for p in seq.parameters()]
    move_module(seq, "cpu", torch.bfloat16)
    assert [id(p) for p in seq.parameters()] == ids
    assert seq[1].weight is seq[0].weight and seq[0].weight.dtype == torch.bfloat16
    assert seq.steps.dtype == torch.int64


def test_swap_moves_weights_in_for_the_step_and_releases_them_after():
    enc = meta_dinov2()
    with fake_gpu() as bytes_:
        materialize(enc, "cpu")
        size = module_bytes(enc)
        p = place(enc, "swap", compute_device=FAKE_GPU)
        assert isinstance(p, SwapPlacement) and p.facts()["host_pinned"] is False  # no CUDA here
        params = list(enc.parameters())
        assert devices_of(enc) == {"cpu"} and bytes_.live_bytes() == 0
        with p.active() as m:
            assert devices_of(m) == {"cuda:0"} and bytes_.live_bytes() == size
            with p.active():  # nested use moves nothing twice
                assert bytes_.live_bytes() == size
            m(pixel_values=torch.empty(2, 3, 28, 28, device=FAKE_GPU))
        assert devices_of(enc) == {"cpu"} and bytes_.live_bytes() == 0
        assert list(enc.parameters()) == params  # same Parameter objects throughout






def test_device_tier_runs_on_the_teacher_device():
    enc = meta_dinov2()
    with fake_gpu() as bytes_:
        materialize(enc, "cpu")
        p = place(enc, "device", compute_device=FAKE_GPU, teacher_device="cpu")
        assert p.exec_device == torch.device("cpu") and bytes_.live_bytes() == 0
        with p.active() as m:
            m(pixel_values=torch.empty(1, 3, 28, 28))
        assert bytes_.peak_bytes(FAKE_GPU) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tier", ["swap", "stream"])
def test_cuda_tiers_pin_host_memory_and_match_gpu(tier):
    ref_enc = tiny_dinov2()
    x = torch.randn(2, 3, 28, 28)
    ref = place(tiny_dinov2(), "gpu", compute_device="cuda").module(pixel_values=x.cuda()).last_hidden_state
    p = place(ref_enc, tier, compute_device="cuda")
    assert all(t.is_pinned() for t in p.module.encoder.parameters())
    with p.active() as m:
        out = m(pixel_values=x.cuda()).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


