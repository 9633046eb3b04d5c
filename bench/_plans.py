"""The one place the benchmarks reach into the kernels' internals: their launch plans, as planned for
MODEL_GPU, so that the interpreter on a CPU runs (and the counters count) what that GPU would launch.

Everything here goes through kernels._compile_report._op_modules(), the op modules by path; a change in
how the kernels plan their launches is adapted here and nowhere else in bench/.
"""

from __future__ import annotations

import contextlib

import torch
from _cases import BN, MODEL_GPU, Case


def _gpu_limits():
    """The launchers' planning limits on MODEL_GPU, (BN+LReLU, BCE): what `device_limits` returns on CUDA."""
    from kernels._compile_report import gpu_limits

    return gpu_limits(MODEL_GPU["sms"])


@contextlib.contextmanager
def planned_for_gpu():
    """Launch plans as on MODEL_GPU (grids sized for its SM count, GPU block sizes) while the
    interpreter runs them, so launches and partial-sum traffic are those of the GPU the model names.

    The launchers plan few, wide programs on CPU (the interpreter's cost is per program); the compile
    report records the GPU plan the same way.
    """
    from kernels import batch_norm_leaky_relu_plan, bce_with_logits_plan

    bn_limits, bce_limits = _gpu_limits()
    with batch_norm_leaky_relu_plan.limits_override(bn_limits), bce_with_logits_plan.limits_override(bce_limits):
        yield


def path_signature(case: Case):
    """What decides the Triton launch sequence for a shape: layout, fused/split, spatial extent."""
    from kernels._compile_report import _op_modules

    bn, bce = _op_modules()
    if case.op == BN:
        _, rows, n_rows, c, k = bn.layout_of(torch.empty(case.shape, device="meta"))
        fused = bn.plan(n_rows, c, k, rows, _gpu_limits()[0]).fused
        return rows, fused, None if rows else k
    return bce.plan(case.numel, _gpu_limits()[1]).grid[0] > 1
