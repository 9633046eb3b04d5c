#!/usr/bin/env python
"""Static GPU compile report: every registered op's kernels, at the launch configs its launchers choose, compiled
for sm_80 / sm_90 without a GPU; registers, stack, local memory and 128-bit loads read off the binary.

    python bench/compile_report.py [--arch 80 90] [--ops NAME ...] [--json out.json]

How: each op of `kernels.registry` runs its launchers on small CPU tensors of its `compile_cases`
(`launch_example`) while every one of its kernels is replaced by a recorder, so the report sees exactly the
arguments, constexprs and num_warps a real launch would use, planned for a 132-SM H100 (`LIMITS.gpu`). Each recorded
launch is specialised the way triton's JIT would (ints == 1 become constexprs, 16-divisible ints and 16-byte aligned
pointers get `tt.divisibility`) and compiled with `triton.compile(ASTSource(...), GPUTarget(...))`;
`cuobjdump --dump-resource-usage` (bundled with triton) reads the cubin.

TRITON_INTERPRET must be unset (interpreted kernels cannot be compiled): bench/kernels.py and the tests run it as a
subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # before bench/: bench/kernels.py would shadow the kernels package

import torch  # noqa: E402

from kernels import collectives, registry  # noqa: E402

H100_SMS = 132  # grids are planned for this many SMs (the split path's P depends on it)

_V4_LOAD = re.compile(r"ld\.global(?:\.[\w:]+)*\.v4\.")
_RESOURCE = re.compile(r"Function ([\w$]+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, fn, calls, label):
        self.fn, self.calls, self.label = fn, calls, label

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.label, self.fn, grid, args, kwargs))


@contextlib.contextmanager
def _recording(op, calls, label):
    """The op's kernels replaced by recorders; the collectives by a 2-rank world of identical ranks (the
    synchronised variants launch around them)."""
    stand_ins = [(mod, name, _Recorder(getattr(mod, name), calls, label)) for mod, name in op.jit_kernels()]
    stand_ins += [(collectives, "all_gather_stats", lambda stats, group=None: torch.stack([stats, stats])),
                  (collectives, "all_reduce_sum", lambda t, group=None: t * 2)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in stand_ins]
    try:
        for mod, name, stand_in in stand_ins:
            setattr(mod, name, stand_in)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def record_launches(ops=None, sms: int = H100_SMS):
    """Run every op's launchers on each of its compile cases with recording kernels, planned for a GPU with `sms`
    SMs; returns [(case label, fn, grid, args, kwargs)]. `ops`: default, every registered op."""
    calls = []
    for op in registry.ops() if ops is None else ops:
        impl = op.load()
        limits = impl.LIMITS.gpu(sms)
        for case in op.compile_cases:
            with _recording(op, calls, case.label):
                impl.launch_example(case.shape, case.dtype, case.variant, limits)
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


def compile_report(archs=(90, 80), ops=None) -> list[dict]:
    """One row per distinct (kernel, specialisation, arch), for `ops` (default: every registered op)."""
    from triton.runtime.jit import JITFunction

    rows, seen = [], set()
    for label, fn, grid, args, kwargs in record_launches(ops):
        if not isinstance(fn, JITFunction):
            raise RuntimeError("the compile report needs TRITON_INTERPRET unset (kernels are interpreted)")
        signature, constexprs, attrs, options = _specialise(fn, args, kwargs)
        key = (fn.__name__, str(sorted(signature.items())), str(sorted(constexprs.items())), str(attrs), str(options))
        if key in seen:
            continue
        seen.add(key)
        blocks = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k == "K_ALIGN"}
        flags = sorted(k for k, v in constexprs.items() if v is True)
        # "streams": the kernel reads its input (`X`, or `GRAD` in a backward) tile by tile -- where 128-bit loads
        # matter; the per-channel `*finalize*` kernels do not.
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
    parser.add_argument("--ops", nargs="+", choices=[op.name for op in registry.ops()], default=None,
                        help="default: every registered op")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile for a GPU", file=sys.stderr)
        return 2
    ops = None if args.ops is None else [registry.get(name) for name in args.ops]
    rows = compile_report(tuple(args.arch), ops)
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
