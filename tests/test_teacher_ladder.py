"""crepa_mem.teacher.ladder: the teacher step under a policy — placing, releasing, retrying, measuring."""
import copy

import pytest
import torch

from crepa_mem.config import CrepaConfig
from crepa_mem.errors import CrepaConfigError, TeacherOutOfMemoryError
from crepa_mem.teacher import ladder
from crepa_mem.teacher.ladder import TeacherRunner, build_path, measured, release, rung_label
from crepa_mem.teacher.path import TeacherFeatures
from crepa_mem.testing import devices_of, tiny_dinov2, tiny_vae


def _lat(seed=0):
    return torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _hooked(module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


class _Scripted:
    """A policy that walks a fixed list of rungs (the planner's ladder is tested in test_integrations_auto)."""

    def __init__(self, *rungs):
        self.rungs, self.calls = list(rungs), []

    def choose(self, cfg, ctx):
        self.calls.append(("choose", ctx.reading.device, ctx.latents_shape))
        return self.rungs.pop(0), {"line": "decided", "summary": "first"}

    def step_down(self, cfg, ctx, tried):
        self.calls.append(("step_down", [rung_label(c) for c in tried]))
        return self.rungs.pop(0) if self.rungs else None


def test_auto_without_a_policy_is_a_config_error_naming_where_auto_is_decided():
    with pytest.raises(CrepaConfigError, match="crepa_mem_encoder_tier.*auto.*wrap"):
        TeacherRunner(CrepaConfig(encoder_tier="auto"), encoder=tiny_dinov2(), vae=tiny_vae("wan"), compute_device="cpu")


def test_auto_decides_once_at_the_first_step_and_keeps_it():
    base = CrepaConfig(encoder_tier="auto", vae_tier="auto", encoder_image_size=70)
    chosen = base.replace(encoder_tier="stream", vae_tier="swap", encoder_frames_batch_size=2)
    policy, lines = _Scripted(chosen), []
    runner = TeacherRunner(base, encoder=tiny_dinov2(), vae=tiny_vae("wan"), compute_device="cpu", policy=policy,
                           on_decision=lines.append)
    assert runner.path is None and runner.encoder is None  # nothing placed before the first step
    first = runner.features(_lat(), 3)
    second = runner.features(_lat(1), 3)
    assert [c[0] for c in policy.calls] == ["choose"] and lines == ["decided"]
    assert runner.config == chosen and first.stats["rung"] == second.stats["rung"] == rung_label(chosen)
    assert first.stats["auto"] == "first" and runner.encoder.tier == "stream"


def test_an_oom_steps_down_frees_the_failed_rung_and_gives_the_same_features():
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    cfg = CrepaConfig(encoder_image_size=70, encoder_tier="stream", vae_tier="gpu")
    want = build_path(copy.deepcopy(enc), copy.deepcopy(vae), cfg, torch.device("cpu")).features(_lat(), 3).features
    lower = cfg.replace(encoder_tier="swap", encoder_frames_batch_size=1)
    runner = TeacherRunner(cfg, encoder=enc, vae=vae, compute_device="cpu", policy=_Scripted(lower))
    calls = {"n": 0}

    def oom_once(module, args):  # the decode runs out of memory once (the path's chunk back-off covers encodes only)
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("injected")

    vae.decoder.register_forward_pre_hook(oom_once)
    out = runner.features(_lat(), 3)
    torch.testing.assert_close(out.features, want)
    assert out.stats["ladder_steps"] == 1 and runner.config == lower and runner.encoder.tier == "swap"
    assert "encoder=stream" in runner.record.tried[0] and "VAE decode" in runner.record.tried[0]
    assert _hooked(enc) == 0  # the failed rung's stream hooks are gone


def test_a_shared_vae_never_moves_a_rung_that_moves_it_works_on_a_host_copy(monkeypatch):
    """SimpleTuner keeps using its VAE where it put it: stepping down from `gpu` must not move, hook or tile it."""
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    cfg = CrepaConfig(encoder_image_size=70, vae_tier="gpu")
    want = build_path(copy.deepcopy(enc), copy.deepcopy(vae), cfg, torch.device("cpu")).features(_lat(), 3).features
    lower = cfg.replace(vae_tier="stream", vae_tiling=True)
    runner = TeacherRunner(cfg, encoder=enc, vae=None, compute_device="cpu", policy=_Scripted(lower))
    runner.set_vae(vae, shared=True)
    assert runner.path.vae.module is vae  # the gpu rung uses the trainer's VAE as it is
    moved = []
    real_move = ladder.move_module
    monkeypatch.setattr(ladder, "move_module", lambda m, *a, **k: (moved.append(m), real_move(m, *a, **k))[1])
    calls = {"n": 0}

    def oom_once(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("injected")

    hook = vae.decoder.register_forward_pre_hook(oom_once)
    out = runner.features(_lat(), 3)
    hook.remove()
    torch.testing.assert_close(out.features, want)
    assert runner.config == lower and runner.path.vae.module is not vae and runner.path.vae.module is runner._vae_copy
    assert all(m is not vae for m in moved) and not getattr(vae, "use_tiling", False)
    assert getattr(vae.decoder, "_diffusers_hook", None) is None  # no group offloading on the trainer's decoder


def test_after_the_last_rung_it_raises_with_every_rung_tried():
    cfg = CrepaConfig(encoder_image_size=70)
    runner = TeacherRunner(cfg, encoder=tiny_dinov2(), vae=tiny_vae("wan"), compute_device="cpu",
                           policy=_Scripted(cfg.replace(encoder_tier="swap")),
                           on_chunk=lambda n: (_ for _ in ()).throw(torch.OutOfMemoryError("always")))
    runner.path.on_chunk = runner.on_chunk
    with pytest.raises(TeacherOutOfMemoryError, match=r"tried: encoder=gpu .*; encoder=swap .*crepa-mem doctor"):
        runner.features(_lat(), 3)


def test_without_a_policy_the_paths_own_message_stands():
    runner = TeacherRunner(CrepaConfig(encoder_image_size=70), encoder=tiny_dinov2(), vae=tiny_vae("wan"),
                           compute_device="cpu", on_chunk=lambda n: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    runner.path.on_chunk = runner.on_chunk
    with pytest.raises(TeacherOutOfMemoryError, match="chunk tried down to 1 frame"):
        runner.features(_lat(), 3)


def test_release_takes_the_stream_hooks_off_and_the_weights_to_the_host():
    enc, vae = tiny_dinov2(), tiny_vae("wan")
    path = build_path(enc, vae, CrepaConfig(encoder_tier="stream", vae_tier="stream"), torch.device("cpu"))
    assert _hooked(enc) > 0 and vae.decoder._diffusers_hook.get_hook("group_offloading") is not None
    release(path.encoder)
    release(path.vae)
    assert _hooked(enc) == 0 and devices_of(enc) == {"cpu"}
    assert all(getattr(m, "_diffusers_hook", None) is None or m._diffusers_hook.get_hook("group_offloading") is None
               for m in vae.decoder.modules())
    path = build_path(enc, vae, CrepaConfig(encoder_tier="stream", vae_tier="stream"), torch.device("cpu"))
    assert path.features(_lat(), 3).features.isfinite().all()  # placeable and runnable again


def _fake_cuda(monkeypatch, allocated, peaks):
    """The CUDA allocator's counters as a GPU reports them, on a CPU (the calls, not the numbers, are tested)."""
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: peaks.pop(0))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: resets.append(d))
    return resets


def _features():
    return TeacherFeatures(torch.zeros(1), (1, 1), [0], 1, {})


def test_the_teacher_peak_is_measured_without_resetting_cudas_peak_statistics(monkeypatch):
    resets = _fake_cuda(monkeypatch, 100, [500, 900])  # the teacher step set a new process peak
    out = measured(torch.device("cuda", 0), False, _features)
    assert resets == [] and out.stats == {"peak_bytes": 800, "peak_exact": True}
    _fake_cuda(monkeypatch, 100, [900, 900])  # it did not: an upper bound
    assert measured(torch.device("cuda", 0), False, _features).stats == {"peak_bytes": 800, "peak_exact": False}
    resets = _fake_cuda(monkeypatch, 100, [100, 300])
    out = measured(torch.device("cuda", 0), True, _features)  # crepa_mem_reset_peak_stats: the debug option
    assert len(resets) == 1 and out.stats == {"peak_bytes": 200, "peak_exact": True}


def test_cuda_reading_on_a_cpu_reports_no_device_memory():
    r = ladder.cuda_reading(torch.device("cpu"))
    assert r.total_bytes is None and r.free_bytes is None and r.device == "cpu"
