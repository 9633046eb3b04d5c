"""Per-device launch limits for the plan modules, with a scoped override for tests, bench and the compile report.

Each op keeps one `LimitsSource`, `LIMITS` in its module, built from its limits dataclass's `gpu(sm_count)` and
`cpu()` constructors; `device_limits(device)` asks it, and `limits_override(limits)` makes every device plan with
`limits` inside a `with` block (forward and backward alike), without touching module globals. The compile report
and the benchmarks plan for a GPU they do not have through `LIMITS.gpu(sms)` and `LIMITS.override`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Generic, TypeVar

L = TypeVar("L")


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (cached: the query costs microseconds per launch)."""
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


class LimitsSource(Generic[L]):
    def __init__(self, name: str, gpu: Callable[[int], L], cpu: Callable[[], L]):
        self._gpu, self._cpu = gpu, cpu
        self._override: contextvars.ContextVar[L | None] = contextvars.ContextVar(name, default=None)

    def gpu(self, sms: int) -> L:
        """The limits of a GPU with `sms` streaming multiprocessors (what `for_device` answers there)."""
        return self._gpu(sms)

    def cpu(self) -> L:
        """The limits of the CPU interpreter."""
        return self._cpu()

    @contextlib.contextmanager
    def override(self, limits: L):
        """Inside the block, `for_device` returns `limits` for every device."""
        token = self._override.set(limits)
        try:
            yield limits
        finally:
            self._override.reset(token)

    def for_device(self, device) -> L:
        """The limits to plan with on `device` (a torch.device), unless an override is active."""
        override = self._override.get()
        if override is not None:
            return override
        if device.type == "cuda":
            import torch

            return self._gpu(sm_count(device.index if device.index is not None else torch.cuda.current_device()))
        return self._cpu()
