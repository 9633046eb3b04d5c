"""The one place the benchmarks reach into the kernels' launch plans: as planned for MODEL_GPU, so that the
interpreter on a CPU runs (and the counters count) what that GPU would launch.

Everything goes through what each registered op's module offers the registry's tools (`LIMITS`, `proxy_key`);
a change in how an op plans its launches is adapted in the op's file and nowhere in bench/.
"""

from __future__ import annotations

import contextlib

from kernels import registry

from .cases import MODEL_GPU, Case


def _limit_sources() -> list:
    """Every registered op's LimitsSource, once each (ops that share a module share it)."""
    sources = {}
    for op in registry.ops():
        source = op.load().LIMITS
        sources[id(source)] = source
    return list(sources.values())


@contextlib.contextmanager
def planned_for_gpu():
    """Launch plans as on MODEL_GPU (grids sized for its SM count, GPU block sizes) while the
    interpreter runs them, so launches and partial-sum traffic are those of the GPU the model names.

    The launchers plan few, wide programs on CPU (the interpreter's cost is per program); the compile
    report records the GPU plan the same way.
    """
    with contextlib.ExitStack() as stack:
        for source in _limit_sources():
            stack.enter_context(source.override(source.gpu(MODEL_GPU["sms"])))
        yield


def proxy_key(case: Case):
    """What a proxy shape must share with the case for its counted bytes to scale by element count (the op's
    `proxy_key` under MODEL_GPU's plan)."""
    impl = registry.get(case.op).load()
    return impl.proxy_key(case.shape, impl.LIMITS.gpu(MODEL_GPU["sms"]))
