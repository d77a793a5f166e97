"""Cost of torch's weight-only quantized CPU kernels against the fp32 kernels the native decoder
runs today, on qwen2.5-coder-1.5b's linear shapes (issue 27, step 1: measure before choosing).

Kernels: fp32 dense F.linear (MKL), fp32 oneDNN packed for 8 rows (`PackedLinear`'s default on this
project's AMD EPYC), int4 group-32 `aten._weight_int4pack_mm_for_cpu` (weight from
`_convert_weight_to_int4pack_for_cpu(int32 [N, K] in 0..15, 1)` -> uint8 [N, K/2]; scales and zeros
[K/32, N, 2], w = (q - 8) * scale + zero, which re-expresses Q4_K exactly: scale = d*sc,
zero = 8*d*sc - dmin*m), fp32 and bf16 activations, and int8 per-channel `aten._weight_int8pack_mm`.
Best of --reps after a warm-up, in ms; random weights (the cost does not depend on the values).
usage: python scripts/quant_kernels.py [--threads 2] [--rows 1,16] [--reps 5]"""
import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960), (151936, 1536)]  # [N out, K in]


def best_ms(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print("| N x K | rows | fp32 dense | fp32 packed8 | int4 (fp32 act) | int4 (bf16 act) | int8 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, k in SHAPES:
        w = torch.randn(n, k)
        p8 = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz = torch.randn(k // 32, n, 2) * 0.01
        sz16 = sz.bfloat16()
        w8, s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n)
        for t in [int(r) for r in a.rows.split(",")]:
            x = torch.randn(t, k)
            x16 = x.bfloat16()
            ms = [best_ms(f, a.reps) for f in (
                lambda: F.linear(x, w),
                lambda: torch.ops.mkldnn._linear_pointwise(x, p8, None, "none", [], ""),
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 32, sz),
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, q4, 32, sz16),
                lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8))]
            print(f"| {n} x {k} | {t} | " + " | ".join(f"{m:.2f}" for m in ms) + " |", flush=True)


if __name__ == "__main__":
    main()
