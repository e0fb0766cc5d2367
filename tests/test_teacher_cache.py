import gzip
import io

import pytest
import torch
from safetensors.torch import save_file

from crepa_mem import CrepaConfig, CrepaRegularizer
from crepa_mem.teacher.cache import (FeatureCacheTeacher, LatentFileError, build_feature_cache, encoder_identity,
                             find_latent_files, load_vae, read_latents)
from crepa_mem.teacher.store import FeatureStore, _host
from crepa_mem.errors import FeatureCacheError
from crepa_mem.testing import tiny_dinov2, tiny_vae

D_DIT = 24


def dead_pid() -> int:
    """The pid of a process that has exited (a killed build's)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)
FRAMES, HW = 3, (4, 4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Wan VAE and DINOv2 saved with save_pretrained, as users pass them (--vae DIR, --encoder DIR)."""
    root = tmp_path_factory.mktemp("models")
    tiny_vae("wan").save_pretrained(root / "vae")
    tiny_dinov2().save_pretrained(root / "enc")
    return root


def _latents(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, FRAMES, *HW, generator=g) for _ in range(n)]


def _write_dir(path, latents):
    path.mkdir(parents=True, exist_ok=True)
    for i, lat in enumerate(latents):
        torch.save(lat, path / f"{i:03d}.pt")
    return path


def _cfg(models, **kw):
    return CrepaConfig(encoder=str(models / "enc"), encoder_image_size=70, encoder_frames_batch_size=1, **kw)


def _build(models, lat_dir, out, cfg=None, **kw):
    from crepa_mem.teacher.encoders import load_encoder

    cfg = cfg or _cfg(models)
    return build_feature_cache(find_latent_files(lat_dir), out, cfg=cfg, encoder=load_encoder(cfg.encoder),
                               vae=load_vae(models / "vae"), source_root=lat_dir, **kw)


def _cache_cfg(cfg, out):
    return cfg.replace(encoder_tier="cache", vae_tier="cache", feature_cache=str(out))


def _hidden(batch, seed=1):
    return torch.randn(batch, FRAMES, (HW[0] // 2) * (HW[1] // 2), D_DIT,
                       generator=torch.Generator().manual_seed(seed))


def _pair(models, out, cfg):
    """Regularizers with the cache and with the live encoder + VAE, sharing one projector."""
    from crepa_mem.teacher.encoders import load_encoder

    cached = CrepaRegularizer(_cache_cfg(cfg, out), D_DIT, device="cpu")
    live = CrepaRegularizer(cfg, D_DIT, encoder=load_encoder(cfg.encoder), vae=load_vae(models / "vae"),
                            device="cpu")
    live.projector.load_state_dict(cached.projector.state_dict())
    return cached, live


def test_cache_gives_the_identical_loss(models, tmp_path):
    lats = _latents(3)
    lat_dir = _write_dir(tmp_path / "lat", lats)
    summary = _build(models, lat_dir, tmp_path / "out")
    assert (summary.files, summary.written, summary.skipped) == (3, 3, 0)
    cached, live = _pair(models, tmp_path / "out", _cfg(models))
    assert cached.teacher.encoder_dim == live.encoder_dim == 32
    for i, lat in enumerate(lats):  # per sample: bit-identical features, so the identical loss
        h = _hidden(1, seed=i)
        loss_c, logs_c = cached.compute_loss(h, lat[None])
        loss_l, logs_l = live.compute_loss(h, lat[None])
        assert torch.equal(loss_c, loss_l)
        assert logs_c["crepa_alignment_score"] == logs_l["crepa_alignment_score"]
    assert logs_c["crepa_teacher_tier"] == logs_c["crepa_teacher_encoder_tier"] == "cache"
    assert logs_c["crepa_teacher_vae_tier"] == "cache" and logs_c["crepa_teacher_hits"] == 1
    # A batch: the live VAE decodes both samples in one call, which on CPU differs from one-by-one
    # decoding in the last bits (~1e-6); the cache holds the one-by-one result.
    h = _hidden(2)
    loss_c, logs_c = cached.compute_loss(h, torch.stack(lats[:2]))
    loss_l, _ = live.compute_loss(h, torch.stack(lats[:2]))
    torch.testing.assert_close(loss_c, loss_l, rtol=1e-5, atol=0)
    assert logs_c["crepa_teacher_hits"] == 2


def test_interrupted_build_resumes_without_corrupt_entries(models, tmp_path):
    lat_dir = _write_dir(tmp_path / "lat", _latents(4, seed=3))
    out = tmp_path / "out"

    def die_after_two(n):
        if n == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        _build(models, lat_dir, out, on_entry=die_after_two)
    store = FeatureStore.open(out)
    assert len(list(store.keys())) == 2
    # a process killed inside a write leaves only its temp file, which the next build removes
    shard = next((out / "entries").iterdir())
    (shard / f".tmp-r0-p{dead_pid()}@{_host()}~killed.part").write_bytes(b"half an entry")
    summary = _build(models, lat_dir, out)
    assert (summary.skipped, summary.written, summary.repaired) == (2, 2, 0)
    keys = list(store.keys())
    assert len(keys) == 4 and all(store.verify(k) is None for k in keys)
    assert store.temp_files() == []
    again = _build(models, lat_dir, out)
    assert (again.skipped, again.written) == (4, 0)


def test_corrupt_entry_is_an_error_on_read_and_rebuilt_on_resume(models, tmp_path):
    lats = _latents(2, seed=5)
    lat_dir = _write_dir(tmp_path / "lat", lats)
    out = tmp_path / "out"
    _build(models, lat_dir, out)
    store = FeatureStore.open(out)
    victim = store.path_of(next(store.keys()))
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x01
    victim.write_bytes(bytes(data))
    teacher = FeatureCacheTeacher.open(out, _cfg(models))
    with pytest.raises(FeatureCacheError, match="checksum"):
        for lat in lats:
            teacher.features(lat[None], FRAMES)
    summary = _build(models, lat_dir, out)
    assert (summary.repaired, summary.skipped) == (1, 1)
    for lat in lats:
        assert teacher.features(lat[None], FRAMES).features.shape == (1, FRAMES, 25, 32)


def test_settings_mismatch_is_an_error(models, tmp_path):
    lat_dir = _write_dir(tmp_path / "lat", _latents(1))
    _build(models, lat_dir, tmp_path / "out")
    for change, key in [({"encoder_image_size": 98}, "encoder_image_size"),
                        ({"encoder_dtype": "bf16"}, "encoder_dtype"),
                        ({"encoder": "dinov2_vits14"}, "encoder"),
                        ({"vae_tiling": True}, "vae_tiling")]:
        with pytest.raises(FeatureCacheError, match=f"{key}: cache has"):
            CrepaRegularizer(_cache_cfg(_cfg(models).replace(**change), tmp_path / "out"), D_DIT, device="cpu")
    other_vae = tiny_vae("kandinsky5_video")
    with pytest.raises(FeatureCacheError, match="vae_class: cache has 'AutoencoderKLWan'"):
        FeatureCacheTeacher.open(tmp_path / "out", _cfg(models), vae=other_vae)
    FeatureCacheTeacher.open(tmp_path / "out", _cfg(models), vae=load_vae(models / "vae"))  # the same VAE: fine


def test_missing_entry_and_other_frame_selection_are_errors(models, tmp_path):
    lats = _latents(2, seed=7)
    lat_dir = _write_dir(tmp_path / "lat", lats[:1])
    _build(models, lat_dir, tmp_path / "out")
    teacher = FeatureCacheTeacher.open(tmp_path / "out", _cfg(models))
    with pytest.raises(FeatureCacheError, match="no entry for batch item 1"):
        teacher.features(torch.stack(lats), FRAMES)
    with pytest.raises(FeatureCacheError, match="no entry"):
        teacher.features(lats[0][None].to(torch.bfloat16), FRAMES)  # a cast latent is another tensor
    with pytest.raises(FeatureCacheError, match="built for 3 DiT frames"):
        teacher.features(lats[0][None], 2)


def test_latents_dtype_builds_for_the_trainers_cast(models, tmp_path):
    lats = _latents(1, seed=9)
    lat_dir = _write_dir(tmp_path / "lat", lats)
    _build(models, lat_dir, tmp_path / "out", latents_dtype=torch.bfloat16)
    teacher = FeatureCacheTeacher.open(tmp_path / "out", _cfg(models))
    assert teacher.features(lats[0][None].to(torch.bfloat16), FRAMES).stats["hits"] == 1
    with pytest.raises(FeatureCacheError, match="latents as bfloat16"):
        teacher.features(lats[0][None], FRAMES)


def test_target_frames_and_true_grid_are_recorded(models, tmp_path):
    lats = _latents(1, seed=11)
    lat_dir = _write_dir(tmp_path / "lat", lats)
    cfg = _cfg(models, true_grid=True)
    _build(models, lat_dir, tmp_path / "out", cfg=cfg, target_frames=2, patch_size=(1, 2, 2))
    teacher = FeatureCacheTeacher.open(tmp_path / "out", cfg)
    result = teacher.features(lats[0][None], 2, dit_grid=(2, 2))
    assert result.frame_indices == [0, 8] and result.pixel_frames == 9 and result.grid == (2, 2)
    with pytest.raises(FeatureCacheError, match="grid"):
        teacher.features(lats[0][None], 2, dit_grid=(1, 4))


def test_reads_simpletuner_and_plain_latent_files(tmp_path):
    x = torch.randn(16, 3, 4, 4)
    torch.save(x, tmp_path / "plain.pt")
    torch.save({"latents": x, "num_frames": 9, "height": 32, "width": 32}, tmp_path / "ltx_style.pt")
    buf = io.BytesIO()
    torch.save(x, buf)
    (tmp_path / "compressed.pt").write_bytes(gzip.compress(buf.getvalue()))  # compress_disk_cache
    save_file({"latents": x}, tmp_path / "named.safetensors")
    save_file({"z": x}, tmp_path / "single.safetensors")
    for name in ("plain.pt", "ltx_style.pt", "compressed.pt", "named.safetensors", "single.safetensors"):
        (got,) = read_latents(tmp_path / name)
        assert torch.equal(got, x), name
    torch.save(torch.stack([x, x + 1]), tmp_path / "batch.pt")
    assert [torch.equal(a, b) for a, b in zip(read_latents(tmp_path / "batch.pt"), [x, x + 1])] == [True, True]
    torch.save(x[:, 0], tmp_path / "image.pt")
    assert read_latents(tmp_path / "image.pt")[0].shape == (16, 1, 4, 4)
    (tmp_path / ".hidden.pt").write_bytes(b"")
    assert ".hidden.pt" not in [p.name for p in find_latent_files(tmp_path)]


def test_bad_latent_files_are_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    torch.save({"prompt_embeds": torch.zeros(2)}, tmp_path / "embeds.pt")
    torch.save(torch.zeros(2, 2), tmp_path / "flat.pt")
    for name, msg in [("junk.pt", "cannot read"), ("embeds.pt", "without a 'latents'"), ("flat.pt", "shape")]:
        with pytest.raises(LatentFileError, match=msg) as err:
            read_latents(tmp_path / name)
        assert name in str(err.value) and err.value.exit_code == 2


def test_wrong_channel_count_is_bad_input(models, tmp_path):
    lat_dir = tmp_path / "lat"
    lat_dir.mkdir()
    torch.save(torch.randn(128, 2, 1, 1), lat_dir / "ltx.pt")  # LTX latents, Wan VAE
    with pytest.raises(LatentFileError, match="128 channels"):
        _build(models, lat_dir, tmp_path / "out")


def test_encoder_identity_follows_content_not_location(models, tmp_path):
    import shutil

    assert encoder_identity("dinov2_vitg14") == encoder_identity("dinov2-vitg14") == "facebook/dinov2-giant"
    moved = tmp_path / "elsewhere"
    shutil.copytree(models / "enc", moved)
    assert encoder_identity(str(moved)) == encoder_identity(str(models / "enc"))
    tiny_dinov2(seed=1).save_pretrained(tmp_path / "other")
    assert encoder_identity(str(tmp_path / "other")) != encoder_identity(str(models / "enc"))


def test_a_bit_flip_in_an_entry_header_is_reported_and_repaired_by_a_resume(models, tmp_path):
    """The flip that used to give a KeyError (a metadata key's name) in verify and in the resume."""
    lats = _latents(2, seed=13)
    lat_dir = _write_dir(tmp_path / "lat", lats)
    out = tmp_path / "out"
    _build(models, lat_dir, out)
    store = FeatureStore.open(out)
    victim = store.path_of(next(store.keys()))
    data = victim.read_bytes()
    at = data.index(b'"dit_grid"') + 1
    victim.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])  # "dit_grid" → "eit_grid"
    assert "corrupt" in store.verify(victim.stem)
    summary = _build(models, lat_dir, out)
    assert (summary.repaired, summary.skipped) == (1, 1)
    assert all(store.verify(k) is None for k in store.keys())


def test_non_finite_values_in_a_cached_latent_are_reported_at_build(models, tmp_path):
    lat = _latents(1)[0]
    lat[3, 1, 2, 2] = float("nan")
    lat_dir = _write_dir(tmp_path / "lat", [lat])
    with pytest.raises(LatentFileError, match=r"000\.pt.*1 NaN/Inf"):
        _build(models, lat_dir, tmp_path / "out")


def test_a_gzip_latent_file_is_read_with_a_size_cap(tmp_path, monkeypatch):
    import crepa_mem.teacher.cache as cache

    buf = io.BytesIO()
    torch.save(torch.zeros(16, 3, 64, 64), buf)  # 786 kB of zeros: a few kB gzipped
    (tmp_path / "bomb.pt").write_bytes(gzip.compress(buf.getvalue()))
    assert (tmp_path / "bomb.pt").stat().st_size < 10_000
    monkeypatch.setattr(cache, "MAX_LATENT_FILE_BYTES", 100_000)
    with pytest.raises(LatentFileError, match="bomb.pt.*more than 100000 bytes once decompressed"):
        read_latents(tmp_path / "bomb.pt")
    monkeypatch.setattr(cache, "MAX_LATENT_FILE_BYTES", 1_000_000)
    assert read_latents(tmp_path / "bomb.pt")[0].shape == (16, 3, 64, 64)


def test_a_build_starting_beside_a_running_one_leaves_its_temps_alone(models, tmp_path, monkeypatch):
    """Build B (another process) starts while build A is between writing an entry's temp file and
    renaming it: B's clean-up must not remove A's temp, or A's os.replace fails."""
    import os
    import subprocess
    import sys

    lat_dir = _write_dir(tmp_path / "lat", _latents(2, seed=17))
    out = tmp_path / "out"
    real_replace = os.replace
    started = []

    def second_build_starts(src, dst):
        if not started and str(src).endswith(".part") and "entries" in str(src):
            started.append(subprocess.run(
                [sys.executable, "-c", "import sys; from crepa_mem.teacher.store import FeatureStore; "
                 "print(FeatureStore.open(sys.argv[1]).remove_stale_temps())", str(out)],
                capture_output=True, text=True, check=True).stdout.strip())
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_build_starts)
    summary = _build(models, lat_dir, out)
    assert started == ["0"] and summary.written == 2
    store = FeatureStore.open(out)
    assert all(store.verify(k) is None for k in store.keys()) and store.temp_files() == []
