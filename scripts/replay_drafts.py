"""Acceptance of training-free drafters replayed offline against recorded greedy outputs.

Under greedy decoding a lossless method emits exactly the target's greedy output, so how many
tokens each step accepts depends only on the drafter and that output: feeding a drafter the
recorded `ar` output of a bench run (results.json) reproduces its acceptance length tau and its
number of target forwards without running the model. This makes drafter variants cheap to compare
(seconds on a CPU for outputs that took a GPU to produce); speed still needs `semiar bench`.

usage: python scripts/replay_drafts.py RESULTS.json [--methods pld,copy,...] [--tree 'copy=...']
Prompts are re-encoded with the bench's tokenizer and chat template (the results name the target).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def accepted_along(tree, future: list[int]) -> tuple[int, list[int]]:
    """Greedy acceptance: the longest root-to-node path whose tokens equal `future`'s start."""
    kids = tree.children()
    node, n = -1, 0
    while n < len(future):
        nxt = next((c for c in kids[node + 1] if tree.tokens[c] == future[n]), None)
        if nxt is None:
            break
        node, n = nxt, n + 1
    return n, future[:n]


def replay(drafter, prompt: list[int], output: list[int]) -> dict:
    """Steps and tau of `drafter` generating `output` after `prompt` (greedy, lossless)."""
    from semiar.sampling import SamplingParams

    drafter.start(list(prompt), SamplingParams())
    done, steps, nodes = 0, 0, 0
    while done < len(output):
        ctx = list(prompt) + output[:done]
        tree = drafter.propose(ctx)
        nodes += len(tree)
        n, acc = accepted_along(tree, output[done:])
        bonus = output[done + n:done + n + 1]  # the target's own token after the accepted path
        drafter.observe(acc + bonus, n)
        done += n + len(bonus)
        steps += 1
    drafter.finish()
    return {"steps": steps, "tau": len(output) / steps, "nodes_per_step": nodes / steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--methods", default="pld,ngram,copy,lookahead")
    ap.add_argument("--tree", default=None, help="per-method trees, as semiar bench --tree")
    ap.add_argument("--tasks", default=None)
    a = ap.parse_args()

    from semiar.bench.run import tree_per_method
    from semiar.bench.tasks import load_tasks
    from semiar.methods import make_drafter
    from semiar.models.loading import LoadedModel, load_hf_config, load_tokenizer, resolve_model_dir

    r = json.loads(open(a.results).read())
    name, path = resolve_model_dir(r["target"])
    tok = load_tokenizer(path)
    fake = LoadedModel.__new__(LoadedModel)  # the tokenizer side of a LoadedModel, no weights
    fake.name, fake.tokenizer, fake.path = name, tok, path
    fake.config = type("C", (), {"vocab_size": load_hf_config(path)["vocab_size"]})()
    tasks = sorted({p["task"] for p in r["prompts"]})
    if a.tasks:
        tasks = [t for t in tasks if t in a.tasks.split(",")]
    prompts = {(p.task, p.id): p for p in load_tasks(tasks, n=None)}
    chat = r["settings"].get("chat", True)
    methods = a.methods.split(",")
    trees = tree_per_method(a.tree, methods)
    totals = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for run in r["runs"]["ar"]:
        if run["task"] not in tasks:
            continue
        p = prompts[(run["task"], run["prompt_id"])]
        ids = fake.encode(p.prompt, chat=chat, system=p.system)
        for m in methods:
            d = make_drafter(m, fake, tree=trees.get(m))
            res = replay(d, ids, run["token_ids"])
            for key in (run["task"], "all"):
                totals[key][m][0] += len(run["token_ids"])
                totals[key][m][1] += res["steps"]
            recorded = next((x for x in r["runs"].get(m, []) if x["prompt_id"] == run["prompt_id"]), None)
            rec = f" (recorded {recorded['tau']:.2f})" if recorded and recorded.get("tau") else ""
            print(f"{run['task']:5s} {run['prompt_id']:14s} {m:10s} tau {res['tau']:.2f}{rec} "
                  f"nodes/step {res['nodes_per_step']:.1f}")
    print()
    for key, per in totals.items():
        print(key, "  ".join(f"{m} {t / s:.2f}" for m, (t, s) in per.items()))


if __name__ == "__main__":
    main()
