"""Weight identity of a feature cache: other weights under the same config or name are never accepted."""
import warnings

import pytest
import torch

from crepa_mem import CrepaConfig, CrepaRegularizer
from crepa_mem.errors import FeatureCacheError
from crepa_mem.teacher.cache import FeatureCacheTeacher, build_feature_cache, find_latent_files, load_vae
from crepa_mem.teacher.encoders import load_encoder
from crepa_mem.teacher.identity import vae_settings, weights_fingerprint
from crepa_mem.teacher.store import FeatureStore
from crepa_mem.testing import tiny_dinov2, tiny_vae

FRAMES = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A cache built from a tiny Wan VAE and DINOv2; a second VAE and encoder with the same configs but
    other weights, saved as folders of the same names elsewhere."""
    root = tmp_path_factory.mktemp("identity")
    tiny_vae("wan").save_pretrained(root / "a" / "vae")
    tiny_dinov2().save_pretrained(root / "a" / "enc")
    tiny_vae("wan", seed=1).save_pretrained(root / "b" / "vae")
    tiny_dinov2(seed=1).save_pretrained(root / "b" / "enc")
    lat_dir = root / "lat"
    lat_dir.mkdir()
    lat = torch.randn(16, FRAMES, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.save(lat, lat_dir / "0.pt")
    return root, lat_dir, lat


def _cfg(encoder_dir, **kw):
    return CrepaConfig(encoder="dinov2_vits14", encoder_path=str(encoder_dir), encoder_image_size=70, **kw)


def _build(root, lat_dir, out, side="a"):
    cfg = _cfg(root / side / "enc")
    return build_feature_cache(find_latent_files(lat_dir), out, cfg=cfg,
                               encoder=load_encoder(cfg.encoder, path=cfg.encoder_path),
                               vae=load_vae(root / side / "vae"), source_root=lat_dir)


def test_the_fingerprint_follows_the_weights_not_the_config():
    a, same, other = tiny_vae("wan"), tiny_vae("wan"), tiny_vae("wan", seed=1)
    assert weights_fingerprint(a) == weights_fingerprint(same) != weights_fingerprint(other)
    assert dict(a.config) == dict(other.config)
    # the decode never uses the VAE's encoder half: dropping it (SimpleTuner does) keeps the identity
    before = vae_settings(a)["vae_weights_sha256"]
    a.encoder, a.quant_conv = None, None
    assert vae_settings(a)["vae_weights_sha256"] == before
    # a bf16 trainer copy of the same weights is the build's bf16 load
    enc = tiny_dinov2()
    assert weights_fingerprint(enc, torch.bfloat16) == weights_fingerprint(enc.to(torch.bfloat16), torch.bfloat16)


def test_a_resume_with_other_weights_is_refused_not_skipped(setup, tmp_path):
    root, lat_dir, _ = setup
    out = tmp_path / "out"
    assert _build(root, lat_dir, out).written == 1
    for side_vae, side_enc, key in (("b", "a", "vae_weights_sha256"), ("a", "b", "encoder_weights_sha256")):
        cfg = _cfg(root / side_enc / "enc")
        with pytest.raises(FeatureCacheError, match=f"{key}: cache has"):
            build_feature_cache(find_latent_files(lat_dir), out, cfg=cfg,
                                encoder=load_encoder(cfg.encoder, path=cfg.encoder_path),
                                vae=load_vae(root / side_vae / "vae"))
    assert _build(root, lat_dir, out).skipped == 1  # the same weights again: a plain resume


def test_training_checks_the_weights_at_hand_and_says_when_it_cannot(setup, tmp_path):
    root, lat_dir, lat = setup
    out = tmp_path / "out"
    _build(root, lat_dir, out)
    cfg = _cfg(root / "a" / "enc", encoder_tier="cache", vae_tier="cache", feature_cache=str(out))
    with pytest.raises(FeatureCacheError, match="vae_weights_sha256: cache has"):
        CrepaRegularizer(cfg, 24, vae=load_vae(root / "b" / "vae"), device="cpu")
    with pytest.raises(FeatureCacheError, match="encoder_weights_sha256: cache has"):
        CrepaRegularizer(cfg, 24, encoder=load_encoder("x", path=root / "b" / "enc"), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both at hand and right: nothing to say
        CrepaRegularizer(cfg, 24, vae=load_vae(root / "a" / "vae"), encoder=load_encoder("x", path=root / "a" / "enc"),
                         device="cpu")
    with pytest.warns(RuntimeWarning, match="VAE and encoder weights it was built with .* were not checked"):
        reg = CrepaRegularizer(cfg, 24, device="cpu")  # the documented setup: neither loaded
    assert reg.teacher.features(lat[None], FRAMES).stats["hits"] == 1


def test_encoder_dim_and_the_weights_are_inside_the_settings_checksum(setup, tmp_path):
    import json

    root, lat_dir, _ = setup
    out = tmp_path / "out"
    _build(root, lat_dir, out)
    store = FeatureStore.open(out)
    assert {"vae_weights_sha256", "encoder_weights_sha256", "encoder_dim"} <= set(store.settings)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["encoder_dim"] = 64  # edited outside the settings: they disagree
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FeatureCacheError, match="encoder_dim 64"):
        FeatureCacheTeacher.open(out, _cfg(root / "a" / "enc"))
    manifest["settings"]["encoder_dim"] = 64  # edited inside them: the checksum says so
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FeatureCacheError, match="edited"):
        FeatureCacheTeacher.open(out, _cfg(root / "a" / "enc"))
