import pytest
import torch

from crepa_mem.errors import TeacherOutOfMemoryError
from crepa_mem.teacher.path import (TeacherPath, decode_selected, denormalize_latents, pixel_frames,
                               vae_compression)
from crepa_mem.testing import tiny_dinov2, tiny_vae
from crepa_mem.teacher.tiers import place
from simpletuner_reference import st_decode, st_encode

LATENT_HW = {"wan": (4, 4), "wan2.2": (2, 2), "ltxvideo": (1, 1), "sanavideo": (4, 4), "kandinsky5_video": (4, 4)}


def _latents(vae, frames=3, batch=1, seed=0):
    h, w = LATENT_HW.get(type(vae).__name__, None) or (2, 2)
    ch = int(vae.config.get("z_dim") or vae.config["latent_channels"])
    return torch.randn(batch, ch, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _path(vae, encoder, size=28, chunk=None, **kw):
    return TeacherPath(vae=place(vae, "gpu", compute_device="cpu"), encoder=place(encoder, "gpu", compute_device="cpu"),
                       image_size=size, compute_device="cpu", frames_per_chunk=chunk, **kw)


@pytest.mark.parametrize("family", ["wan", "wan2.2", "ltxvideo", "kandinsky5_video"])
def test_selected_decode_equals_stock_decode_then_select(family):
    vae = tiny_vae(family)
    h, w = LATENT_HW[family]
    ch = int(vae.config.get("z_dim") or vae.config["latent_channels"])
    z = denormalize_latents(torch.randn(1, ch, 3, h, w), vae)
    frames = pixel_frames(vae, 3)
    keep = [0, frames // 2, frames - 1]
    with torch.no_grad():
        ref = vae.decode(z).sample.clamp(-1, 1)
        mine, decoded = decode_selected(vae, z, keep)
    assert decoded == ref.shape[2] == frames == 1 + vae_compression(vae)[0] * 2
    torch.testing.assert_close(mine, ref[:, :, keep], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["wan", "wan2.2", "ltxvideo", "kandinsky5_video"])
@pytest.mark.parametrize("registers", [False, True])
def test_select_then_encode_equals_simpletuner_encode_all_then_select(family, registers):
    vae, enc = tiny_vae(family), tiny_dinov2(registers=registers)
    lat = _latents(vae, frames=3, batch=2)
    h, w = LATENT_HW[family]
    lat = torch.randn(2, lat.shape[1], 3, h, w, generator=torch.Generator().manual_seed(3))
    target = 3  # DiT frames: patch_t = 1 for every family
    ours = _path(vae, enc).features(lat, target)
    all_frames = st_encode(enc, st_decode(vae, lat), 28)
    ref = all_frames[:, torch.linspace(0, all_frames.shape[1] - 1, target).long()]
    assert ours.frame_indices == torch.linspace(0, ours.pixel_frames - 1, target).long().tolist()
    assert ours.stats["frames_encoded"] == 2 * target < 2 * ours.pixel_frames
    torch.testing.assert_close(ours.features, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_chunked_equals_all_at_once(chunk):
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    lat = torch.randn(2, 16, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = _path(vae, enc).features(lat, 4)
    seen = []
    part = _path(vae, enc, chunk=chunk, on_chunk=seen.append).features(lat, 4)
    torch.testing.assert_close(part.features, whole.features, rtol=1e-5, atol=1e-6)
    assert max(seen) <= chunk and sum(seen) == 8


def test_oom_halves_the_chunk_and_keeps_earlier_chunks():
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    lat = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    whole = _path(vae, enc).features(lat, 4)
    calls = []

    def fail_big(n):
        calls.append(n)
        if n > 1 and len(calls) > 1:  # the first chunk succeeds, later ones OOM until 1 frame
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    got = _path(vae, enc, chunk=2, on_chunk=fail_big).features(lat, 4)
    torch.testing.assert_close(got.features, whole.features)
    assert got.stats["retries"] == 1 and got.stats["chunk_frames"] == 1
    assert calls[0] == 2 and calls[1] == 2 and set(calls[2:]) == {1}


def test_oom_at_one_frame_names_tiers_and_doctor():
    vae, enc = tiny_vae("wan"), tiny_dinov2()

    def always(n):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(TeacherOutOfMemoryError, match="crepa-mem doctor") as err:
        _path(vae, enc, chunk=4, on_chunk=always).features(torch.randn(1, 16, 2, 4, 4), 2)
    assert "encoder tier gpu" in str(err.value) and "VAE tier gpu" in str(err.value)


def test_other_errors_are_not_retried():
    vae, enc = tiny_vae("wan"), tiny_dinov2()

    def boom(n):
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        _path(vae, enc, chunk=4, on_chunk=boom).features(torch.randn(1, 16, 2, 4, 4), 2)


def test_true_grid_sizes_the_encoder_input_to_the_dit_grid():
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    out = _path(vae, enc, true_grid=True).features(torch.randn(1, 16, 2, 4, 6), 2, dit_grid=(2, 3))
    assert out.grid == (2, 3) and out.features.shape[2] == 6


def test_fewer_pixel_frames_than_dit_frames_keeps_all():
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    out = _path(vae, enc).features(torch.randn(1, 16, 2, 4, 4), target_frames=9)
    assert out.frame_indices == list(range(5))


def test_denormalize_per_family():
    z = torch.ones(1, 16, 1, 1, 1)
    wan = tiny_vae("wan")
    expect = torch.tensor(wan.config.latents_std) + torch.tensor(wan.config.latents_mean)
    torch.testing.assert_close(denormalize_latents(z, wan).flatten(), expect)
    hv = tiny_vae("kandinsky5_video")
    torch.testing.assert_close(denormalize_latents(z, hv), z / hv.config.scaling_factor)
    ltx = tiny_vae("ltxvideo")
    with torch.no_grad():
        ltx.latents_std.fill_(2.0)
        ltx.latents_mean.fill_(0.5)
    z = torch.ones(1, 128, 1, 1, 1)
    torch.testing.assert_close(denormalize_latents(z, ltx), z * 2.0 / ltx.config.scaling_factor + 0.5)


def test_ltx_timestep_conditioned_decoder_runs_with_a_zero_timestep():
    vae = tiny_vae("ltxvideo", timestep_conditioning=True)
    with torch.no_grad():
        frames, decoded = decode_selected(vae, torch.randn(1, 128, 2, 1, 1), [0, 1])
    assert decoded == pixel_frames(vae, 2) and frames.shape[2] == 2


def test_a_vae_that_yields_too_few_frames_is_an_error_not_garbage(monkeypatch):
    import crepa_mem.teacher.path as teacher
    from crepa_mem.errors import ShapeError

    real = teacher.decode_selected
    monkeypatch.setattr(teacher, "decode_selected", lambda vae, z, keep, **kw: (real(vae, z, keep, **kw)[0], 1))
    with pytest.raises(ShapeError, match="decoded 1 frames from 3 latent frames; expected 9"):
        _path(tiny_vae("wan"), tiny_dinov2()).features(torch.randn(1, 16, 3, 4, 4), 3)


def test_oom_back_off_keeps_the_working_chunk_for_later_steps():
    """Once 2 frames OOM and 1 works, later steps start at 1: one retry in all, not one per step."""
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    lat = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(2))

    def fail_big(n):
        if n > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    path = _path(vae, enc, chunk=4, on_chunk=fail_big)
    retries = [path.features(lat, 4).stats["retries"] for _ in range(3)]
    assert retries == [2, 0, 0] and path.working_chunk == 1


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: out of memory"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")])
def test_cuda_and_cublas_allocation_failures_are_ooms(error):
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    lat = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = _path(vae, enc).features(lat, 2)

    def fail_big(n):
        if n > 1:
            raise error

    got = _path(vae, enc, chunk=2, on_chunk=fail_big).features(lat, 2)
    torch.testing.assert_close(got.features, whole.features)
    assert got.stats["retries"] == 1


def test_oom_in_the_vae_decode_names_the_phase_and_what_to_try(monkeypatch):
    vae, enc = tiny_vae("wan"), tiny_dinov2()

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(vae.decoder, "forward", oom)
    with pytest.raises(TeacherOutOfMemoryError, match="VAE decode.*vae_decode.*VAE tier gpu.*crepa_mem_vae_tiling"):
        _path(vae, enc).features(torch.randn(1, 16, 2, 4, 4), 2)


def test_four_threads_on_one_wan_vae_get_the_serial_results():
    """The Wan VAE's causal decode cache lives on the module: concurrent callers must not share it mid-call."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    vae, enc = tiny_vae("wan"), tiny_dinov2()
    path = _path(vae, enc, chunk=2)
    lats = [torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    serial = [path.features(lat, 3).features for lat in lats]
    barrier = threading.Barrier(4)

    def run(i):
        if i < 4:
            barrier.wait()  # the first four start together
        return path.features(lats[i], 3).features

    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, range(16)))
    wrong = [i for i, (a, b) in enumerate(zip(serial, threaded)) if not torch.equal(a, b)]
    assert wrong == []
