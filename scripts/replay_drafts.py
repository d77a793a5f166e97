"""Acceptance of training-free drafters replayed offline against recorded greedy outputs.

Under greedy decoding a lossless method emits exactly the target's greedy output, so how many
tokens each step accepts depends only on the drafter and that output: feeding a drafter the
recorded `ar` output of a bench run (results.json) reproduces its acceptance length tau and its
number of target forwards without running the model. This makes drafter variants cheap to compare
(seconds on a CPU for outputs that took a GPU to produce); speed still needs `semiar bench`.

usage: python scripts/replay_drafts.py RESULTS.json [--methods pld,copy,...] [--tree 'copy=...']
           [--skip N] [--cost 'ROWS:STEPS,...' [--padded]] [--timing] [-v]
--skip N leaves out the first N prompts of each task (a held-out check of a shape chosen on them);
--cost gives the measured cost of verifying ROWS rows (root + nodes) in decode steps, interpolated
linearly (--padded: the next listed size up, as CUDA graphs pad a block), and adds an *estimate* of speed vs ar: tokens / summed verification cost (prefill and
drafting left out); --timing adds the host time of a proposal. Prompts are re-encoded with the
bench's tokenizer and chat template (the results name the target).
"""
from __future__ import annotations

import argparse
import json
import time
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


def replay(drafter, prompt: list[int], output: list[int], cost=None) -> dict:
    """Steps and tau of `drafter` generating `output` after `prompt` (greedy, lossless); with
    `cost(rows)` (decode steps to verify that many rows) also the summed cost; host seconds of
    each proposal in `propose_s`."""
    from semiar.sampling import SamplingParams

    drafter.start(list(prompt), SamplingParams())
    done, steps, nodes, spent, propose_s = 0, 0, 0, 0.0, []
    while done < len(output):
        ctx = list(prompt) + output[:done]
        t0 = time.perf_counter()
        tree = drafter.propose(ctx)
        propose_s.append(time.perf_counter() - t0)
        nodes += len(tree)
        spent += cost(len(tree) + 1) if cost else 0.0
        n, acc = accepted_along(tree, output[done:])
        bonus = output[done + n:done + n + 1]  # the target's own token after the accepted path
        drafter.observe(acc + bonus, n)
        done += n + len(bonus)
        steps += 1
    drafter.finish()
    return {"steps": steps, "tau": len(output) / steps, "nodes_per_step": nodes / steps, "cost": spent,
            "propose_s": propose_s}


def cost_curve(spec: str, padded: bool = False):
    """'1:1,16:1.07,64:1.18' -> cost(rows), linear between the points, flat beyond them; padded:
    the cost of the smallest listed size that holds the rows (CUDA graphs pad a block up)."""
    try:
        pts = sorted((int(r), float(c)) for r, c in (item.split(":") for item in spec.split(",")))
    except ValueError:
        raise SystemExit(f"error: --cost wants ROWS:STEPS pairs separated by commas, got {spec!r}") from None

    def cost(rows: int) -> float:
        if padded:
            return next((c for r, c in pts if r >= rows), pts[-1][1])
        if rows <= pts[0][0]:
            return pts[0][1]
        for (r0, c0), (r1, c1) in zip(pts, pts[1:]):
            if rows <= r1:
                return c0 + (c1 - c0) * (rows - r0) / (r1 - r0)
        return pts[-1][1]

    return cost


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--methods", default="pld,ngram,copy,lookahead")
    ap.add_argument("--tree", default=None, help="per-method trees, as semiar bench --tree")
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N prompts of each task")
    ap.add_argument("--cost", default=None, help="verification cost in decode steps by rows, e.g. 1:1,16:1.07,64:1.18")
    ap.add_argument("--padded", action="store_true", help="--cost points are graph sizes: a block costs the next one up")
    ap.add_argument("--timing", action="store_true", help="report the host time of a proposal")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per prompt")
    a = ap.parse_args()

    from semiar.bench.run import tree_per_method
    from semiar.bench.tasks import load_tasks
    from semiar.methods import make_drafter
    from semiar.models.decoder import DecoderConfig
    from semiar.models.loading import LoadedModel, load_hf_config, load_tokenizer, resolve_model_dir

    try:
        r = json.loads(open(a.results).read())
        runs = r["runs"]["ar"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {a.results} is not a semiar bench results.json with an `ar` run ({e})") from None
    name, path = resolve_model_dir(r["target"])
    # the tokenizer side of the target (encode, vocabulary), no weights
    target = LoadedModel(name=name, path=path, decoder=None, tokenizer=load_tokenizer(path),
                         config=DecoderConfig.from_hf(load_hf_config(path)))
    tasks = sorted({p["task"] for p in r["prompts"]})
    if a.tasks:
        tasks = [t for t in tasks if t in a.tasks.split(",")]
    prompts = {(p.task, p.id): p for p in load_tasks(tasks, n=None)}
    chat = r["settings"].get("chat", True)
    methods = a.methods.split(",")
    trees = tree_per_method(a.tree, methods)
    cost = cost_curve(a.cost, a.padded) if a.cost else None
    totals = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0]))  # tokens, steps, cost
    times = defaultdict(list)
    seen = defaultdict(int)
    for run in runs:
        if run["task"] not in tasks:
            continue
        seen[run["task"]] += 1
        if seen[run["task"]] <= a.skip:
            continue
        p = prompts[(run["task"], run["prompt_id"])]
        ids = target.encode(p.prompt, chat=chat, system=p.system)
        for m in methods:
            res = replay(make_drafter(m, target, tree=trees.get(m)), ids, run["token_ids"], cost)
            times[m] += res["propose_s"]
            for key in (run["task"], "all"):
                t = totals[key][m]
                t[0] += len(run["token_ids"])
                t[1] += res["steps"]
                t[2] += res["cost"]
            if a.verbose:
                recorded = next((x for x in r["runs"].get(m, []) if x["prompt_id"] == run["prompt_id"]), None)
                rec = f" (recorded {recorded['tau']:.2f})" if recorded and recorded.get("tau") else ""
                print(f"{run['task']:5s} {run['prompt_id']:14s} {m:10s} tau {res['tau']:.2f}{rec} "
                      f"nodes/step {res['nodes_per_step']:.1f}")
    for key, per in totals.items():
        cells = []
        for m, (toks, steps, spent) in per.items():
            cells.append(f"{m} tau {toks / steps:.2f}" + (f" est. {toks / spent:.2f}x" if cost else ""))
        print(f"{key:5s}", "  ".join(cells))
    if a.timing:
        for m, ts in times.items():
            ts.sort()
            print(f"{m}: proposal host time median {ts[len(ts) // 2] * 1e6:.0f} us, "
                  f"90th percentile {ts[int(len(ts) * 0.9)] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
