"""Tune the training-free methods' knobs on a real target: tokens/s and tau of each variant on a
few prompts per task, interleaved per prompt, against `ar` measured in the same process.

    PYTHONPATH=src python scripts/tune_training_free.py --target smollm2-135m-instruct \
        --tasks code,edit,chat --n-prompts 3 --max-new-tokens 96 \
        --variants ar pld copy lookahead:3,3,3 lookahead:5,4,5 auto
"""

from __future__ import annotations

import argparse
import time

import torch

from semiar.bench.tasks import load_tasks
from semiar.engine import Engine
from semiar.methods import make_drafter
from semiar.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default="code,edit,chat")
    ap.add_argument("--n-prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=["ar", "pld", "copy", "lookahead", "auto"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    target = load_model(a.target)
    engines = {}
    for v in a.variants:
        method, _, spec = v.partition(":")
        tree = f"lookahead:{spec}" if method == "lookahead" and spec else (spec or None)
        engines[v] = Engine(target, make_drafter(method, target, tree=tree))
    prompts = load_tasks(a.tasks, a.n_prompts)
    agg = {}  # (task, variant) -> [tokens, seconds, forwards]
    for p in prompts:
        ids = target.encode(p.prompt, chat=True, system=p.system)
        ref = None
        for v, eng in engines.items():
            g = eng.generate(ids, max_new_tokens=a.max_new_tokens).run()
            if ref is None:
                ref = g.token_ids
            assert g.token_ids == ref, f"{v} differs from {a.variants[0]} on {p.id}"
            t = agg.setdefault((p.task, v), [0, 0.0, 0])
            t[0] += g.stats.new_tokens
            t[1] += g.stats.seconds
            t[2] += g.stats.target_forwards
    for task in dict.fromkeys(p.task for p in prompts):
        base = agg[(task, a.variants[0])]
        for v in a.variants:
            n, s, f = agg[(task, v)]
            print(f"{task:6s} {v:18s} {n / s:8.1f} tok/s  x{(n / s) / (base[0] / base[1]):.2f}  tau {n / f:.2f}")
    for v, eng in engines.items():
        if hasattr(eng.drafter, "summary"):
            print(v, eng.drafter.summary())


if __name__ == "__main__":
    main()
