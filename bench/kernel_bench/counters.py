"""What the benchmarks count instead of time on a machine without a GPU: bytes and launches.

    TritonCounter     bytes loaded and stored by Triton kernels, counted lane by lane inside the
                      interpreter (TRITON_INTERPRET=1), masked-off lanes excluded; one launch per grid.
    DispatchCounter   every ATen op dispatched (a TorchDispatchMode): launches = ops that run a kernel,
                      bytes = the tensors each such op reads plus the tensors it writes.
    SavedCounter      bytes autograd keeps for backward (saved_tensors_hooks), by storage.

The two byte counts are not the same kind of figure, and the difference favours eager: the
interpreter sees every access a kernel makes (a two-pass kernel that reads x twice counts x twice),
while the dispatch counter charges each ATen op one read of its inputs and one write of its outputs,
whatever the op does inside (CPU/CUDA batch_norm reads x twice; it is counted once). So eager's
figure is a lower bound on its traffic, and the Triton figure is exact for the launch plan it ran.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ATen ops that run no kernel and move no data: allocation without initialisation, metadata, and
# host-side queries. Views are recognised from their schema (OpOverload.is_view), not listed here.
NO_KERNEL_OPS = frozenset(
    {
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::detach",
        "aten::lift_fresh",
        "aten::alias",
        "aten::_unsafe_view",
        "aten::_reshape_alias",
        "aten::set_",
        "aten::resize_",
        "aten::sym_size",
        "aten::sym_stride",
        "aten::sym_numel",
        "aten::sym_storage_offset",
        "aten::is_same_size",
        "aten::_has_compatible_shallow_copy_type",
        "aten::_local_scalar_dense",  # .item(): a device->host sync, counted apart as `syncs`
    }
)

# In-place ops that overwrite their destination without reading it (every other mutated argument
# is charged a read and a write: add_ reads what it adds to).
WRITE_ONLY_OPS = frozenset(
    {
        "aten::copy_",
        "aten::fill_",
        "aten::zero_",
        "aten::normal_",
        "aten::uniform_",
        "aten::random_",
        "aten::bernoulli_",
        "aten::exponential_",
        "aten::geometric_",
        "aten::cauchy_",
        "aten::log_normal_",
    }
)

# Ops that update arguments in place without saying so in their schema (no `(a!)`): BatchNorm's
# kernels write the running statistics.
UNDECLARED_WRITES = {
    "aten::native_batch_norm": ("running_mean", "running_var"),
    "aten::cudnn_batch_norm": ("running_mean", "running_var"),
    "aten::miopen_batch_norm": ("running_mean", "running_var"),
}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements `t` addresses: a broadcast (stride-0) dimension costs nothing."""
    if t.numel() == 0:
        return 0
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return distinct * t.element_size()


@dataclass
class Tally:
    """Counts over one region of code; `ops` maps a kernel or ATen op name to its launches."""

    read: int = 0
    written: int = 0
    launches: int = 0
    syncs: int = 0
    ops: Counter = field(default_factory=Counter)

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.read + other.read,
            self.written + other.written,
            self.launches + other.launches,
            self.syncs + other.syncs,
            self.ops + other.ops,
        )

    def as_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "read": self.read,
            "written": self.written,
            "launches": self.launches,
            "syncs": self.syncs,
            "ops": dict(self.ops),
        }


class DispatchCounter(TorchDispatchMode):
    """Counts the ATen ops below autograd: each one that runs a kernel is a launch; bytes as above.

    Composite ops (F.batch_norm, F.leaky_relu's wrappers) decompose before they reach this mode, so
    what is counted is what the backend runs: on CPU `native_batch_norm` + `leaky_relu` forward.
    `paused()` stops counting (the Triton interpreter's own host copies are not the kernel's work).
    """

    def __init__(self):
        super().__init__()
        self.tally = Tally()
        self._paused = 0

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._paused:
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out):
        name = func._schema.name
        if name == "aten::_local_scalar_dense":
            self.tally.syncs += 1
            return
        if func.is_view or name in NO_KERNEL_OPS:
            return
        self.tally.launches += 1
        self.tally.ops[name] += 1
        mutated = set()
        positional = dict(zip((a.name for a in func._schema.arguments), args))
        undeclared = UNDECLARED_WRITES.get(name, ())
        for arg in func._schema.arguments:
            value = kwargs.get(arg.name, positional.get(arg.name))
            tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            write = (arg.alias_info is not None and arg.alias_info.is_write) or arg.name in undeclared
            for t in tensors:
                if write:
                    mutated.add(id(t))
                    self.tally.written += tensor_bytes(t)
                    if name not in WRITE_ONLY_OPS:
                        self.tally.read += tensor_bytes(t)
                else:
                    self.tally.read += tensor_bytes(t)
        # An in-place or out= op returns its destination, already charged above.
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in mutated:
                self.tally.written += tensor_bytes(t)


class TritonCounter:
    """Counts Triton kernels run by the interpreter: bytes of unmasked lanes loaded / stored, launches.

    Wraps the interpreter builder's load/store (and atomic) ops for the duration of the `with` block.
    A launch is one grid; `dispatch` (a DispatchCounter) is paused while a kernel runs, because the
    interpreter copies arguments to and from host tensors around every launch.
    """

    def __init__(self, dispatch: DispatchCounter | None = None):
        self.tally = Tally()
        self.dispatch = dispatch
        self._saved = []

    def __enter__(self):
        from triton.runtime import interpreter as interp

        builder = interp.InterpreterBuilder
        tally = self.tally

        def lanes(ptrs, mask=None):
            width = ptrs.get_element_ty().primitive_bitwidth // 8
            if mask is None:
                return ptrs.data.size * width
            return int(np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape))) * width

        orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
        orig_rmw, orig_cas = builder.create_atomic_rmw, builder.create_atomic_cas
        orig_call = interp.GridExecutor.__call__
        dispatch = self.dispatch

        def create_masked_load(b, ptrs, mask, *args):
            tally.read += lanes(ptrs, mask)
            return orig_load(b, ptrs, mask, *args)

        def create_masked_store(b, ptrs, value, mask, *args):
            tally.written += lanes(ptrs, mask)
            return orig_store(b, ptrs, value, mask, *args)

        def create_atomic_rmw(b, op, ptr, val, mask, *args):
            n = lanes(ptr, mask)
            tally.read += n
            tally.written += n
            return orig_rmw(b, op, ptr, val, mask, *args)

        def create_atomic_cas(b, ptr, cmp, val, *args):
            n = lanes(ptr)
            tally.read += n
            tally.written += n
            return orig_cas(b, ptr, cmp, val, *args)

        def call(executor, *args, **kwargs):
            tally.launches += 1
            tally.ops[executor.fn.__name__] += 1
            with dispatch.paused() if dispatch is not None else contextlib.nullcontext():
                return orig_call(executor, *args, **kwargs)

        self._saved = [
            (builder, "create_masked_load", orig_load),
            (builder, "create_masked_store", orig_store),
            (builder, "create_atomic_rmw", orig_rmw),
            (builder, "create_atomic_cas", orig_cas),
            (interp.GridExecutor, "__call__", orig_call),
        ]
        builder.create_masked_load = create_masked_load
        builder.create_masked_store = create_masked_store
        builder.create_atomic_rmw = create_atomic_rmw
        builder.create_atomic_cas = create_atomic_cas
        interp.GridExecutor.__call__ = call
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)
        self._saved = []
        return False


@contextlib.contextmanager
def count_region(triton: bool = False):
    """Count everything in the block: ATen ops always, Triton kernels too when `triton`.

    Yields a callable returning the combined Tally (kernels + the ATen ops around them).
    """
    dispatch = DispatchCounter()
    tc = TritonCounter(dispatch) if triton else None
    with contextlib.ExitStack() as stack:
        if tc is not None:
            stack.enter_context(tc)
        stack.enter_context(dispatch)
        yield lambda: dispatch.tally + (tc.tally if tc is not None else Tally())


class SavedCounter:
    """Bytes autograd saves for backward, by distinct storage; `new_bytes` leaves out the storages of
    `exclude` (the op's inputs, which the caller keeps alive anyway): the extra activation memory."""

    def __init__(self, exclude=()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
        self._storages: dict[int, int] = {}
        self._hooks = None

    def __enter__(self):
        def pack(t):
            storage = t.untyped_storage()
            self._storages[storage.data_ptr()] = storage.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    @property
    def new_bytes(self) -> int:
        return sum(n for ptr, n in self._storages.items() if ptr not in self._exclude)
