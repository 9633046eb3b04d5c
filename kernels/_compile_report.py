"""Static GPU compile report: every kernel, at the launch configs the launchers choose, compiled for
sm_80 / sm_90 without a GPU; registers, stack, local memory and 128-bit loads read off the binary.

    python -m kernels._compile_report [--arch 80 90] [--json out.json]

How: the launchers run on small CPU tensors of representative DCGAN shapes while every kernel is
replaced by a recorder, so the report sees exactly the arguments, constexprs and num_warps a real
launch would use (the split-path grid sized for a 132-SM H100). Each recorded launch is specialised
the way triton's JIT would (ints == 1 become constexprs, 16-divisible ints and 16-byte aligned
pointers get `tt.divisibility`) and compiled with `triton.compile(ASTSource(...), GPUTarget(...))`;
`cuobjdump --dump-resource-usage` (bundled with triton) reads the cubin.

TRITON_INTERPRET must be unset (interpreted kernels cannot be compiled): run it as a subprocess
from tests. bench/ reuses `compile_report()`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

H100_SMS = 132  # grids are planned for this many SMs (the split path's P depends on it)

# (label, op, shape, dtype, variant): the generator's BN+LReLU layers of the 28x28 DCGAN at batch 64, 128 and 256
# (the fused path at its largest tiles, aligned and not; the split path in both layouts), bf16, eval and sync
# variants, and the D losses.
CASES = [
    ("G.project (64,12544)", "bn", (64, 12544), torch.float32, "train"),
    ("G.project (256,12544)", "bn", (256, 12544), torch.float32, "train"),
    ("G.bn1 (64,128,7,7)", "bn", (64, 128, 7, 7), torch.float32, "train"),
    ("G.bn1 (128,128,7,7)", "bn", (128, 128, 7, 7), torch.float32, "train"),
    ("G.bn1 (256,128,7,7)", "bn", (256, 128, 7, 7), torch.float32, "train"),
    ("G.bn2 (64,64,14,14)", "bn", (64, 64, 14, 14), torch.float32, "train"),
    ("G.bn2 (128,64,14,14)", "bn", (128, 64, 14, 14), torch.float32, "train"),
    ("G.bn2 (64,64,14,14) bf16", "bn", (64, 64, 14, 14), torch.bfloat16, "train"),
    ("G.bn2 (128,64,14,14) bf16", "bn", (128, 64, 14, 14), torch.bfloat16, "train"),
    ("G.bn1 (128,128,7,7) bf16", "bn", (128, 128, 7, 7), torch.bfloat16, "train"),
    ("G.project (256,12544) bf16", "bn", (256, 12544), torch.bfloat16, "train"),
    ("(256,64,28,28) channels_last", "bn", (256, 64, 28, 28), torch.float32, "channels_last"),
    ("G.bn2 (128,64,14,14) eval", "bn", (128, 64, 14, 14), torch.float32, "eval"),
    ("G.bn2 (64,64,14,14) sync", "bn", (64, 64, 14, 14), torch.float32, "sync"),
    ("D loss (128,)", "dloss", (128,), torch.float32, ""),
    ("G loss (64,)", "bce", (64,), torch.float32, "mean"),
    ("bce none (64,)", "bce", (64,), torch.float32, "none"),
    ("bce mean (1<<20,) bf16", "bce_t", (1 << 20,), torch.bfloat16, "mean"),
]

_V4_LOAD = re.compile(r"ld\.global(?:\.[\w:]+)*\.v4\.")
_RESOURCE = re.compile(r"Function ([\w$]+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _op_modules():
    # The op modules share their names with kernels' public functions (`kernels.batch_norm_leaky_relu`
    # is the function), so they are fetched by module path.
    return (
        importlib.import_module(f"{__package__}.batch_norm_leaky_relu"),
        importlib.import_module(f"{__package__}.bce_with_logits"),
    )


def kernel_modules():
    """The modules holding the @triton.jit kernels (what the recorders stand in for)."""
    return (
        importlib.import_module(f"{__package__}.batch_norm_leaky_relu_kernels"),
        importlib.import_module(f"{__package__}.bce_with_logits_kernels"),
    )


def kernel_names(module) -> list[str]:
    return [n for n in dir(module) if n.startswith(("_bnlr_", "_bce_")) and n.endswith("_kernel")]


def gpu_limits(sms: int = H100_SMS):
    """The planning limits of a GPU with `sms` SMs, for both ops: (BN+LReLU limits, BCE limits)."""
    from .batch_norm_leaky_relu_plan import DeviceLimits
    from .bce_with_logits_plan import BCELimits

    return DeviceLimits.gpu(sms), BCELimits.gpu(sms)


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, fn, calls, case):
        self.fn, self.calls, self.case = fn, calls, case

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.case[0], self.fn, grid, args, kwargs))


@contextlib.contextmanager
def _recording(calls, case):
    """Kernels replaced by recorders; the synchronised BN's collectives by a 2-rank world of identical ranks."""
    from . import collectives

    patches = [(mod, name) for mod in kernel_modules() for name in kernel_names(mod)]
    patches += [(collectives, "all_gather_stats"), (collectives, "all_reduce_sum")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in patches]
    try:
        for mod, name, fn in saved:
            if name.endswith("_kernel"):
                setattr(mod, name, _Recorder(fn, calls, case))
        collectives.all_gather_stats = lambda stats, group=None: torch.stack([stats, stats])
        collectives.all_reduce_sum = lambda t, group=None: t * 2
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _record_bn(bn, shape, dtype, variant, limits):
    c = shape[1]
    x = torch.empty(shape, dtype=dtype)
    if variant == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(c), torch.zeros(c)
    rm, rv, nbt = torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long)
    training = variant != "eval"
    group = object() if variant == "sync" else None
    _, saved = bn.batch_norm_leaky_relu_forward(x, w, b, rm, rv, training, 0.1, 1e-5, 0.2, nbt, group, limits=limits)
    xv = bn.layout_of(x)[0]
    bn.batch_norm_leaky_relu_backward(torch.empty_like(xv), xv, saved, training, 0.2, (True, True, True), w.dtype,
                                      b.dtype, group, limits=limits)


def _record_bce(bce, op, shape, dtype, variant, limits):
    x = torch.empty(shape, dtype=dtype)
    m = x.numel()
    if op == "dloss":
        half = m // 2
        bce.bce_forward(x, None, half, 1.0, 0.0, 1 / half, 1 / (m - half), False, True, True, True, limits=limits)
        bce.bce_backward(torch.empty(shape), torch.empty(()), dtype, limits=limits)
    else:
        target = torch.empty_like(x) if op == "bce_t" else 1.0
        reduce = variant != "none"
        bce.bce_forward(x, target, m, 1.0, 1.0, 1.0 / m, 1.0 / m, not reduce, True, reduce, False, limits=limits)
        go = torch.empty(()) if reduce else torch.empty(shape)
        bce.bce_backward(torch.empty(shape), go, dtype, limits=limits)


def record_launches(cases=CASES, sms: int = H100_SMS):
    """Run the launchers on every case with recording kernels, planned for a GPU with `sms` SMs;
    returns [(case, fn, grid, args, kwargs)]."""
    bn, bce = _op_modules()
    bn_limits, bce_limits = gpu_limits(sms)
    calls = []
    for case in cases:
        _label, op, shape, dtype, variant = case
        with _recording(calls, case):
            if op == "bn":
                _record_bn(bn, shape, dtype, variant, bn_limits)
            else:
                _record_bce(bce, op, shape, dtype, variant, bce_limits)
    return calls


def _specialise(fn, args, kwargs):
    """(signature, constexprs, attrs, options) as triton's JIT would build them for this call."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in options})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":
            signature[param.name] = "constexpr"
            constexprs[param.name] = spec
        else:
            signature[param.name] = ty
            if spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs, options


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_one(fn, signature, constexprs, attrs, options, arch: int) -> dict:
    """Compile for sm_<arch>; returns registers, stack and local bytes (spills) and the static shared memory from
    the cubin (cuobjdump's SHARED), the dynamic shared memory Triton launches the kernel with (its metadata:
    reduction and layout-conversion scratch) and the PTX load widths."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
    match = _RESOURCE.search(dump.replace("\n", " "))
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{dump}")
    reg, stack, static_shared, local = (int(v) for v in match.groups()[1:])
    return {
        "regs": reg,
        "stack": stack,
        "shared": int(compiled.metadata.shared),
        "static_shared": static_shared,
        "local": local,
        "v4_loads": len(_V4_LOAD.findall(ptx)),
        "loads": ptx.count("ld.global"),
    }


def compile_report(archs=(90, 80), cases=CASES) -> list[dict]:
    """One row per distinct (kernel, specialisation, arch)."""
    bn, _ = _op_modules()
    if bn.INTERPRET:
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (kernels are interpreted)")
    rows, seen = [], set()
    for label, fn, grid, args, kwargs in record_launches(cases):
        signature, constexprs, attrs, options = _specialise(fn, args, kwargs)
        key = (fn.__name__, str(sorted(signature.items())), str(sorted(constexprs.items())), str(attrs), str(options))
        if key in seen:
            continue
        seen.add(key)
        blocks = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k == "K_ALIGN"}
        flags = sorted(k for k, v in constexprs.items() if v is True)
        # "streams": the kernel reads x (or the logits) tile by tile -- where 128-bit loads matter.
        # "aligned": every pointer is 16-byte aligned and rows start 16-byte aligned, so they are legal.
        dtype = next((signature[p.name][1:] for p in fn.params if p.name in ("X", "GRAD")), "")
        itemsize = {"fp32": 4, "bf16": 2, "fp16": 2}.get(dtype, 4)
        ptr_idx = [i for i, p in enumerate(fn.params) if signature[p.name].startswith("*")]
        aligned = all((i,) in attrs for i in ptr_idx) and constexprs.get("K_ALIGN", 16) * itemsize >= 16
        streams = "finalize" not in fn.__name__
        for arch in archs:
            res = compile_one(fn, signature, constexprs, attrs, options, arch)
            rows.append(dict(kernel=fn.__name__, case=label, arch=arch, grid=list(grid),
                             num_warps=options.get("num_warps", 4), blocks=blocks, flags=flags, dtype=dtype,
                             aligned=aligned, streams=streams, **res))
    return rows


def markdown(rows) -> str:
    """One line per (kernel, case, specialisation), registers side by side for each arch."""
    merged: dict = {}
    for r in rows:
        key = (r["kernel"], r["case"], str(r["blocks"]), str(r["flags"]))
        merged.setdefault(key, {"row": r, "arch": {}})["arch"][r["arch"]] = r
    archs = sorted({r["arch"] for r in rows})
    head = " | ".join(f"regs sm_{a}" for a in archs)
    lines = [
        f"| kernel | case | warps | blocks | {head} | stack / local | shared B (dynamic) | ld.global.v4 / ld.global |",
        "|---|---|---|---|" + "---|" * len(archs) + "---|---|---|",
    ]
    for entry in merged.values():
        r, per_arch = entry["row"], entry["arch"]
        blocks = " ".join(f"{k}={v}" for k, v in r["blocks"].items())
        regs = " | ".join(str(per_arch[a]["regs"]) if a in per_arch else "" for a in archs)
        spill = max(x["stack"] + x["local"] for x in per_arch.values())
        shared = max(x["shared"] for x in per_arch.values())
        lines.append(
            f"| `{r['kernel']}` | {r['case']} | {r['num_warps']} | {blocks} | {regs} | "
            f"{'0 / 0' if spill == 0 else 'SPILLS'} | {shared} | {r['v4_loads']} / {r['loads']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile for a GPU", file=sys.stderr)
        return 2
    rows = compile_report(tuple(args.arch))
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
