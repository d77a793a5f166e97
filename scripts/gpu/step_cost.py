"""Cost of one decode step and of tree verification on CUDA: eager, CUDA graphs, compiled + graphs.

usage: python scripts/gpu/step_cost.py --model MODEL [--compile] [--sizes 16,32,64] [--context 300]
Prints a table and writes step_cost.json to --out. The bound: every decode step reads all weights
once; at the GPU's memory bandwidth (--bandwidth, default 3.35e12 B/s for an H100 SXM) that allows
bandwidth / weight_bytes steps per second.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from semiar.models.decoder import Attention
from semiar.models.graphs import GraphedDecoder
from semiar.models.loading import load_model


def timed(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def step_costs(runner, cache, context, sizes, reps):
    """ms per call for 1 token and for chain blocks of each size, after `context` cached tokens."""
    dev = cache.k.device
    runner(torch.randint(100, 1000, (1, context), device=dev), cache, logits_at=slice(0, 0))
    out = {}
    for T in [1] + sizes:
        ids = torch.randint(100, 1000, (1, T), device=dev)

        def call():
            cache.length = context
            runner(ids, cache)

        out[T] = timed(call, reps)
    return out


ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--sizes", default="16,32,64")
ap.add_argument("--context", type=int, default=300)
ap.add_argument("--capacity", type=int, default=2048)
ap.add_argument("--reps", type=int, default=200)
ap.add_argument("--compile", action="store_true")
ap.add_argument("--bandwidth", type=float, default=3.35e12)
ap.add_argument("--out", default="runs/step_cost")
ap.add_argument("--profile", action="store_true", help="also print the GPU kernels of one static 1-token step")
a = ap.parse_args()
sizes = [int(s) for s in a.sizes.split(",")]

m = load_model(a.model, device="cuda", cuda_graphs=False)
dec = m.decoder
# what a step reads: every weight but the embedding table (one row of it), unless the LM head is tied to it
weight_bytes = sum(p.numel() * p.element_size() for p in dec.parameters())
if dec.lm_head.weight is not dec.embed_tokens.weight:
    weight_bytes -= dec.embed_tokens.weight.numel() * dec.embed_tokens.weight.element_size()
bound_ms = weight_bytes / a.bandwidth * 1e3
res = {"model": m.name, "gpu": torch.cuda.get_device_name(0), "dtype": str(m.dtype), "torch": torch.__version__,
       "weight_bytes": weight_bytes, "bandwidth": a.bandwidth, "bound_ms": bound_ms, "context": a.context,
       "capacity": a.capacity}



def report(name):
    r = res[name]
    line = f"{name:>16}: 1 token {r[1]:.3f} ms ({1e3 / r[1]:.0f} steps/s, {bound_ms / r[1]:.0%} of bound)"
    line += "".join(f" | {T}: {r[T]:.3f} ms (x{r[T] / r[1]:.2f})" for T in sizes)
    if name + "_replay_ms" in res:
        rp = res[name + "_replay_ms"]
        line += f" | replay alone {rp:.3f} ms ({bound_ms / rp:.0%} of bound), capture {res[name + '_capture_s']:.1f} s"
    print(line, flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "step_cost.json").write_text(json.dumps(res, indent=1))


print(f"{res['model']} on {res['gpu']}, {res['dtype']}, weights {weight_bytes / 1e9:.2f} GB, "
      f"bound {bound_ms:.3f} ms/step ({1e3 / bound_ms:.0f} steps/s at {a.bandwidth / 1e12:.2f} TB/s)", flush=True)
res["eager"] = step_costs(dec, dec.new_cache(a.capacity), a.context, sizes, max(20, a.reps // 10))
report("eager")
variants = [("graphs", False), ("graphs-sdpa", False)] + ([("compiled+graphs", True)] if a.compile else [])
for name, comp in variants:
    Attention.static_sdpa = name == "graphs-sdpa"
    t0 = time.perf_counter()
    g = GraphedDecoder(dec, capacity=a.capacity, sizes=[1] + sizes, compile=comp)
    res[name + "_capture_s"] = time.perf_counter() - t0
    cache = g.new_cache(a.context + 100)
    res[name] = step_costs(g, cache, a.context, sizes, a.reps)
    # the replay alone (no input copies, no Python around it): what the GPU itself takes
    cache.length = a.context
    res[name + "_replay_ms"] = timed(lambda: g.graphs[1].replay(), a.reps)
    report(name)
    del g, cache
    torch.cuda.empty_cache()

Attention.static_sdpa = False
if a.profile:
    from torch.profiler import ProfilerActivity, profile

    g = GraphedDecoder(dec, capacity=a.capacity, sizes=[1], capture=False)
    cache = g.new_cache(a.context + 100)
    step_costs(g, cache, a.context, [], 5)
    ids = torch.randint(100, 1000, (1, 1), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            cache.length = a.context
            g(ids, cache)
        torch.cuda.synchronize()
    for key in ("self_device_time_total", "self_cuda_time_total", "cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
            break
        except Exception:  # the key's name changed across torch versions
            continue
