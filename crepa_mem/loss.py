"""CREPA math as pure tensor functions, plus the projector: the file to compare with SimpleTuner.

Legend: B batch, T frames (after temporal alignment), P DiT tokens per frame, N encoder tokens per
frame, D width. Every function here matches SimpleTuner 4.10.1's CrepaRegularizer (REFERENCE §1.2)
except `resample_grid`, the opt-in true-grid spatial alignment.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crepa_mem.errors import ShapeError


def build_projector(hidden_size: int, encoder_dim: int) -> nn.Sequential:
    """LayerNorm + Linear, fp32; state-dict keys 0.weight 0.bias 1.weight 1.bias like SimpleTuner's."""
    return nn.Sequential(nn.LayerNorm(hidden_size, eps=1e-5), nn.Linear(hidden_size, encoder_dim)).float()


def project(projector: nn.Module, hidden_BTPD: Tensor) -> Tensor:
    """Hidden states (B, T, P, D) or legacy (B, T, D) → fp32 projected tokens (B, T, P, D_enc)."""
    if hidden_BTPD.ndim == 3:
        hidden_BTPD = hidden_BTPD.unsqueeze(2)
    if hidden_BTPD.ndim != 4:
        raise ShapeError(f"CREPA expected hidden states with 3 or 4 dims (B, T, P, D), got {tuple(hidden_BTPD.shape)}")
    b, t, p, d = hidden_BTPD.shape
    out = projector(hidden_BTPD.float().reshape(b * t * p, d))
    return out.view(b, t, p, -1)


def temporal_indices(source_frames: int, target_frames: int, device=None) -> Tensor:
    """SimpleTuner's representative frames: linspace(0, F-1, T).long() (Wan 81 → 21: 0, 4, …, 80)."""
    return torch.linspace(0, source_frames - 1, target_frames, device=device).long()


def align_temporal(projected: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Subsample whichever side has more frames down to the other's count."""
    t_proj, t_feat = projected.shape[1], features.shape[1]
    if t_feat > t_proj:
        features = features.index_select(1, temporal_indices(t_feat, t_proj, features.device))
    elif t_proj > t_feat:
        projected = projected.index_select(1, temporal_indices(t_proj, t_feat, projected.device))
    return projected, features


def resample_tokens(tokens_BTND: Tensor, target: int) -> Tensor:
    """SimpleTuner's token resampling: 2-D bilinear when both counts are perfect squares, else 1-D linear
    over the flattened raster index (ignores the real h×w grid)."""
    b, t, n, d = tokens_BTND.shape
    if n == target:
        return tokens_BTND
    flat = tokens_BTND.reshape(b * t, n, d).permute(0, 2, 1)
    src, dst = math.isqrt(n), math.isqrt(target)
    if src * src == n and dst * dst == target:
        out = F.interpolate(flat.reshape(b * t, d, src, src), size=(dst, dst), mode="bilinear", align_corners=False)
        out = out.reshape(b * t, d, target)
    else:
        out = F.interpolate(flat, size=target, mode="linear", align_corners=False)
    return out.permute(0, 2, 1).reshape(b, t, target, d)


def resample_grid(tokens_BTND: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """True-grid resampling (opt-in): tokens on an h×w raster → 2-D bilinear onto target h×w."""
    b, t, n, d = tokens_BTND.shape
    h, w = grid
    if h * w != n:
        raise ShapeError(f"token grid {h}x{w} does not hold {n} tokens")
    if (h, w) == tuple(target):
        return tokens_BTND
    img = tokens_BTND.reshape(b * t, h, w, d).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=tuple(target), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(b, t, target[0] * target[1], d)


def align_tokens(projected: Tensor, features: Tensor, *, spatial_align: bool,
                 projected_grid: tuple[int, int] | None = None,
                 feature_grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Match token counts per frame. Without spatial_align both sides are mean-pooled to one token.
    With both grids given (true-grid mode) both sides go 2-D onto the smaller grid."""
    p, n = projected.shape[2], features.shape[2]
    if p == n and (projected_grid is None or feature_grid is None or tuple(projected_grid) == tuple(feature_grid)):
        return projected, features
    if not spatial_align:
        return projected.mean(dim=2, keepdim=True), features.mean(dim=2, keepdim=True)
    if projected_grid is not None and feature_grid is not None:
        target = projected_grid if p <= n else feature_grid
        return resample_grid(projected, projected_grid, target), resample_grid(features, feature_grid, target)
    target = min(p, n)
    return resample_tokens(projected, target), resample_tokens(features, target)


def neighbour_offsets(distance: int, frames: int, cumulative: bool) -> list[int]:
    """K: {d} (adjacent) or {1..d} (cumulative), with d = min(distance, T-1)."""
    d = min(distance, frames - 1)
    if d <= 0:
        return []
    return list(range(1, d + 1)) if cumulative else [d]


def frame_similarity(p: Tensor, y: Tensor, *, distance: int, tau: float, cumulative: bool,
                     normalize_neighbour_sum: bool) -> tuple[Tensor, Tensor]:
    """S(f) = s(f,f) + Σ_k w_k ([f+k<T] s(f,f+k) + [f-k≥0] s(f,f-k)), s = mean over tokens of cosine.

    p, y: L2-normalised (B, T, N, D). Returns (total (B, T), self (B, T)).
    """
    self_sim = (p * y).sum(dim=-1).mean(dim=-1)
    total = self_sim.clone()
    weight_sum = torch.zeros_like(total[0]) if normalize_neighbour_sum else None
    tau = max(tau, 1e-8)
    for k in neighbour_offsets(distance, total.shape[1], cumulative):
        w = math.exp(-float(k) / tau)
        total[:, :-k] += w * (p[:, :-k] * y[:, k:]).sum(dim=-1).mean(dim=-1)
        total[:, k:] += w * (p[:, k:] * y[:, :-k]).sum(dim=-1).mean(dim=-1)
        if weight_sum is not None:
            weight_sum[:-k] += w
            weight_sum[k:] += w
    if weight_sum is not None:
        total = total / (1.0 + weight_sum)
    return total, self_sim


def frame_similarity_rows(p: Tensor, y: Tensor, start: int, *, distance: int, tau: float, cumulative: bool,
                          normalize_neighbour_sum: bool, y_start: int = 0,
                          frames: int | None = None) -> tuple[Tensor, Tensor]:
    """`frame_similarity` for the frames start … start+c−1 only (p: those c frames; y: the frames
    y_start … of all `frames` (default: y holds all T), covering start − d … start+c−1+d).

    S(f) involves p at frame f alone (against y at f and f±k), so the rows of a chunk are the rows of
    the whole computation, term by term in the same order."""
    frames, c = frames or y.shape[1], p.shape[1]
    at = start - y_start  # frame f of the clip is row f − y_start of y
    self_sim = (p * y[:, at:at + c]).sum(dim=-1).mean(dim=-1)
    total = self_sim.clone()
    weight_sum = torch.zeros_like(total[0]) if normalize_neighbour_sum else None
    tau = max(tau, 1e-8)
    for k in neighbour_offsets(distance, frames, cumulative):
        w = math.exp(-float(k) / tau)
        ahead = max(0, min(c, frames - k - start))  # rows with a frame f+k < T
        if ahead:
            total[:, :ahead] += w * (p[:, :ahead] * y[:, at + k:at + k + ahead]).sum(dim=-1).mean(dim=-1)
        behind = max(0, k - start)  # first row with a frame f−k ≥ 0
        if behind < c:
            total[:, behind:] += w * (p[:, behind:] * y[:, at + behind - k:at + c - k]).sum(dim=-1).mean(dim=-1)
        if weight_sum is not None:
            weight_sum[:ahead] += w
            weight_sum[behind:] += w
    if weight_sum is not None:
        total = total / (1.0 + weight_sum)
    return total, self_sim


class FeatureSide:
    """The features' half of the alignment (it has no gradient), made frame window by frame window where
    the chunks need it: temporal subsampling, the copy to the compute device (`staged`: the features
    wait on the host, e.g. read from the feature cache), the cast to fp32, token alignment, L2
    normalisation. Every step is per frame, so a window's rows are the whole computation's rows, bit for
    bit; the clip is never held in fp32 at once, only the features in their own dtype where they are.
    `rows`: the DiT frames temporal alignment keeps (None for all); `tokens`: the features' own token
    count, which decides the projected side's token alignment."""

    def __init__(self, features_BTND: Tensor, hidden_shape: tuple[int, ...], *, spatial_align: bool,
                 projected_grid=None, feature_grid=None, device=None, staged: bool = False):
        t_proj = hidden_shape[1]
        self.features, self.p_tok = features_BTND, (hidden_shape[2] if len(hidden_shape) == 4 else 1)
        t_feat, self.tokens = features_BTND.shape[1], features_BTND.shape[2]
        self.keep = temporal_indices(t_feat, t_proj) if t_feat > t_proj else None  # host indices
        self.rows = temporal_indices(t_proj, t_feat, device) if t_proj > t_feat else None
        self.frames = t_proj if self.keep is not None else t_feat
        self.device, self.staged = device or features_BTND.device, staged
        self.grids = dict(spatial_align=spatial_align, projected_grid=projected_grid, feature_grid=feature_grid)

    def window(self, lo: int, hi: int) -> Tensor:
        """y (B, hi−lo, t, D_enc) fp32 on the compute device: aligned, normalised frames lo … hi−1."""
        f = self.features
        if self.keep is None:
            f = f[:, lo:hi]
        else:
            f = f.index_select(1, self.keep[lo:hi].to(f.device))
        f = f.to(self.device, non_blocking=self.staged, copy=self.staged).float()
        # Token alignment is per frame: a one-frame, width-1 stand-in takes the projected side's place.
        _, y = align_tokens(f.new_empty(f.shape[0], 1, self.p_tok, 1), f, **self.grids)
        return F.normalize(y, dim=-1)


def feature_side(features_BTND: Tensor, hidden_shape: tuple[int, ...], *, spatial_align: bool, projected_grid=None,
                 feature_grid=None, device=None, staged: bool = False) -> FeatureSide:
    """`FeatureSide` of the features for hidden states of `hidden_shape` (see there)."""
    return FeatureSide(features_BTND, hidden_shape, spatial_align=spatial_align, projected_grid=projected_grid,
                       feature_grid=feature_grid, device=device, staged=staged)


class _Recomputed(torch.autograd.Function):
    """(total, self) (B, T) of all chunks. Forward runs each chunk without a graph and keeps only its inputs;
    backward recomputes one chunk at a time and writes its slice of the hidden states' gradient."""

    @staticmethod
    def forward(ctx, run, pieces, hidden, *params):
        ctx.run, ctx.pieces, ctx.params = run, pieces, params
        ctx.save_for_backward(hidden)
        outs = [run(piece, start) for start, piece in ((a, take(hidden)) for a, _, take, _ in pieces)]
        return torch.cat([t for t, _ in outs], dim=1), torch.cat([s for _, s in outs], dim=1)

    @staticmethod
    def backward(ctx, grad_total, grad_self):
        (hidden,) = ctx.saved_tensors
        grad_hidden, grad_params = torch.zeros_like(hidden), [None] * len(ctx.params)
        for start, stop, take, put in ctx.pieces:
            with torch.enable_grad():
                piece = take(hidden).detach().requires_grad_()
                total, self_sim = ctx.run(piece, start)
                grads = torch.autograd.grad((total, self_sim), [piece, *ctx.params],
                                            (grad_total[:, start:stop], grad_self[:, start:stop]))
            put(grad_hidden, grads[0])
            del total, self_sim, piece
            for i, g in enumerate(grads[1:]):
                grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        return (None, None, grad_hidden, *grad_params)


def chunked_frame_scores(projector: nn.Module, hidden_BTPD: Tensor, side: FeatureSide,
                         chunk: int, *, spatial_align: bool, projected_grid=None, feature_grid=None, distance: int,
                         tau: float, cumulative: bool, normalize_neighbour_sum: bool) -> tuple[Tensor, Tensor]:
    """project → align → normalise → frame_similarity, `chunk` DiT frames at a time, recomputed in backward:
    the same (total, self) (B, T) as the whole computation, while one chunk's fp32 copy, projector
    activations, alignment tensors and gradients are alive at a time (plus the hidden states' gradient),
    with the features' window of that chunk and its neighbours (`side`, a `feature_side(...)`)."""
    rows, frames = side.rows, side.frames
    if hidden_BTPD.ndim == 3:
        hidden_BTPD = hidden_BTPD.unsqueeze(2)
    reach = max(neighbour_offsets(distance, frames, cumulative), default=0)
    stand_in = hidden_BTPD.new_empty((hidden_BTPD.shape[0], 1, side.tokens, 1), dtype=torch.float32)
    grids = dict(spatial_align=spatial_align, projected_grid=projected_grid, feature_grid=feature_grid)

    def run(hidden_chunk: Tensor, start: int) -> tuple[Tensor, Tensor]:
        projected, _ = align_tokens(project(projector, hidden_chunk), stand_in, **grids)
        lo, hi = max(0, start - reach), min(frames, start + hidden_chunk.shape[1] + reach)
        return frame_similarity_rows(F.normalize(projected, dim=-1), side.window(lo, hi), start, distance=distance,
                                     tau=tau, cumulative=cumulative, normalize_neighbour_sum=normalize_neighbour_sum,
                                     y_start=lo, frames=frames)

    pieces = []
    for start in range(0, frames, chunk):
        stop = min(start + chunk, frames)
        if rows is None:
            take = lambda h, a=start, b=stop: h[:, a:b]  # noqa: E731
            put = lambda g, v, a=start, b=stop: g[:, a:b].copy_(v)  # noqa: E731
        else:
            idx = rows[start:stop]
            take = lambda h, i=idx: h.index_select(1, i)  # noqa: E731
            put = lambda g, v, i=idx: g.index_copy_(1, i, v)  # noqa: E731
        pieces.append((start, stop, take, put))
    return _Recomputed.apply(run, pieces, hidden_BTPD, *[p for p in projector.parameters() if p.requires_grad])


def per_video_objective(total_BT: Tensor, normalize_by_frames: bool) -> Tensor:
    """V_b = Σ_f S(f), divided by T when normalize_by_frames."""
    v = total_BT.sum(dim=1)
    return v / float(total_BT.shape[1]) if normalize_by_frames else v


class LambdaSchedule:
    """λ_t of REFERENCE §1.2 step 10: EMA of the alignment score, cutoffs, warm-up and decay."""

    def __init__(self, *, lambda_: float, scheduler: str = "constant", warmup_steps: int = 0,
                 decay_steps: int = 0, cutoff_step: int = 0, lambda_end: float = 0.0, power: float = 1.0,
                 similarity_threshold: float | None = None, similarity_ema_decay: float = 0.99,
                 threshold_mode: str = "permanent", max_train_steps: int | None = None):
        self.lambda_, self.scheduler = lambda_, scheduler
        self.warmup_steps, self.cutoff_step = warmup_steps, cutoff_step
        self.decay_steps = decay_steps if decay_steps > 0 else (max_train_steps or 0)
        self.lambda_end, self.power = lambda_end, power
        self.threshold, self.ema_decay, self.threshold_mode = similarity_threshold, similarity_ema_decay, threshold_mode
        self.ema: float | None = None
        self.latched = False

    def state_dict(self) -> dict:
        return {"ema": self.ema, "latched": self.latched}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.latched = state.get("ema"), bool(state.get("latched", False))

    def __call__(self, step: int, score: float) -> tuple[float, bool]:
        """Returns (λ_t, cut off?) after folding this step's alignment score into the EMA."""
        self.ema = score if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * score
        if self.latched:
            return 0.0, True
        cut = (self.cutoff_step > 0 and step >= self.cutoff_step) or (
            self.threshold is not None and self.ema >= self.threshold)
        if cut:
            if self.threshold_mode == "permanent":
                self.latched = True
            return 0.0, True
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lambda_ * step / self.warmup_steps, False
        if self.scheduler == "constant" or self.decay_steps <= 0:
            return self.lambda_, False
        prog = min((step - self.warmup_steps) / max(self.decay_steps - self.warmup_steps, 1), 1.0)
        prog = max(prog, 0.0)
        lam, end = self.lambda_, self.lambda_end
        if self.scheduler == "linear":
            return lam + (end - lam) * prog, False
        if self.scheduler == "cosine":
            return end + (lam - end) * (1 + math.cos(math.pi * prog)) / 2, False
        return (lam - end) * (1 - prog) ** self.power + end, False  # polynomial
