import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from crepa_mem.loss import (LambdaSchedule, align_temporal, align_tokens, build_projector, frame_similarity,
                            neighbour_offsets, per_video_objective, project, resample_grid, resample_tokens,
                            temporal_indices)
from simpletuner_reference import st_interp, st_lambda, st_loss, st_scores


def _normed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_simpletuner_test_vector():
    # 4 identical unit frames, 1 token, d=1, tau=1: score 1 + 1.5/e, loss -0.5 (1 + 1.5/e)
    x = torch.ones(1, 4, 1, 3) / math.sqrt(3)
    total, selfs = frame_similarity(x, x, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False)
    assert total.mean().item() == pytest.approx(1 + 1.5 * math.exp(-1), rel=1e-6)
    loss = -0.5 * per_video_objective(total, True).mean()
    assert loss.item() == pytest.approx(-0.5 * (1 + 1.5 * math.exp(-1)), rel=1e-6)
    total, _ = frame_similarity(x, x, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=True)
    assert total.mean().item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("distance", [0, 1, 2, 5, 10])
@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("normalize_neighbour_sum", [False, True])
@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_frame_similarity_matches_the_loop_formula(distance, cumulative, normalize_neighbour_sum, tau):
    p, y = _normed(2, 6, 5, 8, seed=1), _normed(2, 6, 5, 8, seed=2)
    total, selfs = frame_similarity(p, y, distance=distance, tau=tau, cumulative=cumulative,
                                    normalize_neighbour_sum=normalize_neighbour_sum)
    ref_total, ref_self = st_scores(p, y, distance=distance, tau=tau, cumulative=cumulative,
                                    normalize_neighbour_sum=normalize_neighbour_sum)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(selfs, ref_self, rtol=1e-5, atol=1e-6)


def test_neighbour_offsets():
    assert neighbour_offsets(1, 4, False) == [1]
    assert neighbour_offsets(3, 4, True) == [1, 2, 3]
    assert neighbour_offsets(9, 4, False) == [3]  # d = min(distance, T-1)
    assert neighbour_offsets(0, 4, True) == []
    assert neighbour_offsets(2, 1, False) == []


def test_temporal_indices_wan():
    idx = temporal_indices(81, 21)
    assert idx.tolist() == list(range(0, 81, 4))


@pytest.mark.parametrize("tp,tf", [(21, 81), (5, 3), (4, 4)])
def test_align_temporal_subsamples_the_longer_side(tp, tf):
    p, y = torch.randn(1, tp, 2, 3), torch.randn(1, tf, 2, 3)
    ap, ay = align_temporal(p, y)
    assert ap.shape[1] == ay.shape[1] == min(tp, tf)


@pytest.mark.parametrize("n,target", [(16, 9), (1369, 1560), (1560, 1369), (24, 16), (12, 7)])
def test_resample_tokens_matches_simpletuner(n, target):
    x = torch.randn(2, 3, n, 4)
    t = min(n, target)
    torch.testing.assert_close(resample_tokens(x, t), st_interp(x, t))


def test_align_tokens_pools_without_spatial_align():
    p, y = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
    ap, ay = align_tokens(p, y, spatial_align=False)
    assert ap.shape == ay.shape == (1, 2, 1, 4)
    torch.testing.assert_close(ap, p.mean(2, keepdim=True))


def test_true_grid_resampling_uses_the_real_grid():
    # a 2×4 grid whose value is its column index: resampled to 2×2 keeps the left-to-right ramp
    grid = torch.arange(4.0).repeat(2).view(1, 1, 8, 1)
    out = resample_grid(grid, (2, 4), (2, 2)).view(2, 2)
    assert (out[:, 1] > out[:, 0]).all() and torch.allclose(out[0], out[1])
    p, y = torch.randn(1, 2, 8, 3), torch.randn(1, 2, 4, 3)
    ap, ay = align_tokens(p, y, spatial_align=True, projected_grid=(2, 4), feature_grid=(2, 2))
    assert ap.shape == ay.shape == (1, 2, 4, 3)


def test_projector_layout_and_dtype():
    proj = build_projector(16, 8)
    assert list(proj.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    out = project(proj, torch.randn(2, 3, 4, 16, dtype=torch.bfloat16))
    assert out.shape == (2, 3, 4, 8) and out.dtype == torch.float32


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "polynomial"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_matches_formula(scheduler, warmup):
    sched = LambdaSchedule(lambda_=0.5, scheduler=scheduler, warmup_steps=warmup, decay_steps=100,
                           lambda_end=0.1, power=2.0)
    for step in [0, 5, 10, 50, 99, 100, 150]:
        lam, cut = sched(step, 0.3)
        assert not cut
        assert lam == pytest.approx(st_lambda(step, lam=0.5, scheduler=scheduler, warmup=warmup, decay=100,
                                              end=0.1, power=2.0))


def test_schedule_decay_zero_uses_max_train_steps():
    sched = LambdaSchedule(lambda_=1.0, scheduler="linear", decay_steps=0, max_train_steps=10)
    assert sched(5, 0.0)[0] == pytest.approx(0.5)


def test_cutoff_step_and_thresholds():
    sched = LambdaSchedule(lambda_=0.5, cutoff_step=3)
    assert [sched(s, 0.1) for s in range(5)] == [(0.5, False)] * 3 + [(0.0, True)] * 2
    perm = LambdaSchedule(lambda_=0.5, similarity_threshold=0.8, similarity_ema_decay=0.0)
    assert perm(0, 0.9) == (0.0, True)
    assert perm(1, 0.1) == (0.0, True)  # latched
    rec = LambdaSchedule(lambda_=0.5, similarity_threshold=0.8, similarity_ema_decay=0.0,
                         threshold_mode="recoverable")
    assert rec(0, 0.9) == (0.0, True)
    assert rec(1, 0.1) == (0.5, False)  # recovered


def test_ema_first_call_sets_it_then_decays():
    sched = LambdaSchedule(lambda_=0.5, similarity_threshold=0.99, similarity_ema_decay=0.9)
    sched(0, 0.5)
    assert sched.ema == 0.5
    sched(1, 1.0)
    assert sched.ema == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)


@settings(max_examples=40, deadline=None)
@given(frames=st.integers(1, 7), tokens=st.integers(1, 5), distance=st.integers(0, 4),
       tau=st.floats(0.1, 5.0), cumulative=st.booleans(), seed=st.integers(0, 10_000))
def test_invariants(frames, tokens, distance, tau, cumulative, seed):
    p, y = _normed(1, frames, tokens, 4, seed=seed), _normed(1, frames, tokens, 4, seed=seed + 1)
    total, selfs = frame_similarity(p, y, distance=distance, tau=tau, cumulative=cumulative,
                                    normalize_neighbour_sum=True)
    # with normalised neighbour sums each S(f) is a weighted mean of cosines: within [-1, 1]
    assert (total.abs() <= 1 + 1e-5).all()
    # identical inputs align perfectly with the normalised sum
    same, _ = frame_similarity(p, p, distance=distance, tau=tau, cumulative=cumulative,
                               normalize_neighbour_sum=False)
    assert (selfs.abs() <= 1 + 1e-5).all()
    if distance == 0 or frames == 1:
        torch.testing.assert_close(same, torch.ones_like(same))


# ---------------------------------------------------------------------------- the chunked loss phase
from crepa_mem.loss import build_projector, chunked_frame_scores, feature_side, frame_similarity_rows  # noqa: E402


@pytest.mark.parametrize("distance,cumulative,normalize", [(1, False, False), (2, True, True), (3, False, True),
                                                           (0, False, False)])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_rows_of_a_chunk_are_the_rows_of_the_whole_similarity(distance, cumulative, normalize, chunk):
    g = torch.Generator().manual_seed(1)
    p, y = torch.randn(2, 7, 5, 8, generator=g), torch.randn(2, 7, 5, 8, generator=g)
    opts = dict(distance=distance, tau=0.7, cumulative=cumulative, normalize_neighbour_sum=normalize)
    total, selfs = frame_similarity(p, y, **opts)
    parts = [frame_similarity_rows(p[:, a:a + chunk], y, a, **opts) for a in range(0, 7, chunk)]
    torch.testing.assert_close(torch.cat([t for t, _ in parts], 1), total, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([s for _, s in parts], 1), selfs, rtol=0, atol=0)


def _whole(projector, hidden, features, **kw):
    from crepa_mem.loss import align_temporal, align_tokens, project

    projected, feats = align_temporal(project(projector, hidden), features)
    projected, feats = align_tokens(projected, feats, spatial_align=kw.pop("spatial_align"),
                                    projected_grid=kw.pop("projected_grid", None),
                                    feature_grid=kw.pop("feature_grid", None))
    return frame_similarity(F.normalize(projected, dim=-1), F.normalize(feats, dim=-1), **kw)


@pytest.mark.parametrize("case", [
    dict(frames=(6, 6), tokens=(4, 4)),                        # nothing to align
    dict(frames=(6, 21), tokens=(6, 16)),                      # features subsampled, 1-D token resampling
    dict(frames=(9, 4), tokens=(16, 9)),                       # hidden frames subsampled, 2-D bilinear
    dict(frames=(5, 5), tokens=(4, 9), spatial_align=False),   # mean-pooled to one token
    dict(frames=(5, 5), tokens=(6, 12), grids=((2, 3), (3, 4))),  # true grid
])
@pytest.mark.parametrize("chunk", [1, 2, 4, 100])
def test_chunked_loss_and_gradient_equal_the_whole_computation(case, chunk):
    g = torch.Generator().manual_seed(2)
    (tp, tf), (p, n) = case["frames"], case["tokens"]
    torch.manual_seed(0)
    projector = build_projector(12, 8)
    hidden = torch.randn(2, tp, p, 12, generator=g, requires_grad=True)
    features = torch.randn(2, tf, n, 8, generator=g)
    grids = case.get("grids", (None, None))
    kw = dict(spatial_align=case.get("spatial_align", True), projected_grid=grids[0], feature_grid=grids[1],
              distance=2, tau=1.0, cumulative=True, normalize_neighbour_sum=True)
    total, selfs = _whole(projector, hidden, features, **dict(kw))
    loss = -total.sum(1).mean()
    grads = torch.autograd.grad(loss, [hidden, *projector.parameters()])
    side = feature_side(features, tuple(hidden.shape), spatial_align=kw["spatial_align"],
                        projected_grid=grids[0], feature_grid=grids[1])
    c_total, c_selfs = chunked_frame_scores(projector, hidden, side, chunk, **kw)
    c_loss = -c_total.sum(1).mean()
    c_grads = torch.autograd.grad(c_loss, [hidden, *projector.parameters()])
    torch.testing.assert_close(c_total, total, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_selfs, selfs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=0)
    for a, b in zip(c_grads, grads):  # relative to the norm: chunks sum the weight gradient in another order
        assert (a - b).norm() <= 1e-6 * b.norm()


def _eager_rows(projector, hidden, features, chunk, **kw):
    """The chunked scores as they were made before the features' side went window by window: the whole
    clip's y (aligned, normalised, fp32) first, then each chunk's rows against it (no recomputation)."""
    from crepa_mem.loss import align_tokens, project, temporal_indices

    grids = dict(spatial_align=kw.pop("spatial_align"), projected_grid=kw.pop("projected_grid", None),
                 feature_grid=kw.pop("feature_grid", None))
    feats = features.float()
    if feats.shape[1] > hidden.shape[1]:
        feats = feats.index_select(1, temporal_indices(feats.shape[1], hidden.shape[1]))
    _, y = align_tokens(feats.new_empty(feats.shape[0], 1, hidden.shape[2], 1), feats, **grids)
    y = F.normalize(y, dim=-1)
    rows = temporal_indices(hidden.shape[1], y.shape[1]) if hidden.shape[1] > y.shape[1] else None
    stand_in = y.new_empty(y.shape[0], 1, features.shape[2], 1)
    parts = []
    for a in range(0, y.shape[1], chunk):
        h = hidden[:, a:a + chunk] if rows is None else hidden.index_select(1, rows[a:a + chunk])
        projected, _ = align_tokens(project(projector, h), stand_in, **grids)
        parts.append(frame_similarity_rows(F.normalize(projected, dim=-1), y, a, **kw))
    return torch.cat([t for t, _ in parts], 1), torch.cat([s for _, s in parts], 1)


@pytest.mark.parametrize("case", [dict(frames=(6, 21), tokens=(6, 16)), dict(frames=(9, 4), tokens=(16, 9)),
                                  dict(frames=(5, 5), tokens=(4, 9), spatial_align=False),
                                  dict(frames=(5, 5), tokens=(6, 12), grids=((2, 3), (3, 4)))])
@pytest.mark.parametrize("dtype,staged", [(torch.float32, False), (torch.bfloat16, True)])
def test_features_window_by_window_give_the_scores_of_the_whole_y_bit_for_bit(case, dtype, staged):
    """Features kept in their own dtype (a bf16 cache, staged from the host) and cast per window of a chunk
    and its neighbours: the same bits as casting, aligning and normalising the whole clip at once."""
    g = torch.Generator().manual_seed(3)
    (tp, tf), (p, n) = case["frames"], case["tokens"]
    torch.manual_seed(0)
    projector = build_projector(12, 8)
    hidden = torch.randn(2, tp, p, 12, generator=g)
    features = torch.randn(2, tf, n, 8, generator=g).to(dtype)
    grids = case.get("grids", (None, None))
    kw = dict(spatial_align=case.get("spatial_align", True), projected_grid=grids[0], feature_grid=grids[1],
              distance=2, tau=1.0, cumulative=True, normalize_neighbour_sum=True)
    side = feature_side(features, tuple(hidden.shape), spatial_align=kw["spatial_align"], projected_grid=grids[0],
                        feature_grid=grids[1], staged=staged)
    for chunk in (1, 3):
        total, selfs = chunked_frame_scores(projector, hidden, side, chunk, **kw)
        ref_total, ref_selfs = _eager_rows(projector, hidden, features, chunk, **dict(kw))
        torch.testing.assert_close(total, ref_total, rtol=0, atol=0)
        torch.testing.assert_close(selfs, ref_selfs, rtol=0, atol=0)
