"""`auto` step by step on a real target: which arm drafted each step, what it emitted, what the step cost.

For each prompt it runs `copy` alone and `auto` (training-free arms), each after a warm-up, and prints
per prompt the tokens/s, the steps per arm and, for `auto`, each arm's first steps and every step slower
than --slow-ms; then the arms' estimates at the end. `--before FILE` also runs an `AutoDrafter` class
loaded from FILE (another version of drafters/auto.py) on the same prompts, for an A/B in one process.

usage: python scripts/gpu/auto_trace.py --model PATH [--device cuda] [--tasks code,edit,chat] [--n 2]
"""
import argparse
import importlib.util
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from semiar.bench.tasks import load_tasks  # noqa: E402
from semiar.drafters import auto as auto_mod  # noqa: E402
from semiar.engine import Engine  # noqa: E402
from semiar.errors import SemiarError  # noqa: E402
from semiar.methods import TRAINING_FREE, make_drafter  # noqa: E402
from semiar.models.loading import load_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--device", default="cuda")
ap.add_argument("--tasks", default="code,edit,chat")
ap.add_argument("--n", type=int, default=2)
ap.add_argument("--tokens", type=int, default=128)
ap.add_argument("--slow-ms", type=float, default=4.0)
ap.add_argument("--before", help="an older drafters/auto.py to compare with")
a = ap.parse_args()


def load_before(path: str):
    src = Path(path).read_text()
    src = re.sub(r"from \.\.(\w+)", r"from semiar.\1", src).replace("from .base", "from semiar.drafters.base")
    spec = importlib.util.spec_from_loader("auto_before", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod.AutoDrafter


def traced(cls):
    """A subclass that logs (arm, tokens emitted, ms) per step, timed as the chooser times it."""

    class Traced(cls):
        def observe(self, accepted, n_draft_accepted, hidden=None, node_argmax=None):
            if self._chosen is not None:
                self.log.append((self._chosen.name, len(accepted), (self.clock() - self._t0) * 1e3))
            return super().observe(accepted, n_draft_accepted, hidden, node_argmax)

    return Traced


try:
    target = load_model(a.model, device=a.device, compile=a.device.startswith("cuda"))
    prompts = load_tasks(a.tasks, a.n)
    classes = {"auto": traced(auto_mod.AutoDrafter)}
    if a.before:
        classes["auto-before"] = traced(load_before(a.before))
except (SemiarError, OSError, SyntaxError, AttributeError) as e:
    sys.exit(f"error: {e}")
engines = {"copy": Engine(target, make_drafter("copy", target, device=a.device))}
for name, cls in classes.items():
    d = cls({m: make_drafter(m, target, device=a.device) for m in TRAINING_FREE})
    d.log = []
    engines[name] = Engine(target, d)
encoded = [target.encode(p.prompt, chat=True, system=p.system) for p in prompts]
for e in engines.values():  # warm-up, as the bench's
    e.generate(encoded[0], max_new_tokens=8).run()
totals = defaultdict(lambda: [0, 0.0])
for p, ids in zip(prompts, encoded):
    print(f"== {p.task}/{p.id} ({len(ids)} prompt tokens)")
    for name, e in engines.items():
        d = e.drafter
        if hasattr(d, "log"):
            d.log.clear()
        t0 = time.perf_counter()
        g = e.generate(ids, max_new_tokens=a.tokens).run()
        dt = time.perf_counter() - t0
        n = len(g.token_ids)
        totals[name][0] += n
        totals[name][1] += g.stats.seconds
        line = f"  {name:12s} {n / g.stats.seconds:8.1f} tok/s  forwards {g.stats.target_forwards:3d}  wall {dt * 1e3:6.1f} ms"
        if hasattr(d, "log"):
            steps = Counter(arm for arm, _, _ in d.log)
            line += f"  steps {dict(steps)}"
            print(line)
            first = defaultdict(list)
            for i, (arm, tok, ms) in enumerate(d.log):
                if len(first[arm]) < 3:
                    first[arm].append(f"#{i}:{tok}t/{ms:.2f}ms")
                if ms > a.slow_ms:
                    print(f"    slow step #{i}: {arm} {tok} tokens {ms:.2f} ms")
            print("    first steps: " + "; ".join(f"{arm} " + " ".join(v) for arm, v in first.items()))
        else:
            print(line)
for name, e in engines.items():
    n, s = totals[name]
    print(f"{name:12s} all {n / s:8.1f} tok/s")
    if hasattr(e.drafter, "summary"):
        for arm, rec in e.drafter.summary().items():
            print(f"    {arm:10s} {rec}")
