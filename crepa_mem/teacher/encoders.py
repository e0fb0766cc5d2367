"""Loading the frozen DINOv2 teacher by name, from the local Hugging Face cache or a local directory.

Nothing here downloads: training machines are often offline, and a surprise multi-GB download in the
middle of a run is worse than a clear error that says what to fetch.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from crepa_mem.errors import CrepaConfigError, CrepaMemError, EncoderNotAvailableError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hub_id_for(name: str) -> str:
    """dinov2_vitg14 → facebook/dinov2-giant (profiles/encoders.toml); hub ids pass through."""
    if "/" in name:
        return name
    from crepa_mem.profiles import get_encoder

    return get_encoder(name).hub_id


def _looks_like_path(name: str) -> bool:
    """'./dino', '../w', '/models/dino', '~/dino': a folder, never a hub id ('facebook/dinov2-giant')."""
    return name.startswith(("./", "../", "/", "~", ".\\")) or name in (".", "..")


def local_encoder_dir(name: str, path: str | os.PathLike | None = None) -> Path | None:
    """The local folder to load from (`path`, or a `name` that is a path), None for a name or hub id.
    A local folder that does not exist is bad input (CrepaConfigError, exit 2), found before any loading."""
    if path:
        key, given = "crepa_mem_encoder_path", Path(path).expanduser()
    elif _looks_like_path(str(name)) or Path(str(name)).is_dir():
        key, given = "crepa_encoder", Path(str(name)).expanduser()
    else:
        return None
    if not given.is_dir():
        raise CrepaConfigError(key, str(path or name), valid="an existing local folder with the encoder's "
                               "config.json and weights (from save_pretrained or `huggingface-cli download`)")
    return given


def load_encoder(name: str, *, path: str | os.PathLike | None = None, dtype: str = "fp32") -> nn.Module:
    """A frozen transformers DINOv2 (with or without registers), eval mode, in `dtype`, on the CPU.

    `path` (or a `name` that is an existing directory) loads with from_pretrained from that folder;
    otherwise the hub id is read from the local cache only.
    """
    from transformers import AutoModel

    source = local_encoder_dir(name, path)
    try:
        if source is None:
            # Resolve the cached snapshot ourselves: from_pretrained with a hub id can still reach
            # for the network (and hang until a timeout) on machines without it.
            from huggingface_hub import snapshot_download

            hub_id = hub_id_for(name)
            source = Path(snapshot_download(hub_id, local_files_only=True))
        # local_files_only: a local folder never reaches for the network (no retries, no timeouts)
        model = AutoModel.from_pretrained(str(source), dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError) as err:
        where = str(source) if source is not None else f"{hub_id_for(name)} in the Hugging Face cache ({_hub_cache()})"
        raise EncoderNotAvailableError(
            f"encoder {name!r} is not available: {where} has no loadable weights. On a machine with "
            f"internet run `huggingface-cli download {hub_id_for(name) if source is None else name}` "
            f"(or copy the folder here and set crepa_mem_encoder_path=DIR)") from err
    except CrepaMemError:
        raise
    except Exception as err:  # noqa: BLE001 - an unsafe or corrupt pickle (UnpicklingError), a bad zip (RuntimeError)
        raise _unloadable(name, source, err) from err
    return model.eval().requires_grad_(False)


def _unloadable(name: str, source: Path | None, err: BaseException) -> EncoderNotAvailableError:
    detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return EncoderNotAvailableError(
        f"encoder {name!r}: the weights in {str(source)!r} cannot be loaded ({type(err).__name__}: {detail}); "
        f"replace them with a model.safetensors saved by save_pretrained (crepa-mem never runs a pickle's code)")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
