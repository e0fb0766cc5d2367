"""`crepa-mem demo`: CREPA end to end on tiny random models of a family — a real forward, the CREPA
loss through `wrap`, a backward and an optimizer step — printing the logs. Needs no GPU and no weights."""
from __future__ import annotations

import time

import typer

from ._errors import fail, user_errors
from ._output import console, emit_json, table

FAMILIES = ("wan", "ltxvideo", "sanavideo", "kandinsky5_video")
VAE_OF = {"wan": "wan", "ltxvideo": "ltxvideo", "sanavideo": "sanavideo", "kandinsky5_video": "kandinsky5_video"}
LATENT_HW = {"wan": (8, 8), "ltxvideo": (2, 2), "sanavideo": (8, 8), "kandinsky5_video": (8, 8)}


def run_demo(family: str, steps: int, chunk: int, seed: int) -> list[dict]:
    import torch

    from crepa_mem import CrepaConfig, wrap
    from crepa_mem.testing import tiny_dinov2, tiny_transformer, tiny_transformer_inputs, tiny_vae

    torch.manual_seed(seed)
    transformer = tiny_transformer(family, num_layers=3, seed=seed).train()
    h, w = LATENT_HW[family]
    inputs = tiny_transformer_inputs(family, transformer, latent_frames=3, latent_height=h, latent_width=w, seed=seed)
    latents = torch.randn(1, 128 if family == "ltxvideo" else 16, 3, h, w, generator=torch.Generator().manual_seed(seed))
    cfg = CrepaConfig(enabled=True, block_index=1, encoder_image_size=70, encoder_frames_batch_size=chunk)
    crepa = wrap(transformer, vae=tiny_vae(VAE_OF[family], seed=seed), encoder=tiny_dinov2(seed=seed), config=cfg,
                 device="cpu")
    opt = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-3)
    rows = []
    for step in range(steps):
        t0 = time.perf_counter()
        transformer(**inputs)
        loss, logs = crepa(latents, step=step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append({"step": step, **logs, "seconds": round(time.perf_counter() - t0, 4)})
    crepa.remove()
    return rows


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def demo(
        family: str = typer.Option("wan", help=f"model family: {', '.join(FAMILIES)}"),
        steps: int = typer.Option(3, min=1, max=1000, help="training steps"),
        chunk: int = typer.Option(2, help="frames per teacher chunk (≤ 0: all at once)"),
        seed: int = typer.Option(0),
        json_out: bool = typer.Option(False, "--json", help="print the logs as JSON"),
    ) -> None:
        """Run CREPA end to end on tiny random models (CPU, no downloads) and print its logs."""
        if family not in FAMILIES:
            fail(f"--family {family!r} is not supported; valid: {', '.join(FAMILIES)}")
        rows = run_demo(family, steps, chunk, seed)
        if json_out:
            emit_json({"family": family, "steps": rows})
            return
        keys = ["step", "crepa_loss", "crepa_alignment_score", "crepa_similarity_self", "crepa_weight",
                "crepa_teacher_chunk_frames", "crepa_teacher_frames_encoded", "seconds"]
        short = {"crepa_teacher_chunk_frames": "chunk", "crepa_teacher_frames_encoded": "frames",
                 "crepa_alignment_score": "alignment", "crepa_similarity_self": "self sim."}
        t = table(f"CREPA on a tiny random {family} transformer (CPU)")
        for k in keys:
            t.add_column(short.get(k, k.removeprefix("crepa_")), justify="right", no_wrap=True)
        for r in rows:
            t.add_row(*[f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys])
        console().print(t)
