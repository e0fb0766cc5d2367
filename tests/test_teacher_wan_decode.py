import itertools

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import autoencoder_kl_wan as wan

from crepa_mem.teacher import wan_decode
from crepa_mem.teacher.path import denormalize_latents
from crepa_mem.teacher.wan_decode import HostCache, decode_kept_frames, lean_leaves
from crepa_mem.testing import tiny_vae
from crepa_mem.trace.runtime import FAKE_GPU, fake_gpu, materialize

# Latent sizes whose pixel widths leave vector tails (40, 56 px) next to round ones.
SHAPES = {"wan": (5, 7), "wan2.2": (3, 5)}


def _vae(family, dtype, tiled, slicing):
    vae = tiny_vae(family).to(dtype)
    if tiled:  # small tiles: several rows and columns of tiles, each blended with its neighbours
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                          tile_sample_stride_width=16)
    if slicing:
        vae.enable_slicing()
    return vae


def _z(vae, batch, frames=4, seed=0):
    h, w = SHAPES["wan2.2" if vae.config.patch_size else "wan"]
    z = torch.randn(batch, vae.config.z_dim, frames, h, w, generator=torch.Generator().manual_seed(seed))
    return denormalize_latents(z, vae).to(vae.dtype)


# Every family × dtype × tiling with one clip; batches of two (with and without the VAE's slicing) on two.
CASES = [(*c, 1, False) for c in itertools.product(["wan", "wan2.2"], [torch.float32, torch.bfloat16], [False, True])]
CASES += [("wan2.2", torch.bfloat16, True, 2, s) for s in (False, True)]
CASES += [("wan", torch.float32, False, 2, s) for s in (False, True)]


@pytest.mark.parametrize("family, dtype, tiled, batch, slicing", CASES)
def test_kept_frames_are_the_stock_decode_bit_for_bit(monkeypatch, family, dtype, tiled, batch, slicing):
    monkeypatch.setattr(wan_decode, "NORM_SLICE_BYTES", 4096)  # tiny activations still take the sliced norm
    vae = _vae(family, dtype, tiled, slicing)
    z = _z(vae, batch)
    with torch.no_grad():
        ref = vae.decode(z).sample.clamp(-1, 1)
    keep = [0, 3, 4, 9, 12]
    mine, decoded = decode_kept_frames(vae, z, [12, 0, 4, 3, 9, 4])  # any order, duplicates: sorted, once
    assert decoded == ref.shape[2] == 13
    assert mine.dtype == ref.dtype and mine.shape == ref[:, :, keep].shape
    torch.testing.assert_close(mine, ref[:, :, keep], rtol=0, atol=0)


def test_the_host_cache_path_gives_the_same_frames():
    vae = _vae("wan", torch.bfloat16, True, False)
    z = _z(vae, 1)
    a, _ = decode_kept_frames(vae, z, [0, 5, 12])
    cache = []
    real = HostCache.__setitem__

    def spy(self, i, v):
        cache.append(type(v).__name__)
        real(self, i, v)

    HostCache.__setitem__ = spy
    try:
        b, _ = wan_decode._decode_clip(vae, z, [0, 5, 12], per_frame_quant=False, cache_host=torch.device("cpu"))
    finally:
        HostCache.__setitem__ = real
    assert cache and "Tensor" in cache
    with torch.no_grad():
        ref = vae.decode(z).sample.clamp(-1, 1)
    vae.disable_tiling()
    torch.testing.assert_close(b.clamp(-1, 1), vae.decode(z).sample.clamp(-1, 1)[:, :, [0, 5, 12]], rtol=0, atol=0)
    torch.testing.assert_close(a, ref[:, :, [0, 5, 12]], rtol=0, atol=0)


def test_host_cache_entries_wait_on_the_host():
    with fake_gpu():
        cache = HostCache(3, torch.device("cpu"))
        cache[0] = torch.empty(2, 3, device=FAKE_GPU)
        cache[1] = "Rep"  # the upsampler's marker passes through
        assert cache[0].device.type == "cpu" and cache[1] == "Rep" and cache[2] is None


def test_each_latent_frame_is_one_decoder_call_per_tile():
    vae = _vae("wan", torch.float32, True, False)
    calls = []
    handle = vae.decoder.register_forward_hook(lambda m, a, o: calls.append(o.shape[2]))
    try:
        decode_kept_frames(vae, _z(vae, 1), [0])
    finally:
        handle.remove()
    rows, cols = len(range(0, 5, 3)), len(range(0, 7, 2))  # latent strides 24 / 8 and 16 / 8
    assert calls == [1, 4, 4, 4] * rows * cols


def test_lean_leaves_run_and_come_off_again(monkeypatch):
    monkeypatch.setattr(wan_decode, "NORM_SLICE_BYTES", 4096)
    vae = tiny_vae("wan").to(torch.bfloat16)
    ran = {"norm": 0, "conv": 0, "up": 0}
    for key, name in (("norm", "_rms_norm_sliced"), ("conv", "_causal_conv_one_buffer"), ("up", "_upsample_in_dtype")):
        fn = getattr(wan_decode, name)
        monkeypatch.setattr(wan_decode, name, lambda *a, _fn=fn, _k=key, **kw: (ran.__setitem__(_k, ran[_k] + 1),
                                                                               _fn(*a, **kw))[1])
    decode_kept_frames(vae, _z(vae, 1, frames=2), [0, 4])
    assert all(ran.values()), ran
    assert not any("forward" in m.__dict__ for m in vae.decoder.modules())


def test_a_leaf_with_its_own_forward_is_left_alone():
    vae = tiny_vae("wan")
    norm = vae.decoder.norm_out
    own = norm.forward
    norm.forward = own  # e.g. another library's hook
    with lean_leaves(vae.decoder):
        assert norm.__dict__["forward"] is own
        assert vae.decoder.conv_out.__dict__["forward"].__func__ is wan_decode._causal_conv_one_buffer
    assert norm.__dict__["forward"] is own and "forward" not in vae.decoder.conv_out.__dict__


def _meta_vae(tiled):
    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(tiny_vae("wan").config)
    if tiled:
        vae.enable_tiling(tile_sample_min_height=64, tile_sample_min_width=64, tile_sample_stride_height=56,
                          tile_sample_stride_width=56)  # 8-px blends: stock blends row by row, slow on fake tensors
    return vae


@pytest.mark.parametrize("tiled", [False, True])
def test_less_is_alive_than_in_the_stock_decode(tiled):
    """Fake-GPU peaks (the trace's counter) of the stock decode vs ours: 9 frames of 33 kept."""
    peaks = {}
    for name in ("stock", "ours") + (() if tiled else ("host cache",)):  # the host cache once (the slow part)
        with fake_gpu() as tracker:
            vae = materialize(_meta_vae(tiled), FAKE_GPU, torch.bfloat16)
            z = torch.empty(1, 16, 9, 12, 12, dtype=torch.bfloat16, device=FAKE_GPU)
            base = tracker.live_bytes()
            tracker.reset_peak()
            if name == "stock":
                vae.decode(z).sample.clamp(-1, 1)[:, :, list(range(0, 33, 4))]
            else:
                decode_kept_frames(vae, z, list(range(0, 33, 4)), cache_host="cpu" if name == "host cache" else None)
            peaks[name] = tracker.peak_bytes() - base
            h2d = tracker.h2d["all"]
        if name == "host cache":
            assert h2d > 0  # the cache came back to the device for every call
    assert peaks["ours"] < (0.5 if tiled else 0.9) * peaks["stock"], peaks
    assert tiled or peaks["host cache"] < peaks["ours"], peaks


def test_the_causal_conv_buffer_equals_cat_then_pad():
    conv = wan.WanCausalConv3d(6, 5, 3, padding=1)
    x, cache = torch.randn(1, 6, 4, 7, 9), torch.randn(1, 6, 1, 7, 9)
    for c in (None, cache, torch.cat([cache, cache], 2)):
        ref = conv(x, c)
        mine = wan_decode._causal_conv_one_buffer(conv, x, c)
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    one = wan.WanCausalConv3d(6, 5, 1)  # no padding: the input itself goes in
    torch.testing.assert_close(wan_decode._causal_conv_one_buffer(one, x), one(x), rtol=0, atol=0)
