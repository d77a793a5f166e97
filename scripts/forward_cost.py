"""Cost of one target forward over T new tokens (after a prompt), packed vs plain linear layers.
usage: python scripts/forward_cost.py [--model NAME] [--threads N] [--sizes 1,4,8,16]"""
import argparse
import time

import torch

from semiar.models.loading import load_model


def cost_ms(m, T, reps=5):
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
ap.add_argument("--sizes", default="1,4,8,16")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
sizes = [int(s) for s in a.sizes.split(",")]
for pack in (True, False):
    m = load_model(a.model, pack=pack)
    print("packed" if pack else "plain ", " ".join(f"T={T}: {cost_ms(m, T):.0f} ms" for T in sizes), flush=True)
    del m
