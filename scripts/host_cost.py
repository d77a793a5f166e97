"""Host work per decoding step, which a GPU step cannot hide, measured on the CPU.

  python scripts/host_cost.py text  [--tokenizer NAME] [--outputs docs/results/qwen-cpu-ar-outputs.json]
      streaming text: µs per token when every generated id is decoded again for each new token
      (the engine's rule before 2768893) vs the engine's windowed decode per step of 8 tokens
  python scripts/host_cost.py mask  [--nodes 48]
      a tree's attention mask: built row by row in torch (before 93ddd2c) vs DraftTree.attention_mask
  python scripts/host_cost.py engine [--src CHECKOUT]
      ms per iteration of `ar` and `copy` (dynamic:8,8,48) on a tiny model with a character
      tokenizer (its forward costs little), 300 tokens, best of 4; --src runs another checkout's
      code, e.g. one made with `git worktree add /tmp/old 7a10224`
  python scripts/host_cost.py lookup [--method ngram] [--results docs/results/gpu-h200-all-greedy.json] [--src ...]
      µs per proposal of a lookup drafter replaying a bench's `ar` outputs, 2 tokens a step, each
      output after another's as context (real token ids, so a 152k vocabulary)
"""
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("what", choices=["text", "mask", "engine", "lookup"])
ap.add_argument("--tokenizer", default="qwen2.5-coder-1.5b-instruct")
ap.add_argument("--outputs", default="docs/results/qwen-cpu-ar-outputs.json")
ap.add_argument("--nodes", type=int, default=48)
ap.add_argument("--method", default="ngram", help="lookup: ngram, pld or copy")
ap.add_argument("--results", default="docs/results/gpu-h200-all-greedy.json")
ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1]))
a = ap.parse_args()
sys.path[:0] = [a.src + "/src", a.src + "/tests"]

import torch  # noqa: E402

torch.set_num_threads(1)


def per_call_us(fn, n):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


if a.what == "text":
    from transformers import AutoTokenizer

    from semiar.engine import _Detokenizer
    from semiar.models.registry import hf_dir

    if not hf_dir(a.tokenizer).is_dir() or not Path(a.outputs).is_file():
        sys.exit(f"error: needs the model {a.tokenizer} (semiar models pull {a.tokenizer}) and {a.outputs}")
    tok = AutoTokenizer.from_pretrained(str(hf_dir(a.tokenizer)))
    runs = [r for r in json.loads(Path(a.outputs).read_text())["runs"]["ar"] if r.get("token_ids")]
    ids = max((r["token_ids"] for r in runs), key=len)

    def every_id_per_token():
        for n in range(1, len(ids) + 1):
            tok.decode(ids[:n], skip_special_tokens=True)

    def windowed():
        d = _Detokenizer(tok, ["\n\n\n"])
        for i in range(0, len(ids), 8):
            d.extend(ids[i:i + 8])

    for name, fn in [("every id per token", every_id_per_token), ("windowed, per step", windowed)]:
        print(f"{name:>20}: {per_call_us(fn, 5) / len(ids):.1f} µs per token over a {len(ids)}-token output")

elif a.what == "mask":
    from semiar.tree import DraftTree

    random.seed(0)
    parents = [-1] + [random.randrange(-1, i) for i in range(1, a.nodes)]
    tree = DraftTree(list(range(a.nodes)), parents)

    def row_by_row():
        n = len(tree) + 1
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(tree.parents):
            mask[i + 1] = mask[p + 1]
            mask[i + 1, i + 1] = True
        return mask

    assert torch.equal(row_by_row(), tree.attention_mask())
    for name, fn in [("torch, row by row", row_by_row), ("attention_mask", tree.attention_mask)]:
        print(f"{name:>18}: {per_call_us(fn, 1000):.1f} µs for {a.nodes} nodes")

elif a.what == "lookup":
    from semiar.methods import make_drafter

    if a.method not in ("ngram", "pld", "copy"):
        sys.exit(f"error: --method must be a lookup drafter (ngram, pld or copy), not {a.method!r}")
    try:
        outs = [r["token_ids"] for r in json.loads(Path(a.results).read_text())["runs"]["ar"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: {a.results} is not a bench results.json with `ar` outputs ({type(e).__name__}: {e})")
    total, calls = 0.0, 0
    for i, out in enumerate(outs):
        prompt = outs[(i + 1) % len(outs)] + out[:20]
        d = make_drafter(a.method, None)
        d.start(prompt, None)
        toks = list(prompt)
        for j in range(0, len(out), 2):
            t0 = time.perf_counter()
            d.propose(toks)
            total += time.perf_counter() - t0
            calls += 1
            d.observe(out[j:j + 2], 1)
            toks.extend(out[j:j + 2])
    print(f"{a.method}: {total / calls * 1e6:.1f} µs per proposal over {calls} ({a.src})")

else:
    from tiny import tiny_model_dir

    from semiar.engine import Engine
    from semiar.methods import make_drafter
    from semiar.models.cuda.graphs import GraphedDecoder
    from semiar.models.loading import load_model

    m = load_model(str(tiny_model_dir(Path(tempfile.mkdtemp()) / "tiny")))
    m.runner = GraphedDecoder(m.decoder, capacity=1024, capture=False)
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 6
    ids = m.tokenizer.encode(text, add_special_tokens=False)[:200]
    for method in ("ar", "copy"):
        best = float("inf")
        for _ in range(4):
            drafter = make_drafter("copy", m, tree="dynamic:8,8,48") if method == "copy" else None
            gen = Engine(m, drafter).generate(ids, max_new_tokens=300).run()
            s = gen.stats
            best = min(best, (s.seconds - s.prefill_seconds) / s.target_forwards * 1e3)
        print(f"{method:>5}: {best:.3f} ms per iteration, tau {s.tau:.2f}, {len(gen.token_ids)} tokens ({a.src})")
