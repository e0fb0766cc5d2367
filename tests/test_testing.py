"""The tiny builders: real classes, realistic compression and grids, deterministic per seed."""
from __future__ import annotations

import pytest
import torch

from crepa_mem.testing import (
    TRANSFORMER_FAMILIES,
    VAE_FAMILIES,
    tiny_dinov2,
    tiny_transformer,
    tiny_transformer_inputs,
    tiny_vae,
    vae_compression,
    vae_latent_channels,
)


EXPECTED_VAE = {  # family → (class name, latent channels, temporal, spatial); REFERENCE §2.2
    "wan": ("AutoencoderKLWan", 16, 4, 8),
    "wan2.2": ("AutoencoderKLWan", 48, 4, 16),
    "ltxvideo": ("AutoencoderKLLTXVideo", 128, 8, 32),
    "sanavideo": ("AutoencoderKLWan", 16, 4, 8),
    "kandinsky5_video": ("AutoencoderKLHunyuanVideo", 16, 4, 8),
}


@pytest.mark.parametrize("family", VAE_FAMILIES)
def test_vae_decodes_with_true_compression(family):
    cls, channels, temporal, spatial = EXPECTED_VAE[family]
    vae = tiny_vae(family)
    assert type(vae).__name__ == cls
    assert vae_compression(vae) == (temporal, spatial)
    assert vae_latent_channels(vae) == channels
    with torch.no_grad():
        video = vae.decode(torch.randn(1, channels, 2, 2, 3)).sample
    assert video.shape == (1, 3, 1 + temporal * (2 - 1), 2 * spatial, 3 * spatial)
    assert torch.isfinite(video).all()


def test_ltx_vae_with_timestep_conditioning_needs_a_timestep():
    vae = tiny_vae("ltxvideo", timestep_conditioning=True)
    z = torch.randn(1, 128, 2, 1, 1)
    with torch.no_grad():
        assert vae.decode(z, torch.tensor([0.05])).sample.shape == (1, 3, 9, 32, 32)
        with pytest.raises(TypeError):
            vae.decode(z)


def test_vae_is_deterministic_per_seed():
    a, b, c = tiny_vae("wan", seed=1), tiny_vae("wan", seed=1), tiny_vae("wan", seed=2)
    for (_, pa), (_, pb), (_, pc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        torch.testing.assert_close(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_tokens(registers):
    model = tiny_dinov2(registers=registers)
    assert not model.training and model.config.patch_size == 14
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 28, 42)).last_hidden_state
    assert out.shape == (2, 1 + (4 if registers else 0) + 2 * 3, 32)


def test_dinov2_is_deterministic_and_sized():
    a, b = tiny_dinov2(seed=3, hidden_size=48, num_layers=1, heads=3), tiny_dinov2(seed=3, hidden_size=48, num_layers=1, heads=3)
    assert a.config.hidden_size == 48 and len(a.encoder.layer) == 1
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(a(pixel_values=x).last_hidden_state, b(pixel_values=x).last_hidden_state)


EXPECTED_DIT = {  # family → (class name, block-list attribute, patch (t, h, w))
    "wan": ("WanTransformer3DModel", "blocks", (1, 2, 2)),
    "ltxvideo": ("LTXVideoTransformer3DModel", "transformer_blocks", (1, 1, 1)),
    "sanavideo": ("SanaVideoTransformer3DModel", "transformer_blocks", (1, 2, 2)),
    "kandinsky5_video": ("Kandinsky5Transformer3DModel", "visual_transformer_blocks", (1, 2, 2)),
}


@pytest.mark.parametrize("family", TRANSFORMER_FAMILIES)
def test_transformer_runs_on_its_inputs(family):
    cls, blocks_attr, _ = EXPECTED_DIT[family]
    model = tiny_transformer(family, num_layers=2)
    assert type(model).__name__ == cls and len(getattr(model, blocks_attr)) == 2
    kwargs = tiny_transformer_inputs(family, model, batch=2, latent_frames=2, latent_height=4, latent_width=6)
    with torch.no_grad():
        out = model(**kwargs).sample
    # the prediction has the latent's own shape and layout
    assert out.shape == kwargs["hidden_states"].shape
    assert torch.isfinite(out).all()


def test_transformer_is_deterministic_per_seed():
    a, b = tiny_transformer("wan", seed=5), tiny_transformer("wan", seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)
    ka = tiny_transformer_inputs("wan", a, seed=1)
    kb = tiny_transformer_inputs("wan", b, seed=1)
    torch.testing.assert_close(ka["hidden_states"], kb["hidden_states"])


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="known: wan"):
        tiny_vae("hunyuan")
    with pytest.raises(ValueError, match="known: wan"):
        tiny_transformer("flux")
    with pytest.raises(ValueError, match="only for ltxvideo"):
        tiny_vae("wan", timestep_conditioning=True)
