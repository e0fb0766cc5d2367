"""The LoRA + CREPA loop of train_wan_lora.py under sharded training: PyTorch FSDP2 (`fully_shard`).

    torchrun --nproc_per_node 2 examples/train_wan_fsdp.py                 # FSDP2, projector: its own unit
    torchrun --nproc_per_node 2 examples/train_wan_fsdp.py --fsdp 2:root,1:own --save-dir out

Runs on GPUs (NCCL) and on a CPU (gloo). accelerate 1.15 enables FSDP only for accelerator devices (its
AcceleratorState turns FSDP on for MULTI_GPU/NPU/XPU/…, never for MULTI_CPU), so on a CPU this example calls
`fully_shard` itself, the same call accelerate's `fsdp_version: 2` makes on GPUs.

What it shows:
- the capture hook sees full block outputs: FSDP shards parameters, never activations;
- the projector is sharded with the model: `own` makes it an FSDP unit of its own (its forward gathers
  its shards, as any FSDP module's does); `root` leaves it in the root unit, which FSDP2 keeps unsharded
  from the forward until the backward, where CREPA's call falls (FSDP1 reshards its root after forward, so
  there it must be `own`). Either way its gradient is reduce-scattered with the rest, so N processes give
  the update of 1 process on the whole batch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_wan_lora as base  # noqa: E402  (same models, data and loss)


def shard(transformer, version: int, projector_unit: str, device: torch.device, world: int):
    """FSDP2: fully_shard each block (+ the projector when `own`) and the root, as accelerate's
    fsdp_version 2 with fsdp_transformer_layer_cls_to_wrap does. FSDP1: the same units through
    transformer_auto_wrap_policy; there the root unit is resharded after forward, so the projector must
    be its own unit (accelerate: add `Sequential` to fsdp_transformer_layer_cls_to_wrap)."""
    block_cls = type(transformer.blocks[0])
    if version == 2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for block in transformer.blocks:
            fully_shard(block, mesh=mesh)
        if projector_unit == "own":
            fully_shard(transformer.crepa_projector, mesh=mesh)
        fully_shard(transformer, mesh=mesh)
        return transformer
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    units = {block_cls, torch.nn.Sequential} if projector_unit == "own" else {block_cls}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=units)
    return FSDP(transformer, auto_wrap_policy=policy, device_id=device, use_orig_params=True)


def gather(model, crepa, version: int) -> tuple[dict, dict]:
    """Full (unsharded) projector and LoRA weights on every rank (collectives)."""
    from peft.utils import get_peft_model_state_dict

    if version == 2:
        lora = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                for k, v in get_peft_model_state_dict(model).items()}
        return crepa.projector_state_dict(), lora  # gathers the DTensor shards
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        projector = {k: v.clone() for k, v in crepa.projector_state_dict().items()}
        # FSDP1's state_dict hooks hide the adapters from get_peft_model_state_dict: read the parameters
        lora = {n.replace("_fsdp_wrapped_module.", "").replace(".default", ""): q.detach().cpu().clone()
                for n, q in model.module.named_parameters() if "lora_" in n}
    return projector, lora


def run_once(args, version: int, unit: str, device: torch.device, rank: int, world: int, say) -> None:
    """Build, shard, train `args.steps` steps and (with --save-dir) write LoRA + projector to SAVE/fsdp{v}-{unit}."""
    from crepa_mem import wrap

    transformer, vae, encoder = base.build_models(args)
    transformer.to(device)
    # wrap before sharding: the projector is a submodule when FSDP decides what to shard
    crepa = wrap(transformer, vae=vae, encoder=encoder, config=base.crepa_config(args), device=device,
                 max_train_steps=args.steps)
    model = shard(transformer, version, unit, device, world)
    weight = transformer.crepa_projector.get_parameter("1.weight") if version == 2 else None
    held = (f"{type(weight).__name__} shard {tuple(weight.to_local().shape)} of {tuple(weight.shape)}"
            if weight is not None else f"{type(crepa.projector).__name__} flat shard")
    say(f"{world} process(es), FSDP{version} on {device}; projector held as {held} (unit: {unit})")

    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = (torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW)(params, lr=args.lr)
    width = crepa.capture.spec.hidden_size
    for step in range(args.steps):
        full = base.global_batch(args, step, world)
        mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
        batch = {k: v[mine].to(device) for k, v in full.items()}
        sigma = batch["sigmas"].view(-1, 1, 1, 1, 1)
        noisy = (1.0 - sigma) * batch["latents"] + sigma * batch["noise"]
        pred = model(hidden_states=noisy, timestep=batch["sigmas"] * 1000.0,
                     encoder_hidden_states=batch["text"], return_dict=False)[0]
        hidden = tuple(crepa.capture.hidden_states.shape)
        if hidden[-1] != width:  # FSDP shards parameters, never activations
            raise RuntimeError(f"captured width {hidden[-1]} is not the model's {width}")
        diffusion_loss = F.mse_loss(pred.float(), (batch["noise"] - batch["latents"]).float())
        crepa_loss, logs = crepa(batch["latents"], step=step)
        (diffusion_loss + crepa_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = torch.tensor([diffusion_loss.item(), logs["crepa_alignment_score"]], device=device)
        dist.all_reduce(stats)
        stats /= world
        say(f"step {step:4d} | diffusion {stats[0].item():.4f} | crepa_alignment_score {stats[1].item():.4f} | "
            f"captured block output {hidden} (full width {width})")

    projector, lora = gather(model, crepa, version)
    if args.save_dir is not None and rank == 0:
        from diffusers import WanPipeline
        from safetensors.torch import save_file

        out = args.save_dir / f"fsdp{version}-{unit}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(projector, str(out / "crepa_projector.safetensors"))
        WanPipeline.save_lora_weights(out, transformer_lora_layers=lora)
        say(f"saved LoRA and projector to {out}")
    dist.barrier()
    crepa.remove()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CREPA under FSDP")
    p.add_argument("--fsdp", default="2:own",
                   help="comma-separated VERSION:UNIT runs, UNIT own|root (FSDP1 needs own), e.g. 2:root,1:own")
    extra, rest = p.parse_known_args(argv)
    try:
        runs = [(int(v), u) for v, u in (item.split(":") for item in extra.fsdp.split(","))]
        assert all(v in (1, 2) and u in ("own", "root") for v, u in runs)
    except (ValueError, AssertionError):
        p.error(f"--fsdp {extra.fsdp!r}: expected VERSION:UNIT items with VERSION 1|2 and UNIT own|root")
    args = base.parse_args(rest)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        for version, unit in runs:
            run_once(args, version, unit, device, rank, world, say)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
