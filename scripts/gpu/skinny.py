"""Can a Triton kernel beat cuBLAS on a tree forward's products? Skinny products y[M, N] = x[M, K] @ W.T
for M = 16..64 block rows and the 1.5B's weight shapes, timed over all 28 layers in one CUDA graph
(as a forward reads them: no weight in L2) against torch's F.linear (cuBLAS).

The kernel swaps the operands (acc[BLOCK_N, BM] = W_tile @ x_tile.T), so the weight tile is the
tensor-core product's wide side and Hopper's warpgroup products apply even at M = 16; the earlier
kernels (commit f182c6e) put the block rows there. SPLIT > 1 splits K for enough programs (the
down projection's 1536 rows are 24 tiles of 64) and writes fp32 partials that a second kernel adds.

usage: python scripts/gpu/skinny.py [--rows 16,64] [--reps 100] [--out DIR]
(with the package importable: installed, or PYTHONPATH=src as scripts/gpu/session.sh sets it)
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from semiar.models.cuda.capture import Captured


@triton.jit
def skinny(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           SPLIT: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BM)
    per_split = K // SPLIT
    k_lo = split * per_split
    acc = tl.zeros((BLOCK_N, BM), dtype=tl.float32)
    for k0 in range(0, per_split, BLOCK_K):
        cols = k_lo + k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], eviction_policy="evict_first")
        xt = tl.load(x_ptr + m[None, :] * K + cols[:, None], mask=(m < M)[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
    if SPLIT == 1:
        tl.store(y_ptr + m[None, :] * N + rows[:, None], acc.to(y_ptr.dtype.element_ty), mask=(m < M)[None, :])
    else:  # y: fp32 partials [SPLIT, BM, N]
        tl.store(y_ptr + split * BM * N + m[None, :] * N + rows[:, None], acc)


@triton.jit
def add_splits(p_ptr, y_ptr, total, stride, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + s * stride + i, mask=ok, other=0.0)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=ok)


def graph_ms(fn, reps):
    """ms per replay of `fn` captured as one CUDA graph (models.cuda.capture.Captured), the mean of `reps`."""
    g = Captured(fn, []).graph
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,64")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--out", default="runs/skinny")
    a = ap.parse_args()
    torch.manual_seed(0)
    layers = 28
    shapes = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960)}
    res = {"gpu": torch.cuda.get_device_name(0), "triton": triton.__version__, "torch": torch.__version__}
    for kind, (N, K) in shapes.items():
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        nbytes = N * K * 2 * layers
        for M in (int(r) for r in a.rows.split(",")):
            BM = max(16, triton.next_power_of_2(M))
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
            ys = [torch.empty(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
            ref_ms = graph_ms(lambda: [F.linear(x, w) for x, w in zip(xs, ws)], a.reps)
            row = {"cublas_us": round(ref_ms * 1e3 / layers, 2), "cublas_TBps": round(nbytes / ref_ms / 1e9, 2)}
            ref = F.linear(xs[0], ws[0]).float()
            best = None
            for bn, bk, sp, w, st in itertools.product((64, 128, 256), (64, 128), (1, 2, 4, 8), (4, 8), (3, 4)):
                if K % (sp * bk) or N % bn or bn * bk * 2 * st > 200_000 or (bn == 256) != (w == 8):
                    continue
                tiles = N // bn
                if tiles * sp < 66 or tiles * sp > 1100:  # too few programs for the SMs, or needless splitting
                    continue
                part = torch.empty(sp, BM, N, device="cuda", dtype=torch.float32) if sp > 1 else None

                def run(bn=bn, bk=bk, sp=sp, w=w, st=st, part=part):
                    for x, wt, y in zip(xs, ws, ys):
                        skinny[(tiles, sp)](x, wt, part if sp > 1 else y, M, N, K, BM=BM, BLOCK_N=bn, BLOCK_K=bk,
                                            SPLIT=sp, num_warps=w, num_stages=st)
                        if sp > 1:
                            add_splits[(triton.cdiv(M * N, 1024),)](part, y, M * N, BM * N, SPLIT=sp, BLOCK=1024)

                try:
                    run()
                    torch.cuda.synchronize()
                    err = (ys[0].float() - ref).abs().max().item()
                    ms = graph_ms(run, a.reps)
                except Exception as e:  # noqa: BLE001 - a config that does not build is skipped
                    print(f"{kind} M={M} {bn},{bk},{sp},{w},{st}: {type(e).__name__} {str(e)[:120]}", flush=True)
                    continue
                cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp, "warps": w, "stages": st,
                       "us": round(ms * 1e3 / layers, 2), "TBps": round(nbytes / ms / 1e9, 2), "max_err": err}
                if best is None or cfg["us"] < best["us"]:
                    best = cfg
            row["triton_best"] = best
            res.setdefault(kind, {})[str(M)] = row
            print(f"{kind} M={M}: {row}", flush=True)
            Path(a.out).mkdir(parents=True, exist_ok=True)
            (Path(a.out) / "skinny.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
