import json
import os

import pytest
import torch

from crepa_mem.teacher.store import (MANIFEST, STALE_SECONDS, FeatureStore, _host, atomic_write, temp_prefix, latent_key, settings_diff,
                                   tensor_checksum)
from crepa_mem.errors import FeatureCacheError

SETTINGS = {"encoder": "facebook/dinov2-small", "encoder_image_size": 224, "encoder_dtype": "fp32"}


def _store(tmp_path, settings=SETTINGS):
    return FeatureStore.create(tmp_path / "store", settings, encoder_dim=8)


def _write(store, key="ab" * 32, feats=None):
    feats = torch.randn(3, 4, 8) if feats is None else feats
    store.write(key, feats, frame_indices=[0, 4, 8], pixel_frames=9, target_frames=3, grid=(2, 2), dit_grid=None,
                source="a.pt")
    return key, feats


def test_latent_key_depends_on_bytes_dtype_and_shape_only():
    x = torch.randn(4, 3, 2, 2)
    assert latent_key(x) == latent_key(x.clone())
    assert latent_key(x.transpose(2, 3)) == latent_key(x.transpose(2, 3).contiguous())  # views hash their values
    assert latent_key(x) != latent_key(x.to(torch.bfloat16))
    assert latent_key(x) != latent_key(x.reshape(4, 3, 4, 1))
    y = x.clone()
    y[0, 0, 0, 0] += 1e-6
    assert latent_key(x) != latent_key(y)
    assert len(latent_key(x.to(torch.bfloat16))) == 64  # bf16 has no numpy dtype; hashed as raw bytes


def test_round_trip_keeps_features_and_selection(tmp_path):
    store = _store(tmp_path)
    key, feats = _write(store)
    entry = FeatureStore.open(tmp_path / "store").read(key)
    assert torch.equal(entry.features, feats)
    assert (entry.frame_indices, entry.pixel_frames, entry.target_frames, entry.grid, entry.dit_grid) == \
        ([0, 4, 8], 9, 3, (2, 2), None)
    assert entry.source == "a.pt" and store.verify(key) is None
    assert list(store.keys()) == [key]


def test_bf16_features_round_trip_bit_exactly(tmp_path):
    store = _store(tmp_path)
    key, feats = _write(store, feats=torch.randn(2, 4, 8).to(torch.bfloat16))
    got = store.read(key).features
    assert got.dtype == torch.bfloat16 and torch.equal(got, feats)


def test_missing_entry_is_an_error(tmp_path):
    with pytest.raises(FeatureCacheError, match="no entry"):
        _store(tmp_path).read("cd" * 32)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    store = _store(tmp_path)
    key, _ = _write(store)
    path = store.path_of(key)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the tensor bytes: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(FeatureCacheError, match="checksum"):
        store.read(key)
    assert "checksum" in store.verify(key)


@pytest.mark.parametrize("keep", [0, 5, 40, -7])
def test_truncated_entry_is_detected(tmp_path, keep):
    store = _store(tmp_path)
    key, _ = _write(store)
    path = store.path_of(key)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(FeatureCacheError, match="corrupt or truncated"):
        store.read(key)


def test_entry_from_a_store_with_other_settings_is_stale(tmp_path):
    a, b = _store(tmp_path / "a"), _store(tmp_path / "b", {**SETTINGS, "encoder_image_size": 518})
    key, _ = _write(a)
    b.path_of(key).parent.mkdir(parents=True)
    b.path_of(key).write_bytes(a.path_of(key).read_bytes())  # copied across stores
    with pytest.raises(FeatureCacheError, match="stale"):
        b.read(key)


def test_create_resumes_with_same_settings_and_refuses_others(tmp_path):
    store = _store(tmp_path)
    key, _ = _write(store)
    again = _store(tmp_path)
    assert list(again.keys()) == [key]
    with pytest.raises(FeatureCacheError, match=r"encoder_dtype: cache has 'fp32', wanted 'bf16'"):
        _store(tmp_path, {**SETTINGS, "encoder_dtype": "bf16"})


def test_manifest_problems_are_errors(tmp_path):
    with pytest.raises(FeatureCacheError, match="does not exist"):
        FeatureStore.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FeatureCacheError, match="not a feature cache"):
        FeatureStore.open(tmp_path / "plain")
    store = _store(tmp_path)
    manifest = json.loads((store.root / MANIFEST).read_text())
    manifest["settings"]["encoder_image_size"] = 518  # hand-edited: the sha256 no longer matches
    (store.root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FeatureCacheError, match="edited"):
        FeatureStore.open(store.root)
    (store.root / MANIFEST).write_text("{not json")
    with pytest.raises(FeatureCacheError, match="corrupt"):
        FeatureStore.open(store.root)


def test_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic_write(target, b"old")

    def crash(src, dst):
        raise KeyboardInterrupt  # killed between writing the temp file and the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_only_temps_of_dead_owners_are_removed(tmp_path):
    """A starting build keeps the temps of every live build (same --out, any rank) and removes those of
    dead ones, of any rank (a smaller world than last time leaves higher ranks' behind)."""
    import subprocess
    import sys
    import time

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    store = _store(tmp_path)
    shard = store.root / "entries" / "ab"
    shard.mkdir(parents=True)
    host = _host()
    names = {"dead_r0": f".tmp-r0-p{dead}@{host}~a.part", "dead_r7": f".tmp-r7-p{dead}@{host}~b.part",
             "live": f".tmp-r0-p{os.getppid()}@{host}~c.part", "mine": f"{temp_prefix(0)}d.part",
             "other_host_fresh": ".tmp-r1-p1@elsewhere~e.part", "other_host_old": ".tmp-r1-p1@elsewhere~f.part"}
    for name in names.values():
        (shard / name).write_bytes(b"half")
    old = time.time() - STALE_SECONDS - 60
    os.utime(shard / names["other_host_old"], (old, old))
    assert store.remove_stale_temps() == 3
    assert sorted(p.name for p in store.temp_files()) == sorted(names[k] for k in ("live", "mine", "other_host_fresh"))
    assert list(store.keys()) == []  # temp files are never entries


def test_settings_diff_names_each_difference():
    assert settings_diff({"a": 1, "b": 2}, {"a": 1, "b": 3}) == ["b: cache has 2, wanted 3"]
    assert settings_diff({"a": 1, "b": 2}, {"a": 5, "b": 3}, keys=["b"]) == ["b: cache has 2, wanted 3"]
    assert tensor_checksum(torch.zeros(2)) != tensor_checksum(torch.zeros(3))


def test_single_bit_flips_in_an_entry_header_are_feature_cache_errors(tmp_path):
    """Each flip either leaves a readable, identical entry (a JSON space, say) or is a FeatureCacheError
    naming the file — never a KeyError/JSONDecodeError that would also crash the repairing resume."""
    import struct

    store = _store(tmp_path)
    key, feats = _write(store)
    path = store.path_of(key)
    clean = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", clean[:8])[0]
    refused = 0
    flips = [(i, b) for i in range(header_end) for b in (0, 1, 5)]  # digits, letters, case: the common ones
    for i, b in flips:
        data = bytearray(clean)
        data[i] ^= 1 << b
        path.write_bytes(bytes(data))
        try:
            entry = store.read(key)
        except FeatureCacheError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            refused += 1
        else:
            assert torch.equal(entry.features, feats) and entry.frame_indices == [0, 4, 8]
    assert refused > len(flips) // 2  # almost every flip is caught (they are not all harmless)


@pytest.mark.parametrize("damage, match", [
    (lambda m: m.pop("settings"), "no settings object"),
    (lambda m: m.update(settings=[1, 2]), "no settings object"),
    (lambda m: m.update(encoder_dim="8"), "encoder_dim '8'"),
    (lambda m: m.update(encoder_dim=8.5), "encoder_dim 8.5"),
    (lambda m: m.update(format_version=1), "format version 1"),
])
def test_a_damaged_manifest_is_one_line(tmp_path, damage, match):
    store = _store(tmp_path)
    manifest = json.loads((store.root / MANIFEST).read_text())
    damage(manifest)
    (store.root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FeatureCacheError, match=match):
        FeatureStore.open(store.root)


def test_a_deeply_nested_manifest_is_one_line(tmp_path):
    store = _store(tmp_path)
    (store.root / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FeatureCacheError, match="corrupt"):
        FeatureStore.open(store.root)


def test_two_builds_racing_to_create_a_store_never_share_it(tmp_path, monkeypatch):
    """Build B checks for a manifest, build A creates the store in between, then B links its own:
    B is refused (A's settings win) instead of stamping its entries under A's checksum."""
    root = tmp_path / "store"
    real_link = os.link
    other = {**SETTINGS, "encoder_image_size": 518}

    def a_wins_first(src, dst):
        monkeypatch.setattr(os, "link", real_link)
        FeatureStore.create(root, SETTINGS, encoder_dim=8)  # build A, just before B's link
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", a_wins_first)
    with pytest.raises(FeatureCacheError, match="encoder_image_size: cache has 224, wanted 518"):
        FeatureStore.create(root, other, encoder_dim=8)
    assert FeatureStore.open(root).settings["encoder_image_size"] == 224
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == []


def test_an_entry_stamped_by_another_build_is_stale_not_intact(tmp_path):
    store = _store(tmp_path)
    key, _ = _write(store)
    stranger = FeatureStore(store.root, {**store.manifest, "settings_sha": "0" * 64})
    _write(stranger, key)  # a build whose settings are not this manifest's
    assert "other settings" in store.verify(key)


def test_the_folder_is_fsynced_after_each_rename(tmp_path, monkeypatch):
    from crepa_mem import fileio

    synced = []
    monkeypatch.setattr(fileio, "fsync_dir", lambda d: synced.append(str(d)))
    store = _store(tmp_path)
    key, _ = _write(store)
    assert str(store.path_of(key).parent) in synced and str(store.root) in synced


def test_an_entry_is_read_into_its_destination_with_no_second_buffer_of_it(tmp_path):
    """The bytes go from the file into the caller's tensor (a slice of a batch buffer), hashed block by
    block: Python holds no copy of the entry (what `path.read_bytes()` and a safetensors load held, twice
    its size), and a verify holds one block."""
    import tracemalloc

    from crepa_mem.teacher import store as store_module

    store = _store(tmp_path)
    feats = torch.randn(64, 128, 8).to(torch.bfloat16)  # 128 KiB
    key, _ = _write(store, feats=feats)
    batch = torch.zeros(2, *feats.shape, dtype=torch.bfloat16)
    tracemalloc.start()
    try:
        entry = store.read(key, into=lambda shape, dtype: batch[1])
        _, read_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        store_module._BLOCK, block = 4096, store_module._BLOCK
        try:
            assert store.verify(key) is None
        finally:
            store_module._BLOCK = block
        _, verify_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    nbytes = feats.numel() * 2
    assert entry.features.data_ptr() == batch[1].data_ptr() and torch.equal(batch[1], feats)
    assert not batch[0].any()
    assert read_peak < nbytes / 4 and verify_peak < nbytes / 4
