"""An independent, loop-by-loop transcription of REFERENCE §1.2 (SimpleTuner 4.10.1's CREPA), used only
as the oracle in tests. It is deliberately naive: all F frames are encoded, then subsampled, exactly
as SimpleTuner does; sums are explicit Python loops over frames and offsets."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def st_decode(vae, latents):
    """Denormalise (Wan-style config lists / LTX buffers / Hunyuan scaling factor), decode all frames."""
    z = latents.float()
    cfg = vae.config
    view = [1, z.shape[1], 1, 1, 1]
    name = type(vae).__name__
    if name == "AutoencoderKLLTXVideo":
        z = z * vae.latents_std.view(view) / cfg.scaling_factor + vae.latents_mean.view(view)
    elif getattr(cfg, "latents_mean", None) is not None:
        z = z * torch.tensor(cfg.latents_std).view(view) + torch.tensor(cfg.latents_mean).view(view)
    else:
        z = z / cfg.scaling_factor
    with torch.no_grad():
        x = vae.decode(z).sample.clamp(-1, 1)
    return ((x + 1.0) * 0.5).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W)


def st_encode(encoder, video, size):
    b, t, c, h, w = video.shape
    x = F.interpolate(video.reshape(b * t, c, h, w), size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.no_grad():
        out = encoder(pixel_values=x).last_hidden_state
    skip = 1 + int(getattr(encoder.config, "num_register_tokens", 0) or 0)
    tok = out[:, skip:]
    return tok.reshape(b, t, tok.shape[1], tok.shape[2])


def st_interp(tokens, target):
    b, t, n, d = tokens.shape
    if n == target:
        return tokens
    flat = tokens.reshape(b * t, n, d).permute(0, 2, 1)
    s, g = int(math.sqrt(n)), int(math.sqrt(target))
    if s * s == n and g * g == target:
        out = F.interpolate(flat.reshape(b * t, d, s, s), size=(g, g), mode="bilinear", align_corners=False)
        out = out.reshape(b * t, d, target)
    else:
        out = F.interpolate(flat, size=target, mode="linear", align_corners=False)
    return out.permute(0, 2, 1).reshape(b, t, target, d)


def st_scores(projected, feats, *, distance=1, tau=1.0, cumulative=False, normalize_neighbour_sum=False,
              spatial_align=True):
    """Returns (total (B, T), self (B, T)) after temporal and spatial alignment."""
    tp, tf = projected.shape[1], feats.shape[1]
    if tf > tp:
        feats = feats[:, torch.linspace(0, tf - 1, tp).long()]
    elif tp > tf:
        projected = projected[:, torch.linspace(0, tp - 1, tf).long()]
    p_tok, n_tok = projected.shape[2], feats.shape[2]
    if p_tok != n_tok:
        if not spatial_align:
            projected, feats = projected.mean(2, keepdim=True), feats.mean(2, keepdim=True)
        else:
            target = min(p_tok, n_tok)
            projected, feats = st_interp(projected, target), st_interp(feats, target)
    p = F.normalize(projected, dim=-1)
    y = F.normalize(feats, dim=-1)
    B, T = p.shape[:2]

    def s(b, f, g):
        return (p[b, f] * y[b, g]).sum(-1).mean()

    d = min(distance, T - 1)
    ks = (list(range(1, d + 1)) if cumulative else [d]) if d > 0 else []
    total = torch.zeros(B, T)
    selfs = torch.zeros(B, T)
    for b in range(B):
        for f in range(T):
            selfs[b, f] = s(b, f, f)
            acc, wsum = s(b, f, f), 0.0
            for k in ks:
                w = math.exp(-k / max(tau, 1e-8))
                if f + k < T:
                    acc = acc + w * s(b, f, f + k)
                    wsum += w
                if f - k >= 0:
                    acc = acc + w * s(b, f, f - k)
                    wsum += w
            total[b, f] = acc / (1 + wsum) if normalize_neighbour_sum else acc
    return total, selfs


def st_loss(total, lam, normalize_by_frames=True):
    v = total.sum(1)
    if normalize_by_frames:
        v = v / total.shape[1]
    return -lam * v.mean()


def st_lambda(step, *, lam, scheduler="constant", warmup=0, decay=0, end=0.0, power=1.0):
    """λ_t without cutoffs (REFERENCE §1.2 step 10)."""
    if warmup > 0 and step < warmup:
        return lam * step / warmup
    if scheduler == "constant" or decay <= 0:
        return lam
    p = min(max((step - warmup) / max(decay - warmup, 1), 0.0), 1.0)
    if scheduler == "linear":
        return lam + (end - lam) * p
    if scheduler == "cosine":
        return end + (lam - end) * (1 + math.cos(math.pi * p)) / 2
    return (lam - end) * (1 - p) ** power + end
