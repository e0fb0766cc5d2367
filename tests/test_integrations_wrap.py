"""`crepa_mem.integrations.wrap` with real diffusers + peft LoRA: the projector trains, saves and loads beside the LoRA."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from crepa_mem import CrepaConfig, CrepaMemError, wrap
from crepa_mem.testing import tiny_dinov2, tiny_transformer, tiny_transformer_inputs, tiny_vae
from crepa_mem.integrations.wrap import PROJECTOR_FILE, Crepa

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CFG = CrepaConfig(enabled=True, block_index=1, encoder_image_size=70, encoder_frames_batch_size=2)



def _lora_model(seed: int = 0):
    model = tiny_transformer("wan", seed=seed).train()
    model.requires_grad_(False)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    return model


def _wrap(model, seed: int = 0) -> Crepa:
    return wrap(model, vae=tiny_vae("wan", seed=seed), encoder=tiny_dinov2(seed=seed), config=CFG, device="cpu")


def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(1, 16, 3, 8, 8, generator=g)


def _step(model, crepa, latents, inputs, opt=None):
    model(**inputs)
    loss, logs = crepa(latents, step=0)
    if opt is not None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach(), logs


def test_projector_is_registered_trainable_and_removed():
    model = _lora_model()
    crepa = _wrap(model)
    assert model.crepa_projector is crepa.projector
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {"crepa_projector.0.weight", "crepa_projector.1.weight"} <= set(names)
    assert any("lora_B" in n for n in names)
    crepa.remove()
    assert not hasattr(model, "crepa_projector")
    assert not crepa.capture._hooks._handles
    crepa.remove()  # idempotent


def test_save_and_load_projector_beside_lora_round_trips(tmp_path):
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    model = _lora_model()
    crepa = _wrap(model)
    inputs, latents = tiny_transformer_inputs("wan", model, seed=1), _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _step(model, crepa, latents, inputs, opt)
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model))
    path = crepa.save_projector(tmp_path)
    assert path.name == PROJECTOR_FILE and (tmp_path / "pytorch_lora_weights.safetensors").exists()
    loss, _ = _step(model, crepa, latents, inputs)

    fresh = tiny_transformer("wan", seed=0).train()  # same base weights, no adapter, new projector init
    fresh.load_lora_adapter(str(tmp_path), prefix="transformer", adapter_name="default",
                            weight_name="pytorch_lora_weights.safetensors")
    torch.manual_seed(123)
    crepa2 = wrap(fresh, vae=tiny_vae("wan"), encoder=tiny_dinov2(), config=CFG, device="cpu")
    assert not torch.equal(crepa2.projector[1].weight, crepa.projector[1].weight)
    crepa2.load_projector(tmp_path)
    for key, value in crepa.projector.state_dict().items():
        torch.testing.assert_close(crepa2.projector.state_dict()[key], value, rtol=0, atol=0)
    lora_a, lora_b = get_peft_model_state_dict(model), get_peft_model_state_dict(fresh)
    assert lora_a.keys() == lora_b.keys()
    for key in lora_a:
        torch.testing.assert_close(lora_b[key], lora_a[key], rtol=0, atol=0)
    loss2, _ = _step(fresh, crepa2, latents, inputs)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)


def test_peft_modules_to_save_trains_the_active_copy():
    """PEFT replaces crepa_projector with a ModulesToSaveWrapper: the copy trains, the original is frozen.
    CREPA must run (and save) the copy, or the projector would silently never learn."""
    model = tiny_transformer("wan").train()
    crepa = _wrap(model)
    original = crepa.projector
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["crepa_projector"]))
    live = crepa.projector
    assert live is not original and live is model.crepa_projector.modules_to_save["default"]
    assert all(p.requires_grad for p in live.parameters())
    before = {k: v.clone() for k, v in live.state_dict().items()}
    frozen = {k: v.clone() for k, v in original.state_dict().items()}
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    _step(peft_model, crepa, _batch(), tiny_transformer_inputs("wan", model, seed=1), opt)
    assert not torch.equal(live.state_dict()["1.weight"], before["1.weight"])
    assert torch.equal(original.state_dict()["1.weight"], frozen["1.weight"])
    assert set(crepa.projector_state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    crepa.remove()
    assert not hasattr(model, "crepa_projector")


def test_projector_left_sharded_by_fsdp_is_named_not_a_shape_error():
    """FSDP1 frees a resharded unit's parameters to empty storage; the call says what to do instead."""
    model = tiny_transformer("wan").train()
    crepa = _wrap(model)
    crepa.projector[1].weight.data = torch.empty(0)
    model(**tiny_transformer_inputs("wan", model))
    with pytest.raises(CrepaMemError, match="FSDP unit of its own"):
        crepa(_batch(), step=0)


def test_wrap_reads_a_simpletuner_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"--crepa_enabled": true, "crepa_block_index": 2, "crepa_lambda": 0.25, '
                    '"crepa_encoder_image_size": 70, "model_family": "wan"}')
    model = tiny_transformer("wan")
    crepa = wrap(model, vae=tiny_vae("wan"), encoder=tiny_dinov2(), config=path, device="cpu")
    assert crepa.config.block_index == 2 and crepa.config.lambda_ == 0.25
    model(**tiny_transformer_inputs("wan", model))
    loss, logs = crepa(_batch(), step=0)
    assert logs["crepa_weight"] == 0.25 and torch.isfinite(loss)


def test_wrap_twice_is_refused_and_allowed_again_after_remove():
    model = _lora_model()
    first = _wrap(model)
    with pytest.raises(CrepaMemError, match="wrap\\(\\) was already called.*remove\\(\\)"):
        _wrap(model)
    assert model.crepa_projector is first.projector and len(first.capture._hooks._handles) > 0  # the first one is intact
    first.remove()
    second = _wrap(model)
    first.remove()  # a stale handle does not take the new projector with it
    assert model.crepa_projector is second.projector


def test_a_forward_under_no_grad_warns_that_only_the_projector_trains():
    import warnings

    model = _lora_model()
    crepa = _wrap(model)
    inputs = tiny_transformer_inputs("wan", model)
    with torch.no_grad():
        model(**inputs)
    with pytest.warns(RuntimeWarning, match="only the CREPA projector will train"):
        loss, _ = crepa(_batch(), step=0)
    assert loss.requires_grad  # the projector still gets a gradient
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once; a normal forward says nothing
        model(**inputs)
        crepa(_batch(), step=1)
