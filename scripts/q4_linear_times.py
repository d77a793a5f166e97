"""Time every quantized linear layer inside a real greedy run (ms per call, one row vs many rows):
    python scripts/q4_linear_times.py [--kernel int4|vnni] [--model NAME] [-n TOKENS]
The kernel is chosen as semiar chooses it (SEMIAR_Q4_KERNEL); the prompt's prefill is the many-row call."""

import argparse
import collections
import os
import time

ap = argparse.ArgumentParser()
ap.add_argument("--kernel", default="int4", choices=["int4", "vnni"])
ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
ap.add_argument("-n", type=int, default=33)
args = ap.parse_args()
os.environ["SEMIAR_Q4_KERNEL"] = args.kernel

from semiar import api  # noqa: E402
from semiar.models.loading import load_model  # noqa: E402

if args.kernel == "vnni":
    from semiar.models.cpu.qdot import VnniLinear as Linear
else:
    from semiar.models.quant import QuantLinear as Linear

model = load_model(args.model)
prompt = "Write a Python function that returns the n-th Fibonacci number, with a docstring."
api.generate(prompt, model, method="ar", max_new_tokens=4, temperature=0)  # warm-up
total, calls = collections.defaultdict(float), collections.Counter()
forward = Linear.forward


def timed(self, x):
    t = time.perf_counter()
    y = forward(self, x)
    key = (self.out_features, self.in_features, "rows>1" if x.reshape(-1, x.shape[-1]).shape[0] > 1 else "1 row")
    total[key] += time.perf_counter() - t
    calls[key] += 1
    return y


Linear.forward = timed
t = time.perf_counter()
api.generate(prompt, model, method="ar", max_new_tokens=args.n, temperature=0)
wall = time.perf_counter() - t
print(f"kernel {args.kernel}, {args.n} tokens in {wall:.2f} s, linear layers {sum(total.values()):.2f} s")
print("| N x K | rows | calls | ms per call |")
print("|---|---|---:|---:|")
for k in sorted(total):
    print(f"| {k[0]} x {k[1]} | {k[2]} | {calls[k]} | {total[k] * 1e3 / calls[k]:.3f} |")
