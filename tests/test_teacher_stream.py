"""crepa_mem.teacher.stream: block-by-block weight streaming (diffusers group offloading) keeps about one block on the device."""
import pytest
import torch

from crepa_mem.errors import CrepaConfigError
from crepa_mem.testing import devices_of, meta_dinov2, tiny_vae
from crepa_mem.teacher.placement import module_bytes
from crepa_mem.teacher.tiers import place
from crepa_mem.teacher.stream import StreamPlacement, stream_group_bytes
from crepa_mem.trace.runtime import FAKE_GPU, fake_gpu, materialize


def test_stream_keeps_about_one_block_on_the_device():
    enc = meta_dinov2(layers=6, width=128)
    with fake_gpu() as bytes_:
        materialize(enc, "cpu")
        size = module_bytes(enc)
        p = place(enc, "stream", compute_device=FAKE_GPU)
        assert isinstance(p, StreamPlacement)
        groups = p.groups()
        layer = module_bytes(enc.encoder.layer[0])
        assert len(groups) == 1 + 6 and sum(groups) == size and max(groups) == layer  # embeddings+norm, 6 layers
        x = torch.empty(1, 3, 28, 28, device=FAKE_GPU)
        bytes_.reset_peak()
        with p.active() as m:
            m(pixel_values=x)
        weights_peak = bytes_.peak_bytes() - x.untyped_storage().nbytes()
        assert bytes_.live_bytes() == x.untyped_storage().nbytes()  # every block went back
        assert weights_peak < size / 2  # 6 layers, never more than one or two at once (plus activations)
        assert devices_of(enc) == {"cpu"}


def test_stream_vae_streams_only_the_decoder():
    vae = tiny_vae("wan")
    p = place(vae, "stream", compute_device="cpu")
    assert p.streamed is vae.decoder
    assert sum(stream_group_bytes(vae.decoder)) == module_bytes(vae.decoder)
    assert p.facts()["engine"] == "diffusers.group_offloading"


def test_stream_refuses_a_torch_hub_style_encoder():
    class HubLike(torch.nn.Module):  # what torch.hub's DinoVisionTransformer exposes to the teacher
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def forward_features(self, x):
            return {"x_norm_patchtokens": self.blocks[0](x)}

    with pytest.raises(CrepaConfigError, match="transformers Dinov2Model"):
        place(HubLike(), "stream", compute_device="cpu")
