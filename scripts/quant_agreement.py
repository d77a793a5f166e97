"""How often the quantized path (`--dtype q4`) departs from the fp32 reference, and at what logit gaps
(issue 27): a property of the quantization, not of speculation (speculation on q4 equals ar on q4).
Also times both `ar` runs (same process, same prompts, one after the other): fp32 vs q4 tokens/s.

Per prompt (the bench's tasks, chat template applied): greedy `ar` on fp32 and on q4, the first
position where the texts part, and the fp32 logit gap there between fp32's token and q4's; then,
teacher-forced on fp32's text (one q4 forward), the share of positions whose q4 argmax differs
from fp32's and the fp32 logit gaps at those positions.
usage: python scripts/quant_agreement.py --model qwen2.5-coder-1.5b-instruct --tasks code,edit,chat \
    --n-prompts 2 --max-new-tokens 128 [--threads 2] [--out agreement.json]"""
import argparse
import json

import torch

from semiar.bench.tasks import load_tasks
from semiar.engine import Engine
from semiar.models import load_model


def logits_over(model, ids):
    dec = model.decoder
    return dec(torch.tensor([ids]), dec.new_cache(len(ids) + 1)).logits[0]  # [T, vocab]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--tasks", default="code,edit,chat")
    ap.add_argument("--n-prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref, q4 = load_model(a.model, dtype="fp32", progress=False), load_model(a.model, dtype="q4", progress=False)
    rows = []
    for p in load_tasks(a.tasks.split(","), a.n_prompts):
        ids = ref.encode(p.prompt, chat=True, system=p.system)
        g_ref = Engine(ref).generate(ids, max_new_tokens=a.max_new_tokens).run()
        g_q4 = Engine(q4).generate(ids, max_new_tokens=a.max_new_tokens).run()
        t_ref, t_q4 = g_ref.token_ids, g_q4.token_ids
        first = next((j for j, (x, y) in enumerate(zip(t_ref, t_q4)) if x != y), None)
        full = ids + t_ref
        lr, lq = logits_over(ref, full)[len(ids) - 1:-1], logits_over(q4, full)[len(ids) - 1:-1]  # [n, vocab]
        ar, aq = lr.argmax(-1), lq.argmax(-1)
        diff = (ar != aq).nonzero().flatten().tolist()
        gaps = [round(float(lr[j, ar[j]] - lr[j, aq[j]]), 4) for j in diff]
        row = {"task": p.task, "id": p.id, "tokens": len(t_ref), "tokens_q4": len(t_q4),
               "seconds_fp32": round(g_ref.stats.seconds, 3), "seconds_q4": round(g_q4.stats.seconds, 3),
               "first_departure": first,
               "gap_at_departure": None if first is None else round(float(
                   logits_over(ref, ids + t_ref[:first])[-1, t_ref[first]]
                   - logits_over(ref, ids + t_ref[:first])[-1, t_q4[first]]), 4),
               "forced_disagreements": len(diff), "forced_gaps": gaps}
        rows.append(row)
        print(json.dumps(row), flush=True)
    n = sum(r["tokens"] for r in rows)
    dis = sum(r["forced_disagreements"] for r in rows)
    allg = sorted(g for r in rows for g in r["forced_gaps"])
    tps = lambda k, s: sum(r[k] for r in rows) / max(sum(r[s] for r in rows), 1e-9)  # noqa: E731
    summary = {"model": a.model, "prompts": len(rows),
               "ar_tokens_per_s_fp32": round(tps("tokens", "seconds_fp32"), 2),
               "ar_tokens_per_s_q4": round(tps("tokens_q4", "seconds_q4"), 2), "departed": sum(r["first_departure"] is not None for r in rows),
               "forced_positions": n, "forced_disagreements": dis,
               "forced_agreement": round(1 - dis / max(n, 1), 4), "max_gap": allg[-1] if allg else None,
               "median_gap": allg[len(allg) // 2] if allg else None}
    print(json.dumps(summary))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
