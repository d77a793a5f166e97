"""Host cost of one Falcon proposal (Python, tree building, small ops) on a tiny random model:
what the GPU cannot hide when every drafter pass is a short CUDA graph.
    python scripts/propose_cost.py [--tree dynamic:8,6,48] [--steps 200]"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import tiny_target  # noqa: E402

from semiar.drafters.falcon import FalconConfig, FalconDrafter, FalconNet  # noqa: E402
from semiar.tree import parse_tree_spec  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tree", default="dynamic:8,6,48")
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--profile", action="store_true", help="cProfile the proposals (top 25 by own time)")
a = ap.parse_args()
torch.set_num_threads(1)
target, _ = tiny_target()
torch.manual_seed(0)
net = FalconNet(FalconConfig.for_target(target.config, k=2))
net.reset_parameters(std=0.3)
d = FalconDrafter(net.eval(), target, parse_tree_spec(a.tree))
prompt = list(range(3, 40))
hidden = torch.randn(len(prompt) - 1, target.config.hidden_size)
d.start(prompt, None, None, hidden)
tokens = list(prompt)
times = []
if a.profile:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
for step in range(a.steps):
    t0 = time.perf_counter()
    tree = d.propose(tokens)
    times.append(time.perf_counter() - t0)
    tokens.append(tree.tokens[0] if len(tree) else 5)
    d.observe([tokens[-1]], 1, torch.randn(2, target.config.hidden_size))
    if len(tokens) > 300:
        tokens = list(prompt)
        d.start(prompt, None, None, hidden)
if a.profile:
    import pstats
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
times.sort()
print(f"{a.tree}: median {1e3 * times[len(times) // 2]:.2f} ms per proposal, {len(tree)} nodes, "
      f"{d.forwards} drafter passes")
