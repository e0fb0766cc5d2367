"""A fake GPU on a CPU: fake tensors on `cuda:0`, with the live storage bytes of every device counted.

`fake_gpu()` is the runtime `crepa-mem trace` measures in: torch's FakeTensorMode (shapes, dtypes
and devices, no data, no compute) with a TorchDispatchMode on top that sees every tensor an op
creates, counts its storage once, and subtracts it when the storage dies (REFERENCE §6). The
compute device is a fake `cuda:0`, which FakeTensorMode supports on a CPU-only build; the host is
the (fake) CPU. Nothing is approximated: the bytes are those of the tensors the real code creates.

A CPU-only torch cannot run a few things on fake CUDA tensors, and this file works around exactly
those, for the duration of the block only:
- Hand-written Python bindings that take a CUDA device guard before dispatching
  (`Tensor.contiguous` of a non-contiguous tensor, `Tensor.copy_`, `Tensor.__setitem__`) are routed
  to the same aten ops, which dispatch through the fake mode without a guard.
- `param.data = x` swaps the storage but FakeTensor keeps its device in a Python attribute; the
  setter is wrapped to carry the device across (what a real tensor does by itself).
- nn.Module.to (and .float) on fake parameters takes a swap_tensors path that fails in torch 2.13; under the trace
  it moves tensors with `.data =`, which is what Module.to does for ordinary tensors.
- Scaled-dot-product attention on a CPU-only build decomposes to the math kernel, which materialises
  the (L × L) score matrix; a GPU runs the fused memory-efficient kernel, which does not. Attention
  on the fake GPU is sent to that fused kernel's own meta implementation.
- The autograd engine of a CPU-only build aborts on a CUDA tensor (it takes a device guard), so the
  loss and its backward run on fake *CPU* tensors inside `tracker.count_as("cpu", FAKE_GPU)`: every
  storage made there is counted on the fake GPU, where the real call makes it (the host's own bytes,
  made before, stay on the host).
- Fake tensors hold no values: a Python scalar read (`.item()`, `bool(t)`) returns 1.0 (a value nothing
  divides by zero over, e.g. AdamW's step count in `1 - beta ** step`), or for a
  bool: False for the result of `any`, True otherwise ("all finite", "no NaN"), so data-dependent
  checks take the path of a healthy step.
Not modelled: cuDNN/cuBLAS workspaces and the caching allocator's fragmentation (the allocator's
reserved bytes exceed the live bytes counted here).
"""
from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

FAKE_GPU = torch.device("cuda", 0)


class LiveBytes(TorchDispatchMode):
    """Sums the bytes of live storages per device; keeps the peak per device and per phase."""

    def __init__(self, budget: dict[str, int] | None = None) -> None:
        super().__init__()
        self.budget = dict(budget or {})  # device → bytes: a simulated card; passing it raises OutOfMemoryError
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self._refs: dict[int, weakref.ref] = {}
        self._phases: list[tuple[str, dict[str, int]]] = []
        self.phase_peaks: dict[str, dict[str, int]] = {}
        self._alias: dict[str, str] = {}
        self._falsy: dict[int, weakref.ref] = {}  # outputs of `any`, by id (a WeakSet would compare tensors)
        self.h2d: dict[str, int] = defaultdict(int)  # host → device bytes copied, by phase (and "all")

    # -- bookkeeping
    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs:
            return
        dev, n = str(t.device), st.nbytes()
        dev = self._alias.get(dev, dev)
        if dev in self.budget and self.live[dev] + n > self.budget[dev]:  # checked before counting it
            raise torch.OutOfMemoryError(f"simulated out of memory on {dev}: {self.live[dev]} B live + {n} B "
                                         f"> budget {self.budget[dev]} B")
        self._add(dev, n)
        self._refs[key] = weakref.ref(st, lambda _r, key=key, dev=dev, n=n: self._gone(key, dev, n))

    def _add(self, dev: str, n: int) -> None:
        self.live[dev] += n
        if self.live[dev] > self.peak[dev]:
            self.peak[dev] = self.live[dev]
        for _, peaks in self._phases:
            if self.live[dev] > peaks.get(dev, 0):
                peaks[dev] = self.live[dev]

    def _gone(self, key: int, dev: str, n: int) -> None:
        self._refs.pop(key, None)
        self.live[dev] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # no values under the trace (see above)
            t = args[0]
            if t.dtype != torch.bool:
                return 1.0
            ref = self._falsy.get(id(t))
            return not (ref is not None and ref() is t)
        out = func(*args, **(kwargs or {}))
        if func in _ANY:
            self._falsy[id(out)] = weakref.ref(out, lambda _r, k=id(out): self._falsy.pop(k, None))
        elif func in _COPIES:
            self._count_h2d(func, args, out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def _count_h2d(self, func, args, out) -> None:
        src, dst = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
        if isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst.device.type == "cuda":
            n = src.numel() * src.element_size()
            self.h2d["all"] += n
            for name, _ in self._phases:
                self.h2d[name] += n

    @contextlib.contextmanager
    def count_as(self, source: torch.device | str, target: torch.device | str) -> Iterator[None]:
        """Storages made on `source` inside the block are counted on `target` (see the module docstring)."""
        src, dst = str(torch.device(source)), str(torch.device(target))
        saved = self._alias.get(src)
        self._alias[src] = dst
        try:
            yield
        finally:
            if saved is None:
                self._alias.pop(src)
            else:
                self._alias[src] = saved

    # -- queries
    def live_bytes(self, device: torch.device | str = FAKE_GPU) -> int:
        return self.live.get(str(torch.device(device)), 0)

    def peak_bytes(self, device: torch.device | str = FAKE_GPU) -> int:
        return self.peak.get(str(torch.device(device)), 0)

    def reset_peak(self) -> None:
        self.peak = defaultdict(int, self.live)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, int]]:
        """Peak live bytes per device while the block runs (starting from what is live on entry)."""
        peaks = dict(self.live)
        self._phases.append((name, peaks))
        try:
            yield peaks
        finally:
            self._phases.remove((name, peaks))
            self.phase_peaks[name] = peaks


_ANY = (torch.ops.aten.any.default, torch.ops.aten.any.dim, torch.ops.aten.any.dims)
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


@contextlib.contextmanager
def _fused_attention_on_gpu() -> Iterator[None]:
    """F.scaled_dot_product_attention on the fake GPU → the fused memory-efficient kernel's meta.
    (The attribute is swapped rather than a TorchFunctionMode installed: a mode would sit on every
    torch call of the trace, and diffusers/transformers look the function up on `F` at call time.)"""
    original = F.scaled_dot_product_attention

    def sdpa(query, *args, **kwargs):
        if query.device.type == "cuda":
            return _efficient_attention(query, *args, **kwargs)
        return original(query, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale)
    return out[0]


def _index(t: torch.Tensor, index) -> torch.Tensor:
    """`t[index]` through aten ops, as torch's own applySlicing does: basic indices become
    select / slice / unsqueeze views, then any tensor indices one aten.index call."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is Ellipsis for i in items):
        at = next(k for k, i in enumerate(items) if i is Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (t.dim() - used)
    out, dim, advanced = t, 0, {}
    for item in items:
        if item is None:
            out = torch.ops.aten.unsqueeze.default(out, dim)
            dim += 1
        elif isinstance(item, bool) or (isinstance(item, torch.Tensor) and item.dtype == torch.bool):
            raise IndexError("boolean masks are data-dependent and cannot be traced")
        elif isinstance(item, int):
            out = torch.ops.aten.select.int(out, dim, item)
        elif isinstance(item, slice):
            step = 1 if item.step is None else item.step
            out = torch.ops.aten.slice.Tensor(out, dim, item.start, item.stop, step)
            dim += 1
        else:  # a tensor or a list of ints: advanced indexing
            idx = item if isinstance(item, torch.Tensor) else torch.tensor(item, device=t.device)
            advanced[dim] = idx.to(t.device) if idx.device != t.device else idx
            dim += 1
    if advanced:
        indices = [advanced.get(d) for d in range(max(advanced) + 1)]
        out = torch.ops.aten.index.Tensor(out, indices)
    return out


@contextlib.contextmanager
def _cuda_binding_shims() -> Iterator[None]:
    from torch._subclasses.fake_tensor import FakeTensor

    base_data = torch._C.TensorBase.data
    saved = {name: torch.Tensor.__dict__.get(name) for name in ("contiguous", "copy_", "__getitem__", "__setitem__")}
    saved_fake_data = FakeTensor.__dict__.get("data")
    saved_module_to, saved_module_float = torch.nn.Module.to, torch.nn.Module.float
    orig_getitem, orig_setitem = torch._C.TensorBase.__getitem__, torch._C.TensorBase.__setitem__

    def contiguous(self, memory_format=torch.contiguous_format):
        if self.is_contiguous(memory_format=memory_format):
            return self
        return torch.ops.aten.clone.default(self, memory_format=memory_format)

    def copy_(self, src, non_blocking=False):
        return torch.ops.aten.copy_.default(self, src, non_blocking)

    def getitem(self, index):
        if self.device.type != "cuda":
            return orig_getitem(self, index)
        return _index(self, index)

    def setitem(self, index, value):
        if self.device.type != "cuda":
            return orig_setitem(self, index, value)
        view = _index(self, index)
        if view.untyped_storage()._cdata != self.untyped_storage()._cdata:  # advanced indexing
            return orig_setitem(self, index, value)
        if isinstance(value, torch.Tensor):
            torch.ops.aten.copy_.default(view, value)
        else:
            torch.ops.aten.fill_.Scalar(view, value)

    def get_data(self):
        return base_data.__get__(self)

    def set_data(self, new):
        base_data.__set__(self, new)
        if isinstance(new, FakeTensor):
            self.fake_device = new.fake_device

    def module_to(self, *args, **kwargs):
        from crepa_mem.teacher.placement import move_module

        device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
        return move_module(self, device, dtype)

    torch.Tensor.contiguous, torch.Tensor.copy_ = contiguous, copy_
    torch.Tensor.__getitem__, torch.Tensor.__setitem__ = getitem, setitem
    FakeTensor.data = property(get_data, set_data)
    def module_float(self):
        from crepa_mem.teacher.placement import move_module

        return move_module(self, dtype=torch.float32)

    torch.nn.Module.to, torch.nn.Module.float = module_to, module_float
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, value)
        if saved_fake_data is None:
            del FakeTensor.data
        else:
            FakeTensor.data = saved_fake_data
        torch.nn.Module.to, torch.nn.Module.float = saved_module_to, saved_module_float


class _Values(list):
    def tolist(self) -> list:
        return list(self)


@contextlib.contextmanager
def _real_frame_selection() -> Iterator[None]:
    """The teacher turns SimpleTuner's frame selection (a linspace) into Python ints; fake tensors
    carry no values, so under the trace it is computed for real, by the same function, and handed
    back as the values (`.tolist()` is all the teacher reads)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from crepa_mem.teacher import path as teacher
    from crepa_mem.loss import temporal_indices

    def real_indices(source_frames: int, target_frames: int, device=None):
        with unset_fake_temporarily():
            values = temporal_indices(source_frames, target_frames).tolist()
        return _Values(values)

    saved = teacher.temporal_indices
    teacher.temporal_indices = real_indices
    try:
        yield
    finally:
        teacher.temporal_indices = saved


@contextlib.contextmanager
def fake_gpu(budget_bytes: int | None = None) -> Iterator[LiveBytes]:
    """Run the block on fake tensors with a fake `cuda:0`; yields the byte counter. With `budget_bytes`
    the fake GPU has that much memory: an op whose output would pass it raises torch.OutOfMemoryError."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    tracker = LiveBytes(None if budget_bytes is None else {str(FAKE_GPU): budget_bytes})
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with _cuda_binding_shims(), _real_frame_selection(), mode, tracker, \
            _fused_attention_on_gpu(), torch.no_grad():
        yield tracker


def materialize(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Give a module built on `meta` fresh (fake) storage on `device`, frozen; call inside `fake_gpu()`."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                want = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
                sub._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=want, device=device),
                                                           requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                want = dtype if (dtype is not None and b.is_floating_point()) else b.dtype
                sub._buffers[name] = torch.empty(b.shape, dtype=want, device=device)
    return module.eval()
