"""Every tier gives the `gpu` tier's features and loss exactly (fp32), through TeacherPath and CrepaRegularizer.

Tiers only change where weights sit, never the arithmetic, so on one device the results are bit-identical.
"""
import copy
import itertools

import pytest
import torch

from crepa_mem import CrepaConfig, CrepaRegularizer
from crepa_mem.teacher.path import TeacherPath
from crepa_mem.testing import tiny_dinov2, tiny_vae
from crepa_mem.teacher.tiers import place

TIERS = ("gpu", "swap", "stream", "device")
LATENT_HW = {"wan": (4, 4), "wan2.2": (2, 2), "ltxvideo": (1, 1), "kandinsky5_video": (4, 4)}


def _latents(vae, family, batch=2, frames=3, seed=0):
    ch = int(vae.config.get("z_dim") or vae.config["latent_channels"])
    return torch.randn(batch, ch, frames, *LATENT_HW[family], generator=torch.Generator().manual_seed(seed))


def _features(vae, enc, lat, vae_tier, enc_tier, chunk=2, dtype=None, on_chunk=None):
    path = TeacherPath(vae=place(copy.deepcopy(vae), vae_tier, compute_device="cpu", teacher_device="cpu"),
                       encoder=place(copy.deepcopy(enc), enc_tier, compute_device="cpu", teacher_device="cpu",
                                     dtype=dtype),
                       image_size=28, compute_device="cpu", frames_per_chunk=chunk, on_chunk=on_chunk)
    first = path.features(lat, lat.shape[2])
    second = path.features(lat, lat.shape[2])  # hooks and swaps leave nothing behind between steps
    torch.testing.assert_close(second.features, first.features, rtol=0, atol=0)
    return first


@pytest.fixture(scope="module")
def wan_reference():
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    lat = _latents(vae, "wan")
    return vae, enc, lat, _features(vae, enc, lat, "gpu", "gpu").features


@pytest.mark.parametrize("vae_tier,enc_tier", list(itertools.product(TIERS, TIERS)))
def test_every_tier_pair_equals_gpu_on_wan(wan_reference, vae_tier, enc_tier):
    vae, enc, lat, ref = wan_reference
    out = _features(vae, enc, lat, vae_tier, enc_tier)
    torch.testing.assert_close(out.features, ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["wan2.2", "ltxvideo", "kandinsky5_video"])
def test_streamed_vae_and_swapped_encoder_equal_gpu_on_other_families(family):
    vae, enc = tiny_vae(family), tiny_dinov2(registers=True)
    lat = _latents(vae, family)
    ref = _features(vae, enc, lat, "gpu", "gpu").features
    for vae_tier, enc_tier in (("stream", "swap"), ("swap", "stream")):
        torch.testing.assert_close(_features(vae, enc, lat, vae_tier, enc_tier).features, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_encoder_is_the_same_on_every_tier_and_close_to_fp32(wan_reference, dtype):
    vae, enc, lat, ref32 = wan_reference
    outs = [_features(vae, enc, lat, "gpu", tier, dtype=dtype).features for tier in TIERS]
    assert outs[0].dtype == dtype
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0].float(), ref32, rtol=0.05, atol=0.05)


def test_oom_back_off_under_streamed_tiers_gives_the_same_features(wan_reference):
    vae, enc, lat, ref = wan_reference
    calls = []

    def oom_on_big_chunks(n):
        calls.append(n)
        if n > 1 and len(calls) > 1:
            raise torch.OutOfMemoryError("injected")

    out = _features(vae, enc, lat, "stream", "stream", chunk=4, on_chunk=oom_on_big_chunks)
    torch.testing.assert_close(out.features, ref, rtol=0, atol=0)
    assert out.stats["retries"] >= 1 and out.stats["chunk_frames"] == 1


@pytest.mark.parametrize("enc_tier,vae_tier", [("swap", "swap"), ("stream", "stream"), ("device", "device"),
                                               ("stream", "swap")])
def test_regularizer_loss_and_gradient_equal_across_tiers(enc_tier, vae_tier):
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(2, 16, 3, 4, 4, generator=g)
    hidden = torch.randn(2, 3, 4, 24, generator=g, requires_grad=True)
    results = []
    for tiers in ({}, {"crepa_mem_encoder_tier": enc_tier, "crepa_mem_vae_tier": vae_tier,
                       "crepa_mem_teacher_device": "cpu"}):
        cfg = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_encoder_image_size": 70,
                                     "crepa_encoder_frames_batch_size": 2, **tiers})
        torch.manual_seed(0)  # same projector init
        reg = CrepaRegularizer(cfg, hidden_size=24, encoder=copy.deepcopy(enc), vae=copy.deepcopy(vae), device="cpu")
        loss, logs = reg.compute_loss(hidden, lat, step=0)
        (grad,) = torch.autograd.grad(loss, hidden)
        results.append((loss.detach(), grad, logs))
    (l0, g0, logs0), (l1, g1, logs1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    assert logs1["crepa_alignment_score"] == logs0["crepa_alignment_score"]


def test_streamed_vae_under_spatial_tiling_equals_gpu():
    from crepa_mem.teacher.vae import prepare_vae

    cfg = CrepaConfig(vae_tiling=True, vae_tile_size=64)
    vae, enc = prepare_vae(tiny_vae("wan"), cfg), tiny_dinov2()
    lat = torch.randn(1, 16, 2, 16, 16, generator=torch.Generator().manual_seed(4))  # 128 px: 2×2 tiles of 64
    ref = _features(vae, enc, lat, "gpu", "gpu").features
    torch.testing.assert_close(_features(vae, enc, lat, "stream", "gpu").features, ref, rtol=0, atol=0)
