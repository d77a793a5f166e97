"""Cost of one decode step and of tree verification on CUDA: eager, CUDA graphs, compiled + graphs.

usage: python scripts/gpu/step_cost.py --model MODEL [--variants graphs,compiled,compiled-gemv,...] [--sizes 16,32,64]
       [--context 300] [--profile]

MODEL is a name or path as `semiar` takes it, or random:qwen2.5-1.5b / random:qwen2.5-0.5b: the same
architecture with random bf16 weights, which costs what the real model costs (nothing here depends
on the values) and needs no model file on the GPU machine.

Prints a table and writes step_cost.json to --out. The bound: every decode step reads all weights
once; at the GPU's memory bandwidth (--bandwidth; default the datasheet figure of the GPU found:
3.35e12 B/s for an H100 SXM, 4.8e12 for an H200) that allows bandwidth / weight_bytes steps per
second. Also measured, as ceilings read on this GPU: a device-to-device copy's bandwidth, and
the same step's matrix products alone (replayed as one CUDA graph, nothing else in it).
--profile adds a kernel profile of a 1-token step for each variant: kernels per step and where the
GPU time goes (matrix products vs everything else).
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from semiar.models.cuda import gemv
from semiar.models.decoder import Attention
from semiar.models.cuda.capture import Captured
from semiar.models.cuda.graphs import GraphedDecoder
from semiar.models.loading import load_model

DATASHEET = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def timed(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def step_costs(runner, cache, context, sizes, reps):
    """ms per call for 1 token and for chain blocks of each size, after `context` cached tokens."""
    dev = cache.k.device
    runner(torch.randint(100, 1000, (1, context), device=dev), cache, logits_at=slice(0, 0))
    out = {}
    for T in [1] + sizes:
        ids = torch.randint(100, 1000, (1, T), device=dev)

        def call():
            cache.length = context
            runner(ids, cache)

        out[T] = timed(call, reps)
    return out


def copy_bandwidth():
    """Bytes read + written per second by a 4 GiB device-to-device copy."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), 10)
    del a, b
    return 2 * (2 << 30) / (ms / 1e3)


def matmuls_alone(dec, reps, product=F.linear):
    """ms of one 1-token step's matrix products alone (every linear layer + the LM head, one CUDA
    graph): what the step would cost if nothing but the weight reads took time."""
    linears = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, m.in_features, device="cuda", dtype=dec.dtype) for m in linears]

    def run():
        for m, x in zip(linears, xs):
            product(x, m.weight, m.bias)

    g = Captured(run, [])
    return timed(g.graph.replay, reps), len(linears)


def kernel_profile(dec, context, kw, T=1):
    """Kernels of one T-token fixed-shape forward (no graph: the same kernels a replay runs);
    kw: the variant's GraphedDecoder options (`configure`)."""
    from torch.profiler import ProfilerActivity, profile

    g = GraphedDecoder(dec, capacity=a.capacity, sizes=sorted({1, T}), capture=False, **kw)
    cache = g.new_cache(context + 100)
    step_costs(g, cache, context, [T] if T > 1 else [], 5)
    ids = torch.randint(100, 1000, (1, T), device="cuda")
    steps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            cache.length = context
            g(ids, cache)
        torch.cuda.synchronize()
    gemm_words = ("gemm", "gemv", "cutlass", "sm90", "cublas", "nvjet", "xmma", "splitk")
    kinds = {"matmul": [0, 0.0], "other": [0, 0.0]}
    top = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if not t or e.count == 0 or e.key.startswith("ProfilerStep"):
            continue
        # Inductor's fused kernels (triton_*) name the ops they fuse, gemv among them: not products
        kind = ("matmul" if e.key.startswith(("row_product", "block_swiglu")) or (not e.key.startswith("triton_")
                                                                and any(w in e.key.lower() for w in gemm_words))
                else "other")
        kinds[kind][0] += e.count
        kinds[kind][1] += t
        top.append((t / steps, e.count // steps, e.key[:90]))
    dec.static_fns = None
    top.sort(reverse=True)
    out = {k: {"kernels_per_step": c / steps, "gpu_ms_per_step": us / steps / 1e3} for k, (c, us) in kinds.items()}
    out["top"] = [{"us_per_step": round(t, 1), "per_step": n, "kernel": k} for t, n, k in top[:25 if T > 1 else 15]]
    return out


def products_by_rows(rows_list, reps):
    """GPU time of each kind of matrix product of a forward (qkv, o, gate_up, down over all layers, the
    LM head) for blocks of M rows, one CUDA graph per kind, through cuBLAS and through cuBLASLt
    (torch.backends.cuda.preferred_blas_library): what the tree forward's products cost and could."""
    L = dec.layers
    kinds = {"qkv": [l.self_attn.qkv_proj for l in L], "o": [l.self_attn.o_proj for l in L],
             "gate_up": [l.mlp.gate_up_proj for l in L], "down": [l.mlp.down_proj for l in L],
             "lm_head": [dec.lm_head]}
    out = {}
    before = torch.backends.cuda.preferred_blas_library()
    for lib in ("cublas", "cublaslt"):
        try:
            torch.backends.cuda.preferred_blas_library(lib)
        except Exception as e:  # noqa: BLE001
            out[lib] = f"{type(e).__name__}: {e}"[:200]
            continue
        for M in rows_list:
            row = out.setdefault(lib, {}).setdefault(str(M), {})
            for kind, mods in kinds.items():
                xs = [torch.randn(1, M, m.in_features, device="cuda", dtype=dec.dtype) for m in mods]

                def run():
                    for m, x in zip(mods, xs):
                        F.linear(x, m.weight, m.bias)

                ms = timed(Captured(run, []).graph.replay, reps)
                nbytes = sum(m.weight.numel() * m.weight.element_size() for m in mods)
                row[kind] = {"us_per_layer": round(ms * 1e3 / len(mods), 2), "TBps": round(nbytes / ms / 1e9, 2)}
            row["total_ms"] = round(sum(v["us_per_layer"] * len(kinds[k]) for k, v in row.items()) / 1e3, 3)
            print(f"products {lib} M={M}: {row}", flush=True)
    torch.backends.cuda.preferred_blas_library(before)
    res["products_by_rows"] = out
    save()


ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--sizes", default="16,32,64")
ap.add_argument("--context", type=int, default=300)
ap.add_argument("--capacity", type=int, default=2048)
ap.add_argument("--reps", type=int, default=200)
ap.add_argument("--variants", default="graphs-full,graphs,compiled,compiled-gemv",
                help="comma-separated, measured in this order: graphs-full (attention over the whole cache), graphs, "
                     "graphs-sdpa, compiled (torch.compile + graphs, cuBLAS for every product), compiled-gemv (+ the "
                     "one-row Triton kernel where it beats cuBLAS, models.cuda.gemv), compiled-fused (+ one-token steps as five "
                     "fused Triton kernels per layer, models.cuda.fused; compiled-fused-nopdl: without programmatic dependent "
                     "launch; compiled-fused-tree: + blocks of 2-64 tokens attending through fused.block_attention; "
                     "compiled-fused-mlp: + their MLP's gate/up and SwiGLU in one kernel (-emulate: Inductor rounds "
                     "every bf16 intermediate as eager does; -nodefer: each layer adds its own last residual, not the next "
                     "one; also for compiled-fused-tree); "
                     "graphs-fused: without torch.compile for the larger blocks), compiled-rowsum (one-row products "
                     "written as multiply + sum for Inductor to generate), compiled-cdt (+ coordinate-descent "
                     "tuning), compiled-autotune (Inductor autotunes the products against its Triton templates)")
ap.add_argument("--bandwidth", type=float, default=None)
ap.add_argument("--chains", default="", help="chain lengths, e.g. 2,6,12: a greedy chain of that many tokens drafted as "
                "one replay (GraphedDecoder.greedy_chain) against the one-token steps with a host sync each")
ap.add_argument("--out", default="runs/step_cost")
ap.add_argument("--profile", action="store_true", help="also profile the kernels of a 1-token step")
ap.add_argument("--agreement-steps", type=int, default=64, help="one-token steps whose tokens the blocks re-feed")
ap.add_argument("--agreement-only", action="store_true",
                help="after the timings, only the block-agreement check (no lockstep eager check, no per-kernel timings)")
ap.add_argument("--profile-sizes", default="",
                help="with --profile: also profile the compiled-fused-tree variant's forwards of these sizes")
ap.add_argument("--products", default="", help="rows, e.g. 1,16,64: time each kind of product for blocks of "
                                               "that many rows, cuBLAS and cuBLASLt, before the variants")
a = ap.parse_args()
sizes = [int(s) for s in a.sizes.split(",")]
VARIANTS = ("graphs-full", "graphs", "graphs-sdpa", "graphs-fused", "compiled", "compiled-gemv", "compiled-fused",
            "compiled-fused-nopdl", "compiled-fused-tree", "compiled-fused-mlp", "compiled-fused-mlp-noprefetch", "compiled-fused-mlp-emulate", "compiled-fused-mlp-nodefer", "compiled-fused-tree-nodefer", "compiled-rowsum", "compiled-cdt",
            "compiled-autotune")
unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
if unknown:
    ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

def random_model(name):
    from random_model import random_decoder  # scripts/gpu/random_model.py

    d = random_decoder(name)
    return type("Random", (), {"name": f"random:{name}", "dtype": d.dtype, "decoder": d})()


if a.model.startswith("random:"):
    m = random_model(a.model.split(":", 1)[1])
else:
    m = load_model(a.model, device="cuda", cuda_graphs=False)
dec = m.decoder
gpu = torch.cuda.get_device_name(0)
bandwidth = a.bandwidth or next((bw for k, bw in DATASHEET.items() if k in gpu), 3.35e12)
# what a step reads: every weight but the embedding table (one row of it), unless the LM head is tied to it
weight_bytes = sum(p.numel() * p.element_size() for p in dec.parameters())
if dec.lm_head.weight is not dec.embed_tokens.weight:
    weight_bytes -= dec.embed_tokens.weight.numel() * dec.embed_tokens.weight.element_size()
bound_ms = weight_bytes / bandwidth * 1e3
res = {"model": m.name, "gpu": gpu, "dtype": str(m.dtype), "torch": torch.__version__,
       "weight_bytes": weight_bytes, "bandwidth": bandwidth, "bound_ms": bound_ms, "context": a.context,
       "capacity": a.capacity}
copy_bw = copy_bandwidth()
mm_ms, n_linear = matmuls_alone(dec, a.reps)
res.update(copy_bandwidth=copy_bw, copy_bound_ms=weight_bytes / copy_bw * 1e3, matmuls_alone_ms=mm_ms, linears=n_linear)
try:  # the same products through the one-row Triton kernel (autotuned per shape on first use)
    res["gemv_alone_ms"] = matmuls_alone(dec, a.reps, gemv.gemv)[0]
except Exception as e:  # noqa: BLE001
    res["gemv_alone_error"] = f"{type(e).__name__}: {e}"[:300]


def save():
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "step_cost.json").write_text(json.dumps(res, indent=1))


def report(name):
    r = res[name]
    line = f"{name:>16}: 1 token {r[1]:.3f} ms ({1e3 / r[1]:.0f} steps/s, {bound_ms / r[1]:.0%} of bound)"
    line += "".join(f" | {T}: {r[T]:.3f} ms (x{r[T] / r[1]:.2f})" for T in sizes)
    if name + "_replay_ms" in res:
        rp = res[name + "_replay_ms"]
        line += f" | replay alone {rp:.3f} ms ({bound_ms / rp:.0%} of bound), capture {res[name + '_capture_s']:.1f} s"
    print(line, flush=True)
    save()


print(f"{res['model']} on {gpu}, {res['dtype']}, weights {weight_bytes / 1e9:.2f} GB, "
      f"bound {bound_ms:.3f} ms/step ({1e3 / bound_ms:.0f} steps/s at {bandwidth / 1e12:.2f} TB/s datasheet); "
      f"copy {copy_bw / 1e12:.2f} TB/s here -> {res['copy_bound_ms']:.3f} ms; "
      f"the {n_linear} matrix products alone {mm_ms:.3f} ms ({weight_bytes / mm_ms / 1e9:.2f} TB/s), through the "
      f"Triton kernel {res.get('gemv_alone_ms', float('nan')):.3f} ms {res.get('gemv_alone_error', '')}", flush=True)
res["eager"] = step_costs(dec, dec.new_cache(a.capacity), a.context, sizes, max(20, a.reps // 10))
report("eager")


def rowsum_forward(self, x):
    """RowLinear's one-row product as multiply + sum, which Inductor turns into its own reduction kernel."""
    if x.numel() == x.shape[-1]:
        y = (x.float() * self.weight.float()).sum(-1)
        return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
    return F.linear(x, self.weight, self.bias)


def configure(name):
    """Inductor's settings for a variant, and its GraphedDecoder options: compile, row_kernel, fused_step,
    block_attention, block_mlp."""
    import torch._inductor.config as ic

    Attention.static_sdpa = name == "graphs-sdpa"
    ic.coordinate_descent_tuning = name == "compiled-cdt"
    ic.emulate_precision_casts = name.endswith("-emulate")
    dec.defer_residual = not name.endswith("-nodefer")
    ic.max_autotune_gemm = name == "compiled-autotune"
    if name == "compiled-autotune":  # one-row products: cuBLAS vs Triton's mm templates, the faster kept per shape
        ic.max_autotune_gemm_backends = "ATEN,TRITON"
    gemv.RowLinear.forward = rowsum_forward if name == "compiled-rowsum" else ROW_FORWARD
    torch._dynamo.reset()
    row_kernel = {"compiled-gemv": None, "compiled-fused": None, "compiled-fused-nopdl": None, "graphs-fused": None,
                  "compiled-fused-tree": None, "compiled-fused-mlp": None, "compiled-fused-mlp-emulate": None,
                  "compiled-fused-mlp-nodefer": None, "compiled-fused-tree-nodefer": None,
                  "compiled-fused-mlp-noprefetch": None,
                  "compiled-rowsum": True}.get(name, False)
    from semiar.models.cuda import fused

    fused.PDL = False if name.endswith("-nopdl") else None  # None: on where the GPU and Triton have it
    fused.PREFETCH = not name.endswith("-noprefetch")  # row_product's weights loaded a chunk ahead
    return dict(compile=name.startswith("compiled"), row_kernel=row_kernel, fused_step="-fused" in name,
                block_attention=name.startswith(("compiled-fused-tree", "compiled-fused-mlp")),
                block_mlp=name.startswith("compiled-fused-mlp"))


def chain_costs(name, g, cache):
    """ms per greedy chain of k tokens after `context` cached tokens: one replay of k - 1 one-token
    forwards with the argmax fed back on the device (the draft model's path on a GPU), against k - 1
    graphed one-token calls each followed by softmax, max and a host copy (its loop before)."""
    logits = torch.randn(dec.config.vocab_size, device="cuda")
    g.prepare_chains(max(int(k) for k in a.chains.split(",")))
    out = {}
    for k in (int(k) for k in a.chains.split(",")):
        def one_replay():
            cache.length = a.context
            g.greedy_chain(logits, cache, k)

        def stepped():
            cache.length = a.context
            lg = logits
            for i in range(k):
                conf, tok = lg.softmax(-1).max(-1)
                float(conf), int(tok)
                if i + 1 < k:
                    lg = g(torch.tensor([[int(tok)]]), cache).logits[0, -1]

        out[k] = {"one_replay_ms": timed(one_replay, a.reps // 4), "stepped_ms": timed(stepped, a.reps // 4)}
    res[name + "_chains"] = out
    print(f"{name}: greedy chains (ms; k tokens = k - 1 forwards): {out}", flush=True)
    save()


def measure(name):
    kw = configure(name)
    t0 = time.perf_counter()
    g = GraphedDecoder(dec, capacity=a.capacity, sizes=[1, 2] + sizes,
                       windows=() if name == "graphs-full" else None, **kw)
    res[name + "_capture_s"] = time.perf_counter() - t0
    if dec.gpu_row_kernel:
        res[name + "_row_kernel"] = dec.gpu_row_kernel
        print(f"{name}: one-row kernel per weight shape {dec.gpu_row_kernel}", flush=True)
    cache = g.new_cache(a.context + 100)
    res[name] = step_costs(g, cache, a.context, sizes, a.reps)
    # the replay alone (no input copies, no Python around it): what the GPU itself takes
    cache.length = a.context
    W = next(w for w in g.windows if w > a.context)
    res[name + "_replay_ms"] = timed(lambda: g.graphs[1, W].replay(), a.reps)
    report(name)
    if a.chains:
        chain_costs(name, g, cache)
    del cache  # (the graphs' static cache is free again)
    if kw["fused_step"]:
        from semiar.models.cuda import fused

        res[name + "_pdl"] = fused.PDL
        if not a.agreement_only:
            agreement(name, g)
        block_agreement(name, g, steps=a.agreement_steps)
        try:
            if not a.agreement_only:
                fused_parts()
        except Exception as e:  # noqa: BLE001
            print(f"!! fused parts: {type(e).__name__}: {e}"[:300], flush=True)
    if a.profile and name in ("graphs", "compiled", "compiled-gemv", "compiled-fused", "compiled-fused-nopdl", "graphs-fused"):
        del g
        profile_step(name, kw)
    elif a.profile and name in ("compiled-fused-tree", "compiled-fused-mlp") and a.profile_sizes:
        del g
        for T in (int(t) for t in a.profile_sizes.split(",")):
            profile_step(name, kw, T)
    gemv.uninstall(dec)
    dec.static_fns = None
    dec.row_layer = None
    for layer in dec.layers:
        layer.self_attn.block_kernel = None
        layer.mlp.block_kernel = None
    torch.cuda.empty_cache()


def agreement(name, g, steps=64):
    """The graphed one-token forward (fused) against the eager decoder, in lockstep on the eager
    decoder's greedy tokens from the same prompt: steps whose next token differs, the eager logit gap
    between the two tokens there (bf16 near-ties may differ), the largest logit difference and the
    logits' spread to judge it by."""
    prompt = torch.randint(100, 1000, (1, a.context), device="cuda")
    caches = [r.new_cache(a.context + steps + 8) for r in (g, dec)]
    lg = [r(prompt, c, logits_at=slice(-1, None)).logits[:, -1] for r, c in zip((g, dec), caches)]
    differ, gaps, diff, spread = 0, [], 0.0, 0.0
    for _ in range(steps):
        mine, ref = lg[0][0].float(), lg[1][0].float()
        tok = int(ref.argmax())
        if int(mine.argmax()) != tok:
            differ += 1
            gaps.append(round((ref[tok] - ref[int(mine.argmax())]).item(), 4))
        diff = max(diff, (mine - ref).abs().max().item())
        spread = max(spread, ref.std().item())
        ids = torch.tensor([[tok]], device="cuda")
        lg = [r(ids, c).logits[:, -1] for r, c in zip((g, dec), caches)]
    res[name + "_agreement"] = {"steps": steps, "steps_with_another_token": differ, "eager_gaps_there": gaps,
                                "max_logit_diff": diff, "logit_std": spread}
    print(f"{name}: one-token steps vs the eager decoder (lockstep): {res[name + '_agreement']}", flush=True)
    save()


def block_agreement(name, g, steps=64, block=16):
    """Tree verification's side of identity: the tokens a run of one-token steps chose, fed again in
    blocks of `block` (causal, as a chain verifies), and per position whether the block forward's
    next token is the step's, the largest logit difference, and the step's logit gap where they differ."""
    # the same prompt for every variant, so that they re-feed the same tokens
    prompt = torch.randint(100, 1000, (1, a.context), generator=torch.Generator().manual_seed(7)).cuda()
    cache = g.new_cache(a.context + steps + block + 8)
    last = g(prompt, cache, logits_at=slice(-1, None)).logits[:, -1]
    toks, ref = [], []
    for _ in range(steps):
        ref.append(last[0].float())
        toks.append(int(last[0].argmax()))
        last = g(torch.tensor([[toks[-1]]], device="cuda"), cache).logits[:, -1]
    cache.length = a.context
    differ, gaps, diff = 0, [], 0.0
    for b0 in range(0, steps - 1, block):
        ids = torch.tensor([toks[b0:b0 + block]], device="cuda")
        lg = g(ids, cache).logits[0].float()
        for j in range(ids.shape[1] - 1):  # the logits after toks[b0 + j] predict toks[b0 + j + 1]
            r, mine = ref[b0 + j + 1], lg[j]
            diff = max(diff, (mine - r).abs().max().item())
            if int(mine.argmax()) != int(r.argmax()):
                differ += 1
                gaps.append(round((r.max() - r[int(mine.argmax())]).item(), 4))
    res[name + "_block_agreement"] = {"positions": steps - steps // block, "block": block,
                                      "positions_with_another_token": differ, "step_gaps_there": gaps,
                                      "max_logit_diff": diff}
    print(f"{name}: {block}-token blocks vs one-token steps: {res[name + '_block_agreement']}", flush=True)
    save()


def fused_parts():
    """GPU time of each fused kernel of a layer against the plain one-row kernel for the same weights,
    over all the layers (as a step reads them, so no weight sits in L2), one CUDA graph each."""
    from semiar.models.cuda import fused

    L = dec.layers
    h = torch.randn(1, 1, dec.config.hidden_size, device="cuda", dtype=dec.dtype)
    qkv = torch.randn(1, 1, L[0].self_attn.qkv_proj.out_features, device="cuda", dtype=dec.dtype)
    act = torch.randn(1, 1, dec.config.intermediate_size, device="cuda", dtype=dec.dtype)
    cache = dec.new_cache(a.capacity)
    start = torch.tensor([a.context], device="cuda")
    cos, sin = torch.ones(1, 1, dec.config.head_dim, device="cuda", dtype=dec.dtype), torch.zeros_like(h[..., :dec.config.head_dim])
    W = next(w for w in (256, 512, 1024, a.capacity) if w > a.context)
    n = len(L)
    parts = {
        "qkv+norm": (lambda: [fused.row_product(h, l.self_attn.qkv_proj.weight, l.self_attn.qkv_proj.bias,
                                                norm_weight=l.input_layernorm.weight) for l in L],
                     lambda: [gemv.gemv(h, l.self_attn.qkv_proj.weight, l.self_attn.qkv_proj.bias) for l in L]),
        "o+residual": (lambda: [fused.row_product(qkv[..., :h.shape[-1]], l.self_attn.o_proj.weight, residual=h) for l in L],
                       lambda: [gemv.gemv(qkv[..., :h.shape[-1]], l.self_attn.o_proj.weight) for l in L]),
        "gate_up+norm+swiglu": (lambda: [fused.row_product(h, l.mlp.gate_up_proj.weight, norm_weight=l.post_attention_layernorm.weight,
                                                           swiglu=True) for l in L],
                                lambda: [gemv.gemv(h, l.mlp.gate_up_proj.weight) for l in L]),
        "down+residual": (lambda: [fused.row_product(act, l.mlp.down_proj.weight, residual=h) for l in L],
                          lambda: [gemv.gemv(act, l.mlp.down_proj.weight) for l in L]),
        "attention": (lambda: [fused.decode_attention(qkv, cos, sin, cache.k[i], cache.v[i], start, dec.config.num_heads,
                                                      dec.config.num_kv_heads, window=W) for i in range(n)], None),
    }
    out = {}
    for k, (mine, plain) in parts.items():
        out[k] = {"fused_us": round(gemv._graph_ms(mine, 1) / n * 1e3, 2)}
        if plain is not None:
            out[k]["gemv_us"] = round(gemv._graph_ms(plain, 1) / n * 1e3, 2)
    res.setdefault("fused_parts_us_per_layer", {})[f"pdl={fused.PDL}"] = out
    print(f"fused kernels per layer (us): {out}", flush=True)
    save()


def profile_step(name, kw, T=1):
    key = name + "_profile" + (f"_{T}" if T > 1 else "")
    p = res[key] = kernel_profile(dec, a.context, kw, T)
    print(f"\n{name}: per {T}-token forward, matrix products {p['matmul']['kernels_per_step']:.0f} kernels "
          f"{p['matmul']['gpu_ms_per_step']:.3f} ms, everything else {p['other']['kernels_per_step']:.0f} kernels "
          f"{p['other']['gpu_ms_per_step']:.3f} ms", flush=True)
    for row in p["top"]:
        print(f"  {row['us_per_step']:8.1f} us  x{row['per_step']:<4} {row['kernel']}")
    save()


ROW_FORWARD = gemv.RowLinear.forward
if a.products:
    try:
        products_by_rows([int(r) for r in a.products.split(",")], a.reps)
    except Exception as e:  # noqa: BLE001
        print(f"!! products: {type(e).__name__}: {e}"[:300], flush=True)
# Ordered so that a run stopped at its time limit keeps the most: put the slow tuning last.
for variant in a.variants.split(","):
    try:
        measure(variant)
    except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others' numbers
        import traceback

        traceback.print_exc()
        res[variant + "_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"!! {variant} failed: {res[variant + '_error']}", flush=True)
        gemv.uninstall(dec)
        dec.static_fns = None
        dec.row_layer = None
        save()
