"""crepa_mem.teacher.stream: block-by-block weight streaming (own block hooks for the encoder, diffusers group
offloading for the VAE decoder) keeps about one block on the device; layer-major encoding moves each once."""
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
        assert len(groups) == 2 + 6 and sum(groups) == size and max(groups) == layer  # embeddings, 6 layers, norm
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


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_layer_major_moves_each_block_once_and_gives_the_frame_major_tokens(chunk):
    from crepa_mem.teacher.path import encode_tokens, leading_tokens
    from crepa_mem.testing import tiny_dinov2

    enc = tiny_dinov2()
    images = torch.randn(5, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    reference = [encode_tokens(enc, images[i:i + chunk]) for i in range(0, 5, chunk)]
    p = place(enc, "stream", compute_device="cpu")
    arrivals = []
    for b in p.layers.blocks:
        b.register_forward_pre_hook(lambda m, _a: arrivals.append(id(m)))
    made = []

    def chunk_maker(i):
        def make():
            made.append(i)
            return images[i:i + chunk]
        return make

    states = p.encode_layer_major([chunk_maker(i) for i in range(0, 5, chunk)])
    for got, want in zip(states, reference):
        torch.testing.assert_close(got[:, leading_tokens(enc):], want, rtol=0, atol=0)
    calls = len(reference)
    assert len(arrivals) == calls * len(p.layers.blocks)  # every chunk ran every block ...
    order = [a for i, a in enumerate(arrivals) if i == 0 or arrivals[i - 1] != a]
    assert order == [id(b) for b in p.layers.blocks]  # ... a block at a time: each came in once
    assert made == list(range(0, 5, chunk))
