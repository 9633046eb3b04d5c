"""kernels.batch_norm_leaky_relu: Triton (interpreted on CPU) against a float64 eager reference.

Every Triton output (and every partial buffer) is pre-filled with NaN, so an element a kernel forgot to
write shows up as a mismatch. Each case runs both launch paths: "fused" (a channel in one tile) and
"split" (statistics / finalize / normalise with tiny tiles, so several programs, several tiles per
program, masked tails and chunked finalize loops are all exercised).
"""

import contextlib
import dataclasses
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import reference
from kernels.batch_norm_leaky_relu_plan import DeviceLimits, limits_override

from conftest import assert_close_to_reference

BN = importlib.import_module("kernels.batch_norm_leaky_relu")

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # rtol, and atol relative to the largest |expected|


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    monkeypatch.setattr(
        BN, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


# Tiny tiles for the split path: many programs, several tiles each, masked tails, chunked finalize.
# DCGAN-sized inputs keep the real tile sizes (the interpreter runs programs one by one).
SPLIT_TINY = DeviceLimits(programs=3, rows_block_c=4, stats_block_c=4, finalize_block_c=4, finalize_block_p=2,
                          fused_max_tile=0, stats_tile=16, elementwise_tile=32)
SPLIT_REAL = dataclasses.replace(DeviceLimits.cpu(), programs=3, fused_max_tile=0)


@pytest.fixture(params=["fused", "split"])
def path(request):
    """use(x or shape): plan it on the fused or the split path (tiny tiles when small), and check it does."""
    stack = contextlib.ExitStack()

    def use(x):
        x = x if torch.is_tensor(x) else torch.empty(x, device="meta")
        if request.param == "split":
            stack.enter_context(limits_override(SPLIT_TINY if x.numel() <= 2048 else SPLIT_REAL))
        assert BN.plan_for(x).fused == (request.param == "fused"), f"{x.shape} not on the {request.param} path"

    use.name = request.param
    with stack:
        yield use


def assert_close(actual, expected, dtype, what=""):
    assert_close_to_reference(actual, expected, TOL[dtype], what)


def make_inputs(shape, dtype, affine=True, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=gen) * 1.5 + 0.3 + offset).to(dtype)
    w = (torch.rand(c, generator=gen) + 0.5) if affine else None
    b = torch.randn(c, generator=gen) if affine else None
    g = torch.randn(shape, generator=gen).to(dtype)
    return x, w, b, g


def run(impl, x, w, b, g, rm, rv, training, momentum=0.1, slope=0.2, nbt=None, to64=False):
    cast = (lambda t: t.double()) if to64 else (lambda t: t.clone())
    xx = cast(x).requires_grad_()
    ww = cast(w).requires_grad_() if w is not None else None
    bb = cast(b).requires_grad_() if b is not None else None
    y = kernels.batch_norm_leaky_relu(
        xx, ww, bb, rm, rv, training, momentum, 1e-5, slope, impl=impl, num_batches_tracked=nbt
    )
    y.backward(cast(g))
    return y.detach(), xx.grad, ww.grad if ww is not None else None, bb.grad if bb is not None else None


SHAPES = [
    (3, 7, 5, 5),  # odd and prime
    (2, 13),  # (N, C), prime C
    (2, 3, 1, 1),  # 4D that is really (N, C)
    (5, 1, 3, 3),  # C = 1
    (7, 1),  # C = 1, (N, C)
    (3, 5, 6, 11),  # M per channel not a multiple of any block
]
DCGAN_SHAPES = [  # the 28x28 generator's BN+LReLU layers at batch 4
    (4, 12544),  # G.project: 256*7*7 features
    (4, 128, 7, 7),
    (4, 64, 14, 14),
]
LARGE_FUSED = [  # one launch each way at the largest register tiles (the plan's limits, on any device)
    (64, 2, 14, 14),  # a 64 x 256 tile at 16 warps: rows 16-byte aligned (K = 196)
    (100, 2, 7, 7),  # K = 49, unaligned rows: a 128 x 64 tile, half the aligned cap
]
FP32, BF16 = torch.float32, torch.bfloat16


PARITY = [(s, d, p) for s in SHAPES for d in (FP32, BF16) for p in ("fused", "split")] + [
    (s, FP32, p)
    for s in DCGAN_SHAPES
    for p in ("fused", "split")
    if not (p == "split" and s == (4, 128, 7, 7))  # fused at any batch <= 32; (4, 64, 14, 14) covers split
] + [(s, d, "fused") for s in LARGE_FUSED for d in (FP32, BF16)]


@pytest.mark.parametrize(
    "shape, dtype, path", PARITY, indirect=["path"], ids=lambda v: str(v).replace("torch.", "")
)
def test_parity_training_steps_then_eval(shape, dtype, path):
    path(shape)
    c = shape[1]
    state = {impl: (torch.zeros(c), torch.ones(c)) for impl in ("triton", "ref")}
    for step in range(1 if shape in DCGAN_SHAPES + LARGE_FUSED else 2):  # the interpreter is slow: 1 step there
        x, w, b, g = make_inputs(shape, dtype, seed=step)
        got = run("triton", x, w, b, g, *state["triton"], training=True)
        rm, rv = state["ref"]
        rm64, rv64 = rm.double(), rv.double()
        want = run("eager", x, w, b, g, rm64, rv64, training=True, to64=True)
        rm.copy_(rm64), rv.copy_(rv64)
        for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, want):
            assert_close(a, e, dtype, f"step {step} {name}")
            assert a.dtype == (dtype if name in ("y", "dx") else torch.float32)
        assert_close(state["triton"][0], rm, torch.float32, "running_mean")
        assert_close(state["triton"][1], rv, torch.float32, "running_var")
    x, w, b, g = make_inputs(shape, dtype, seed=7)
    got = run("triton", x, w, b, g, *state["triton"], training=False)
    want = run(
        "eager", x, w, b, g, state["ref"][0].double(), state["ref"][1].double(), training=False, to64=True
    )
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert_close(a, e, dtype, f"eval {name}")


@pytest.mark.parametrize(
    "shape, slope, momentum, affine, offset",
    [
        ((3, 7, 5, 5), 0.0, 0.5, True, 0.0),
        ((2, 13), 0.0, 0.1, False, 0.0),
        ((3, 7, 5, 5), 0.2, 0.1, False, 1000.0),  # |mean| >> std: raw sum/sum-of-squares would fail here
        ((6, 13), 0.2, 0.5, True, 1000.0),
        ((4, 64, 14, 14), 0.2, 0.1, True, 1000.0),
    ],
)
def test_variants(shape, slope, momentum, affine, offset, path):
    path(shape)
    c = shape[1]
    x, w, b, g = make_inputs(shape, torch.float32, affine=affine, offset=offset)
    rm_t, rv_t = torch.zeros(c), torch.ones(c)
    rm_r, rv_r = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    got = run("triton", x, w, b, g, rm_t, rv_t, True, momentum, slope)
    want = run("eager", x, w, b, g, rm_r, rv_r, True, momentum, slope, to64=True)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, want):
        if e is not None:
            assert_close(a, e, torch.float32, name)
    assert_close(rm_t, rm_r, torch.float32, "running_mean")
    assert_close(rv_t, rv_r, torch.float32, "running_var")


def test_cumulative_average_and_num_batches_tracked(path):
    shape, c = (3, 5, 2, 3), 5
    path(shape)
    rm_t, rv_t, n_t = torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long)
    rm_r, rv_r, n_r = rm_t.double(), rv_t.double(), n_t.clone()
    for step in range(3):
        x, w, b, g = make_inputs(shape, torch.float32, seed=step)
        run("triton", x, w, b, g, rm_t, rv_t, True, None, nbt=n_t)
        run("eager", x, w, b, g, rm_r, rv_r, True, None, nbt=n_r, to64=True)
    assert n_t.item() == n_r.item() == 3
    assert_close(rm_t, rm_r, torch.float32, "running_mean")
    assert_close(rv_t, rv_r, torch.float32, "running_var")


def test_no_running_stats_and_no_affine(path):
    path((4, 3, 3, 3))
    x, _, _, g = make_inputs((4, 3, 3, 3), torch.float32)
    got = run("triton", x, None, None, g, None, None, True)
    want = run("eager", x, None, None, g, None, None, True, to64=True)
    assert_close(got[0], want[0], torch.float32, "y")
    assert_close(got[1], want[1], torch.float32, "dx")


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(layout, path):
    if layout == "channels_last":
        x = torch.randn(3, 5, 4, 3).contiguous(memory_format=torch.channels_last)
        g = torch.randn(3, 5, 4, 3)
    elif layout == "transposed":
        x = torch.randn(7, 6).t()  # (6, 7) with C strided
        g = torch.randn(7, 6).t()
    else:
        x = torch.randn(4, 10, 3, 5)[:, ::2, :, 1:]  # (4, 5, 3, 4), every stride odd
        g = torch.randn(4, 5, 3, 4)
    path(x)
    c = x.shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    got = run("triton", x, w, b, g, torch.zeros(c), torch.ones(c), True)
    want = run("eager", x, w, b, g, torch.zeros(c).double(), torch.ones(c).double(), True, to64=True)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert_close(a, e, torch.float32, name)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_launches_per_direction(path, training, monkeypatch):
    """One launch each way on the fused path, two on the split path (the eval forward: scale/shift, normalise)."""
    launched = []
    real = BN._launch
    monkeypatch.setattr(BN, "_launch", lambda kernel, grid, **kw: launched.append(kernel.__name__) or real(
        kernel, grid, **kw))
    shape = (4, 3, 5, 5)
    path(shape)
    x, w, b, g = make_inputs(shape, torch.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = kernels.batch_norm_leaky_relu(x.requires_grad_(), w, b, rm, rv, training, impl="triton")
    forward = list(launched)
    y.backward(g)
    backward = launched[len(forward):]
    if not training:
        assert forward == ["_bnlr_fwd_finalize_eval_kernel", "_bnlr_fwd_kernel"]
    elif path.name == "fused":
        assert forward == ["_bnlr_fwd_fused_kernel"]
    else:
        assert forward == ["_bnlr_fwd_stats_kernel", "_bnlr_fwd_apply_kernel"]
    assert backward == (["_bnlr_bwd_fused_kernel"] if path.name == "fused"
                        else ["_bnlr_bwd_reduce_kernel", "_bnlr_bwd_apply_kernel"])


@pytest.mark.parametrize("needs", [(False, True, True), (False, True, False), (True, False, False)], ids=str)
def test_split_backward_with_some_grads(needs, monkeypatch):
    """Without dx the split backward's apply kernel runs one program per channel block (dweight / dbias only)."""
    x, w, b, g = make_inputs((3, 5, 4, 4), torch.float32)
    with limits_override(SPLIT_TINY):
        xx = x.clone().requires_grad_(needs[0])
        ww, bb = w.clone().requires_grad_(needs[1]), b.clone().requires_grad_(needs[2])
        kernels.batch_norm_leaky_relu(xx, ww, bb, impl="triton").backward(g)
    want = run("eager", x, w, b, g, None, None, True, to64=True)
    for name, t, e, needed in zip(("dx", "dweight", "dbias"), (xx, ww, bb), want[1:], needs):
        if needed:
            assert_close(t.grad, e, torch.float32, name)
        else:
            assert t.grad is None, name


def test_only_weight_grads_requested():
    x, w, b, g = make_inputs((3, 4, 2, 2), torch.float32)
    ww = w.clone().requires_grad_()
    kernels.batch_norm_leaky_relu(x, ww, b, None, None, impl="triton").backward(g)
    ref = w.clone().requires_grad_()
    F.leaky_relu(F.batch_norm(x, None, None, ref, b, True), 0.2).backward(g)
    assert_close(ww.grad, ref.grad, torch.float32, "dweight")


# -------------------------------------------------------------------------------------------------
# The switch and bad input


def test_auto_is_eager_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("auto must not take the Triton path for CPU tensors")

    monkeypatch.setattr(BN, "batch_norm_leaky_relu", boom)
    x = torch.randn(4, 3)
    torch.testing.assert_close(
        kernels.batch_norm_leaky_relu(x, impl="auto"),
        F.leaky_relu(F.batch_norm(x, None, None, training=True), 0.2),
    )


@pytest.mark.parametrize("gpu, capability, backend", [("Tesla T4", (7, 5), "eager"), ("Tesla V100", (7, 0), "eager"),
                                                      ("NVIDIA A100", (8, 0), "triton"),
                                                      ("NVIDIA H100", (9, 0), "triton")])
def test_auto_takes_triton_only_from_sm80(monkeypatch, gpu, capability, backend):
    monkeypatch.setattr(kernels, "_gpu", lambda index: (gpu, capability))
    got, reason = kernels.auto_backend("cuda:0")
    assert got == backend and gpu in reason and f"sm_{capability[0]}{capability[1]}" in reason
    assert "\n" not in reason and (backend == "triton" or "sm_80 and newer" in reason)
    assert kernels.resolve_impl("auto", "cuda:0", torch.bfloat16) == backend
    assert kernels.resolve_impl("auto", "cuda:0", torch.float64) == "eager"
    assert kernels.auto_backend("cpu") == ("eager", "cpu tensors (the Triton kernels run on CUDA GPUs)")


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setattr(BN, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.batch_norm_leaky_relu(torch.randn(4, 3), impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.batch_norm_leaky_relu(torch.randn(4, 3), impl="cuda")


@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_bad_input(impl):
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        kernels.batch_norm_leaky_relu(x, torch.ones(4), None, impl=impl)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 2"):
        kernels.batch_norm_leaky_relu(x, None, None, torch.zeros(2), torch.ones(2), impl=impl)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        kernels.batch_norm_leaky_relu(torch.randn(1, 3), impl=impl)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        kernels.batch_norm_leaky_relu(torch.randn(1, 3, 1, 1), impl=impl)
    with pytest.raises(NotImplementedError, match="not implemented for torch.int64"):
        kernels.batch_norm_leaky_relu(torch.ones(4, 3, dtype=torch.long), impl=impl)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        kernels.batch_norm_leaky_relu(x, torch.ones(3, dtype=torch.float64), None, impl=impl)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        kernels.batch_norm_leaky_relu(x, training=False, impl=impl)
    with pytest.raises(RuntimeError, match="same device"):
        kernels.batch_norm_leaky_relu(x, torch.ones(3, device="meta"), None, impl=impl)
    with pytest.raises(ValueError, match="at least 2D"):
        kernels.batch_norm_leaky_relu(torch.randn(3), impl=impl)


def test_eval_with_one_value_per_channel_is_fine():
    # PyTorch only refuses a single value per channel when it has to compute batch statistics.
    x = torch.randn(1, 3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    got = kernels.batch_norm_leaky_relu(x, None, None, rm, rv, training=False, impl="triton")
    torch.testing.assert_close(got, reference.batch_norm_leaky_relu(x, None, None, rm, rv, training=False))


# -------------------------------------------------------------------------------------------------
# On a GPU (skipped here)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape", [(64, 12544), (64, 128, 7, 7), (64, 64, 14, 14), (256, 64, 28, 28)], ids=str
)
def test_gpu_parity(shape, dtype):
    x, w, b, g = (t.cuda() if t is not None else None for t in make_inputs(shape, dtype))
    c = shape[1]
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    rm64, rv64 = rm.double(), rv.double()
    got = run("triton", x, w, b, g, rm, rv, True)
    want = run("eager", x, w, b, g, rm64, rv64, True, to64=True)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), got, want):
        assert_close(a, e, dtype, name)
    assert_close(rv, rv64, torch.float32, "running_var")


def test_float64_is_eager_only():
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="accumulate in fp32"):
        kernels.batch_norm_leaky_relu(x, impl="triton")
    with pytest.raises(TypeError, match="accumulate in fp32"):
        kernels.bce_with_logits(x, 1.0, impl="triton")
    torch.testing.assert_close(
        kernels.batch_norm_leaky_relu(x, impl="auto"), reference.batch_norm_leaky_relu(x)
    )
