"""CUDA smoke test on a tiny model (seconds): training and Falcon, CUDA graphs, compiled graphs with a
chunked prefill (and the fused one-token step, on by default), the one-row kernel forced on, the
tree forwards' block attention. Run first in a lease; --graphs-only skips the training part."""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny import tiny_model_dir  # noqa: E402

import semiar  # noqa: E402
from semiar.train.trainer import TrainConfig, train_drafter  # noqa: E402

assert torch.cuda.is_available()
tmp = Path(tempfile.mkdtemp())
d = tiny_model_dir(tmp / "tiny")
if "--graphs-only" not in sys.argv:
    s = train_drafter(TrainConfig(target=str(d), out=str(tmp / "f"), n_prompts=16, max_new_tokens=24, gen_batch=8,
                                  batch_tokens=600, max_len=240, max_steps=4, device="cuda"), progress=False)
    print("trained", s["steps"], s["final"], s["val"])
    kw = dict(model=str(d), chat=True, max_new_tokens=40, device="cuda")
    ref = semiar.generate("make a list", **kw)
    got = semiar.generate("make a list", method="falcon", drafter=str(tmp / "f"), **kw)
    print("identity", got.token_ids == ref.token_ids, "tau", got.stats.tau)
    for tree in ("dynamic:6,1,6", "dynamic:5,1,5"):  # one-wide: the whole chain on the device
        got = semiar.generate("make a list", method="falcon", drafter=str(tmp / "f"), tree=tree, **kw)
        print(f"falcon chain {tree} identity", got.token_ids == ref.token_ids, "tau", got.stats.tau)
    got = semiar.generate("make a list", method="falcon", drafter=str(tmp / "f"), temperature=1.0, seed=1, **kw)
    print("sampling ok", len(got.token_ids))

# CUDA graphs: replayed forwards equal eager ones; greedy speculative output equals AR on graphs
from semiar.engine import Engine  # noqa: E402
from semiar.methods import make_drafter  # noqa: E402
from semiar.models.loading import load_model  # noqa: E402

eager = load_model(str(d), device="cuda", cuda_graphs=False)
graphed = load_model(str(d), device="cuda")
draft = load_model(str(d), device="cuda")  # its own runner and static cache
assert type(graphed.runner).__name__ == "GraphedDecoder", type(graphed.runner)
ids = graphed.encode("make a list", chat=True)


def departure(prompt, ref, got) -> str:
    """Where `got` first leaves `ref`, and the eager model's logit gap there between the two tokens
    (bf16 rounding can flip a near-tie between forwards of different shapes: gaps of ~0.1 or less)."""
    i = next((j for j, (x, y) in enumerate(zip(ref, got)) if x != y), min(len(ref), len(got)))
    if i == len(ref) == len(got):
        return ""
    if i >= min(len(ref), len(got)):
        return f" (lengths {len(ref)} vs {len(got)})"
    with torch.no_grad():
        logits = eager.decoder(torch.tensor([prompt + ref[:i]], device="cuda"),
                               eager.decoder.new_cache(len(prompt) + i + 1)).logits[0, -1].float()
    return f" (first departure at token {i}: logit gap {abs(logits[ref[i]] - logits[got[i]]).item():.4f})"


a = Engine(eager).generate(ids, max_new_tokens=60).run().token_ids
b = Engine(graphed).generate(ids, max_new_tokens=60).run().token_ids
print("graphs == eager (AR):", a == b)
for method, kw in [("pld", {}), ("ngram", {}), ("draft", {"draft_model": draft})]:
    gen = Engine(graphed, make_drafter(method, graphed, device="cuda", **kw)).generate(ids, max_new_tokens=60).run()
    print(f"graphs {method} == AR:", gen.token_ids == b, "tau", round(gen.stats.tau, 2),
          departure(ids, b, gen.token_ids))

# compiled graphs, a prompt longer than the largest graph (chunked prefill), attention windows
compiled = load_model(str(d), device="cuda", compile=True)
long_ids = (ids * 40)[:300]
a = Engine(eager).generate(long_ids, max_new_tokens=60).run().token_ids
b = Engine(compiled).generate(long_ids, max_new_tokens=60).run().token_ids
print("compiled graphs, 300-token prompt == eager (AR):", a == b)
for method in ("pld", "ngram", "copy", "lookahead"):
    gen = Engine(compiled, make_drafter(method, compiled, device="cuda")).generate(long_ids, max_new_tokens=60).run()
    print(f"compiled {method} == AR:", gen.token_ids == b, "tau", round(gen.stats.tau, 2),
          departure(long_ids, b, gen.token_ids))

# the one-row Triton kernel (models.cuda.gemv) on this GPU: against cuBLAS at the 1.5B's shapes, then
# forced on for every layer of compiled graphs (SEMIAR_GEMV=1, the fused step off)
import os  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from semiar.models.cuda import gemv  # noqa: E402

for N, K in [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960), (151936, 1536)]:
    # errors against fp32, then ms per product over distinct weights (L2-cold, as in a step)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5 for _ in range(2 if N > 100000 else 16)]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), ws[0].float())
    cublas_ms = gemv._graph_ms(lambda: [F.linear(x, w) for w in ws], 2) / len(ws)
    mine_ms = gemv._graph_ms(lambda: [gemv.gemv(x, w) for w in ws], 2) / len(ws)
    print(f"{N}x{K}: max |err| Triton {(gemv.gemv(x, ws[0]).float() - ref).abs().max().item():.4f} "
          f"cuBLAS {(F.linear(x, ws[0]).float() - ref).abs().max().item():.4f}; ms cuBLAS {cublas_ms:.4f} "
          f"Triton {mine_ms:.4f} ({N * K * 2 / mine_ms / 1e9:.2f} TB/s)", flush=True)
    del ws
os.environ["SEMIAR_GEMV"] = "1"
os.environ["SEMIAR_FUSED"] = "0"  # the fused step does the one-row products itself: the kernel alone here
rows = load_model(str(d), device="cuda", compile=True)
print("row kernel:", rows.decoder.gpu_row_kernel)
c = Engine(rows).generate(long_ids, max_new_tokens=60).run().token_ids
print("compiled graphs + gemv, AR == eager AR:", c == a, "(bf16: may differ at near-ties)")
for method in ("pld", "copy", "lookahead"):
    gen = Engine(rows, make_drafter(method, rows, device="cuda")).generate(long_ids, max_new_tokens=60).run()
    print(f"compiled + gemv {method} == AR:", gen.token_ids == c, "tau", round(gen.stats.tau, 2))

# the tree forwards' attention through fused.block_attention (on with the fused one-token step, the
# default on CUDA): greedy output of the tree methods against AR
del os.environ["SEMIAR_FUSED"], os.environ["SEMIAR_GEMV"]
tree = load_model(str(d), device="cuda", compile=True)
print("fused one-token step:", tree.decoder.row_layer is not None, "block attention:",
      tree.decoder.layers[0].self_attn.block_kernel is not None)
e = Engine(tree).generate(long_ids, max_new_tokens=60).run().token_ids
print("fused, AR == eager AR:", e == a, "(bf16: may differ at near-ties)")
for method in ("pld", "copy", "lookahead"):
    gen = Engine(tree, make_drafter(method, tree, device="cuda")).generate(long_ids, max_new_tokens=60).run()
    print(f"fused + block attention {method} == AR:", gen.token_ids == e, "tau", round(gen.stats.tau, 2))

# the draft model's greedy chain as one replay (GraphedDecoder.greedy_chain) on compiled graphs with the
# fused one-token step: the same tokens as stepping one graphed token at a time, and `draft` stays lossless
cache = tree.runner.new_cache(256)
logits = tree.runner(torch.tensor([long_ids[:200]]), cache).logits[0, -1]
start = cache.length
toks, confs = tree.runner.greedy_chain(logits, cache, 8)
cache.truncate(start)
want = []
for i in range(8):
    want.append(int(logits.argmax()))
    if i < 7:
        logits = tree.runner(torch.tensor([[want[-1]]]), cache).logits[0, -1]
print("greedy chain (one replay) == stepped:", toks == want, toks, [round(c, 3) for c in confs])
del cache
draft_c = load_model(str(d), device="cuda", compile=True)
gen = Engine(tree, make_drafter("draft", tree, device="cuda", draft_model=draft_c)).generate(long_ids, max_new_tokens=60).run()
print("compiled draft (chains in one replay) == AR:", gen.token_ids == e, "tau", round(gen.stats.tau, 2),
      "chains captured:", len(draft_c.runner._chains))
