"""Synchronised BatchNorm+LeakyReLU: 2 gloo processes, each holding part of a batch, must match one
process holding the whole batch with sync off -- outputs, dx, running stats, num_batches_tracked, and
dweight/dbias once summed over ranks (DDP's all-reduce, before its division by the world size).

One spawn runs every case for both impls; the interpreter runs the Triton kernels in the workers.
"""

import os

import pytest
import torch
import torch.distributed as dist

import kernels
from distgan.local import spawn
from kernels import reference

from conftest import requires_gpu

WORLD = 2
STEPS = 2
# name, full-batch shape, rows per rank (uneven on purpose), momentum, through the module or the functional op
CASES = [
    ("nchw-module", (8, 3, 4, 4), (4, 4), 0.1, "module"),
    ("nchw-cumulative", (8, 3, 4, 4), (3, 5), None, "module"),
    ("nc-functional", (8, 5), (3, 5), 0.5, "functional"),
    ("nchw-empty-rank", (6, 3, 2, 2), (0, 6), 0.1, "module"),  # an empty rank still joins both collectives
]
IMPLS = ("eager", "triton")


def _inputs(shape, step):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(shape, generator=gen) * 2 + 5
    g = torch.randn(shape, generator=gen)
    return x, g


def _params(c):
    gen = torch.Generator().manual_seed(7)
    return torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)


def _run_case(case, impl, rows=None, group=None):
    """STEPS training steps on rows [lo, hi) of each batch (all rows when rows is None)."""
    _name, shape, _, momentum, api = case
    c = shape[1]
    w0, b0 = _params(c)
    module = (kernels.BatchNormLeakyReLU2d if len(shape) == 4 else kernels.BatchNormLeakyReLU1d)(
        c, momentum=momentum, impl=impl, sync=group is not None
    )
    with torch.no_grad():
        module.weight.copy_(w0), module.bias.copy_(b0)
    out = []
    for step in range(STEPS):
        x, g = _inputs(shape, step)
        if rows is not None:
            x, g = x[rows[0] : rows[1]], g[rows[0] : rows[1]]
        x = x.clone().requires_grad_()
        module.zero_grad()
        if api == "module":
            y = module(x)
        else:
            y = kernels.batch_norm_leaky_relu(
                x,
                module.weight,
                module.bias,
                module.running_mean,
                module.running_var,
                True,
                momentum,
                module.eps,
                0.2,
                impl=impl,
                num_batches_tracked=module.num_batches_tracked,
                process_group=group,
            )
        y.backward(g)
        out.append(
            {
                "y": y.detach(),
                "dx": x.grad,
                "dweight": module.weight.grad.clone(),
                "dbias": module.bias.grad.clone(),
                "running_mean": module.running_mean.clone(),
                "running_var": module.running_var.clone(),
                "nbt": module.num_batches_tracked.clone(),
            }
        )
    return out


def _worker(rank, out_dir):
    results = {}
    for case in CASES:
        sizes = case[2]
        lo = sum(sizes[:rank])
        for impl in IMPLS:
            results[(case[0], impl)] = _run_case(case, impl, (lo, lo + sizes[rank]), dist.group.WORLD)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync_bn")
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()  # inherited by the workers
    spawn(_worker, WORLD, str(tmp))
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_match_one_process_with_the_full_batch(case, impl, rank_results):
    full = _run_case(case, "eager")  # one process, whole batch, sync off: the ground truth
    sizes = case[2]
    tol = {"rtol": 1e-4, "atol": 1e-5}
    for step in range(STEPS):
        want = full[step]
        parts = [r[(case[0], impl)][step] for r in rank_results]
        lo = 0
        for rank, got in enumerate(parts):
            hi = lo + sizes[rank]
            torch.testing.assert_close(got["y"], want["y"][lo:hi], **tol, msg=f"step {step} rank {rank} y")
            torch.testing.assert_close(got["dx"], want["dx"][lo:hi], **tol, msg=f"step {step} rank {rank} dx")
            for key in ("running_mean", "running_var", "nbt"):
                torch.testing.assert_close(got[key], want[key], **tol, msg=f"step {step} rank {rank} {key}")
            lo = hi
        for key in ("dweight", "dbias"):
            summed = sum(p[key] for p in parts)
            torch.testing.assert_close(summed, want[key], **tol, msg=f"step {step} {key} summed over ranks")


# -------------------------------------------------------------------------------------------------
# Under a real NCCL group (GPU only): every collective's tensors must be CUDA tensors.

DCGAN_SHAPES = [(64, 12544), (64, 128, 7, 7), (64, 64, 14, 14)]  # the generator's BN+LReLU layers at batch 64
GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _assert_close(actual, expected, dtype, what):
    tol = GPU_TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sync_under_nccl_matches_the_float64_reference(nccl_world, dtype, impl):
    for shape in DCGAN_SHAPES:
        c = shape[1]
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=gen) * 1.5 + 0.3).to(dtype).cuda()
        g = torch.randn(shape, generator=gen).to(dtype).cuda()
        w, b = (torch.rand(c, generator=gen) + 0.5).cuda(), torch.randn(c, generator=gen).cuda()
        got, want = {}, {}
        for out, cast, group in ((got, lambda t: t.clone(), nccl_world), (want, lambda t: t.double(), None)):
            xx, ww, bb = (cast(t).requires_grad_() for t in (x, w, b))
            rm, rv = cast(torch.zeros(c, device="cuda")), cast(torch.ones(c, device="cuda"))
            nbt = torch.zeros((), dtype=torch.long, device="cuda")
            if group is None:
                y = reference.batch_norm_leaky_relu(xx, ww, bb, rm, rv, True, 0.1, 1e-5, 0.2, nbt)
            else:
                y = kernels.batch_norm_leaky_relu(xx, ww, bb, rm, rv, True, 0.1, 1e-5, 0.2, impl=impl,
                                                  num_batches_tracked=nbt, process_group=group)
            y.backward(cast(g))
            out.update(y=y.detach(), dx=xx.grad, dweight=ww.grad, dbias=bb.grad, running_mean=rm, running_var=rv,
                       nbt=nbt)
        assert got["y"].is_cuda and got["y"].dtype == dtype
        for key in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
            _assert_close(got[key], want[key], dtype, f"{shape} {key}")
        assert got["nbt"].item() == 1


# -------------------------------------------------------------------------------------------------
# The eager path's arithmetic: fp32 for fp32 / bf16 input, and no host sync in the usual case.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_sync_accumulates_in_fp32_without_a_host_sync(gloo_world, dtype):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.float64, self.host_reads = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func.overloadpacket)
            if name in ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero"):
                self.host_reads.append(name)
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.float64 += [name for t in outs if torch.is_tensor(t) and t.dtype == torch.float64]
            return out

    c = 3
    x = (torch.randn(4, c, 2, 2) * 2 + 1000).to(dtype).requires_grad_()  # |mean| >> std
    w, b = (torch.rand(c) + 0.5).requires_grad_(), torch.randn(c).requires_grad_()
    rm, rv = torch.zeros(c), torch.ones(c)
    rec = Record()
    with rec:
        y = kernels.batch_norm_leaky_relu(x, w, b, rm, rv, True, 0.1, 1e-5, 0.2, impl="eager",
                                          process_group=gloo_world)
        y.backward(torch.ones_like(y))
    assert rec.float64 == [] and rec.host_reads == []
    xd = x.detach().double().requires_grad_()
    want = reference.batch_norm_leaky_relu(xd, w.detach().double(), b.detach().double(), rm.double() * 0,
                                           rv.double() * 0 + 1, True, 0.1, 1e-5, 0.2)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    torch.testing.assert_close(rm.double(), 0.1 * xd.detach().mean((0, 2, 3)), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        kernels.batch_norm_leaky_relu(torch.randn(1, c), None, None, None, None, True, impl="eager",
                                      process_group=gloo_world)
