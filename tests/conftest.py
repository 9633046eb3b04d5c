import os

import torch

# @triton.jit reads TRITON_INTERPRET when the decorator runs, so it must be set before `kernels` is
# imported anywhere in the session. Without a GPU the interpreter is the only way to run the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_gpu = __import__("pytest").mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
