"""The drop-in inside SimpleTuner 4.10.1's own ModelFoundation (its Wan model): its `_init_crepa_regularizer`,
`model_predict` hidden-state capture, `auxiliary_loss` and projector registration, with a tiny random Wan
transformer (SimpleTuner's own class), VAE and DINOv2 — against SimpleTuner's own CrepaRegularizer."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from crepa_mem.testing import tiny_dinov2, tiny_transformer, tiny_vae

WAN = Path(__file__).parent / "fixtures" / "simpletuner" / "wan2.1-t2v-1.3b-480p-ramtorch-crepa.json"


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    """SimpleTuner imported and patched; a folder holding the tiny DINOv2 and the scheduler config."""
    import simpletuner_real

    simpletuner_real.simpletuner()
    from diffusers import FlowMatchEulerDiscreteScheduler

    import crepa_mem.integrations.simpletuner as drop_in

    drop_in.patch_simpletuner()
    root = tmp_path_factory.mktemp("st")
    tiny_dinov2().save_pretrained(root / "dinov2")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "pretrained" / "scheduler")
    (root / "backends.json").write_text("[]")
    return root


def _namespace(root: Path, monkeypatch, **overrides):
    """SimpleTuner's parsed config: the real Wan LoRA config.json through its own loader and parser."""
    from simpletuner.helpers.configuration import cmd_args, json_file

    cfg = json.loads(WAN.read_text())
    cfg.update(pretrained_model_name_or_path=str(root / "pretrained"), ramtorch=False,  # ramtorch needs CUDA
               data_backend_config=str(root / "backends.json"), output_dir=str(root / "out"),
               crepa_encoder=str(root / "dinov2"), crepa_block_index=1, crepa_encoder_image_size=56, **overrides)
    path = root / "config.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv("CONFIG_PATH", str(path))
    ns = cmd_args.parse_cmdline_args(json_file.load_json_config(), exit_on_error=True)
    ns.weight_dtype = torch.float32  # the trainer sets it from mixed_precision
    return ns


def _foundation(ns):
    from accelerate import Accelerator
    from simpletuner.helpers.models.wan.model import Wan
    from simpletuner.helpers.models.wan.transformer import WanTransformer3DModel

    foundation = Wan(ns, Accelerator(cpu=True))
    reference = tiny_transformer("wan")
    foundation.model = WanTransformer3DModel.from_config(reference.config)
    foundation.model.load_state_dict(reference.state_dict())
    foundation.vae = tiny_vae("wan")
    return foundation


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 16, 3, 8, 8, generator=g),
            "noisy_latents": torch.randn(1, 16, 3, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(1, 4, 16, generator=g), "timesteps": torch.full((1,), 500.0)}


def _train_step(foundation, batch, step):
    """What SimpleTuner's trainer does per step: model_predict, the base loss, auxiliary_loss, backward."""
    from simpletuner.helpers.training.state_tracker import StateTracker

    StateTracker.set_global_step(step)
    out = foundation.model_predict(batch)
    loss = F.mse_loss(out["model_prediction"].float(), batch["latents"])
    total, logs = foundation.auxiliary_loss(out, batch, loss)
    total.backward()
    return total, logs


class _HubDinov2(torch.nn.Module):
    """torch.hub's DINOv2 interface (forward_features → x_norm_patchtokens) over the same transformers model,
    for SimpleTuner's class, which loads its encoder through torch.hub (no network here)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward_features(self, x):
        skip = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        return {"x_norm_patchtokens": self.model(pixel_values=x).last_hidden_state[:, skip:]}


def _simpletuners_own(foundation_ns, root, monkeypatch):
    """The same foundation with SimpleTuner's own class in place (as unpatched SimpleTuner builds it)."""
    from transformers import Dinov2Model

    import simpletuner.helpers.models.common as common
    import simpletuner.helpers.training.crepa as crepa

    monkeypatch.setattr(common, "CrepaRegularizer", crepa.SimpleTunerCrepaRegularizer)
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: _HubDinov2(Dinov2Model.from_pretrained(root / "dinov2")))
    foundation = _foundation(foundation_ns)
    foundation._init_crepa_regularizer()
    monkeypatch.undo()
    return foundation


@pytest.mark.parametrize("overrides", [{}, {"crepa_warmup_steps": 2}, {"crepa_mem_vae_tier": "swap",
                                                                      "crepa_mem_encoder_tier": "swap",
                                                                      "crepa_encoder_frames_batch_size": 2}])
def test_simpletuners_wan_foundation_trains_a_step_with_the_drop_in_as_with_its_own_class(st, monkeypatch, overrides):
    from crepa_mem.integrations.simpletuner import CrepaRegularizer

    ns = _namespace(st, monkeypatch, **overrides)
    ours = _foundation(ns)
    ours._init_crepa_regularizer()
    assert type(ours.crepa_regularizer) is CrepaRegularizer
    assert ours.model.crepa_projector is ours.crepa_regularizer.projector
    theirs = _simpletuners_own(ns, st, monkeypatch)
    assert type(theirs.crepa_regularizer).__name__ == "CrepaRegularizer" and type(theirs.crepa_regularizer) is not CrepaRegularizer
    theirs.model.crepa_projector.load_state_dict(ours.model.crepa_projector.state_dict())
    vae_params = [p.data_ptr() for p in ours.vae.parameters()]
    for step in range(3):
        batch = _batch(step)
        a, logs_a = _train_step(ours, batch, step)
        b, logs_b = _train_step(theirs, batch, step)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert set(logs_b) <= set(logs_a) and all(isinstance(v, (int, float)) for v in logs_a.values())
        for key, value in logs_b.items():
            assert logs_a[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
        pa, pb = ours.model.crepa_projector[1].weight.grad, theirs.model.crepa_projector[1].weight.grad
        assert (pa is None) == (pb is None)  # warm-up step 0: no CREPA loss, so no projector gradient at all
        if pa is not None:
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-7)
        ours.model.zero_grad(set_to_none=True)
        theirs.model.zero_grad(set_to_none=True)
    # SimpleTuner validates and caches with its own VAE: still the same object, with the same tensors
    assert ours.get_vae() is ours.vae and [p.data_ptr() for p in ours.vae.parameters()] == vae_params


def test_checkpoint_save_and_load_of_the_projector(st, monkeypatch):
    """SimpleTuner saves `crepa_projector` with the trained model's state dict; it loads back."""
    ns = _namespace(st, monkeypatch)
    a, b = _foundation(ns), _foundation(ns)
    a._init_crepa_regularizer()
    b._init_crepa_regularizer()
    state = {k: v for k, v in a.model.state_dict().items() if k.startswith("crepa_projector.")}
    assert set(state) == {"crepa_projector.0.weight", "crepa_projector.0.bias", "crepa_projector.1.weight",
                          "crepa_projector.1.bias"}
    b.model.load_state_dict(state, strict=False)
    torch.testing.assert_close(b.crepa_regularizer.projector[1].weight, a.crepa_regularizer.projector[1].weight)


@pytest.mark.parametrize("overrides, option, trains", [
    ({"crepa_use_tae": True}, "crepa_use_tae=true", False),  # SimpleTuner downloads the TAE weights: no network
    ({"irepa_enabled": True}, "irepa_enabled=true", True),
    ({"crepa_power": 0.05}, "crepa_power=0.05", True),  # SimpleTuner takes any power, crepa-mem ≥ 0.1
])
def test_modes_crepa_mem_does_not_implement_run_on_simpletuners_class(st, monkeypatch, caplog, overrides, option,
                                                                      trains):
    from crepa_mem.integrations.simpletuner import CrepaRegularizer

    ns = _namespace(st, monkeypatch, **overrides)
    foundation = _foundation(ns)
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: _HubDinov2(tiny_dinov2()))
    with caplog.at_level(logging.WARNING, logger="crepa_mem.simpletuner"):
        foundation._init_crepa_regularizer()
    reg = foundation.crepa_regularizer
    assert type(reg) is not CrepaRegularizer and type(reg).__module__ == "simpletuner.helpers.training.crepa"
    ours = [r.getMessage() for r in caplog.records if r.name == "crepa_mem.simpletuner"]
    assert len(ours) == 1 and option in ours[0]  # one warning, naming the option
    assert hasattr(reg, "reinitialize_projector")  # post_quantization_setup calls it with irepa_enabled
    if trains:
        foundation.post_quantization_setup()
        loss, logs = _train_step(foundation, _batch(), 1)
        assert torch.isfinite(loss) and "crepa_alignment_score" in logs
