"""LoRA training of a (tiny, random) Wan transformer with CREPA, the way a diffusers + accelerate + peft
trainer does it: flow-matching loss plus `crepa_mem.wrap`'s CREPA loss.

    python examples/train_wan_lora.py                        # CPU or one GPU, < 1 min on a CPU
    accelerate launch --multi_gpu --num_processes 2 examples/train_wan_lora.py   # DDP (GPUs, or CPU + gloo)

Everything is built from configs (no downloads): WanTransformer3DModel, AutoencoderKLWan and a DINOv2, all
tiny. Swap `build_models` for `from_pretrained` calls and the loop is unchanged.

Data is deterministic and global: step s draws a batch of `batch_size × processes` clips from a generator
seeded by (seed, s), and rank r trains on its own slice. So N processes with --batch-size b see exactly
the clips that 1 process sees with --batch-size N·b, and DDP's gradient averaging makes the updates equal.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

STARTED = time.perf_counter()  # before torch's import: the wall time printed at the end includes it

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TOKENS, TEXT_DIM, LATENT_CHANNELS = 4, 16, 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-log", type=Path, default=None, help="write one JSON object per step to FILE")
    p.add_argument("--batch-size", type=int, default=1, help="clips per process per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--latent-frames", type=int, default=3, help="latent frames (pixel frames: 1 + 4·(T-1))")
    p.add_argument("--latent-size", type=int, default=10, help="latent height = width (pixels: ×8)")
    p.add_argument("--block-index", type=int, default=1, help="crepa_block_index (the tiny model has 3 blocks)")
    p.add_argument("--crepa-lambda", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=70, help="encoder input size (70 → 5×5 tokens = the DiT grid)")
    p.add_argument("--chunk", type=int, default=2, help="frames per teacher chunk (≤ 0: all at once)")
    p.add_argument("--fixed-batch", action="store_true", help="train on the same batch (and noise) every step")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--plan-model", default=None,
                   help="plan the teacher tiers for this rank's GPU with crepa_mem.plan(NAME, gpu='auto')")
    p.add_argument("--save-dir", type=Path, default=None,
                   help="write pytorch_lora_weights.safetensors and crepa_projector.safetensors here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be ≥ 1")
    return args


def build_models(args: argparse.Namespace):
    """Tiny random Wan transformer (LoRA on its attention), Wan VAE and DINOv2 — same weights on every rank."""
    from peft import LoraConfig

    from crepa_mem.testing import tiny_dinov2, tiny_transformer, tiny_vae

    transformer = tiny_transformer("wan", num_layers=3, seed=args.seed).train()
    transformer.requires_grad_(False)
    torch.manual_seed(args.seed)  # LoRA init draws from the global generator
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer, tiny_vae("wan", seed=args.seed), tiny_dinov2(seed=args.seed)


def crepa_config(args: argparse.Namespace):
    from crepa_mem import CrepaConfig

    return CrepaConfig(enabled=True, block_index=args.block_index, lambda_=args.crepa_lambda,
                       encoder_image_size=args.image_size, encoder_frames_batch_size=args.chunk)


def plan_for_this_rank(args: argparse.Namespace, base, say):
    """Each rank plans for its own GPU (the planner's gpu='auto' reads LOCAL_RANK); only the teacher's
    placement (tiers, chunk, dtype, tiling) is taken — the tiny encoder and image size stay."""
    if not args.plan_model:
        return base
    try:
        from crepa_mem import plan

        # under DDP every other GPU is another rank's: no second-GPU teacher then
        others = [] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        planned = plan(args.plan_model, gpu="auto", teacher_gpus=others).to_config(base)
    except Exception as err:  # noqa: BLE001 - the example runs on, with the defaults
        say(f"plan unavailable ({type(err).__name__}: {err}); using the resident (gpu) tiers")
        return base
    if "cache" in (planned.encoder_tier, planned.vae_tier):
        say("the plan asks for a feature cache; this example has none, keeping the resident tiers")
        return base
    print(f"[rank {os.environ.get('LOCAL_RANK', '0')}] planned {args.plan_model} for this rank's GPU: "
          f"encoder={planned.encoder_tier} vae={planned.vae_tier} chunk={planned.frames_per_chunk or 'all'} "
          f"encoder_dtype={planned.encoder_dtype}", flush=True)
    return planned.replace(encoder=base.encoder, encoder_image_size=base.encoder_image_size,
                           block_index=base.block_index, lambda_=base.lambda_, feature_cache=None)


def global_batch(args: argparse.Namespace, step: int, world: int) -> dict[str, torch.Tensor]:
    """The step's clips for all ranks (CPU generator → identical on CPU and GPU, and across ranks)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + (0 if args.fixed_batch else step))
    n, t, s = args.batch_size * world, args.latent_frames, args.latent_size
    return {
        "latents": torch.randn(n, LATENT_CHANNELS, t, s, s, generator=g),  # clean, normalised (a latent cache)
        "noise": torch.randn(n, LATENT_CHANNELS, t, s, s, generator=g),
        "sigmas": torch.sigmoid(torch.randn(n, generator=g)),  # logit-normal, as SimpleTuner's default
        "text": torch.randn(n, TEXT_TOKENS, TEXT_DIM, generator=g),
    }


def lora_state(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)  # FSDP2: DTensors, gathered (every rank calls this)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in state.items()}


def train(args: argparse.Namespace) -> list[dict]:
    from accelerate import Accelerator

    from crepa_mem import wrap
    from crepa_mem.capture import unwrap
    from crepa_mem.units import format_bytes

    base_cfg = crepa_config(args)  # bad option values fail here, before any model is built
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU: DDP over gloo
    if accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny models: one thread is fastest, and N processes share the cores
    say = accelerator.print
    transformer, vae, encoder = build_models(args)
    cfg = plan_for_this_rank(args, base_cfg, say)
    # wrap before prepare: the projector becomes part of the model DDP synchronises
    crepa = wrap(transformer, vae=vae, encoder=encoder, config=cfg, device=accelerator.device,
                 max_train_steps=args.steps)
    params = [p for p in transformer.parameters() if p.requires_grad]  # LoRA + crepa_projector
    opt_cls = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW
    optimizer = opt_cls(params, lr=args.lr)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    cuda = device.type == "cuda"
    say(f"{world} process(es) on {device}; teacher tiers: encoder={cfg.encoder_tier} vae={cfg.vae_tier}, "
        f"chunk={cfg.frames_per_chunk or 'all'}; trainable parameters: {sum(p.numel() for p in params)}")

    log_file = args.json_log.open("w") if (args.json_log and accelerator.is_main_process) else None
    rows: list[dict] = []
    try:
        for step in range(args.steps):
            t0 = time.perf_counter()
            full = global_batch(args, step, world)
            mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
            batch = {k: v[mine].to(device) for k, v in full.items()}
            sigma = batch["sigmas"].view(-1, 1, 1, 1, 1)
            noisy = (1.0 - sigma) * batch["latents"] + sigma * batch["noise"]
            with accelerator.autocast():
                pred = model(hidden_states=noisy, timestep=batch["sigmas"] * 1000.0,
                             encoder_hidden_states=batch["text"], return_dict=False)[0]
            diffusion_loss = F.mse_loss(pred.float(), (batch["noise"] - batch["latents"]).float())
            crepa_loss, logs = crepa(batch["latents"], step=step)
            accelerator.backward(diffusion_loss + crepa_loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            local = torch.tensor([diffusion_loss.item(), logs["crepa_loss"], logs["crepa_alignment_score"],
                                  logs["crepa_similarity_self"]], device=device)
            mean = accelerator.reduce(local, reduction="mean").tolist() if world > 1 else local.tolist()
            peak = logs.get("crepa_teacher_peak_bytes")  # CUDA allocator's peak of the teacher step
            row = {"step": step, "diffusion_loss": mean[0], "crepa_loss": mean[1],
                   "crepa_alignment_score": mean[2], "crepa_similarity_self": mean[3],
                   "crepa_weight": logs["crepa_weight"], "teacher_peak_bytes": int(peak) if peak is not None else None,
                   "teacher_memory": "cuda" if cuda else "not measured on CPU",
                   "encoder_tier": logs.get("crepa_teacher_encoder_tier"),
                   "vae_tier": logs.get("crepa_teacher_vae_tier"),
                   "chunk_frames": logs.get("crepa_teacher_chunk_frames"), "processes": world,
                   "seconds": round(time.perf_counter() - t0, 4)}
            rows.append(row)
            if not all(math.isfinite(row[k]) for k in ("diffusion_loss", "crepa_loss", "crepa_alignment_score")):
                raise FloatingPointError(f"non-finite loss at step {step}: {row}")
            memory = (f"teacher peak {format_bytes(row['teacher_peak_bytes'])}" if row["teacher_peak_bytes"] is not None
                      else "teacher memory: n/a on CPU (the CUDA allocator measures it)")
            say(f"step {step:4d} | diffusion {row['diffusion_loss']:.4f} | crepa_loss {row['crepa_loss']:+.4f} | "
                f"crepa_alignment_score {row['crepa_alignment_score']:.4f} | {memory} | {row['seconds']:.2f}s")
            if log_file:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
    finally:
        if log_file:
            log_file.close()

    accelerator.wait_for_everyone()
    if args.save_dir is not None:
        from diffusers import WanPipeline
        from safetensors.torch import save_file

        from crepa_mem.fileio import respect_umask
        from crepa_mem.integrations.wrap import PROJECTOR_FILE

        lora, projector = lora_state(unwrap(accelerator.unwrap_model(model))), crepa.projector_state_dict()
        if accelerator.is_main_process:  # the LoRA file, and crepa_projector.safetensors beside it
            WanPipeline.save_lora_weights(args.save_dir, transformer_lora_layers=lora)
            save_file(projector, str(args.save_dir / PROJECTOR_FILE))
            for written in args.save_dir.glob("*.safetensors"):  # safetensors writes 0600: give what the umask says
                respect_umask(written)
            say(f"saved LoRA and projector to {args.save_dir}")
    accelerator.wait_for_everyone()
    say(f"done: {len(rows)} steps, {time.perf_counter() - STARTED:.1f}s wall ({sum(r['seconds'] for r in rows):.1f}s of it "
        f"training); crepa_alignment_score "
        f"{rows[0]['crepa_alignment_score']:.4f} → {rows[-1]['crepa_alignment_score']:.4f}")
    crepa.remove()
    accelerator.end_training()
    return rows


def main(argv: list[str] | None = None) -> int:
    import sys

    from crepa_mem import CrepaMemError

    args = parse_args(argv)
    try:
        train(args)
    except CrepaMemError as err:  # a bad option value: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
