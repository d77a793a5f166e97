"""Acceptance length (tau) of several Falcon drafters and tree shapes on the same prompts, greedy.
The ablation table in docs/benchmarks.md comes from this script (speed is `semiar bench`'s job).

usage: python scripts/falcon_ablation.py --target MODEL [--tasks code,chat] [--n-prompts 3] [-n 128]
           [--device cuda] [--out FILE.json] LABEL=DRAFTER_DIR[@TREE_SPEC] ...
e.g.   k2=runs/f-k2 k3=runs/f-k3 noglance=runs/f-ng k2-chain=runs/f-k2@dynamic:8,1,8
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from semiar.bench.tasks import load_tasks  # noqa: E402
from semiar.drafters.falcon import FalconDrafter, load_falcon  # noqa: E402
from semiar.engine import Engine  # noqa: E402
from semiar.models.loading import load_model  # noqa: E402
from semiar.tree import parse_tree_spec  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--tasks", default="code,chat")
    ap.add_argument("--n-prompts", type=int, default=3)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    target = load_model(a.target, device=a.device)
    prompts = load_tasks(a.tasks.split(","), a.n_prompts)
    ids = [target.encode(p.prompt, chat=True, system=p.system) for p in prompts]
    rows = []
    for v in a.variants:
        label, _, rest = v.partition("=")
        path, _, tree = rest.partition("@")
        drafter = FalconDrafter(load_falcon(path, target), target, parse_tree_spec(tree) if tree else None)
        new = fwd = 0
        for x in ids:
            g = Engine(target, drafter).generate(x, max_new_tokens=a.max_new_tokens).run()
            new += g.stats.new_tokens
            fwd += g.stats.target_forwards
        t = drafter.tree
        rows.append({"variant": label, "k": drafter.k, "tree": f"dynamic:{t.depth},{t.top_k},{t.budget}",
                     "tau": round(new / fwd, 3), "tokens": new})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| variant | k | tree | tau |\n|---|---:|---|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['k']} | `{r['tree']}` | {r['tau']:.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"target": target.name, "tasks": a.tasks, "n_prompts": a.n_prompts,
                                           "max_new_tokens": a.max_new_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
