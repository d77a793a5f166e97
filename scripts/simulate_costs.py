"""The engine's methods on recorded greedy texts with a stub target whose forwards cost what they
cost on a GPU (busy-waited), to study policies such as `auto`'s on a CPU.

The stub target predicts a recorded `ar` output (row at position p: the text's token p + 1) and
takes `--step` ms per one-token forward plus `--host` ms, times the verification cost of the
block's graph size (`--cost`, decode steps per rows, padded up as CUDA graphs pad). The stub draft
model guesses the text's next token with probability `--draft-acc` at `--draft-ms` per forward.
Tokens are renumbered to the texts' own small vocabulary. Every method's output is checked to be
the recorded text. On a quiet 2-core CPU, with the H200 bench's texts and costs (the defaults), it
gave `ar` 714-720 tokens/s, `copy` 2.29-2.30x, `draft` 1.20x and `auto` 1.70-1.88x (its choices
move with timing noise from run to run), where that bench measured `ar` 714, `copy` 2.31x and
`auto` 1.87x (it ran no `draft`; docs/benchmarks.md). It busy-waits: run it on an idle machine.
Faithful for the lookup drafters (`copy`, `pld`, `ngram`: what they accept depends on the text
alone); not for `lookahead`, whose Jacobi guesses come from the target's argmax at its draft nodes,
which the stub gives by position whatever the path (so they come out too good), nor for the draft
model, which the stub makes right at one rate on every task.

Like `semiar bench`, each method first generates --warmup tokens (default 8) of the first prompt,
untimed; `auto`'s record carries over from it, and without it the simulator missed how `auto`
starved `copy` on the GPU (docs/methods.md, `auto`). `copy` runs with its CUDA tree, alone and as
`auto`'s arm. The collector is frozen before the timed runs, as in the bench.

usage: python scripts/simulate_costs.py [RESULTS.json] [--methods ar,copy,auto] [--auto-kw "{'margin': 0.1}"]
"""
import argparse
import ast
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from semiar.bench.tasks import load_tasks  # noqa: E402
from semiar.drafters.auto import AutoDrafter  # noqa: E402
from semiar.drafters.draft_model import DraftModelDrafter  # noqa: E402
from semiar.engine import Engine  # noqa: E402
from semiar.methods import TRAINING_FREE, make_drafter  # noqa: E402
from semiar.models.decoder import DecoderConfig, DecoderOutput, KVCache  # noqa: E402
from semiar.models.loading import LoadedModel, load_hf_config, load_tokenizer, resolve_model_dir  # noqa: E402
from semiar.tree import TreeSpec  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("results", nargs="?", default="docs/results/gpu-h200-n6-repeats-greedy.json")
ap.add_argument("--methods", default="ar,copy,draft,auto")
ap.add_argument("--step", type=float, default=1.15, help="ms of a one-token forward")
ap.add_argument("--host", type=float, default=0.2, help="ms of host work per forward")
ap.add_argument("--cost", default="1:1,16:1.49,32:1.56,64:1.68", help="ROWS:STEPS, padded up")
ap.add_argument("--draft-ms", type=float, default=0.65)
ap.add_argument("--draft-acc", default="0.93",
                help="the stub draft model's chance per token of the text's next one: one value, or per task "
                     "(code:0.95,edit:0.85)")
ap.add_argument("--per-prompt", action="store_true", help="also a line per prompt for auto (tokens/s, steps per arm)")
ap.add_argument("--arms", default=",".join(TRAINING_FREE + ("draft",)), help="auto's arms")
ap.add_argument("--auto-kw", default="{}", help="AutoDrafter keyword arguments, a Python dict")
ap.add_argument("--warmup", type=int, default=8,
                help="tokens each method first generates on the first prompt, untimed, as `semiar bench` does")
a = ap.parse_args()
torch.set_num_threads(1)
sizes = sorted((int(r), float(c)) for r, c in (p.split(":") for p in a.cost.split(",")))


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class StubModel:
    """Predicts `text` (with probability `acc` per row), costing `cost(rows)` seconds per forward."""

    accepts_host_inputs = True
    device = torch.device("cpu")

    def __init__(self, vocab: int, cost, acc: float = 1.0, seed: int = 0):
        self.vocab, self.cost, self.acc, self.rng, self.text = vocab, cost, acc, random.Random(seed), []

    def new_cache(self, capacity, batch=1):
        return KVCache(1, 1, 8, capacity, torch.float32, "cpu", 1)

    def __call__(self, ids, cache, positions=None, tree_mask=None, logits_at=None, return_hidden=False,
                 attn_mask=None):
        T, start = ids.shape[1], cache.length
        pos = positions[0].tolist() if positions is not None else range(start, start + T)
        logits = torch.zeros(1, T, self.vocab)
        for i, p in enumerate(pos):
            if p + 1 < len(self.text):
                right = self.rng.random() < self.acc
                logits[0, i, self.text[p + 1] if right else (self.text[p + 1] + 1) % self.vocab] = 20.0
        cache.length = start + T
        spin(self.cost(T))
        return DecoderOutput(logits=logits if logits_at is None else logits[:, logits_at])


def target_cost(rows: int) -> float:
    steps = next((c for r, c in sizes if r >= rows), sizes[-1][1])
    return (a.step * steps + a.host) / 1e3


r = json.loads(Path(a.results).read_text())
name, path = resolve_model_dir(r["target"])
cfg = DecoderConfig.from_hf(load_hf_config(path))
encoder = LoadedModel(name=name, path=path, decoder=None, tokenizer=load_tokenizer(path), config=cfg)
prompts = {(p.task, p.id): p for p in load_tasks(sorted({x["task"] for x in r["runs"]["ar"]}), n=None)}
cases = []
for run in r["runs"]["ar"]:
    p = prompts[(run["task"], run["prompt_id"])]
    cases.append((run["task"], encoder.encode(p.prompt, chat=r["settings"].get("chat", True), system=p.system),
                  run["token_ids"]))
vocab = {t: i for i, t in enumerate(sorted({t for _, ids, out in cases for t in ids + out}))}
cases = [(task, [vocab[t] for t in ids], [vocab[t] for t in out]) for task, ids, out in cases]
target_stub = StubModel(len(vocab), target_cost)
draft_acc = ({k: float(v) for k, v in (x.split(":") for x in a.draft_acc.split(","))} if ":" in a.draft_acc
             else {task: float(a.draft_acc) for task, _, _ in cases})
draft_stub = StubModel(len(vocab), lambda rows: a.draft_ms / 1e3, seed=1)
stub = torch.nn.Linear(1, 1)
target = LoadedModel(name=name, path=None, decoder=stub, tokenizer=None, config=cfg, runner=target_stub)
draft = LoadedModel(name="draft", path=None, decoder=stub, tokenizer=None, config=cfg, runner=draft_stub)


def make(method):
    if method == "ar":
        return None
    if method == "draft":
        return DraftModelDrafter(draft, tree=TreeSpec("chain", k=12))
    if method == "auto":
        arms = {m: make(m) for m in a.arms.split(",")}
        return AutoDrafter(arms, **ast.literal_eval(a.auto_kw))
    # copy with its CUDA default (make_drafter's COPY_GPU_TREE), alone and as an arm of auto
    return make_drafter(method, target, **({"tree": "dynamic:8,8,48"} if method == "copy" else {}))


# as `semiar bench`: what is loaded by now is frozen, so that a collection inside a timed run does not
# walk it (single 50-100 ms stalls moved from prompt to prompt without this)
gc.collect()
gc.freeze()
base = None
for method in a.methods.split(","):
    drafter = make(method)
    engine = Engine(target, drafter)
    if a.warmup:
        task, ids, out = cases[0]
        target_stub.text = draft_stub.text = ids + out
        draft_stub.acc = draft_acc[task]
        engine.generate(ids, max_new_tokens=min(a.warmup, len(out))).run()
    per_task = {}
    for task, ids, out in cases:
        target_stub.text = draft_stub.text = ids + out
        draft_stub.acc = draft_acc[task]
        before = dict(drafter.choices) if isinstance(drafter, AutoDrafter) else None
        g = engine.generate(ids, max_new_tokens=len(out)).run()
        if a.per_prompt and before is not None:
            steps = {k: v - before.get(k, 0) for k, v in drafter.choices.items() if v - before.get(k, 0)}
            print(f"  {task:5s} {len(out) / g.stats.seconds:7.1f} tok/s tau {len(out) / g.stats.target_forwards:.2f} "
                  f"steps per arm {steps}", flush=True)
        assert g.token_ids == out, (method, task)
        t = per_task.setdefault(task, [0, 0.0, 0])
        t[0], t[1], t[2] = t[0] + len(out), t[1] + g.stats.seconds, t[2] + g.stats.target_forwards
    rate = sum(t[0] for t in per_task.values()) / sum(t[1] for t in per_task.values())
    base = base or (rate if method == "ar" else None)
    cells = "  ".join(f"{task} {t[0] / t[1]:7.1f} tok/s tau {t[0] / t[2]:.2f}" for task, t in per_task.items())
    print(f"{method:9s} {cells}  all {rate:7.1f}" + (f" ({rate / base:.2f}x)" if base else "")
          + (f"  steps per arm {dict(drafter.choices)}" if isinstance(drafter, AutoDrafter) else ""), flush=True)
