"""bench/kernels.py's pieces, one job a module:

    cases      what a run measures: presets, the cases of every registered op, the providers' callables
    plans      the kernels' launch plans as a named GPU would make them (the one place bench/ asks for them)
    counters   bytes, launches and saved bytes, counted on a CPU
    counting   the CPU records: counts, the proxy model for shapes too large to count, the whole training step
    timing     the GPU records: triton.testing.do_bench
    report     the checks and the Markdown tables

Importable with the repository root and bench/ on sys.path, the root first (bench/kernels.py would otherwise
shadow the kernels package): `python bench/kernels.py` puts them there.
"""

import os
from pathlib import Path

import torch

# @triton.jit reads TRITON_INTERPRET when the decorator runs, so it is set before `kernels` is imported:
# without a GPU the interpreter is the only way the Triton kernels run (and are counted).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[2]
