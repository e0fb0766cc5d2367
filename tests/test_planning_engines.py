"""crepa_mem.planning.engines: the two stream engines in bytes, checked against the real modules' chunks."""
import pytest

from crepa_mem.planning import engines as G
from crepa_mem.planning import estimate as est
from crepa_mem.profiles import get_encoder, get_model


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitg14"])
def test_chunks_match_the_real_dinov2_chunks(name):
    from crepa_mem.teacher.ramtorch_engine import chunk_bytes
    from crepa_mem.trace.workloads import build_encoder

    real = chunk_bytes(build_encoder(name))  # meta modules: bytes without memory
    model = G.chunk_bytes(get_encoder(name), "fp32")
    assert len(model) == len(real) and model[1:-1] == real[1:-1] and model[-1] == real[-1]
    assert abs(model[0] - real[0]) <= 0.01 * real[0]


def test_resident_indices_are_ramtorchs():
    from ramtorch.offload_simulator import evenly_pinned

    for n, k in ((14, 4), (42, 7), (6, 6), (6, 0)):
        assert G.resident_indices(n, k) == set(evenly_pinned(n, k))


def test_resident_chunks_trade_device_bytes_for_pcie_bytes():
    enc = get_encoder("dinov2_vitg14")
    none, some = G.ramtorch_bytes(enc, "bf16", 0), G.ramtorch_bytes(enc, "bf16", 10)
    layer = G.chunk_bytes(enc, "bf16")[1]
    assert none["resident_bytes"] == 0 and none["window_bytes"] == 3 * max(G.chunk_bytes(enc, "bf16"))
    assert some["resident_bytes"] > 9 * layer and some["streamed_bytes"] == none["streamed_bytes"] - some["resident_bytes"]
    assert G.moved_bytes(enc, "bf16", "ramtorch", 10, 3) == 3 * some["streamed_bytes"]
    assert G.moved_bytes(enc, "bf16", "group_offload", 0, 3) == enc.params * 2  # layer-major: once per step
    assert G.host_bytes(enc, "bf16", "ramtorch", 0, nvme=True) == max(G.chunk_bytes(enc, "bf16"))
    assert G.encoder_calls(21, 4) == 6 and G.encoder_calls(21, -1) == 1


def test_with_ramtorch_moves_resident_chunks_into_every_phase():
    m, enc = get_model("wan-2.1-14b"), get_encoder("dinov2_vitg14")
    e = est.estimate(m, enc, frames=81, height=480, width=832, encoder_tier="stream", vae_tier="swap")
    r = G.with_ramtorch(e, enc, "fp32", 6)
    assert r.components["encoder_resident_chunks"] == G.ramtorch_bytes(enc, "fp32", 6)["resident_bytes"]
    assert r.phase_bytes["loss"] - e.phase_bytes["loss"] == r.components["encoder_resident_chunks"]
    assert r.inputs["stream_engine"] == "ramtorch"
