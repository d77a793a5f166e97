"""Matrix-vector kernels (Triton) for decode steps and small tree verifications on CUDA.

A batch-1 decode step multiplies one row by every weight matrix: all it does is read the weights,
so it should run at the GPU's memory bandwidth. cuBLAS's one-row kernels did not: on an H200 the
113 products of a qwen2.5-coder-1.5b step, replayed alone in one CUDA graph, took 1.30 ms, 2.4 TB/s
of the 4.8 the memory moves, and they were three quarters of a compiled step. `gemv` is the
plain kernel for that case: each program reads BLOCK_N weight rows in BLOCK_K chunks (evicted
first: they are read once), multiplies with the row in fp32 and reduces; the block shape is
autotuned per matrix shape.

`few_rows` is its sibling for 2..64 rows (a token tree being verified): each weight tile is read
once and multiplied with all the rows on tensor cores (tiles of 16, 32 or 64 rows).

`RowLinear` wraps an `nn.Linear` (same weight and bias tensors, so the state dict and tied
embeddings are untouched) and sends the row counts it was told to the kernels, everything else to
`F.linear` (`row_linear`, a custom op). `install(decoder)` times the kernels against cuBLAS for
each weight shape and row count of the model, inside CUDA graphs as a step runs them, and uses
them only where they are faster; `SEMIAR_GEMV=0` turns them off, `SEMIAR_GEMV=1` uses them
everywhere without timing.
`GraphedDecoder` installs it before it compiles and captures.

Numerics: fp32 accumulation like cuBLAS, but another summation order, so a one-row step can differ
from a multi-row forward in the last bf16 bit (the same holds between cuBLAS's own one-row and
multi-row kernels).

Needs Triton (which CUDA builds of PyTorch bring); tests run the kernel on CPU under Triton's
interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no kernel
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    interpret = os.environ.get("TRITON_INTERPRET") == "1"  # the CPU tests: one config, no timing
    # one row: (weight rows per program, columns per chunk, warps); few rows and long chunks keep
    # many programs in flight for the narrow matrices (1536 rows), more rows for the LM head
    one = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
           for n, k, w in [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4),
                           (8, 512, 8), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (16, 1024, 8), (32, 128, 4),
                           (32, 256, 8), (32, 512, 8), (64, 256, 8)]]
    # a few rows (tree verification): tensor-core tiles of (all the rows) x BLOCK_N, pipelined over K
    few = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
           for n, k, w, st in [(16, 128, 4, 4), (16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4),
                               (64, 64, 4, 5), (128, 64, 8, 4), (16, 512, 4, 2), (32, 64, 2, 6)]]
    if interpret:
        one, few = one[5:6], few[1:2]

    @triton.autotune(configs=one, key=["N", "K"])
    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    @triton.autotune(configs=few, key=["N", "K", "BLOCK_M"])
    @triton.jit
    def few_rows_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                        other=0.0, eviction_policy="evict_first")
            if UPCAST:  # Triton's interpreter (CPU tests) multiplies bf16 tiles wrongly; fp32 it does right
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return gemv_kernel, few_rows_kernel


#: the row counts the few-rows kernel serves, by the tile height it pads them to (tensor cores
#: need 16 at least): a tree of up to 64 tokens
ROW_BUCKETS = (16, 32, 64)


def _bucket(rows: int) -> int:
    """1 for one row, else the smallest ROW_BUCKETS tile that holds `rows` (0: none does)."""
    if rows == 1:
        return 1
    return next((b for b in ROW_BUCKETS if rows <= b), 0)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    K = x.shape[-1]
    if weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} (row-major) does not fit an input of {K} features")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an x of one row ([..., K] with one row in all): [..., N]."""
    K = x.shape[-1]
    if x.numel() != K:
        raise ValueError(f"gemv takes one row, got an input of shape {tuple(x.shape)}")
    _check(x, weight)
    N = weight.shape[0]
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    kernel = _kernels()[0]
    grid = lambda meta: ((N + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)  # noqa: E731
    kernel[grid](x, weight, bias if bias is not None else weight, y, N, K, weight.stride(0), HAS_BIAS=bias is not None)
    return y


def few_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an x of 2..64 rows ([..., K]): every weight tile is read once
    and multiplied with all the rows on tensor cores."""
    K = x.shape[-1]
    M = x.numel() // K
    BLOCK_M = _bucket(M)
    if BLOCK_M in (0, 1):
        raise ValueError(f"few_rows takes 2..{ROW_BUCKETS[-1]} rows, got {M}")
    _check(x, weight)
    N = weight.shape[0]
    x2 = x.reshape(M, K).contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel = _kernels()[1]
    grid = lambda meta: ((N + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)  # noqa: E731
    kernel[grid](x2, weight, bias if bias is not None else weight, y, M, N, K, x2.stride(0), weight.stride(0),
                 y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M,
                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                 UPCAST=os.environ.get("TRITON_INTERPRET") == "1")
    return y.reshape(*x.shape[:-1], N)


@torch.library.custom_op("semiar::row_linear", mutates_args=())
def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernels: int) -> torch.Tensor:
    """F.linear with the Triton kernels for the row counts whose bit is set in `kernels` (bit 0:
    one row, bits 1..: the ROW_BUCKETS), cuBLAS for the others. A PyTorch custom op, so that
    torch.compile keeps it as one opaque call whatever the block length."""
    b = _bucket(x.numel() // x.shape[-1])
    if b == 1 and kernels & 1:
        return gemv(x, weight, bias)
    if b > 1 and kernels & (2 << ROW_BUCKETS.index(b)):
        return few_rows(x, weight, bias)
    return F.linear(x, weight, bias)


@row_linear.register_fake
def _(x, weight, bias, kernels):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class RowLinear(nn.Module):
    """An nn.Linear (the same weight and bias tensors) whose inputs of the row counts set in
    `kernels` go through the Triton kernels (`row_linear`)."""

    def __init__(self, linear: nn.Linear, kernels: int = 1):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.kernels = kernels
        self._original = [linear]  # a list: not a submodule, so the state dict keeps one copy

    def unwrap(self) -> nn.Linear:
        return self._original[0]

    def forward(self, x):
        return row_linear(x, self.weight, self.bias, self.kernels)


def _graph_ms(fn, reps: int = 20, rounds: int = 5) -> float:
    """ms per call of `fn`, replayed `reps` times inside one CUDA graph (best of `rounds`): the GPU
    time as a decode step's graph sees it, without Python's launch cost."""
    import time

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps * 1e3)
    return best


def install(decoder: nn.Module, force: Optional[bool] = None, rows: tuple = (1,) + ROW_BUCKETS) -> dict:
    """Wrap the decoder's linear layers (LM head included) in `RowLinear`, with the Triton kernels
    for the row counts (1, and the tiles of ROW_BUCKETS in `rows`) where they beat cuBLAS: timed
    per weight shape and row count over all the layers of that shape, inside a CUDA graph; the
    kernel must win by 3 %. force=True uses them for every shape and row count (on any device: the
    CPU tests run them under Triton's interpreter), False for none (default: SEMIAR_GEMV=1/0,
    else timed on CUDA). Returns {"NxK": {"layers", "rows": {R: {"cublas_ms", "triton_ms",
    "used"}}}}, also kept as `decoder.gpu_row_kernel`; {} when not on CUDA or without Triton."""
    env = os.environ.get("SEMIAR_GEMV", "")
    if force is None and env in ("0", "1"):
        force = env == "1"
    elif env not in ("", "0", "1"):
        warnings.warn(f"SEMIAR_GEMV={env!r} is not 0 or 1; timing the kernels instead", stacklevel=2)
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
            w0 = lins[0].weight
            report[key] = {"layers": len(lins), "rows": {}}
            kernels = 0
            for R in rows:
                bit = 1 if R == 1 else 2 << ROW_BUCKETS.index(R)
                x = torch.randn(1, R, w0.shape[1], device=w0.device, dtype=w0.dtype)
                mine_fn = gemv if R == 1 else few_rows
                try:
                    if force:
                        mine_fn(x, w0, lins[0].bias)  # autotunes now, not inside a capture
                        entry = {"used": True}
                    else:
                        # every layer of the shape once per round, as a step reads them: timing one
                        # weight over and over would serve it from the L2 cache
                        reps = max(1, 24 // len(lins))
                        cublas = _graph_ms(lambda: [F.linear(x, w.weight, w.bias) for w in lins], reps) / len(lins)
                        mine = _graph_ms(lambda: [mine_fn(x, w.weight, w.bias) for w in lins], reps) / len(lins)
                        entry = {"cublas_ms": round(cublas, 5), "triton_ms": round(mine, 5),
                                 "used": mine < 0.97 * cublas}
                except Exception as e:  # noqa: BLE001 - a kernel that fails to build leaves cuBLAS there
                    if on_cuda:
                        torch.cuda.synchronize()
                    warnings.warn(f"the Triton kernel for {R} row(s) x {key} failed ({type(e).__name__}: "
                                  f"{str(e)[:200]}); using cuBLAS there", stacklevel=2)
                    entry = {"used": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                report[key]["rows"][R] = entry
                kernels |= bit if entry["used"] else 0
            if kernels:
                for module, name, lin in members:
                    setattr(module, name, RowLinear(lin, kernels))
    except Exception as e:  # noqa: BLE001 - whatever else went wrong: cuBLAS everywhere
        uninstall(decoder)
        warnings.warn(f"the Triton row kernels failed ({type(e).__name__}: {str(e)[:200]}); using cuBLAS",
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
