"""crepa_mem.teacher.ramtorch_engine: the encoder streamed by RamTorch's OffloadModel, same features as `gpu`."""
import copy
import threading

import pytest
import torch

from crepa_mem import CrepaConfig
from crepa_mem.errors import CrepaConfigError
from crepa_mem.teacher.path import encode_tokens
from crepa_mem.teacher.placement import module_bytes
from crepa_mem.teacher.ramtorch_engine import RamTorchPlacement, chunk_bytes, encoder_chunks
from crepa_mem.teacher.tiers import place
from crepa_mem.testing import meta_dinov2, tiny_dinov2, tiny_vae
from crepa_mem.trace.runtime import FAKE_GPU, fake_gpu, materialize


def _loaders() -> int:
    return sum(t.name == "offload-loader" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("resident", [0, 2, 99])
def test_ramtorch_stream_gives_the_features_of_gpu(registers, resident):
    enc = tiny_dinov2(registers=registers, num_layers=4)
    x = torch.randn(3, 3, 28, 28)
    ref = encode_tokens(place(copy.deepcopy(enc), "gpu", compute_device="cpu").module, x)
    p = place(enc, "stream", compute_device="cpu", stream_engine="ramtorch", resident_chunks=resident)
    assert isinstance(p, RamTorchPlacement)
    with p.active() as m:
        torch.testing.assert_close(encode_tokens(m, x), ref, rtol=0, atol=0)
    facts = p.facts()
    assert facts["engine"] == "ramtorch.OffloadModel" and facts["chunks"] == 1 + 4 + 1
    assert facts["resident_chunks"] == min(resident, 6)
    assert facts["chunk_loads"] == 6 - min(resident, 6)  # the streamed chunks, once per call
    p.close()


def test_chunks_reproduce_the_model_and_refuse_a_vae():
    enc = tiny_dinov2(num_layers=3)
    assert len(encoder_chunks(enc)) == 5 and sum(chunk_bytes(enc)) == module_bytes(enc)  # every weight, once
    with pytest.raises(CrepaConfigError, match="crepa_mem_stream_engine"):
        place(tiny_vae("wan"), "stream", compute_device="cpu", stream_engine="ramtorch")


def test_nvme_tier_takes_the_masters_out_of_ram(tmp_path):
    enc = tiny_dinov2(num_layers=4)
    x = torch.randn(2, 3, 28, 28)
    ref = encode_tokens(copy.deepcopy(enc), x)
    scratch = tmp_path / "encoder.bin"
    p = place(enc, "stream", compute_device="cpu", stream_engine="ramtorch", resident_chunks=1,
              nvme_path=str(scratch))
    assert scratch.stat().st_size >= sum(chunk_bytes(enc)) - max(chunk_bytes(enc))  # the streamed chunks
    assert p.facts()["nvme_chunks"] == 5  # all but the resident one
    # a streamed chunk's master (its first weight, whatever transformers names it): the file mapping
    layer = next(enc.encoder.layer[1].attention.parameters())
    assert layer.untyped_storage().nbytes() >= scratch.stat().st_size
    with p.active() as m:
        torch.testing.assert_close(encode_tokens(m, x), ref, rtol=0, atol=0)
    p.close()
    assert not scratch.exists()


def test_close_stops_the_threads_when_the_regularizer_is_removed():
    from crepa_mem import wrap
    from crepa_mem.testing import tiny_transformer

    before = _loaders()
    model = tiny_transformer("wan")
    crepa = wrap(model, vae=tiny_vae("wan"), encoder=tiny_dinov2(), device="cpu",
                 config=CrepaConfig(enabled=True, block_index=0, encoder_tier="stream", stream_engine="ramtorch"))
    assert _loaders() == before + 1
    crepa.remove()
    assert _loaders() == before
    crepa.remove()  # idempotent


def test_caller_thread_loader_holds_window_plus_one_chunks_on_the_fake_gpu():
    layers, width = 6, 128
    enc = meta_dinov2(layers=layers, width=width)
    with fake_gpu() as live:
        materialize(enc, "cpu")
        p = place(enc, "stream", compute_device=FAKE_GPU, stream_engine="ramtorch", resident_chunks=2)
        assert p.caller_thread
        resident = live.live_bytes()
        sizes = p.chunk_bytes()
        assert resident == sum(sizes[i] for i in p.engine.pinned_layers)  # RamTorch's evenly spaced pins
        x = torch.empty(1, 3, 28, 28, device=FAKE_GPU)
        live.reset_peak()
        with p.active() as m:
            out = m(pixel_values=x).last_hidden_state
        assert out.device == FAKE_GPU
        del out
        layer = module_bytes(enc.encoder.layer[0])
        weights_peak = live.peak_bytes() - x.untyped_storage().nbytes() - resident
        assert 3 * layer <= weights_peak < 3 * layer + layer // 2  # window 2 + the chunk still held, + activations
        assert p.window_bytes() == resident + 3 * layer
        assert live.live_bytes() == resident + x.untyped_storage().nbytes()  # streamed chunks all went back
        p.close()


def test_config_keys_are_validated():
    cfg = CrepaConfig.from_dict({"crepa_mem_stream_engine": "ramtorch", "crepa_mem_stream_resident_chunks": "3",
                                 "crepa_mem_stream_nvme_path": "/nvme/x.bin"})
    assert (cfg.stream_engine, cfg.stream_resident_chunks, cfg.stream_nvme_path) == ("ramtorch", 3, "/nvme/x.bin")
    with pytest.raises(CrepaConfigError, match="crepa_mem_stream_engine.*group_offload · ramtorch"):
        CrepaConfig(stream_engine="deepspeed")
    with pytest.raises(CrepaConfigError, match="crepa_mem_stream_resident_chunks"):
        CrepaConfig(stream_resident_chunks=-1)
    with pytest.raises(CrepaConfigError, match="crepa_mem_stream_nvme_path"):
        CrepaConfig(stream_nvme_path="/nvme/x.bin")
