"""Capture the output of one DiT block as (B, T', h'·w', D) tokens, frame-major then row then column.

Two hooks per capture: a forward pre-hook on the transformer reads the latent shape (→ the token
grid T', h', w') and arms the capture; a forward hook on block i keeps that block's output — one
tensor, not every block's (SimpleTuner keeps them all). Under diffusers' default (non-reentrant)
gradient checkpointing the tensor the hook sees is the one the next block consumes, so its
gradient reaches blocks 0..i. The capture disarms when the transformer's forward returns, so the
block re-running during checkpoint recomputation in backward never overwrites it.
"""
from __future__ import annotations

import inspect
import operator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from crepa_mem.errors import CaptureError

# B batch, N tokens, D width, T'/h'/w' the token grid (latent grid ÷ patch size).

SUPPORTED_FAMILIES = ("wan", "ltxvideo", "sanavideo", "kandinsky5_video")

# class name (anywhere in the MRO, so trainers' own copies and subclasses match) → family
_CLASS_FAMILY = {
    "WanTransformer3DModel": "wan",
    "WanVACETransformer3DModel": "wan",
    "LTXVideoTransformer3DModel": "ltxvideo",
    "SanaVideoTransformer3DModel": "sanavideo",
    "Kandinsky5Transformer3DModel": "kandinsky5_video",
}
_BLOCKS_ATTR = {
    "wan": "blocks",
    "ltxvideo": "transformer_blocks",
    "sanavideo": "transformer_blocks",
    "kandinsky5_video": "visual_transformer_blocks",
}

_NOT_RETURNED = (
    "CREPA requested hidden states from layer {i} but none were returned. "
    "Check that crepa_block_index is within the model's block count."
)


@dataclass(frozen=True)
class FamilySpec:
    family: str
    blocks_attr: str
    num_blocks: int
    hidden_size: int
    patch_size: tuple[int, int, int]  # (t, h, w)


def _family_of(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls.__name__ in _CLASS_FAMILY:
            return _CLASS_FAMILY[cls.__name__]
    return None


def unwrap(transformer: nn.Module) -> nn.Module:
    """The bare diffusers transformer inside torch.compile / PEFT / DDP / accelerate wrappers."""
    model = transformer
    for _ in range(8):  # wrappers nest a few levels at most
        if _family_of(model) is not None:
            return model
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(getattr(model, "base_model", None), "model", None), nn.Module):  # PeftModel
            model = model.base_model.model
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, DataParallel, DeepSpeed
            model = model.module
        else:
            break
    return model


def _unsupported(transformer: Any) -> CaptureError:
    return CaptureError(
        f"CREPA cannot capture hidden states from {type(transformer).__name__}: "
        f"supported families are {', '.join(SUPPORTED_FAMILIES)} "
        f"({', '.join(sorted(_CLASS_FAMILY))})"
    )


def hidden_size_of(transformer: nn.Module) -> int:
    """Width D of the block outputs: heads × head_dim (Kandinsky 5: model_dim)."""
    config = getattr(unwrap(transformer), "config", None)
    try:
        if _family_of(unwrap(transformer)) == "kandinsky5_video":
            return int(config["model_dim"])
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    except (TypeError, KeyError, ValueError) as exc:
        raise CaptureError("CREPA enabled but unable to infer transformer hidden size.") from exc


def family_spec(transformer: nn.Module) -> FamilySpec:
    """Family facts read from the (unwrapped) model; CaptureError for an unsupported model."""
    model = unwrap(transformer)
    family = _family_of(model)
    if family is None:
        raise _unsupported(transformer)
    config = model.config
    if family == "ltxvideo":
        patch = (int(config["patch_size_t"]), int(config["patch_size"]), int(config["patch_size"]))
    else:
        patch = tuple(int(p) for p in config["patch_size"])
    blocks_attr = _BLOCKS_ATTR[family]
    return FamilySpec(
        family=family,
        blocks_attr=blocks_attr,
        num_blocks=len(getattr(model, blocks_attr)),
        hidden_size=hidden_size_of(model),
        patch_size=patch,  # type: ignore[arg-type]
    )


def _block_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _grid_from_coords(video_coords: Tensor) -> tuple[int, int, int]:
    """LTX called with explicit (B, 3, N) coordinates instead of num_frames/height/width."""
    coords = video_coords[0]
    return tuple(int(torch.unique(coords[axis]).numel()) for axis in range(3))  # type: ignore[return-value]


class ForwardScopedHooks:
    """Forward hooks on some blocks that fire only inside the model's own forward.

    Armed by the model's forward pre-hook and disarmed when that forward returns (always, even on error), so a
    block rerun outside it — recomputation in backward under gradient checkpointing — never overwrites what the
    forward kept. `on_forward(module, args, kwargs)` runs first at each model forward; `on_block(index, output)`
    for each hooked block's output while armed. One mechanism for `BlockCapture` and hook-style adapters."""

    def __init__(self, model: nn.Module, blocks: dict[int, nn.Module], *, on_forward, on_block):
        self.armed = False
        self._on_forward, self._on_block = on_forward, on_block
        self._handles = [model.register_forward_pre_hook(self._arm, with_kwargs=True),
                         model.register_forward_hook(self._disarm, always_call=True)]
        for index, block in blocks.items():
            self._handles.append(block.register_forward_hook(self._block_hook(index)))

    def _arm(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._on_forward(module, args, kwargs)
        self.armed = True

    def _disarm(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.armed = False

    def _block_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.armed:
                self._on_block(index, output)

        return hook

    def remove(self) -> None:
        """Remove every hook; safe to call more than once."""
        while self._handles:
            self._handles.pop().remove()
        self.armed = False


class BlockCapture:
    """Keeps the output of one DiT block (and optionally a teacher block, detached) from the
    latest transformer forward. Persistent: hooks stay until `remove()`."""

    def __init__(self, transformer: nn.Module, block_index: int, *, teacher_block_index: int | None = None):
        self.spec = family_spec(transformer)
        self.block_index = self._check_index(block_index)
        self.teacher_block_index = None if teacher_block_index is None else self._check_index(teacher_block_index)
        self._model = unwrap(transformer)
        # the class's forward: accelerate may replace the instance's with a (*args, **kwargs) wrapper
        self._arg_names = list(inspect.signature(type(self._model).forward).parameters)[1:]
        self.clear()
        self._removed = False
        blocks = getattr(self._model, self.spec.blocks_attr)
        self._hooks = ForwardScopedHooks(
            self._model, {i: blocks[i] for i in {self.block_index, self.teacher_block_index} - {None}},
            on_forward=self._on_forward, on_block=self._on_block)

    def _check_index(self, index: int) -> int:
        n = self.spec.num_blocks
        try:
            valid = not isinstance(index, bool) and 0 <= operator.index(index) < n
        except TypeError:
            valid = False
        if not valid:
            raise CaptureError(
                f"hidden states not returned: {self.spec.family} transformer has {n} blocks, valid block "
                f"indices are 0..{n - 1}, got {index!r}. " + _NOT_RETURNED.format(i=index)
            )
        return operator.index(index)

    # ------------------------------------------------------------------ hooks

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.clear()
        self._forward_ran = True
        self._grad_at_forward = torch.is_grad_enabled()
        inputs = dict(zip(self._arg_names, args), **kwargs)
        self._grid, self._fractal = self._grid_of(inputs)

    def _grid_of(self, inputs: dict[str, Any]) -> tuple[tuple[int, int, int], bool]:
        pt, ph, pw = self.spec.patch_size
        family = self.spec.family
        if family == "ltxvideo":  # packed (B, N, C) tokens; the grid comes as arguments
            f, h, w = inputs.get("num_frames"), inputs.get("height"), inputs.get("width")
            if any(v is None for v in (f, h, w)):
                if inputs.get("video_coords") is None:
                    raise CaptureError(
                        "LTX-Video forward called without num_frames/height/width or video_coords: "
                        "the token grid of the captured hidden states is unknown"
                    )
                return _grid_from_coords(inputs["video_coords"]), False
            return (int(f) // pt, int(h) // ph, int(w) // pw), False
        latents = inputs["hidden_states"]
        if family == "kandinsky5_video":  # channels last: (B, T, H, W, C)
            _, t, h, w, _ = latents.shape
            sparse = inputs.get("sparse_params")
            return (t // pt, h // ph, w // pw), bool(sparse and sparse.get("to_fractal"))
        _, _, t, h, w = latents.shape  # Wan, Sana: (B, C, T, H, W)
        return (t // pt, h // ph, w // pw), False

    def _on_block(self, index: int, output: Any) -> None:
        hidden = _block_output(output)
        if not isinstance(hidden, Tensor):
            return
        if (
            index == self.block_index
            and self._raw is None
            and self._grad_at_forward
            and not torch.is_grad_enabled()
            and not hidden.requires_grad
        ):
            self._reentrant = True  # inside a use_reentrant=True checkpoint: no gradient path
        if index == self.block_index and self._raw is None:
            self._raw = hidden
        if index == self.teacher_block_index and self._teacher_raw is None:
            self._teacher_raw = hidden.detach()

    # ------------------------------------------------------------------ results

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T', h', w') of the latest forward."""
        if self._grid is None:
            raise CaptureError("no transformer forward has run since the capture was set up or cleared")
        return self._grid

    @property
    def hidden_states(self) -> Tensor:
        """Block `block_index`'s output (B, T', h'·w', D) from the latest forward, gradient attached."""
        if not self._forward_ran:
            raise CaptureError(self._no_forward_message())
        if self._raw is None:
            raise CaptureError(_NOT_RETURNED.format(i=self.block_index))
        if self._reentrant:
            raise CaptureError(
                f"block {self.block_index}'s output was produced inside reentrant gradient checkpointing "
                "(use_reentrant=True) and carries no gradient; use transformer.enable_gradient_checkpointing() "
                "with its default (non-reentrant) checkpoint function"
            )
        if self._hidden is None:
            self._hidden = self._to_frames(self._raw)
            self._raw = self._hidden  # a K5 un-grouping copies: keep one tensor, not two
        return self._hidden

    @property
    def teacher_states(self) -> Tensor | None:
        """Block `teacher_block_index`'s output (B, T', h'·w', D), detached; None if not asked."""
        if self.teacher_block_index is None:
            return None
        if self._teacher_raw is None:
            if not self._forward_ran:
                raise CaptureError(self._no_forward_message())
            raise CaptureError(_NOT_RETURNED.format(i=self.teacher_block_index))
        if self._teacher is None:
            self._teacher = self._to_frames(self._teacher_raw)
            self._teacher_raw = self._teacher
        return self._teacher

    def _no_forward_message(self) -> str:
        if self._removed:
            return ("hidden states not returned: no transformer forward ran while the capture was active "
                    "(run the forward inside the `with capture_hidden_states(...)` block)")
        return "hidden states not returned: no transformer forward has run since the capture was set up or cleared"

    def _to_frames(self, hidden: Tensor) -> Tensor:
        t, h, w = self.grid
        batch, tokens = hidden.shape[0], hidden.shape[1]
        if hidden.ndim != 3 or tokens != t * h * w:
            raise CaptureError(
                f"{self.spec.family} block output has shape {tuple(hidden.shape)}, expected "
                f"(B, {t}·{h}·{w} = {t * h * w}, D) for the token grid {self.grid}"
            )
        if self._fractal:
            hidden = _unfractal(hidden, (batch, t, h, w))
        return hidden.reshape(batch, t, h * w, hidden.shape[-1])

    def clear(self) -> None:
        """Drop the kept tensors (call after the loss is computed to free them early)."""
        self._raw: Tensor | None = None
        self._teacher_raw: Tensor | None = None
        self._hidden: Tensor | None = None
        self._teacher: Tensor | None = None
        self._grid: tuple[int, int, int] | None = None
        self._fractal = False
        self._forward_ran = False
        self._grad_at_forward = False
        self._reentrant = False

    def remove(self, *, keep_results: bool = False) -> None:
        """Remove every hook; safe to call more than once. keep_results keeps the latest forward's
        tensors readable (what the `with` block does on exit)."""
        self._hooks.remove()
        self._removed = True
        if not keep_results:
            self.clear()


def _unfractal(hidden: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """Kandinsky 5 sparse attention orders tokens by 8×8 block per frame; diffusers'
    fractal_unflatten is that order's exact inverse → (B, T', h', w', D), raster order."""
    from diffusers.models.transformers.transformer_kandinsky import fractal_unflatten

    _, _, h, w = shape
    if h % 8 or w % 8:
        raise CaptureError(f"Kandinsky 5 sparse attention needs a token grid divisible by 8, got {h}×{w}")
    return fractal_unflatten(hidden, shape, block_mask=True)


@contextmanager
def capture_hidden_states(
    transformer: nn.Module, block_index: int, *, teacher_block_index: int | None = None
) -> Iterator[BlockCapture]:
    """`with capture_hidden_states(dit, 8) as cap: dit(**inputs)`, then `cap.hidden_states`: the hooks go on
    exit, the last forward's result stays readable (until `cap.clear()`)."""
    capture = BlockCapture(transformer, block_index, teacher_block_index=teacher_block_index)
    try:
        yield capture
    finally:
        capture.remove(keep_results=True)
