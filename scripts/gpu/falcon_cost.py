"""Where a Falcon proposal's time goes on a GPU, with random weights (no staging): the target's
forwards (1-64 rows, with and without the features Falcon reads), the drafter's context pass, its
chain replay, a whole proposal (chain and tree), each timed to the device's end, and a profile of
proposals (host time against kernel time, the top kernels).

    python3 scripts/gpu/falcon_cost.py [--model random:qwen2.5-1.5b] [--k 2] [--context 300] --out DIR
"""
import argparse
import json
import time
from pathlib import Path

import torch

from semiar.drafters.falcon import FalconConfig, FalconDrafter, FalconNet
from semiar.models.cuda.graphs import GraphedDecoder
from semiar.sampling import SamplingParams
from semiar.tree import TreeSpec

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="random:qwen2.5-1.5b")
ap.add_argument("--k", type=int, default=2)
ap.add_argument("--context", type=int, default=300)
ap.add_argument("--reps", type=int, default=50)
ap.add_argument("--trees", default="dynamic:6,1,6;dynamic:8,1,8;dynamic:6,4,16")
ap.add_argument("--no-compile", action="store_true")
ap.add_argument("--device", default="cuda", help="cpu: a check of the script itself")
ap.add_argument("--out", required=True)
a = ap.parse_args()

from random_model import random_decoder  # noqa: E402 - scripts/gpu/random_model.py

dev = a.device
dec = random_decoder(a.model.split(":", 1)[1], dev)
compile_ = not a.no_compile and dev == "cuda"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
runner = GraphedDecoder(dec, compile=compile_)
target = type("T", (), {"decoder": dec, "runner": runner, "device": dec.device, "dtype": dec.dtype,
                        "config": dec.config})()
res = {"gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__, "model": a.model, "k": a.k,
       "context": a.context, "compile": compile_}


def timed(fn, reps=a.reps):
    """Median ms of fn() to the device's end."""
    for _ in range(3):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)[len(out) // 2]


# the target's forwards: what verification costs with and without Falcon's features
cache = runner.new_cache(a.context + 100)
for T in (1, 4, 8, 16):
    ids = torch.randint(100, 1000, (1, T))
    for hid in (False, True):
        def fwd():
            cache.length = a.context
            runner(ids, cache, return_hidden=hid)
        res[f"target_{T}_rows{'_hidden' if hid else ''}_ms"] = timed(fwd)
del cache
print({k: round(v, 3) for k, v in res.items() if k.endswith("_ms")}, flush=True)

torch.manual_seed(0)
net = FalconNet(FalconConfig.for_target(dec.config, k=a.k)).to(dev, torch.bfloat16).eval()
H = dec.config.hidden_size
sampling = SamplingParams(0.0)
for spec_s in a.trees.split(";"):
    depth, top_k, budget = (int(x) for x in spec_s.split(":")[1].split(","))
    t0 = time.perf_counter()
    d = FalconDrafter(net, target, TreeSpec("dynamic", depth=depth, top_k=top_k, budget=budget), compile=compile_,
                      graphs=True)
    build_s = time.perf_counter() - t0
    prompt = torch.randint(100, 1000, (a.context,)).tolist()
    d.start(prompt, sampling, None, torch.randn(a.context - 1, H, device=dev, dtype=torch.bfloat16))
    tokens = list(prompt)
    step = [0]

    def propose():
        # a step that accepted 2 tokens: 2 new context pairs, as a real loop feeds
        tokens.extend([101 + step[0] % 50, 102])
        d.observe(tokens[-2:], 1, torch.randn(2, H, device=dev, dtype=torch.bfloat16))
        step[0] += 1
        return d.propose(tokens)

    r = {"build_s": round(build_s, 1), "chained": d._chained, "compiled": d.graphs.compiled}
    r["propose_ms"] = timed(propose, reps=min(a.reps, 40))
    tree = propose()
    r["nodes"] = len(tree)
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])) as prof:
        for _ in range(10):
            propose()
        sync()
    gpu, top = 0.0, []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t and e.count:
            gpu += t
            top.append((round(t / 10, 1), e.count // 10, e.key[:90]))
    top.sort(reverse=True)
    r["kernel_ms_per_propose"] = round(gpu / 10 / 1e3, 3)
    r["top_kernels"] = [{"us": t, "n": n, "kernel": k} for t, n, k in top[:20]]
    r["cpu_top"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    res[spec_s] = r
    print(spec_s, {k: v for k, v in r.items() if k not in ("top_kernels", "cpu_top")}, flush=True)
    print(r["cpu_top"], flush=True)
    for t in r["top_kernels"][:10]:
        print("   ", t, flush=True)
Path(a.out).mkdir(parents=True, exist_ok=True)
(Path(a.out) / "falcon_cost.json").write_text(json.dumps(res, indent=1))
