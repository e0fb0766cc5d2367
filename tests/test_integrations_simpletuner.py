"""The SimpleTuner drop-in: SimpleTuner's constructor/call signatures and errors, crepa-mem's tiers behind them."""
from __future__ import annotations

import inspect
import sys
import textwrap
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from crepa_mem import CrepaConfig, CrepaMemError
from crepa_mem.capture import capture_hidden_states
from crepa_mem.integrations.simpletuner import CrepaRegularizer, config_from_simpletuner, patch_simpletuner
from crepa_mem.testing import tiny_dinov2, tiny_transformer, tiny_transformer_inputs, tiny_vae
from simpletuner_reference import st_decode, st_encode, st_loss, st_scores

FIXTURES = Path(__file__).parent / "fixtures" / "simpletuner"  # copies of ../shared/fixtures/simpletuner


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A DINOv2 on disk, loaded by name the way a user's config names a local encoder."""
    path = tmp_path_factory.mktemp("enc") / "dinov2"
    tiny_dinov2().save_pretrained(path)
    return str(path)


def _namespace(encoder_dir: str, **overrides) -> Namespace:
    """What SimpleTuner's argument parser produces: every option present, unset ones None."""
    values = dict(crepa_enabled=True, crepa_block_index=1, crepa_lambda=0.5, crepa_adjacent_distance=1,
                  crepa_adjacent_tau=1.0, crepa_model=None, crepa_encoder=encoder_dir, crepa_encoder_image_size=70,
                  crepa_encoder_frames_batch_size=None, crepa_normalize_by_frames=True, crepa_spatial_align=True,
                  crepa_cumulative_neighbors=False, crepa_use_backbone_features=False, crepa_teacher_block_index=None,
                  crepa_scheduler=None, crepa_similarity_threshold=None, crepa_use_tae=False,
                  model_family="wan", learning_rate=1e-4)
    values.update(overrides)
    return Namespace(**values)


def _captured(model, seed=0):
    with capture_hidden_states(model, 1) as cap:
        model(**tiny_transformer_inputs("wan", model, latent_frames=3, seed=seed))
        return cap.hidden_states


def test_signatures_mirror_simpletuner_4_10():
    init = inspect.signature(CrepaRegularizer.__init__).parameters
    assert list(init)[:4] == ["self", "config", "accelerator", "hidden_size"]
    assert init["model_foundation"].kind is inspect.Parameter.KEYWORD_ONLY
    assert init["max_train_steps"].kind is inspect.Parameter.KEYWORD_ONLY
    call = inspect.signature(CrepaRegularizer.compute_loss).parameters
    assert list(call)[:4] == ["self", "hidden_states", "latents", "vae"] and call["vae"].default is None
    assert {"frame_features", "step"} <= {n for n, p in call.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_loss_equals_simpletuners_recipe_and_projector_is_registered(accelerator, encoder_dir):
    model = tiny_transformer("wan")
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    reg = CrepaRegularizer(_namespace(encoder_dir), accelerator, 32, max_train_steps=100)
    assert reg.wants_hidden_states() and reg.block_index == 1
    reg.attach_to_model(model)
    assert model.crepa_projector is reg.projector and reg.encoder_dim == 32
    hidden = _captured(model)
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    loss, logs = reg.compute_loss(hidden_states=hidden, latents=latents, vae=vae, step=0)
    proj = reg.projector(hidden.float().reshape(-1, 32)).view(*hidden.shape[:3], -1)
    total, _ = st_scores(proj, st_encode(enc, st_decode(vae, latents), 70))
    torch.testing.assert_close(loss, st_loss(total, 0.5), rtol=1e-5, atol=1e-7)
    assert logs["crepa_alignment_score"] == pytest.approx(total.mean().item(), rel=1e-5)
    loss.backward()
    assert model.blocks[0].attn1.to_q.weight.grad is not None and reg.projector[1].weight.grad is not None


def test_crepa_mem_tier_keys_in_the_same_config_give_the_same_loss(accelerator, encoder_dir):
    model = tiny_transformer("wan")
    hidden = _captured(model).detach()
    latents = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    losses = []
    for extra in ({}, {"crepa_mem_encoder_tier": "swap", "crepa_mem_vae_tier": "device",
                       "crepa_encoder_frames_batch_size": 1}):
        torch.manual_seed(0)  # same projector init
        reg = CrepaRegularizer(_namespace(encoder_dir, **extra), accelerator, 32)
        reg.attach_to_model(tiny_transformer("wan"))
        loss, logs = reg.compute_loss(hidden, latents, tiny_vae("wan"), step=3)
        losses.append(loss)
    assert reg.teacher_facts["crepa_teacher_encoder_tier"] == "swap" and logs["crepa_teacher_chunk_frames"] == 1
    assert all(isinstance(v, (int, float)) for v in logs.values())  # trackers log them as aux_loss/…
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-8)


def test_vae_from_model_foundation_and_image_mode(accelerator, encoder_dir):
    """SimpleTuner 4.10 may pass vae=None and offer it via model_foundation.get_vae(); a foundation whose
    crepa_mode is IMAGE has (B, S, D) hidden states meaning one frame of S tokens."""
    vae = tiny_vae("wan")
    foundation = SimpleNamespace(get_vae=lambda: vae, crepa_mode=SimpleNamespace(name="IMAGE"))
    reg = CrepaRegularizer(_namespace(encoder_dir), accelerator, 32, model_foundation=foundation)
    reg.attach_to_model(tiny_transformer("wan"))
    hidden = torch.randn(1, 25, 32)  # one image, 5×5 tokens
    loss, logs = reg.compute_loss(hidden, torch.randn(1, 16, 1, 8, 8))
    assert torch.isfinite(loss) and logs["crepa_teacher_frames_encoded"] == 1


def test_backbone_mode_needs_no_encoder(accelerator):
    cfg = _namespace("unused", crepa_use_backbone_features=True, crepa_teacher_block_index=2)
    reg = CrepaRegularizer(cfg, accelerator, 32)
    reg.attach_to_model(tiny_transformer("wan"))
    assert reg.encoder is None and reg.encoder_dim == 32
    hidden = torch.randn(2, 3, 16, 32)
    with pytest.raises(ValueError, match="backbone feature mode requires frame_features"):
        reg.compute_loss(hidden, None)
    loss, logs = reg.compute_loss(hidden, None, frame_features=torch.randn(2, 3, 16, 32), step=0)
    assert torch.isfinite(loss) and "crepa_teacher_encoder_tier" not in logs


def test_disabled_and_errors_match_simpletuner(accelerator, encoder_dir):
    off = CrepaRegularizer(_namespace(encoder_dir, crepa_enabled=False), accelerator, 32)
    model = tiny_transformer("wan")
    off.attach_to_model(model)
    assert not off.wants_hidden_states() and not hasattr(model, "crepa_projector")
    assert off.compute_loss(None, None) == (None, None)
    with pytest.raises(ValueError, match="crepa_block_index must be set when CREPA is enabled"):
        CrepaRegularizer(_namespace(encoder_dir, crepa_block_index=None), accelerator, 32)
    reg = CrepaRegularizer(_namespace(encoder_dir), accelerator, 32)
    with pytest.raises(RuntimeError, match="projector was not initialised"):
        reg.compute_loss(torch.randn(1, 3, 16, 32), torch.randn(1, 16, 3, 8, 8), tiny_vae("wan"))
    reg.attach_to_model(model)
    with pytest.raises(ValueError, match="no intermediate hidden states"):
        reg.compute_loss(None, torch.randn(1, 16, 3, 8, 8))
    with pytest.raises(ValueError, match="clean latents"):
        reg.compute_loss(torch.randn(1, 3, 16, 32), None)
    with pytest.raises(ValueError, match="requires a VAE"):
        reg.compute_loss(torch.randn(1, 3, 16, 32), torch.randn(1, 16, 3, 8, 8))
    zero = CrepaRegularizer(_namespace(encoder_dir, crepa_lambda=None), accelerator, 32)  # `or 0.0`
    zero.attach_to_model(tiny_transformer("wan"))
    assert zero.compute_loss(torch.randn(1, 3, 16, 32), torch.randn(1, 16, 3, 8, 8), tiny_vae("wan")) == (None, None)


@pytest.mark.parametrize("name", ["wan2.1-t2v-1.3b-480p-ramtorch-crepa.json", "ltxvideo-0.9.5-t2v-crepa.json"])
def test_real_simpletuner_config_files(name):
    import json

    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} not present")
    from_file = CrepaConfig.from_file(path)
    from_namespace = config_from_simpletuner(Namespace(**json.loads(path.read_text())))
    assert from_file.enabled and from_namespace == from_file


def test_patch_without_simpletuner_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "simpletuner", None)  # makes `import simpletuner` fail
    with pytest.raises(CrepaMemError, match="SimpleTuner is not importable here.*python -m crepa_mem.integrations.simpletuner"):
        patch_simpletuner()


def test_patch_rebinds_the_class_where_simpletuner_imported_it(tmp_path, monkeypatch):
    """A package laid out as SimpleTuner's (crepa.py defines the class, models/common.py imports it by name):
    both names must point at the drop-in after patching, also in a module imported before the patch."""
    root = tmp_path / "simpletuner"
    for sub in ("", "helpers", "helpers/training", "helpers/models"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / "__init__.py").write_text("")
    (root / "helpers/training/crepa.py").write_text("class CrepaRegularizer:\n    pass\n")
    (root / "helpers/models/common.py").write_text(textwrap.dedent("""
        from simpletuner.helpers.training.crepa import CrepaRegularizer
        def build(*args, **kwargs):
            return CrepaRegularizer(*args, **kwargs)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "simpletuner" or n.startswith("simpletuner.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        import simpletuner.helpers.models.common as common

        patched = patch_simpletuner()
        assert patched == ["simpletuner.helpers.models.common.CrepaRegularizer",
                           "simpletuner.helpers.training.crepa.CrepaRegularizer"]
        assert common.CrepaRegularizer is CrepaRegularizer
        assert sys.modules["simpletuner.helpers.training.crepa"].CrepaRegularizer is CrepaRegularizer
        assert patch_simpletuner() == patched  # idempotent
    finally:
        for name in [n for n in sys.modules if n == "simpletuner" or n.startswith("simpletuner.")]:
            del sys.modules[name]


def test_follows_a_projector_copy_registered_in_its_place(accelerator):
    """PEFT's modules_to_save trains a copy registered as model.crepa_projector: the loss must use it."""
    ns = Namespace(crepa_enabled=True, crepa_block_index=0, crepa_use_backbone_features=True,
                   crepa_teacher_block_index=1)
    reg = CrepaRegularizer(ns, accelerator, hidden_size=8)
    model = torch.nn.Module()
    reg.attach_to_model(model)
    copy = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    copy.load_state_dict(model.crepa_projector.state_dict())
    model.crepa_projector = copy
    hidden, teacher = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    loss, _ = reg.compute_loss(hidden, None, frame_features=teacher, step=0)
    loss.backward()
    assert copy[1].weight.grad is not None and reg.projector is copy


def test_zero_scheduled_weight_gives_no_loss_and_the_ema_is_logged_every_step(accelerator):
    """SimpleTuner 4.10: at weight 0 (warm-up step 0 here) no loss at all, so the projector gets no gradient
    and AdamW does not move it; crepa_alignment_score_ema on every step, threshold or not."""
    ns = Namespace(crepa_enabled=True, crepa_block_index=0, crepa_use_backbone_features=True,
                   crepa_teacher_block_index=1, crepa_warmup_steps=2, crepa_lambda=0.5)
    reg = CrepaRegularizer(ns, accelerator, hidden_size=8)
    reg.attach_to_model(torch.nn.Module())
    hidden, teacher = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    loss, logs = reg.compute_loss(hidden, None, frame_features=teacher, step=0)
    assert loss is None and logs["crepa_cutoff"] is True and logs["crepa_weight"] == 0.0 == logs["crepa_loss"]
    assert logs["crepa_alignment_score_ema"] == pytest.approx(logs["crepa_alignment_score"])
    loss, logs = reg.compute_loss(hidden, None, frame_features=teacher, step=1)
    assert loss is not None and logs["crepa_weight"] == 0.25 and logs["crepa_cutoff"] is False
    assert "crepa_alignment_score_ema" in logs


def test_accepts_what_simpletuner_accepts_with_a_warning(accelerator, encoder_dir, caplog):
    """A tiny crepa_encoder_image_size (SimpleTuner's own tests use 8) and a projector assigned before
    attach_to_model, which SimpleTuner keeps."""
    import logging

    with caplog.at_level(logging.WARNING, logger="crepa_mem.simpletuner"):
        reg = CrepaRegularizer(_namespace(encoder_dir, crepa_encoder_image_size=8), accelerator, 32)
    assert reg.encoder_image_size == 8 and "crepa_encoder_image_size=8 is below 64" in caplog.text
    own = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 32))
    reg = CrepaRegularizer(_namespace(encoder_dir), accelerator, 32)
    reg.projector = own
    model = tiny_transformer("wan")
    reg.attach_to_model(model)
    assert model.crepa_projector is own and reg.projector is own


def test_a_mode_only_simpletuner_implements_needs_simpletuners_class(accelerator, encoder_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, "simpletuner.helpers.training.crepa", raising=False)
    with pytest.raises(CrepaMemError, match="crepa_use_tae=true is implemented by SimpleTuner's own CREPA class"):
        CrepaRegularizer(_namespace(encoder_dir, crepa_use_tae=True), accelerator, 32)
    with pytest.raises(ValueError, match="crepa_adjacent_tau"):  # SimpleTuner refuses it too: no hand-over
        CrepaRegularizer(_namespace(encoder_dir, crepa_adjacent_tau=0.0), accelerator, 32)
