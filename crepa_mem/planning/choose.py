"""The planner's choices beside the tiers: the encoder's stream engine, RamTorch's resident chunks, the host copy.

No torch. For every candidate whose encoder is on `stream`, the planner also weighs RamTorch with the
fewest resident chunks that reach its lowest transfer cost within the budget (more resident chunks move
fewer bytes over PCIe each step, but stay on the GPU through the whole training step). Where a
candidate's host bytes do not fit the node (planning/host.py), the ways out are offered as candidates of
their own: one copy of the encoder shared by the local ranks (`swap`: a read-only mapped safetensors file)
and RamTorch's NVMe tier (`stream` on ramtorch: masters on disk).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

from crepa_mem.planning import engines
from crepa_mem.planning import estimate as est
from crepa_mem.planning import host as hosts
from crepa_mem.profiles import EncoderProfile, ModelProfile
from crepa_mem.units import dtype_bytes, format_bytes

NVME_FILE = "crepa_encoder_masters.bin"   # put it on a real drive (not tmpfs): RamTorch's NVMe tier
SHARE_FILE = "crepa_encoder_host.safetensors"  # on local disk; every local rank maps the same file


def weights(model: ModelProfile, enc: EncoderProfile, c: Any) -> dict[str, int]:
    return {"encoder": enc.params * dtype_bytes(c.level.encoder_dtype),
            "vae": est.vae_weight_bytes(model.vae, "bf16", c.drop_vae_encoder)}


def _teacher_frames(ctx: Any) -> int:
    return ctx.batch * min(ctx.frames, ctx.model.latent_frames(ctx.frames))


def with_engine(ctx: Any, e: est.Estimate, enc: EncoderProfile, c: Any) -> est.Estimate:
    """`e` with RamTorch's device bytes and its weight traffic (once per encoder call, less the resident chunks)
    in place of the default engine's, when the encoder streams through RamTorch."""
    if c.encoder_tier == "stream" and c.stream_engine == "ramtorch":
        r = engines.with_ramtorch(e, enc, c.level.encoder_dtype, c.resident_chunks)
        r.h2d = {**e.h2d, "encoder": engines.moved_bytes(enc, c.level.encoder_dtype, "ramtorch", c.resident_chunks,
                                                         engines.encoder_calls(_teacher_frames(ctx), c.chunk))}
        return r
    return e


def host_plan(ctx: Any, c: Any, enc: EncoderProfile) -> hosts.HostPlan:
    """Host bytes of `c` on this node (every local rank holds its own copy unless it is shared)."""
    w = weights(ctx.model, enc, c)
    enc_host = w["encoder"]
    if c.encoder_tier == "stream":
        enc_host = engines.host_bytes(enc, c.level.encoder_dtype, c.stream_engine, c.resident_chunks,
                                      c.encoder_host == "nvme")
    return hosts.plan_host(ctx.host, hosts.host_parts(encoder_tier=c.encoder_tier, vae_tier=c.vae_tier,
                                                       encoder_host_bytes=enc_host, vae_bytes=w["vae"],
                                                       encoder_way=c.encoder_host))


Evaluate = Callable[[Any], tuple[est.Estimate, bool, dict[str, float]]]


def _fewest_resident(ctx: Any, c: Any, evaluate: Evaluate) -> Any:
    """RamTorch with the fewest resident chunks that reach the lowest overhead among those that fit the
    device (overhead falls and bytes rise with each chunk kept, so both searches are bisections)."""
    n = ctx.encoder(c.level.encoder).num_layers + 2
    device_fits = lambda k: evaluate(replace(c, resident_chunks=k))[0].peak_bytes <= ctx.budget  # noqa: E731
    overhead = lambda k: sum(evaluate(replace(c, resident_chunks=k))[2].values())  # noqa: E731
    if not device_fits(0):
        return c
    lo, hi = 0, n  # largest k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if device_fits(mid) else (lo, mid - 1)
    best, lo, hi = overhead(lo), 0, lo
    while lo < hi:  # smallest k with the best overhead
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if overhead(mid) <= best + 1e-9 else (mid + 1, hi)
    return replace(c, resident_chunks=lo)


LOSS_CHUNKS = (8, 4, 2, 1)  # DiT frames per loss chunk, largest (fewest recomputed chunks) first


def loss_twins(ctx: Any, c: Any, evaluate: Evaluate) -> list[Any]:
    """`c` with its loss phase in each chunk size of LOSS_CHUNKS (crepa_mem_loss_chunk: lossless, loss and
    gradient within 1e-6, at the cost of a recomputed forward), largest first, when the whole loss phase
    sets the candidate's peak; [] where chunking cannot help."""
    frames = ctx.model.latent_frames(ctx.frames)
    if c.loss_chunk > 0 or frames < 2 or evaluate(c)[0].peak_phase != "loss":
        return []
    return [replace(c, loss_chunk=k) for k in LOSS_CHUNKS if k < frames]


def loss_twin(ctx: Any, c: Any, evaluate: Evaluate) -> Any | None:
    """The twin plan() weighs: the largest loss chunk that fits, else the smallest; None where chunking
    cannot help."""
    twins = loss_twins(ctx, c, evaluate)
    return next((t for t in twins if evaluate(t)[1]), twins[-1] if twins else None)


def variants(ctx: Any, step: Iterable[Any], evaluate: Evaluate) -> Iterator[Any]:
    """Each candidate, its RamTorch twin (encoder on stream), the host ways out where the node is short, and
    of each the loss-chunked twin where the loss phase is what does not fit or sets the peak."""
    for o in _variants(ctx, step, evaluate):
        yield o
        twin = loss_twin(ctx, o, evaluate)
        if twin is not None:
            yield twin


def _variants(ctx: Any, step: Iterable[Any], evaluate: Evaluate) -> Iterator[Any]:
    for c in step:
        options = [c]
        if c.encoder_tier == "stream":
            options.append(_fewest_resident(ctx, replace(c, stream_engine="ramtorch"), evaluate))
        for o in options:
            yield o
            if host_plan(ctx, o, ctx.encoder(o.level.encoder)).fits:
                continue
            if o.encoder_tier == "swap":
                yield replace(o, encoder_host="shared")
            elif o.encoder_tier == "stream" and o.stream_engine == "ramtorch":
                yield replace(o, encoder_host="nvme")


def settings(c: Any) -> dict[str, Any]:
    return {"crepa_mem_stream_engine": c.stream_engine, "crepa_mem_stream_resident_chunks": c.resident_chunks,
            "crepa_mem_stream_nvme_path": NVME_FILE if c.encoder_host == "nvme" else None,
            "crepa_mem_host_share_path": SHARE_FILE if c.encoder_host == "shared" else None}


def reasons(ctx: Any, c: Any, enc: EncoderProfile) -> list[str]:
    f, out = format_bytes, []
    dtype, calls = c.level.encoder_dtype, engines.encoder_calls(_teacher_frames(ctx), c.chunk)
    if c.encoder_tier == "stream":
        group = engines.moved_bytes(enc, dtype, "group_offload", 0, calls)
        if c.stream_engine == "ramtorch":
            b = engines.ramtorch_bytes(enc, dtype, c.resident_chunks)
            out.append(f"crepa_mem_stream_engine=ramtorch: {c.resident_chunks} of {enc.num_layers + 2} DINOv2 chunks "
                       f"resident ({f(b['resident_bytes'])} on the GPU through the whole step) and a window of "
                       f"{engines.RAMTORCH_WINDOW + 1} streamed chunks ({f(b['window_bytes'])}) while encoding; "
                       f"moves {f(engines.moved_bytes(enc, dtype, 'ramtorch', c.resident_chunks, calls))} per step "
                       f"over PCIe ({calls} encoder call(s)) against {f(group)} with group_offload"
                       + ("; chosen for its NVMe tier: the node's host RAM is short" if c.encoder_host == "nvme"
                          else "; chosen because fewer bytes moved cost less step time"))
        else:
            out.append(f"crepa_mem_stream_engine=group_offload: two layers on the GPU while encoding, {f(group)} "
                       f"over PCIe per step ({calls} encoder call(s)); RamTorch's resident chunks would not lower "
                       f"the step time here (the transfers hide behind compute, or no chunk fits the budget)")
    hp = host_plan(ctx, c, enc)
    out += hp.reasons
    if c.encoder_host == "shared":
        out.append(f"crepa_mem_host_share_path={SHARE_FILE}: one read-only mapped copy of DINOv2 shared by the "
                   f"{ctx.host.local_ranks if ctx.host else 1} local rank(s) (page cache, pageable: its copies to the GPU are "
                   f"slower than from pinned memory); put the file on a local disk")
    if c.encoder_host == "nvme":
        out.append(f"crepa_mem_stream_nvme_path={NVME_FILE}: RamTorch's NVMe tier keeps DINOv2's masters on disk "
                   f"(one chunk of pinned staging in RAM); inference only reads the file, so RamTorch's SSD-wear "
                   f"gate never fires; put it on an NVMe drive, not tmpfs (/tmp often is)")
    return out
