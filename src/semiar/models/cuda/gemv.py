"""A one-row matrix-vector kernel (Triton) for decode steps on CUDA.

A batch-1 decode step multiplies one row by every weight matrix: all it does is read the weights,
so it should run at the GPU's memory bandwidth. cuBLAS's one-row kernels did not: on an H200 the
113 products of a qwen2.5-coder-1.5b step, replayed alone in one CUDA graph, took 1.30 ms, 2.4 TB/s
of the 4.8 the memory moves, and they were three quarters of a compiled step. `gemv` is the
plain kernel for that case (`fused.row_product` with nothing fused): each program reads BLOCK_N
weight rows in BLOCK_K chunks (evicted first: they are read once), multiplies with the row in fp32
and reduces; the block shape is autotuned per matrix shape.

`RowLinear` wraps an `nn.Linear` (same weight and bias tensors, so the state dict and tied
embeddings are untouched) and sends one-row inputs to the kernel, everything else to `F.linear`.
`install(decoder)` times the kernel against cuBLAS for each weight shape of the model, inside CUDA
graphs as the decode step runs them, and wraps only the layers whose shape the kernel serves
faster; `SEMIAR_GEMV=0` turns it off, `SEMIAR_GEMV=1` uses it for every shape without timing.
`GraphedDecoder` installs it before it compiles and captures, where the fused one-token step
(`models.cuda.fused`, which does the same products with the layer's work fused in) is off.

Measured on an H200 (docs/benchmarks.md): the 113 one-row products of a qwen2.5-coder-1.5b step
took 1.03 ms instead of cuBLAS's 1.26-1.30, and a compiled step 1.64 instead of 1.87-1.90 ms. The
kernel won on the attention and down projections (2048x1536, 1536x1536, 1536x8960: 1.3-1.7x), was
even on the gate/up projection (17920x1536: used in one run, not in the other, by the 3 % margin)
and lost slightly on the LM head, which stays on cuBLAS. A sibling for 16-64 rows (tensor-core tiles,
for tree verification) matched cuBLAS at best and lost 1.6x on the 1536x8960 projection, so
verification stays on cuBLAS (tried in commit 32875d9, removed).

Numerics: fp32 accumulation like cuBLAS, but another summation order, so a one-row step can differ
from a multi-row forward in the last bf16 bit (the same holds between cuBLAS's own one-row and
multi-row kernels).

Needs Triton (which CUDA builds of PyTorch bring); tests run the kernel on CPU under Triton's
interpreter (TRITON_INTERPRET=1).

Example (needs a CUDA device):
    >>> from semiar.models.cuda import gemv                                 # doctest: +SKIP
    >>> gemv.install(model.decoder)  # {"2048x1536": {"cublas_ms": ..., "gemv_ms": ..., "used": True}, ...}  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import Captured
from .fused import env_switch, row_product, triton_available


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an x of one row ([..., K] with one row in all): [..., N].
    The kernel is the fused step's `row_product` with nothing fused and no PDL (its neighbours
    here are Inductor's and cuBLAS's kernels)."""
    return row_product(x, weight, bias, pdl=False)


@torch.library.custom_op("semiar::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`gemv` as a PyTorch custom op, so torch.compile keeps it as one opaque call."""
    return gemv(x, weight, bias)


@gemv_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class RowLinear(nn.Module):
    """An nn.Linear whose one-row inputs go through `gemv` (the same weight and bias tensors)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._original = [linear]  # a list: not a submodule, so the state dict keeps one copy

    def unwrap(self) -> nn.Linear:
        return self._original[0]

    def forward(self, x):
        if x.numel() == x.shape[-1]:
            return gemv_op(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _graph_ms(fn, reps: int = 20, rounds: int = 5) -> float:
    """ms per call of `fn`, replayed `reps` times inside one CUDA graph (best of `rounds`): the GPU
    time as a decode step's graph sees it, without Python's launch cost."""
    import time

    graph = Captured(lambda: [fn() for _ in range(reps)], []).graph
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps * 1e3)
    return best


def install(decoder: nn.Module, force: Optional[bool] = None) -> dict:
    """Wrap the decoder's linear layers (LM head included) in `RowLinear` where the kernel serves a
    one-row input faster than cuBLAS, timed per weight shape over all the layers of that shape
    (it must win by 3 %). force=True wraps them all (on any device: the CPU tests run the kernel
    under Triton's interpreter), False none; the default is SEMIAR_GEMV=1/0, else timed on CUDA.
    Starts from the plain layers (a second call re-decides). Returns {"NxK": {"layers",
    "cublas_ms", "gemv_ms", "used"}}, also kept as `decoder.gpu_row_kernel`; {} when the decoder
    is not on CUDA or Triton is missing."""
    if force is None:
        force = env_switch("SEMIAR_GEMV", "timing the kernel instead")
    uninstall(decoder)
    slots = [(m, n) for m in decoder.modules() for n, c in m.named_children() if type(c) is nn.Linear]
    on_cuda = bool(slots) and getattr(*slots[0]).weight.device.type == "cuda"
    if force is False or not slots or not triton_available() or (not on_cuda and not force):
        return {}
    groups: dict[str, list] = {}
    for module, name in slots:
        lin = getattr(module, name)
        groups.setdefault(f"{lin.out_features}x{lin.in_features}", []).append((module, name, lin))
    report: dict[str, dict] = {}
    try:
        for key, members in groups.items():
            lins = [lin for _, _, lin in members]
            x = torch.randn(1, 1, lins[0].in_features, device=lins[0].weight.device, dtype=lins[0].weight.dtype)
            if force:
                gemv(x, lins[0].weight, lins[0].bias)  # autotunes now, not inside a capture
                report[key] = {"used": True}
            else:
                # every layer of the shape once per round, as a step reads them: timing one weight
                # over and over would serve it from the L2 cache
                reps = max(1, 24 // len(lins))
                cublas = _graph_ms(lambda: [F.linear(x, w.weight, w.bias) for w in lins], reps) / len(lins)
                mine = _graph_ms(lambda: [gemv(x, w.weight, w.bias) for w in lins], reps) / len(lins)
                report[key] = {"layers": len(lins), "cublas_ms": round(cublas, 5), "gemv_ms": round(mine, 5),
                               "used": mine < 0.97 * cublas}
            if report[key]["used"]:
                for module, name, lin in members:
                    setattr(module, name, RowLinear(lin))
    except Exception as e:  # noqa: BLE001 - a kernel that fails to build leaves cuBLAS in place
        uninstall(decoder)
        warnings.warn(f"the one-row Triton kernel failed ({type(e).__name__}: {str(e)[:200]}); using cuBLAS",
                      stacklevel=2)
        report = {}
    decoder.gpu_row_kernel = report
    return report


def uninstall(decoder: nn.Module) -> None:
    """Put back the plain nn.Linear layers that `install` wrapped."""
    for m in list(decoder.modules()):
        for n, c in list(m.named_children()):
            if isinstance(c, RowLinear):
                setattr(m, n, c.unwrap())
    decoder.gpu_row_kernel = {}
