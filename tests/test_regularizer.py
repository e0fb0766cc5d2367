import math
import warnings

import pytest
import torch
from torch import nn

from crepa_mem import CrepaConfig, CrepaConfigError, CrepaRegularizer
from crepa_mem.errors import ShapeError
from crepa_mem.testing import tiny_dinov2, tiny_vae
from simpletuner_reference import st_decode, st_encode, st_lambda, st_loss, st_scores

D_DIT = 24


def _setup(seed=0, batch=2, frames=3, hw=(4, 4), tokens=None):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, 16, frames, *hw, generator=g)
    p = tokens or (hw[0] // 2) * (hw[1] // 2)
    hidden = torch.randn(batch, frames, p, D_DIT, generator=g, requires_grad=True)
    return lat, hidden


def _reference(reg, vae, enc, hidden, lat, cfg, step=0, max_train_steps=None):
    """SimpleTuner's recipe with the same projector: returns (loss, score, self)."""
    proj = reg.projector(hidden.float().reshape(-1, D_DIT)).view(*hidden.shape[:3], -1)
    feats = st_encode(enc, st_decode(vae, lat), cfg.encoder_image_size)
    total, selfs = st_scores(proj, feats, distance=cfg.adjacent_distance, tau=cfg.adjacent_tau,
                             cumulative=cfg.cumulative_neighbors,
                             normalize_neighbour_sum=cfg.normalize_neighbour_sum, spatial_align=cfg.spatial_align)
    decay = cfg.decay_steps or (max_train_steps or 0)
    lam = st_lambda(step, lam=cfg.lambda_, scheduler=cfg.scheduler, warmup=cfg.warmup_steps, decay=decay,
                    end=cfg.lambda_end, power=cfg.power)
    return st_loss(total, lam, cfg.normalize_by_frames), total.mean().item(), selfs.mean().item()


OPTIONS = [
    {},
    {"crepa_adjacent_distance": 0},
    {"crepa_adjacent_distance": 2, "crepa_cumulative_neighbors": True},
    {"crepa_adjacent_distance": 3},
    {"crepa_adjacent_tau": 0.3},
    {"crepa_normalize_by_frames": False},
    {"crepa_normalize_neighbour_sum": True},
    {"crepa_spatial_align": False},
    {"crepa_encoder_image_size": 84},  # 6×6 encoder grid vs 2×2 DiT grid: 2-D bilinear
    {"crepa_encoder_frames_batch_size": 2},
    {"crepa_lambda": 1.3},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k[6:]}={v}" for k, v in o.items()) or "defaults")
def test_loss_logs_and_gradient_match_simpletuner(options):
    cfg = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_encoder_image_size": 70, **options})
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=enc, vae=vae, device="cpu")
    lat, hidden = _setup()
    loss, logs = reg.compute_loss(hidden, lat, step=0)
    (grad_ours,) = torch.autograd.grad(loss, hidden)
    ref_loss, score, selfs = _reference(reg, vae, enc, hidden, lat, cfg)
    (grad_ref,) = torch.autograd.grad(ref_loss, hidden)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-8)
    assert logs["crepa_loss"] == pytest.approx(ref_loss.item(), rel=1e-5)
    assert logs["crepa_alignment_score"] == pytest.approx(score, rel=1e-5, abs=1e-7)
    assert logs["crepa_similarity_self"] == pytest.approx(selfs, rel=1e-5, abs=1e-7)
    assert logs["crepa_weight"] == cfg.lambda_ and logs["crepa_cutoff"] is False


def test_non_square_grids_use_1d_linear_like_simpletuner():
    cfg = CrepaConfig(enabled=True, encoder_image_size=70)
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=enc, vae=vae, device="cpu")
    lat, hidden = _setup(hw=(4, 6))  # DiT 2×3 = 6 tokens vs encoder 2×2 = 4
    loss, _ = reg.compute_loss(hidden, lat)
    torch.testing.assert_close(loss, _reference(reg, vae, enc, hidden, lat, cfg)[0], rtol=1e-5, atol=1e-7)


def test_true_grid_is_opt_in_and_changes_only_alignment():
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    lat, hidden = _setup(hw=(4, 6))
    reg = CrepaRegularizer(CrepaConfig(true_grid=True), hidden_size=D_DIT, encoder=enc, vae=vae, device="cpu")
    loss, logs = reg.compute_loss(hidden, lat, dit_grid=(2, 3))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "polynomial"])
def test_scheduler_through_compute_loss(scheduler):
    cfg = CrepaConfig(enabled=True, encoder_image_size=70, scheduler=scheduler, warmup_steps=2, decay_steps=6,
                      lambda_end=0.1, power=2.0)
    vae, enc = tiny_vae("wan"), tiny_dinov2()
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=enc, vae=vae, device="cpu")
    lat, hidden = _setup(batch=1)
    for step in [0, 1, 3, 6, 9]:
        loss, logs = reg.compute_loss(hidden, lat, step=step)
        ref, _, _ = _reference(reg, vae, enc, hidden, lat, cfg, step=step)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)


def test_similarity_threshold_logs_ema_and_cuts_off():
    cfg = CrepaConfig(enabled=True, encoder_image_size=70, similarity_threshold=0.0, similarity_ema_decay=0.5)
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=tiny_dinov2(), vae=tiny_vae("wan"), device="cpu")
    lat, hidden = _setup(batch=1)
    loss, logs = reg.compute_loss(hidden, lat, step=0)
    assert "crepa_alignment_score_ema" in logs
    if logs["crepa_alignment_score_ema"] >= 0.0:
        assert logs["crepa_cutoff"] and logs["crepa_weight"] == 0.0 and loss.item() == 0.0


def test_backbone_mode_needs_no_encoder_and_matches_formula():
    cfg = CrepaConfig(enabled=True, use_backbone_features=True, teacher_block_index=2)
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, device="cpu")
    assert reg.encoder_dim == D_DIT and reg.teacher is None
    _, hidden = _setup()
    teacher = torch.randn_like(hidden)
    loss, logs = reg.compute_loss(hidden, None, frame_features=teacher)
    proj = reg.projector(hidden.float().reshape(-1, D_DIT)).view(*hidden.shape[:3], -1)
    total, _ = st_scores(proj, teacher)
    torch.testing.assert_close(loss, st_loss(total, 0.5), rtol=1e-5, atol=1e-7)


def test_simpletuner_test_vector_through_the_regularizer():
    reg = CrepaRegularizer(CrepaConfig(use_backbone_features=True), hidden_size=4, device="cpu")
    with torch.no_grad():
        reg.projector[0].weight.fill_(1.0)
        reg.projector[0].bias.zero_()
        reg.projector[1].weight.copy_(torch.eye(4))
        reg.projector[1].bias.zero_()
    h = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 1, 4).repeat(1, 4, 1, 1)
    loss, logs = reg.compute_loss(h, None, frame_features=h)
    assert loss.item() == pytest.approx(-0.5 * (1 + 1.5 * math.exp(-1)), rel=1e-6)
    assert logs["crepa_alignment_score"] == pytest.approx(1 + 1.5 * math.exp(-1), rel=1e-6)


def test_lambda_zero_gives_no_loss():
    reg = CrepaRegularizer(CrepaConfig(use_backbone_features=True, lambda_=0.0), hidden_size=4, device="cpu")
    assert reg.compute_loss(torch.randn(1, 2, 1, 4), None, frame_features=torch.randn(1, 2, 1, 4)) == (None, None)


def test_nonfinite_teacher_features_skip_the_step_and_warn_once():
    reg = CrepaRegularizer(CrepaConfig(use_backbone_features=True), hidden_size=4, device="cpu")
    bad = torch.full((1, 2, 1, 4), float("nan"))
    with pytest.warns(RuntimeWarning, match="NaN"):
        loss, logs = reg.compute_loss(torch.randn(1, 2, 1, 4), None, frame_features=bad)
    assert loss is None and logs["crepa_skipped"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reg.compute_loss(torch.randn(1, 2, 1, 4), None, frame_features=bad)[0] is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_hidden_states_skip_the_step_and_keep_the_schedule_finite(value):
    """An fp16 overflow step: no loss (GradScaler skips the step anyway), the EMA and the persistent state
    stay finite, and the similarity cutoff still fires later."""
    cfg = CrepaConfig(use_backbone_features=True, similarity_threshold=0.9, similarity_ema_decay=0.5)
    reg = CrepaRegularizer(cfg, hidden_size=4, device="cpu")
    with torch.no_grad():  # projector = LayerNorm then identity: the score is the features' own alignment
        reg.projector[1].weight.copy_(torch.eye(4))
        reg.projector[1].bias.zero_()
    good = torch.tensor([1.0, -1.0, 2.0, -2.0]).expand(1, 2, 1, 4).clone()  # zero-mean tokens, equal frames
    loss, logs = reg.compute_loss(good, None, frame_features=-good, step=0)  # anti-aligned: low score
    assert logs["crepa_cutoff"] is False
    ema_before = reg.schedule.ema
    bad = good.clone()
    bad[0, 1, 0, 2] = value
    with pytest.warns(RuntimeWarning, match="hidden states contain NaN/Inf"):
        loss, logs = reg.compute_loss(bad, None, frame_features=good, step=1)
    assert loss is None and logs == {"crepa_skipped": True}
    assert reg.schedule.ema == ema_before and math.isfinite(reg.state_dict()["schedule"]["ema"])
    for step in range(2, 8):  # aligned now: the EMA climbs past the threshold and cuts CREPA off
        loss, logs = reg.compute_loss(good, None, frame_features=good, step=step)
    assert logs["crepa_cutoff"] is True and math.isfinite(logs["crepa_alignment_score_ema"])


def test_nonfinite_projector_output_skips_the_step():
    reg = CrepaRegularizer(CrepaConfig(use_backbone_features=True), hidden_size=4, device="cpu")
    with torch.no_grad():
        reg.projector[1].weight[0, 0] = float("inf")  # finite inputs, overflowing projection
    h = torch.ones(1, 2, 1, 4)
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        loss, logs = reg.compute_loss(h, None, frame_features=h)
    assert loss is None and logs["crepa_skipped"] is True and reg.schedule.ema is None


def test_a_nan_ema_in_a_checkpoint_is_not_loaded():
    reg = CrepaRegularizer(CrepaConfig(use_backbone_features=True, similarity_threshold=0.9), hidden_size=4,
                           device="cpu")
    state = reg.state_dict()
    state["schedule"] = {"ema": float("nan"), "latched": False}
    with pytest.warns(RuntimeWarning, match="EMA is nan"):
        reg.load_state_dict(state)
    assert reg.schedule.ema is None


@pytest.mark.parametrize("tier", ["gpu", "swap"])
def test_one_regularizer_called_from_four_threads_gives_the_serial_losses(tier):
    from concurrent.futures import ThreadPoolExecutor

    cfg = CrepaConfig(encoder_image_size=70, encoder_frames_batch_size=2, vae_tier=tier, encoder_tier=tier)
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=tiny_dinov2(), vae=tiny_vae("wan"), device="cpu")
    inputs = [_setup(seed=i, batch=1) for i in range(8)]
    serial = [reg.compute_loss(h, lat)[0].item() for lat, h in inputs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda x: reg.compute_loss(x[1], x[0])[0].item(), inputs))
    assert threaded == serial


def test_shape_mismatch_names_both_shapes():
    reg = CrepaRegularizer(CrepaConfig(encoder_image_size=70), hidden_size=D_DIT, encoder=tiny_dinov2(),
                           vae=tiny_vae("wan"), device="cpu")
    lat, hidden = _setup(batch=2)
    with pytest.raises(ShapeError, match=r"\(1, 16, 3, 4, 4\).*\(2, 3, 4, 24\)"):
        reg.compute_loss(hidden, lat[:1])


def test_hidden_size_must_be_known():
    with pytest.raises(CrepaConfigError, match="unable to infer transformer hidden size"):
        CrepaRegularizer(CrepaConfig(use_backbone_features=True), hidden_size=0, device="cpu")


def test_encoder_loads_from_a_local_directory(tmp_path):
    tiny_dinov2(registers=True).save_pretrained(tmp_path / "enc")
    cfg = CrepaConfig(encoder=str(tmp_path / "enc"), encoder_image_size=70, encoder_dtype="bf16")
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, vae=tiny_vae("wan"), device="cpu")
    assert reg.encoder_dim == 32
    assert next(reg.teacher.encoder.module.parameters()).dtype == torch.bfloat16
    lat, hidden = _setup(batch=1)
    loss, _ = reg.compute_loss(hidden, lat)
    assert torch.isfinite(loss)


def test_hub_style_encoder_with_forward_features_is_accepted():
    inner = tiny_dinov2()

    class HubStyle(nn.Module):  # torch.hub DINOv2's interface
        embed_dim = 32

        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward_features(self, x):
            return {"x_norm_patchtokens": self.inner(pixel_values=x).last_hidden_state[:, 1:]}

    vae = tiny_vae("wan")
    lat, hidden = _setup(batch=1)
    cfg = CrepaConfig(encoder_image_size=70)
    a = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=HubStyle(), vae=vae, device="cpu")
    b = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=inner, vae=vae, device="cpu")
    b.projector.load_state_dict(a.projector.state_dict())
    torch.testing.assert_close(a.compute_loss(hidden, lat)[0], b.compute_loss(hidden, lat)[0])


def test_projector_state_dict_is_simpletuners():
    reg = CrepaRegularizer(CrepaConfig(use_backbone_features=True), hidden_size=8, device="cpu")
    assert set(reg.projector.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert reg.projector[1].weight.dtype == torch.float32


def test_logs_carry_each_components_tier_facts():
    cfg = CrepaConfig(encoder_image_size=70, encoder_tier="swap", vae_tier="stream", encoder_frames_batch_size=2)
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=tiny_dinov2(), vae=tiny_vae("wan"), device="cpu")
    lat, hidden = _setup(batch=1)
    _, logs = reg.compute_loss(hidden, lat)
    assert logs["crepa_teacher_encoder_tier"] == "swap" and logs["crepa_teacher_encoder_host_pinned"] is False
    assert logs["crepa_teacher_vae_tier"] == "stream" and logs["crepa_teacher_vae_engine"] == "diffusers.group_offloading"
    assert logs["crepa_teacher_chunk_frames"] == 2 and logs["crepa_teacher_retries"] == 0


@pytest.mark.parametrize("chunk", [1, 2, -1])
@pytest.mark.parametrize("tier", ["gpu", "swap", "stream", "device"])
def test_teacher_runs_before_the_projection_with_the_same_loss_and_gradient(tier, chunk):
    """The projector's graph must not exist while the teacher holds the device; the math is unchanged."""
    from crepa_mem.loss import align_temporal, align_tokens, frame_similarity, per_video_objective, project

    cfg = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_encoder_image_size": 70,
                                 "crepa_encoder_frames_batch_size": chunk, "crepa_mem_encoder_tier": tier,
                                 "crepa_mem_vae_tier": tier, "crepa_mem_teacher_device": "cpu"})
    reg = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=tiny_dinov2(), vae=tiny_vae("wan"), device="cpu")
    events = []
    reg.teacher.path.on_chunk = lambda n: events.append("encode")
    hook = reg.projector.register_forward_pre_hook(lambda *_: events.append("project"))
    lat, hidden = _setup()
    loss, _ = reg.compute_loss(hidden, lat, step=0)
    hook.remove()
    assert events[-1] == "project" and events.count("project") == 1 and "encode" in events
    (grad,) = torch.autograd.grad(loss, hidden)
    # The order this replaced: project first, then the teacher, same functions.
    projected = project(reg.projector, hidden)
    features = reg.teacher.path.features(lat, hidden.shape[1]).features.float()
    projected, features = align_temporal(projected, features)
    projected, features = align_tokens(projected, features, spatial_align=True)
    total, _ = frame_similarity(nn.functional.normalize(projected, dim=-1), nn.functional.normalize(features, dim=-1),
                                distance=cfg.adjacent_distance, tau=cfg.adjacent_tau,
                                cumulative=cfg.cumulative_neighbors,
                                normalize_neighbour_sum=cfg.normalize_neighbour_sum)
    ref = -per_video_objective(total, cfg.normalize_by_frames).mean() * cfg.lambda_
    (ref_grad,) = torch.autograd.grad(ref, hidden)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


@pytest.mark.parametrize("loss_chunk", [1, 2, 5])
@pytest.mark.parametrize("options", [{}, {"crepa_encoder_image_size": 84}, {"crepa_spatial_align": False}])
def test_chunked_loss_phase_gives_the_same_loss_and_gradient(loss_chunk, options):
    results = []
    for chunk in (-1, loss_chunk):
        cfg = CrepaConfig.from_dict({"crepa_enabled": True, "crepa_encoder_image_size": 70,
                                     "crepa_mem_loss_chunk": chunk, **options})
        torch.manual_seed(0)
        reg = CrepaRegularizer(cfg, hidden_size=D_DIT, encoder=tiny_dinov2(), vae=tiny_vae("wan"), device="cpu")
        lat, hidden = _setup()
        loss, logs = reg.compute_loss(hidden, lat, step=0)
        grads = torch.autograd.grad(loss, [hidden, *reg.projector.parameters()])
        results.append((loss.detach(), grads, logs))
    (l0, g0, logs0), (l1, g1, logs1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for a, b in zip(g1, g0):  # relative to the gradient's norm: chunks sum the weight gradient in another order
        assert (a - b).norm() <= 1e-6 * b.norm()
    assert logs1["crepa_alignment_score"] == pytest.approx(logs0["crepa_alignment_score"], rel=1e-6)
