"""crepa_mem.integrations.auto against a simulated card: full-size Wan 2.1 VAE and DINOv2 on the fake cuda:0 of
crepa_mem.trace.runtime, which raises torch.OutOfMemoryError when live bytes pass the card's size."""
import copy
import dataclasses
import functools

import pytest
import torch

from crepa_mem.config import CrepaConfig
from crepa_mem.integrations.auto import AutoTiers, encoder_profile, vae_profile
from crepa_mem.planning.devices import DeviceInfo
from crepa_mem.planning.ladder import AUTO_HEADROOM, BACKWARD_MARGIN
from crepa_mem.planning.planner import plan
from crepa_mem.profiles import get_vae
from crepa_mem.teacher.ladder import MemoryReading, TeacherRunner
from crepa_mem.testing import tiny_dinov2, tiny_vae
from crepa_mem.trace.runtime import FAKE_GPU, LiveBytes, fake_gpu, materialize
from crepa_mem.trace.workloads import build_encoder, build_vae
from crepa_mem.units import GiB, MiB

HOST = 1 << 40
LATENTS = (1, 16, 3, 16, 16)          # Wan: 9 frames at 128×128
DIT = dict(hidden_size=1536, tokens=64)  # a 1.3B-wide DiT, patch 2
RESIDENT = 40 * MiB                    # what the DiT's forward left allocated


def _probe(tracker, budget):
    def read(device):
        live = tracker.live_bytes()
        return MemoryReading(str(device), budget, budget - live, live, live)
    return read


def _run(budget, **tiers):
    return _cached_run(budget, tuple(sorted(tiers.items())))


@functools.lru_cache(maxsize=None)
def _cached_run(budget, tiers):
    """One teacher step on the simulated card; returns (runner, features stats)."""
    tiers = dict(tiers)
    with fake_gpu(budget) as tracker:
        vae = materialize(build_vae("wan-2.1"), "cpu", torch.bfloat16)
        enc = materialize(build_encoder("dinov2_vits14"), "cpu")
        activations = torch.empty(RESIDENT, dtype=torch.uint8, device=FAKE_GPU)
        cfg = CrepaConfig(enabled=True, encoder="dinov2_vits14", **tiers)
        runner = TeacherRunner(cfg, encoder=enc, vae=vae, compute_device=FAKE_GPU, hidden_size=DIT["hidden_size"],
                               policy=AutoTiers(host_ram_bytes=HOST), probe=_probe(tracker, budget))
        result = runner.features(torch.empty(*LATENTS, device=FAKE_GPU), 3, dit_tokens_per_frame=DIT["tokens"])
        del activations
        return runner, result.stats


@pytest.mark.parametrize("budget_mib", [900, 330])
def test_the_runtime_choice_is_plans_choice_for_the_measured_budget(budget_mib):
    runner, stats = _run(budget_mib * MiB, encoder_tier="auto", vae_tier="auto")
    decision = runner.record.decision
    figures = decision["figures"]
    assert figures["allocated_bytes"] >= RESIDENT and figures["total_bytes"] == budget_mib * MiB
    gpu = DeviceInfo(index=None, name="simulated", uuid=None, total_bytes=figures["total_bytes"],
                     free_bytes=figures["free_for_teacher_bytes"], reserved_bytes=None, used_bytes=None,
                     compute_capability=None, pcie_gen=None, pcie_width=None, h2d_bytes_per_s=None)
    shape = decision["shape"]
    p = plan(decision["model"], gpu, frames=shape["frames"], height=shape["height"], width=shape["width"],
             encoder="dinov2_vits14", headroom=AUTO_HEADROOM, teacher_gpus=[], host_ram_bytes=HOST, feature_cache=False,
             may_drop_vae_encoder=False, train_gib=(figures["total_bytes"] - figures["free_for_teacher_bytes"]) / GiB)
    assert p.fits and p.quality_level == 0
    assert {k: p.settings[k] for k in decision["settings"]} == decision["settings"]
    assert stats["ladder_steps"] == 0 and stats["rung"].startswith(
        f"encoder={p.settings['crepa_mem_encoder_tier']} vae={p.settings['crepa_mem_vae_tier']}")
    assert "crepa-mem auto on cuda:0" in decision["line"] and "budget" in decision["line"]


def test_the_backward_reserve_is_the_training_models_block_for_a_catalog_dit():
    from crepa_mem.planning.training import block_backward_bytes
    from crepa_mem.profiles import get_model

    runner, _ = _run(900 * MiB, encoder_tier="auto", vae_tier="auto")
    figures = runner.record.decision["figures"]  # a Wan VAE and a 1536-wide DiT: Wan 2.1 1.3B, 9 × 128 × 128
    assert figures["backward_reserve_bytes"] == block_backward_bytes(get_model("wan-2.1-1.3b"), frames=9, height=128,
                                                                     width=128) > 0
    ctx = runner.context(torch.empty(*LATENTS), 3, DIT["tokens"], 0)
    unknown = dataclasses.replace(ctx, hidden_size=1000)  # no catalog DiT is 1000 wide: the 10 % margin
    assert AutoTiers().budget(unknown, runner.config)["backward_reserve_bytes"] == int(
        BACKWARD_MARGIN * unknown.reading.allocated_bytes)


def test_more_memory_never_gives_a_slower_auto_choice():
    small, _ = _run(250 * MiB, encoder_tier="auto", vae_tier="auto")
    big, _ = _run(900 * MiB, encoder_tier="auto", vae_tier="auto")
    assert big.record.decision["estimate_bytes"] >= small.record.decision["estimate_bytes"]
    assert big.config.encoder_tier == "gpu" and small.config.encoder_tier != "gpu"


def test_the_ladder_ends_at_the_same_rung_from_any_starting_tier():
    budget = 330 * MiB
    ends = {}
    for start in (dict(encoder_tier="gpu", vae_tier="gpu"), dict(encoder_tier="swap", vae_tier="gpu"),
                  dict(encoder_tier="gpu", vae_tier="swap", encoder_frames_batch_size=1)):
        runner, stats = _run(budget, **start)
        assert stats["ladder_steps"] >= 1 and len(runner.record.tried) == stats["ladder_steps"]
        ends[str(start)] = stats["rung"]
    assert len(set(ends.values())) == 1, ends


def test_after_the_last_rung_it_raises_naming_what_was_tried_and_doctor():
    from crepa_mem.errors import TeacherOutOfMemoryError

    with pytest.raises(TeacherOutOfMemoryError, match=r"tried: encoder=gpu vae=gpu .*crepa-mem doctor.*allow_lossy"):
        _run(RESIDENT + 60 * MiB, encoder_tier="gpu", vae_tier="gpu")


def test_profiles_come_from_the_modules_at_hand():
    full = vae_profile(build_vae("wan-2.1"))
    catalog = get_vae("wan-2.1")
    assert full.name == "wan-2.1" and full.params_decoder + full.params_encoder == pytest.approx(catalog.params, rel=1e-3)
    tiny = vae_profile(tiny_vae("wan"))
    assert tiny.name == "wan-2.1" and tiny.params < catalog.params / 100
    assert encoder_profile("dinov2_vitg14", build_encoder("dinov2_vitg14")).intermediate_size == 4096
    small = encoder_profile("dinov2_vits14", tiny_dinov2())  # a tiny module is not the catalog's ViT-S
    assert small.hidden_size == 32 and small.num_layers == 2


# ------------------------------------------------------------------ real numbers: losses are the unconstrained run's
def _wan_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 24, generator=g, requires_grad=True)


def _loss(cfg, vae, enc, budget=None):
    from crepa_mem.regularizer import CrepaRegularizer

    torch.manual_seed(0)
    reg = CrepaRegularizer(cfg, 24, encoder=copy.deepcopy(enc), vae=copy.deepcopy(vae), device="cpu",
                           tier_policy=AutoTiers(host_ram_bytes=HOST))
    lat, hidden = _wan_batch()
    tracker = LiveBytes(None if budget is None else {"cpu": budget})
    with tracker:
        loss, logs = reg.compute_loss(hidden, lat)
        _, again = reg.compute_loss(hidden, lat, step=1)  # the rung found is kept: no second back-off
    assert again["crepa_teacher_rung"] == logs["crepa_teacher_rung"] and again["crepa_teacher_retries"] == 0
    (grad,) = torch.autograd.grad(loss, hidden)
    return loss, grad, logs, tracker.peak_bytes("cpu")


def test_a_budget_the_top_rung_does_not_fit_gives_the_unconstrained_loss_and_gradient():
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    cfg = CrepaConfig(enabled=True, encoder_image_size=448, encoder_tier="auto", vae_tier="auto")  # encoder-bound
    free_loss, free_grad, free_logs, free_peak = _loss(cfg, vae, enc)
    _, _, _, chunked_peak = _loss(cfg.replace(encoder_tier="gpu", vae_tier="gpu", encoder_frames_batch_size=1), vae, enc)
    assert chunked_peak < free_peak and free_logs["crepa_teacher_ladder_steps"] == 0
    loss, grad, logs, peak = _loss(cfg, vae, enc, budget=(chunked_peak + free_peak) // 2)
    assert logs["crepa_teacher_ladder_steps"] + logs["crepa_teacher_retries"] >= 1
    assert peak <= (chunked_peak + free_peak) // 2
    assert "chunk=all" not in logs["crepa_teacher_rung"] and logs["crepa_teacher_auto"]
    torch.testing.assert_close(loss, free_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, free_grad, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------ the entry points take `auto`
def test_wrap_plan_auto_decides_at_the_first_step_logs_once_and_keeps_it(caplog):
    import logging

    from crepa_mem import wrap
    from crepa_mem.testing import tiny_transformer, tiny_transformer_inputs

    model = tiny_transformer("wan")
    crepa = wrap(model, vae=tiny_vae("wan"), encoder=tiny_dinov2(), device="cpu", plan="auto",
                 config=CrepaConfig(enabled=True, block_index=1, encoder_image_size=70))
    assert crepa.config.encoder_tier == crepa.config.vae_tier == "auto"
    lat = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="crepa_mem"):
        for step in range(2):
            model(**tiny_transformer_inputs("wan", model, latent_frames=3))
            loss, logs = crepa(lat, step=step)
            loss.backward()
    lines = [r.getMessage() for r in caplog.records if "crepa-mem auto" in r.getMessage()]
    assert len(lines) == 1 and "on cpu at step 0" in lines[0] and "chosen encoder=gpu vae=gpu" in lines[0]
    assert logs["crepa_teacher_rung"].startswith("encoder=gpu vae=gpu") and logs["crepa_teacher_auto"]
    assert crepa.config.encoder_tier == "gpu" and logs["crepa_teacher_ladder_steps"] == 0


def test_plan_must_be_auto_or_a_plan():
    from crepa_mem.errors import CrepaConfigError
    from crepa_mem.integrations.wrap import resolve_config

    with pytest.raises(CrepaConfigError, match="plan='fast'"):
        resolve_config(None, "fast")


def test_simpletuner_drop_in_takes_auto_tiers_from_its_config():
    from accelerate import Accelerator

    from crepa_mem.integrations.simpletuner import CrepaRegularizer
    from crepa_mem.testing import tiny_transformer

    config = {"crepa_enabled": True, "crepa_block_index": 1, "crepa_encoder_image_size": 70,
              "crepa_mem_encoder_tier": "auto", "crepa_mem_vae_tier": "auto"}
    reg = CrepaRegularizer(config, Accelerator(cpu=True), 32, encoder=tiny_dinov2())
    reg.attach_to_model(tiny_transformer("wan"))
    hidden = torch.randn(1, 3, 16, 32)
    lat = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loss, logs = reg.compute_loss(hidden, lat, tiny_vae("wan"), step=0)
    runner = reg._regularizer.teacher  # the drop-in hands SimpleTuner numeric logs only
    assert torch.isfinite(loss) and runner.record.decision is not None
    assert (runner.config.encoder_tier, runner.config.vae_tier) == ("gpu", "gpu") and runner.vae.tier == "gpu"
