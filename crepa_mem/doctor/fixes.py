"""Log events → findings with concrete fixes: config lines to change, or a `crepa-mem plan` command
whose plan fits (the planner is asked for the GPU and workload of the failed run)."""
from __future__ import annotations

import json
from typing import Any, Mapping

from crepa_mem.doctor.findings import Context, Finding
from crepa_mem.doctor.setup_fixes import pinned_finding, setup_finding
from crepa_mem.errors import CrepaMemError
from crepa_mem.units import GiB, format_bytes

FRAGMENTED_MIN = GiB
FRAGMENTED_SHARE = 0.05
"""Reserved-but-unallocated memory under 1 GiB is allocator noise; from 5 % of the card it counts
even when it is smaller than the failed request (it would have fit with the free memory)."""


def fragmented(oom: Mapping[str, Any]) -> bool:
    """Much memory reserved but unallocated: more than the failed request (the cache held enough, only
    not in one piece), or a sizeable share of the card that with the free memory would have sufficed,
    or a fifth of the card idle in the cache."""
    unalloc, total = oom.get("reserved_unallocated_bytes") or 0, oom.get("total_bytes") or 0
    if not total or unalloc < FRAGMENTED_MIN:
        return False
    tried, free = oom.get("tried_bytes", 0), oom.get("free_bytes", 0)
    return (unalloc >= tried or (unalloc >= FRAGMENTED_SHARE * total and unalloc + free >= tried)
            or unalloc >= 0.2 * total)


_PHASE_WORDS = {
    "vae_decode": "the VAE decode of the clean latents (CREPA's teacher input)",
    "encoder": "the DINOv2 encoder (CREPA's teacher)",
    "projector": "CREPA's projector / similarity over the captured hidden states",
    "transformer": "the diffusion transformer",
    "unknown": "a part the traceback does not name",
}
_PHASE_ADVICE = {
    "vae_decode": ('tile the decode ("crepa_mem_vae_tiling": true), keep the VAE off the GPU between steps '
                   '("crepa_mem_vae_tier": "swap"), or decode fewer frames at once '
                   '("crepa_encoder_frames_batch_size": 8)'),
    "encoder": ('encode frames in chunks ("crepa_encoder_frames_batch_size": 4), run DINOv2 in bf16 '
                '("crepa_mem_encoder_dtype": "bf16"), stream its weights ("crepa_mem_encoder_tier": "stream"), '
                'or use a smaller encoder ("crepa_encoder": "dinov2_vits14", "crepa_encoder_image_size": 224)'),
    "projector": ('pool tokens before the projector ("crepa_spatial_align": false) or use a narrower encoder '
                  '(dinov2_vitb14 / dinov2_vits14): the fp32 copy of the block output and its projection scale '
                  'with both'),
    "transformer": ('the DiT itself ran out; CREPA adds the captured block output and a resident teacher on top. '
                    'Turn on "gradient_checkpointing": true, offload the DiT\'s blocks ("ramtorch": true, '
                    '"ramtorch_target_modules": "blocks.*"), train fewer frames or a lower resolution, and move '
                    'the teacher off the GPU as the plan below does'),
    "unknown": "the settings of the plan below shrink CREPA's share of the GPU",
}


def gpu_argument(total_bytes: int | None, fallback: str | None) -> str | None:
    """`--gpu` for a card of `total_bytes`: its catalog name when exactly one card has that size
    (within 4 %: drivers report a little less than the label), else the size itself."""
    if not total_bytes:
        return fallback
    try:
        from crepa_mem.profiles import list_gpus
        close = [g.name for g in list_gpus() if abs(g.memory_bytes - total_bytes) <= 0.04 * g.memory_bytes]
    except (CrepaMemError, FileNotFoundError):
        close = []
    if len(close) == 1:
        return close[0]
    return f"{total_bytes / GiB:.2f}".rstrip("0").rstrip(".") + "GiB"


def shape_of(ctx: Context) -> tuple[int | None, int | None, int | None]:
    """Training shape for a plan: --frames/--height/--width, else the model's default shape."""
    m = ctx.model
    return (ctx.frames or (m.default_frames if m else None), ctx.height or (m.default_height if m else None),
            ctx.width or (m.default_width if m else None))


def config_lines(settings: Mapping[str, Any]) -> str:
    """Settings as lines to paste into config.json (unset ones left out)."""
    return ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in settings.items() if v is not None)


def teacher_resident_bytes(ctx: Context) -> int:
    """Bytes of teacher weights a run keeps on the GPU with its config (SimpleTuner: DINOv2 in fp32
    and the VAE, both resident); zero for what a crepa-mem tier keeps elsewhere."""
    from crepa_mem.profiles import get_encoder
    cfg = ctx.config
    total = 0
    backbone = str(cfg.get("crepa_use_backbone_features")).lower() == "true"
    if str(cfg.get("crepa_mem_encoder_tier", "gpu")) == "gpu" and not backbone:
        try:
            enc = get_encoder(str(cfg.get("crepa_model") or cfg.get("crepa_encoder") or "dinov2_vitg14"))
            total += enc.params * (2 if str(cfg.get("crepa_mem_encoder_dtype", "fp32")) in ("bf16", "fp16") else 4)
        except CrepaMemError:
            pass
    if ctx.model is not None and str(cfg.get("crepa_mem_vae_tier", "gpu")) == "gpu":
        total += ctx.model.vae.params * 2  # bf16 VAE
    return total


def train_estimate(oom: Mapping[str, Any], ctx: Context) -> int | None:
    """What the training itself used when it ran out: the process's memory in use (PyTorch's own
    figure, else allocated + cached, else total − free) less the resident teacher weights; for an
    OOM inside the DiT, plus the request that failed (the DiT needed at least that)."""
    in_use = oom.get("process_bytes")
    if in_use is None and "allocated_bytes" in oom:
        in_use = oom["allocated_bytes"] + oom.get("reserved_unallocated_bytes", 0)
    if in_use is None and "total_bytes" in oom and "free_bytes" in oom:
        in_use = oom["total_bytes"] - oom["free_bytes"]
    if in_use is None:
        return None
    if oom.get("phase") == "transformer":
        in_use += oom.get("tried_bytes", 0)
    return max(0, in_use - teacher_resident_bytes(ctx))


def plan_fix(ctx: Context, gpu: str | None, train_bytes: int | None = None) -> dict[str, Any]:
    """The `crepa-mem plan …` command for this model, GPU and training footprint and, when the planner
    runs, the settings of its plan. Keys: command, fits, settings, text (+ tiers, reasons, plan_error)."""
    if ctx.model is None:
        return {"command": None, "fits": None, "settings": {},
                "text": "Name the model (--model wan-2.1-14b, or --config with model_family/model_flavour) "
                        "to get a `crepa-mem plan` whose settings fit this GPU."}
    frames, height, width = shape_of(ctx)
    gpu = gpu or "auto"
    train_gib = None if train_bytes is None else round(train_bytes / GiB, 2)
    cmd = (f"crepa-mem plan --model {ctx.model.name} --gpu {gpu} --frames {frames} --height {height} --width {width}"
           + ("" if train_gib is None else f" --train-gib {train_gib:g}"))
    out: dict[str, Any] = {"command": cmd, "fits": None, "settings": {}, "train_bytes": train_bytes}
    try:
        from crepa_mem.planning.planner import plan
        result = plan(ctx.model, gpu, frames=frames, height=height, width=width, train_gib=train_gib)
    except ImportError:  # a build without the planner: the command still says what to run
        out["text"] = f"Run `{cmd}` and put the crepa_* lines it prints in your config."
        return out
    except (CrepaMemError, ValueError) as e:  # an impossible shape or an unknown card: keep the command
        out.update(plan_error=str(e), text=f"Run `{cmd}` after fixing its input (the planner said: {e}).")
        return out
    out.update(fits=bool(result.fits), settings=dict(result.settings), tiers=dict(getattr(result, "tiers", {}) or {}),
               reasons=[str(r) for r in (getattr(result, "reasons", None) or [])])
    if result.fits:
        out["text"] = f"`{cmd}` finds a configuration that fits; set in config.json:\n{config_lines(result.settings)}"
    else:
        why = "; ".join(out["reasons"][-2:]) or "no configuration fits"
        out["text"] = (f"`{cmd}`: even the smallest CREPA configuration does not fit next to this training ({why}). "
                       "Shrink the training itself (fewer frames, lower resolution, gradient checkpointing, RamTorch "
                       "for the DiT), use a card with more memory, or \"crepa_use_backbone_features\": true (no VAE, "
                       "no encoder).")
    return out


def _family_default(family: str | None):
    try:
        from crepa_mem.profiles import get_model
        return get_model(family) if family else None
    except (CrepaMemError, FileNotFoundError):
        return None


def block_range_text(ctx: Context, family: str | None = None) -> tuple[str, dict[str, Any]]:
    """'valid 0–29 for wan-2.1-1.3b, recommended 8' for the known model (or the family's default
    checkpoint when only the family is known), else every family's default."""
    m = ctx.model or _family_default(family)
    if m is not None:
        default = "" if ctx.model is not None else f" (the {m.family} default; --model names another checkpoint)"
        return (f"valid block indices for {m.name}{default} are 0–{m.num_blocks - 1} ({m.num_blocks} blocks); "
                f"the {m.family} recommendation is {m.recommended_block}",
                {"model": m.name, "num_blocks": m.num_blocks, "valid_range": [0, m.num_blocks - 1],
                 "recommended_block": m.recommended_block})
    try:
        from crepa_mem.profiles import family_defaults, get_model
        parts = []
        for family, default in family_defaults().items():
            d = get_model(default)
            parts.append(f"{family} ({d.name}): 0–{d.num_blocks - 1}, recommended {d.recommended_block}")
        return "valid block indices by family default: " + "; ".join(parts), {}
    except (CrepaMemError, FileNotFoundError):
        return "the index must be below the model's block count (zero-based)", {}


def _sz(n: int | None) -> str:
    return "?" if n is None else format_bytes(n)


def _oom(event, ctx: Context) -> list[Finding]:
    d = dict(event.data)
    phase = d.get("phase", "unknown")
    where = f" ({d['where']})" if d.get("where") else ""
    gpu_text = f"GPU {d['gpu_index']}" if "gpu_index" in d else "the GPU"
    numbers = []
    if "total_bytes" in d:
        numbers.append(f"{_sz(d['total_bytes'])} total")
    if "tried_bytes" in d:
        numbers.append(f"it tried to allocate {_sz(d['tried_bytes'])}")
    if "free_bytes" in d:
        numbers.append(f"{_sz(d['free_bytes'])} was free")
    if "allocated_bytes" in d:
        numbers.append(f"PyTorch held {_sz(d['allocated_bytes'])} allocated"
                       + (f" + {_sz(d['reserved_unallocated_bytes'])} reserved but unallocated"
                          if "reserved_unallocated_bytes" in d else ""))
    seen = f" Seen {event.count}× (first at line {event.line_no})." if event.count > 1 else f" (line {event.line_no})"
    message = (f"{gpu_text} ran out of memory in {_PHASE_WORDS[phase]}{where}"
               + (": " + "; ".join(numbers) if numbers else "") + "." + seen)
    gpu = gpu_argument(d.get("total_bytes"), ctx.gpu)
    pf = plan_fix(ctx, gpu, train_estimate(d, ctx))
    fix = f"Options for this phase: {_PHASE_ADVICE[phase]}.\nFor this GPU and run: {pf['text']}"
    details = {**d, "count": event.count, "line": event.line_no, "frames": event.frames,
               "plan_command": pf["command"], "plan_fits": pf["fits"], "settings": pf["settings"],
               "train_bytes": pf.get("train_bytes")}
    out = [Finding("oom", "error", message, fix, details)]
    if fragmented(d):
        unalloc = d["reserved_unallocated_bytes"]
        old = d.get("wording") == "old"
        setting = "max_split_size_mb:512" if old else "expandable_segments:True"
        env = "PYTORCH_HIP_ALLOC_CONF" if "HIP out of memory" in d.get("exception", "") else "PYTORCH_CUDA_ALLOC_CONF"
        out.append(Finding(
            "fragmentation", "warning",
            f"{_sz(unalloc)} of {gpu_text}'s memory was reserved by PyTorch but unallocated when the "
            f"{_sz(d.get('tried_bytes'))} request failed: the caching allocator's blocks are fragmented.",
            f"export {env}={setting}" + (" (this wording is PyTorch ≤ 2.0; on ≥ 2.1 use "
                                         "expandable_segments:True)" if old else "")
            + " before launching the training.",
            {"phase": phase, "reserved_unallocated_bytes": unalloc, "tried_bytes": d.get("tried_bytes"),
             "alloc_conf": f"{env}={setting}"}))
    # PyTorch lists other processes as "Process N has …" and itself as "this process has …"; inside a
    # container NVML's host pids do not match and the run itself shows up as a "Process N" holding at
    # least what PyTorch allocated.
    others = d.get("processes", [])
    if "process_bytes" not in d:
        floor = d.get("allocated_bytes")
        others = ([p for p in others if p["used_bytes"] < floor] if floor else
                  sorted(others, key=lambda p: p["used_bytes"])[:-1])
    if others:
        held = sum(p["used_bytes"] for p in others)
        out.append(Finding(
            "gpu_memory_held_by_other_process", "warning",
            f"When it ran out, {len(others)} other process(es) held {_sz(held)} on {gpu_text} "
            f"(pids {', '.join(str(p['pid']) for p in others)}).",
            "Stop those processes (nvidia-smi lists them) or give the training a GPU of its own "
            "(CUDA_VISIBLE_DEVICES).", {"processes": others, "held_bytes": held, "source": "log"}))
    return out


def finding_for_event(event, ctx: Context) -> list[Finding]:
    """The finding(s) for one log event."""
    d, code = event.data, event.code
    at = f" (log line {event.line_no}{f', {event.count}×' if event.count > 1 else ''})"
    details = {**d, "line_no": event.line_no, "count": event.count, "frames": event.frames}
    if code == "oom" and d.get("memory") == "pinned_host":
        return [pinned_finding(event, at, details)]
    if code == "oom":
        return _oom(event, ctx)
    if code == "block_index_out_of_range":
        valid, extra = block_range_text(ctx, d.get("family"))
        idx = d.get("block_index")
        if ctx.model is None and d.get("num_blocks"):  # the error itself said how many blocks there are
            n, fam = d["num_blocks"], _family_default(d.get("family"))
            valid = f"valid block indices for this {d.get('family')} transformer are 0–{n - 1} ({n} blocks)"
            extra = {"num_blocks": n, "valid_range": [0, n - 1],
                     "recommended_block": fam.recommended_block if fam else 8}
        details.update(extra)
        rec = extra.get("recommended_block", 8)
        if idx is not None and ctx.model is not None and 0 <= idx < ctx.model.num_blocks:
            msg = (f"The transformer returned no hidden states for block {idx}, which does exist in "
                   f"{ctx.model.name} ({ctx.model.num_blocks} blocks){at}. The block index is not the cause: the "
                   f"family's CREPA hook was not installed.")
            fix = ("Use a model_family with CREPA hooks (wan, ltxvideo, sanavideo, kandinsky5_video) and a SimpleTuner "
                   "≥ 4.10, or wrap the transformer with crepa_mem.integrations.wrap (it hooks the block list directly).")
        else:
            what = f"block {idx}" if idx is not None else "the configured block"
            msg = f"CREPA asked for the hidden states of {what} but the transformer returned none{at}: {valid}."
            fix = f'Set "crepa_block_index": {rec} (any index inside the valid range works; it is zero-based).'
        return [Finding(code, "error", msg, fix, details)]
    if code == "invalid_option":
        key, value, valid = d.get("key"), d.get("value"), d.get("valid")
        if value is None:
            rec = ctx.model.recommended_block if ctx.model else "8 (10 for sanavideo)"
            msg, fix = f"{key} is not set but CREPA is enabled{at}.", f'Set "{key}": {rec}.'
        else:
            msg = f"{key}={value} was rejected{at}" + (f": valid is {valid}." if valid else ".")
            fix = f'Set "{key}" to a value in range' + (f" ({valid})." if valid else " (see REFERENCE §1.1).")
        return [Finding(code, "error", msg, fix, details)]
    if code == "hidden_size_unknown":
        return [Finding(code, "error",
                        f"SimpleTuner could not infer the transformer's hidden size{at}: its config has neither "
                        "num_attention_heads × attention_head_dim nor hidden_size, so the projector cannot be built.",
                        "Use a model_family with CREPA hooks (wan, ltxvideo, sanavideo, kandinsky5_video); for a "
                        "custom transformer, use crepa_mem.integrations.wrap, which reads the width from the captured block output.",
                        details)]
    if code == "unsupported_family":
        return [Finding(code, "error", f"crepa-mem cannot hook {d.get('name')}: it is not one of the video "
                        f"families with CREPA support{at}.",
                        "Train wan, ltxvideo, sanavideo or kandinsky5_video, or turn CREPA off for this model.",
                        details)]
    return setup_finding(code, d, at, details)


def log_notes(scan) -> list[Finding]:
    """Info about the log itself: empty, binary, nothing known found, an unknown error."""
    out: list[Finding] = []
    meta = {"lines": scan.lines, "bytes": scan.bytes, "source": scan.source}
    if scan.lines == 0:
        return [Finding("log_empty", "info", f"The log {scan.source} is empty.",
                        "Pass the log of the failed run (SimpleTuner writes it to the console; save it with "
                        "`2>&1 | tee log.txt`).", meta)]
    if scan.binary:
        out.append(Finding("log_not_text", "warning", f"{scan.source} is not a text log (binary bytes); it was "
                           "read with undecodable bytes replaced.",
                           "Pass the text log of the run, not a checkpoint or archive.", meta))
    if scan.unrecognized is not None:
        u = scan.unrecognized
        out.append(Finding("unrecognized_error", "info",
                           f"The log ends in an error doctor does not know (line {u.line_no}): {u.data['exception']}",
                           "It does not look related to CREPA or GPU memory; see the tool that raised it.",
                           {**meta, "exception": u.data["exception"], "frames": u.frames,
                            "count": scan.unrecognized_count}))
    if not scan.events and scan.unrecognized is None and not scan.binary:
        lines = f"{scan.lines} line{'' if scan.lines == 1 else 's'}"
        out.append(Finding("log_clean", "info", f"No known failure in {lines} of {scan.source}.",
                           "Nothing to change.", meta))
    return out
