"""`crepa-mem profiles`: the models, GPUs and encoders crepa-mem knows (built-in and user files)."""
from __future__ import annotations

from typing import Optional

import typer

from crepa_mem.cli._errors import user_errors
from crepa_mem.cli._output import console, emit_json, human_bytes, table


def register(app: typer.Typer) -> None:
    @app.command("profiles")
    @user_errors
    def profiles_cmd(
        profiles: Optional[list[str]] = typer.Option(None, "--profiles", help="Directory of extra profile *.toml files."),
        as_json: bool = typer.Option(False, "--json", help="Print the profiles as JSON."),
    ) -> None:
        """Known checkpoints (with family defaults), GPUs and encoders."""
        from crepa_mem import profiles as P
        from crepa_mem.planning.report import encoder_to_dict, gpu_profile_to_dict, model_to_dict

        dirs = profiles or None
        doc = {"families": P.family_defaults(dirs),
               "models": [model_to_dict(m) for m in P.list_models(dirs)],
               "gpus": [gpu_profile_to_dict(g) for g in P.list_gpus(dirs)],
               "encoders": [encoder_to_dict(e) for e in P.list_encoders(dirs)],
               "dirs": [str(P.builtin_dir()), *map(str, P.user_dirs(dirs))]}
        if as_json:
            emit_json(doc)
        else:
            _print(doc)


def _print(doc) -> None:
    out = console()
    defaults = set(doc["families"].values())
    t = table("models (* = the family's default)")
    for col in ("name", "blocks × D", "params", "VAE", "frames×H×W"):
        t.add_column(col, no_wrap=True)
    for m in doc["models"]:
        s = m["default_shape"]
        t.add_row(m["name"] + (" *" if m["name"] in defaults else ""), f"{m['num_blocks']} × {m['hidden_size']}", f"{m['params'] / 1e9:.2f}B", m["vae"]["name"],
                  f"{s['frames']}×{s['height']}×{s['width']}")
    out.print(t)
    t = table("SimpleTuner model_flavour → checkpoint")
    t.add_column("checkpoint", no_wrap=True)
    t.add_column("model_flavour", overflow="fold")
    for m in doc["models"]:
        if m["simpletuner_flavours"]:
            t.add_row(m["name"], ", ".join(m["simpletuner_flavours"]))
    out.print(t)
    t = table("GPUs")
    for col in ("name", "memory", "PCIe", "bf16 TFLOP/s", "aliases"):
        t.add_column(col, no_wrap=col != "aliases", overflow="fold")
    for g in doc["gpus"]:
        t.add_row(g["name"], human_bytes(g["memory_bytes"]), f"Gen{g['pcie_gen']} x{g['pcie_width']}",
                  f"{g['bf16_tflops']:g}", ", ".join(g["aliases"]))
    out.print(t)
    t = table("encoders")
    for col in ("name", "hub id", "width", "layers", "heads", "MLP", "params"):
        t.add_column(col, no_wrap=col != "hub id", overflow="fold")
    for e in doc["encoders"]:
        t.add_row(e["name"], e["hub_id"], str(e["hidden_size"]), str(e["num_layers"]), str(e["num_heads"]),
                  f"{e['mlp']} {e['intermediate_size']}", f"{e['params'] / 1e6:.0f} M")
    out.print(t)
    out.print("profile directories: " + ", ".join(doc["dirs"]), markup=False)
