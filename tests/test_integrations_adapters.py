"""CrepaHooks: the three hook-style trainer points, on real diffusers models and on a trainer's own DiT."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from crepa_mem import CrepaConfig, wrap
from crepa_mem.integrations.adapters import CrepaHooks
from crepa_mem.errors import CaptureError
from crepa_mem.testing import tiny_dinov2, tiny_transformer, tiny_transformer_inputs, tiny_vae

CFG = CrepaConfig(enabled=True, block_index=1, encoder_image_size=70, encoder_frames_batch_size=2)



class TrainerDiT(nn.Module):
    """A trainer's own wrapper class around a DiT (as musubi-tuner's WanModel is its own class): crepa-mem
    does not recognise it, so the block list and width are named explicitly."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit
        self.blocks = dit.blocks

    def forward(self, **kwargs):
        return self.dit(**kwargs)


def _latents(seed=5):
    return torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_diffusers_model_goes_through_wrap_and_fills_the_three_points():
    model = tiny_transformer("wan").train()
    hooks = CrepaHooks(model, tiny_vae("wan"), CFG, encoder=tiny_dinov2(), device="cpu", max_train_steps=10)
    params = hooks.trainable_params()
    assert len(params) == 4 and all(p.requires_grad for p in params)
    groups = hooks.extra_trainable_params([{"params": [model.proj_out.weight], "lr": 1e-4}], lr=1e-3)
    assert len(groups) == 2 and groups[1]["lr"] == 1e-3 and groups[1]["params"] == params
    opt = torch.optim.SGD(groups, lr=1e-4)
    model(**tiny_transformer_inputs("wan", model))
    loss, logs = hooks.extra_loss(_latents(), step=0)
    assert logs is hooks.last_logs and logs["crepa_loss"] == pytest.approx(loss.item())
    before = hooks.projector[1].weight.detach().clone()
    loss.backward()
    opt.step()
    assert not torch.equal(before, hooks.projector[1].weight)


def test_trainer_own_dit_matches_wrap_on_the_same_model():
    """The explicit-blocks path (tokens reshaped from the latents' grid) gives wrap's loss and gradients."""
    inputs, latents = tiny_transformer_inputs("wan", tiny_transformer("wan"), seed=2), _latents()
    reference = tiny_transformer("wan").train()
    torch.manual_seed(0)
    crepa = wrap(reference, vae=tiny_vae("wan"), encoder=tiny_dinov2(), config=CFG, device="cpu")
    reference(**inputs)
    ref_loss, _ = crepa(latents, step=0)
    ref_loss.backward()

    own = TrainerDiT(tiny_transformer("wan")).train()
    own.dit.enable_gradient_checkpointing()  # the hook must ignore recomputation in backward
    torch.manual_seed(0)
    hooks = CrepaHooks(own, tiny_vae("wan"), CFG, encoder=tiny_dinov2(), device="cpu", blocks="blocks",
                       hidden_size=32, patch_size=(1, 2, 2))
    assert own.crepa_projector is hooks.projector
    own(**inputs)
    loss, _ = hooks.extra_loss(latents, step=0)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hooks.projector[1].weight.grad, crepa.projector[1].weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(own.dit.blocks[0].attn1.to_q.weight.grad, reference.blocks[0].attn1.to_q.weight.grad,
                               rtol=1e-5, atol=1e-7)
    hooks.remove()
    assert not hasattr(own, "crepa_projector")
    own(**inputs)  # no hook left behind
    with pytest.raises(CaptureError):
        hooks.extra_loss(latents)


def test_own_dit_errors_name_what_is_missing():
    own = TrainerDiT(tiny_transformer("wan"))
    with pytest.raises(CaptureError, match="pass blocks="):
        CrepaHooks(own, tiny_vae("wan"), CFG, encoder=tiny_dinov2(), device="cpu")
    with pytest.raises(CaptureError, match=r"valid block indices are 0\.\.2, got 7"):
        CrepaHooks(own, tiny_vae("wan"), CFG.replace(block_index=7), encoder=tiny_dinov2(), device="cpu",
                   blocks="blocks", hidden_size=32)
    hooks = CrepaHooks(own, tiny_vae("wan"), CFG, encoder=tiny_dinov2(), device="cpu", blocks="blocks", hidden_size=32)
    with pytest.raises(CaptureError, match="call extra_loss after the forward"):
        hooks.extra_loss(_latents())


def test_save_load_and_zero_weight(tmp_path):
    model = tiny_transformer("wan")
    hooks = CrepaHooks(model, tiny_vae("wan"), CFG, encoder=tiny_dinov2(), device="cpu")
    path = hooks.save(tmp_path)
    other = CrepaHooks(tiny_transformer("wan"), tiny_vae("wan"), CFG, encoder=tiny_dinov2(seed=1), device="cpu")
    with torch.no_grad():
        other.projector[1].weight.add_(1.0)
    other.load(path)
    torch.testing.assert_close(other.projector[1].weight, hooks.projector[1].weight, rtol=0, atol=0)
    off = CrepaHooks(tiny_transformer("wan"), tiny_vae("wan"), CFG.replace(lambda_=0.0), encoder=tiny_dinov2(),
                     device="cpu")
    off.transformer(**tiny_transformer_inputs("wan", off.transformer))
    loss, logs = off.extra_loss(_latents())
    assert loss.item() == 0.0 and loss.requires_grad and logs == {}
