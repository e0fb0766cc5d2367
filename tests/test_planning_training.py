"""The DiT training-memory model: exact bytes on hand-computable configurations, names, offload, live GPU."""
from __future__ import annotations

import dataclasses

import pytest

from crepa_mem.errors import CrepaConfigError
from crepa_mem.planning import training as T
from crepa_mem.planning.devices import DeviceInfo
from crepa_mem.profiles import get_model
from crepa_mem.units import GiB, MiB


def terms(**kw):
    kw.setdefault("cuda_context", False)
    return T.training_bytes("wan-2.1-1.3b", frames=17, height=480, width=832, **kw).components


def test_weights_lora_and_adam_bytes_by_hand():
    m = get_model("wan-2.1-1.3b")
    params = 30 * 46_440_704 + 25_775_680
    c = terms(lora_rank=16, optimizer="adamw")
    assert c["weights"] == params * 2  # bf16
    lora = 16 * 30 * 24_576  # rank × blocks × Σ(in + out): 8 linears of 1536 → 1536 per block
    assert c["lora_weights"] == c["lora_grads"] == lora * 4 and c["optimizer_state"] == lora * 8
    assert c["inputs"] == 2 * 16 * 5 * 60 * 104 * 2 and c["text_embeddings"] == 512 * 4096 * 2
    assert m.hidden_size == 1536 and T.lora_params(m, 16) == lora


def test_precision_optimizer_and_full_fine_tune():
    params = 30 * 46_440_704 + 25_775_680
    assert terms(precision="int8-quanto")["weights"] == params
    assert terms(precision="fp8-torchao")["weights"] == params
    full = terms(lora_rank=None, optimizer="adamw_bf16")
    assert full["grads"] == params * 2 and full["optimizer_state"] == params * 4 and "lora_weights" not in full
    assert terms(optimizer="bnb-adamw8bit")["optimizer_state"] == int(16 * 30 * 24_576 * 2.03)
    with pytest.raises(CrepaConfigError, match="base_model_precision"):
        terms(lora_rank=None, precision="int8-quanto")
    with pytest.raises(CrepaConfigError, match="base_model_precision"):
        T.canonical_precision("int7")


def test_offload_keeps_less_on_the_device():
    block = 46_440_704
    base = terms()["weights"]
    assert terms(blocks_to_swap=10)["weights"] == base - 10 * block * 2
    assert terms(blocks_to_swap=10)["offload_buffers"] == block * 2
    assert terms(ramtorch_percent=100)["weights"] == 25_775_680 * 2
    assert terms(group_offload=True)["offload_buffers"] == 2 * block * 2
    with pytest.raises(CrepaConfigError, match="blocks_to_swap"):
        terms(blocks_to_swap=30)


def test_checkpointing_keeps_less_and_more_tokens_keep_more():
    on, off = terms(gradient_checkpointing=True), terms(gradient_checkpointing=False)
    assert on["activations"] < off["activations"] / 4
    assert T.training_bytes("wan-2.1-1.3b", frames=33, cuda_context=False).components["activations"] > on["activations"]
    assert T.training_bytes("wan-2.1-1.3b").components["cuda_context"] == 512 * MiB


def test_training_use_sources():
    m = get_model("wan-2.1-1.3b")
    shape = dict(frames=81, height=480, width=832)
    assert T.training_use(m, None, train_gib=3, **shape).source == "--train-gib"
    assert T.training_use(m, None, training={"source": "config"}, **shape).source == "config"
    live = DeviceInfo(index=0, name="x", uuid="u", total_bytes=80 * GiB, free_bytes=10 * GiB, used_bytes=70 * GiB,
                      source="nvml", reserved_bytes=0, compute_capability="9.0", pcie_gen=5, pcie_width=16,
                      h2d_bytes_per_s=None)
    big = T.training_use(m, live, **shape)
    assert big.source == "live GPU" and big.total_bytes == 70 * GiB and big.inputs["predicted_bytes"] > 0
    live.used_bytes = GiB
    small = T.training_use(m, live, **shape)
    assert small.source == "model" and small.total_bytes > GiB and small.inputs["in_use_bytes"] == GiB


def test_every_family_has_coefficients_and_a_dit_table():
    for name in ("wan-2.1-14b", "wan-2.2-ti2v-5b", "ltxvideo-13b", "sanavideo-2b", "kandinsky5-video-pro"):
        e = T.training_bytes(name)
        assert e.total_bytes == sum(t.bytes for t in e.terms) and e.to_dict()["source"] == "model"
        assert get_model(name).dit["config"]


def small(name: str, blocks: int = 2):
    """The checkpoint with only `blocks` blocks (full width): what the suite can trace quickly."""
    from crepa_mem.trace.dit import LAYER_KEY

    m = get_model(name)
    cfg = {**m.dit["config"], LAYER_KEY.get(m.family, "num_layers"): blocks}
    return dataclasses.replace(m, num_blocks=blocks, dit={**m.dit, "config": cfg})


@pytest.mark.parametrize("name", ["wan-2.1-1.3b", "ltxvideo-2b", "sanavideo-2b", "kandinsky5-video-lite"])
@pytest.mark.parametrize("gc", [True, False])
def test_model_matches_the_trace_on_small_configs(name, gc):
    from crepa_mem.trace.dit import trace_dit

    m = small(name, 3)
    kw = dict(frames=9, height=256, width=256, gradient_checkpointing=gc)
    traced = trace_dit(m, **kw).peak_bytes
    model = T.training_bytes(m, optimizer="adamw", cuda_context=False, **kw).total_bytes
    assert abs(model / traced - 1) < 0.10, (model, traced)
