"""Cost of one target forward over T new tokens (after a prompt) for each CPU weight layout: dense
(F.linear), oneDNN-packed for 1 row, packed for 8 rows, and the default (dense for 1-2 rows, packed
for 8 above). The table in docs/models.md came from this (best of 7, --threads 2).
usage: python scripts/forward_cost.py [--model NAME] [--threads N] [--sizes 1,2,8] [--reps 7]
       python scripts/forward_cost.py --dtypes fp32,bf16 [...]   each dtype's default layout, the models
           loaded side by side and timed interleaved (median of --reps): this machine's speed drifts
           between processes, so dtypes are compared in one"""
import argparse
import time

import torch

from semiar.models.decoder import PackedLinear
from semiar.models.loading import load_model


def cost_ms(m, T, reps):
    dec = m.decoder
    x = torch.tensor([m.encode("Write a function that sorts a list of numbers.", chat=True)])
    c = dec.new_cache(x.shape[1] + T + 1)
    dec(x, c, logits_at=slice(-1, None))
    best = float("inf")
    for _ in range(reps):
        c.truncate(x.shape[1])
        t0 = time.perf_counter()
        dec(torch.ones(1, T, dtype=torch.long), c)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


ap = argparse.ArgumentParser()
ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--sizes", default="1,2,8")
ap.add_argument("--reps", type=int, default=7)
ap.add_argument("--dtypes", default=None, help="compare dtypes (e.g. fp32,bf16) instead of layouts")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
sizes = [int(s) for s in a.sizes.split(",")]
if a.dtypes:
    import statistics

    models = {dt: load_model(a.model, dtype=dt, progress=False) for dt in a.dtypes.split(",")}
    times = {(dt, T): [] for dt in models for T in sizes}
    for _ in range(a.reps):
        for T in sizes:
            for dt, m in models.items():
                times[dt, T].append(cost_ms(m, T, 1))
    for dt, m in models.items():
        print(f"{dt:>5} ({m.decoder.one_row_kernel or 'dense'})",
              " ".join(f"T={T}: {statistics.median(times[dt, T]):.1f} ms" for T in sizes), flush=True)
    raise SystemExit(0)
for name, pack_rows, dense_rows in [("dense", None, 0), ("packed for 1 row", 1, 0), ("packed for 8 rows", 8, 0),
                                     ("default (both)", 8, 2)]:
    m = load_model(a.model, pack=False, progress=False)
    if pack_rows is not None:
        PackedLinear.PACK_ROWS = pack_rows
        m.decoder.pack_for_cpu(dense_rows=dense_rows)
    print(f"{name:>18}", " ".join(f"T={T}: {cost_ms(m, T, a.reps):.0f} ms" for T in sizes), flush=True)
    del m
