"""Block capture on the four real diffusers DiT classes (tiny, random, CPU)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from crepa_mem.capture import (
    SUPPORTED_FAMILIES,
    BlockCapture,
    capture_hidden_states,
    family_spec,
    hidden_size_of,
)
from crepa_mem.errors import CaptureError
from crepa_mem.testing import tiny_transformer, tiny_transformer_inputs

FAMILIES = SUPPORTED_FAMILIES
LAYERS = 3



def _blocks(model):
    return getattr(model, family_spec(model).blocks_attr)


def _raw_block_output(model, index):
    """An independent plain hook on block `index`: what the block really returned."""
    seen = {}

    def hook(module, args, output):
        seen.setdefault("out", output[0] if isinstance(output, tuple) else output)

    return seen, _blocks(model)[index].register_forward_hook(hook)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("height,width", [(8, 8), (8, 12)])
def test_capture_shape_grid_and_token_order(family, height, width):
    model = tiny_transformer(family, num_layers=LAYERS)
    patch = family_spec(model).patch_size
    grid = (3 // patch[0], height // patch[1], width // patch[2])
    kwargs = tiny_transformer_inputs(family, model, batch=2, latent_frames=3, latent_height=height, latent_width=width)
    seen, handle = _raw_block_output(model, 1)
    with capture_hidden_states(model, 1) as cap:
        model(**kwargs)
        hidden = cap.hidden_states
        assert cap.grid == grid
    handle.remove()
    assert hidden.shape == (2, grid[0], grid[1] * grid[2], 32)
    # the block's (B, T'·h'·w', D) output, split frame-major: frame t is tokens [t·P, (t+1)·P)
    torch.testing.assert_close(hidden, seen["out"].reshape(2, grid[0], grid[1] * grid[2], 32))
    assert hidden.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_gradient_reaches_blocks_up_to_index_only(family):
    model = tiny_transformer(family, num_layers=LAYERS)
    kwargs = tiny_transformer_inputs(family, model, batch=2, latent_height=4, latent_width=4)

    def grads(checkpointing):
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        with capture_hidden_states(model, 1) as cap:
            model(**kwargs)
            hidden = cap.hidden_states
            hidden.square().mean().backward()
            assert cap.hidden_states is hidden  # recomputation in backward did not overwrite it
        return [[p.grad for p in block.parameters()] for block in _blocks(model)]

    plain, ckpt = grads(False), grads(True)
    for block_grads in ckpt[:2]:
        assert any(g is not None and g.abs().sum() > 0 for g in block_grads)
    assert all(g is None or not g.any() for g in ckpt[2])
    for a, b in zip(plain, ckpt):  # checkpointing changes memory, not gradients
        for ga, gb in zip(a, b):
            if ga is None or gb is None:
                assert (ga is None or not ga.any()) and (gb is None or not gb.any())
            else:
                torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_block_is_captured_detached(family):
    model = tiny_transformer(family, num_layers=LAYERS)
    kwargs = tiny_transformer_inputs(family, model, latent_height=4, latent_width=6)
    seen, handle = _raw_block_output(model, 2)
    with capture_hidden_states(model, 0, teacher_block_index=2) as cap:
        model(**kwargs)
        student, teacher = cap.hidden_states, cap.teacher_states
    handle.remove()
    assert student.requires_grad and not teacher.requires_grad
    assert teacher.shape == student.shape
    torch.testing.assert_close(teacher, seen["out"].detach().reshape(teacher.shape))
    # same block as student and teacher: one hook, two views
    with capture_hidden_states(model, 1, teacher_block_index=1) as cap:
        model(**kwargs)
        torch.testing.assert_close(cap.teacher_states, cap.hidden_states.detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_range_block_index_names_family_and_range(family):
    model = tiny_transformer(family, num_layers=LAYERS)
    for bad in (LAYERS, -1, 40):
        with pytest.raises(CaptureError) as info:
            BlockCapture(model, bad)
        msg = str(info.value)
        assert family in msg and "3 blocks" in msg and "0..2" in msg and "hidden states not returned" in msg
        assert f"CREPA requested hidden states from layer {bad} but none were returned." in msg
    with pytest.raises(CaptureError, match="layer 5"):
        BlockCapture(model, 0, teacher_block_index=5)


def test_unsupported_models_list_the_supported_families():
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    for model in (nn.Linear(4, 4), unet):
        with pytest.raises(CaptureError, match="supported families are wan, ltxvideo, sanavideo, kandinsky5_video"):
            capture_hidden_states(model, 0).__enter__()
    with pytest.raises(CaptureError, match="^CREPA enabled but unable to infer transformer hidden size.$"):
        hidden_size_of(nn.Linear(4, 4))


def test_hidden_sizes_and_wrappers():
    for family in FAMILIES:
        assert hidden_size_of(tiny_transformer(family, num_layers=1)) == 32
    model = tiny_transformer("wan")
    spec = family_spec(model)
    assert spec == family_spec(nn.DataParallel(model)) == family_spec(torch.compile(model))
    assert (spec.family, spec.blocks_attr, spec.num_blocks, spec.patch_size) == ("wan", "blocks", 3, (1, 2, 2))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_remove_is_idempotent_and_removes_every_hook():
    model = tiny_transformer("wan")
    before = _hook_count(model)
    cap = BlockCapture(model, 1, teacher_block_index=2)
    assert _hook_count(model) == before + 4
    cap.remove()
    cap.remove()
    assert _hook_count(model) == before
    model(**tiny_transformer_inputs("wan", model))
    with pytest.raises(CaptureError, match="no transformer forward"):
        cap.hidden_states
    with capture_hidden_states(model, 0):
        assert _hook_count(model) == before + 3
    assert _hook_count(model) == before


def test_result_stays_readable_after_the_with_block_and_absence_is_named():
    model = tiny_transformer("wan")
    before = _hook_count(model)
    with capture_hidden_states(model, 1) as cap:
        model(**tiny_transformer_inputs("wan", model))
    assert _hook_count(model) == before  # the hooks are gone, the result is not
    hidden = cap.hidden_states
    assert hidden.requires_grad and hidden.shape[-1] == 32
    hidden.sum().backward()  # still connected to the forward's graph
    cap.clear()
    with pytest.raises(CaptureError, match="no transformer forward ran while the capture was active"):
        cap.hidden_states
    with capture_hidden_states(model, 1) as idle:
        pass
    with pytest.raises(CaptureError, match="inside the `with capture_hidden_states"):
        idle.hidden_states


def test_block_that_never_ran_and_clear():
    model = tiny_transformer("sanavideo")
    kwargs = tiny_transformer_inputs("sanavideo", model)
    cap = BlockCapture(model, 2)
    with pytest.raises(CaptureError, match="hidden states not returned"):
        cap.hidden_states
    model(**kwargs)
    assert cap.hidden_states.shape == (1, 3, 16, 32)
    cap.clear()
    with pytest.raises(CaptureError, match="no transformer forward"):
        cap.grid
    model.transformer_blocks = model.transformer_blocks[:2]  # e.g. layer dropping after setup
    model(**kwargs)
    with pytest.raises(CaptureError) as info:
        cap.hidden_states
    assert str(info.value) == (
        "CREPA requested hidden states from layer 2 but none were returned. "
        "Check that crepa_block_index is within the model's block count."
    )
    cap.remove()


def test_reentrant_checkpointing_is_refused_not_silently_gradless():
    model = tiny_transformer("wan")
    model.enable_gradient_checkpointing(
        gradient_checkpointing_func=lambda module, *args: torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=True
        )
    )
    with capture_hidden_states(model, 1) as cap, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**tiny_transformer_inputs("wan", model))
        with pytest.raises(CaptureError, match="use_reentrant=True"):
            cap.hidden_states


@pytest.mark.parametrize("how", ["add_adapter", "get_peft_model"])
def test_lora_wrapped_transformer_is_captured(how):
    from peft import LoraConfig, get_peft_model

    model = tiny_transformer("wan")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    if how == "add_adapter":  # diffusers' own LoRA path (SimpleTuner's)
        model.add_adapter(config)
        wrapped = model
    else:
        wrapped = get_peft_model(model, config)
    kwargs = tiny_transformer_inputs("wan", model, latent_height=4, latent_width=8)
    with capture_hidden_states(wrapped, 0) as cap:
        wrapped(**kwargs)
        hidden = cap.hidden_states
        assert hidden.shape == (1, 3, 8, 32) and cap.grid == (3, 2, 4)
        hidden.sum().backward()
    lora = [p for n, p in model.blocks[0].named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_ltx_grid_from_video_coords():
    model = tiny_transformer("ltxvideo")
    kwargs = tiny_transformer_inputs("ltxvideo", model, latent_frames=2, latent_height=4, latent_width=6)
    t, h, w = (kwargs.pop(k) for k in ("num_frames", "height", "width"))
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    kwargs["video_coords"] = grid.flatten(1).unsqueeze(0).float()
    with capture_hidden_states(model, 0) as cap:
        model(**kwargs)
        assert cap.grid == (2, 4, 6) and cap.hidden_states.shape == (1, 2, 24, 32)


def test_kandinsky5_sparse_attention_tokens_are_put_back_in_raster_order(monkeypatch):
    """With to_fractal the blocks see 8×8-grouped tokens; the model un-groups before out_layer,
    whose input (B, T', h', w', D) is the raster truth the capture must match."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline

    # set_attention_backend also sets the process-wide active backend (diffusers 0.42), which
    # reset_attention_backend does not undo: restore it so later tests in this worker keep SDPA.
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)

    model = tiny_transformer("kandinsky5_video", num_layers=2)
    model.set_attention_backend("flex")  # nabla sparse attention builds a flex BlockMask
    t, h, w = 2, 16, 32  # latent → token grid 2 × 8 × 16
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(t, h // 2 // 8, w // 2 // 8, 3, 3, 3, device="cpu")
    sparse = {"sta_mask": sta[None, None], "to_fractal": True, "P": 0.9, "attention_type": "nabla"}
    kwargs = tiny_transformer_inputs(
        "kandinsky5_video", model, latent_frames=t, latent_height=h, latent_width=w, sparse_params=sparse
    )
    truth = {}

    def keep_input(module, args):
        truth["x"] = args[0]

    handle = model.out_layer.register_forward_pre_hook(keep_input)
    seen, raw_handle = _raw_block_output(model, 1)
    with capture_hidden_states(model, 1) as cap, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention warns that it runs uncompiled on CPU
        model(**kwargs)
        hidden = cap.hidden_states
        assert cap.grid == (2, 8, 16)
    handle.remove()
    raw_handle.remove()
    torch.testing.assert_close(hidden, truth["x"].reshape(1, 2, 128, 32))
    assert not torch.equal(hidden, seen["out"].reshape(1, 2, 128, 32))  # the raw order really differs
