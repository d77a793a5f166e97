"""Speed of self-distillation data generation (`train.data.BatchGenerator`, what `generate_batch` and
`semiar train-drafter` use) on CUDA: answer tokens per second at several batch sizes.

usage: python scripts/gpu/datagen_speed.py [--model qwen2.5-1.5b] [--batches 256,512,1024]
       [--prompt-len 120] [--new-tokens 256] [--budget 140] [--no-sampled] [--device cuda]

A decoder of the model's shapes with random bf16 weights (`gpu/random_model.py`: the cost of a step
does not depend on the values), no EOS, so every row answers --new-tokens tokens, token-only (the
online recipe's path). Per batch size: a short probe (its own graphs) that estimates the step cost,
a cold run (captures the CUDA graphs of that shape) and a warm run (reuses them, what every later
batch of a training run's data costs); then, time left, the same with every row sampled at T=0.8.
First, on 8 rows, the graph replay's greedy tokens against the same steps run eagerly.

Unattended and bounded: every run has a time limit (a timer interrupts it between steps), the
whole script stays under --budget seconds, and an out-of-memory or any other failure is recorded
for that run and the script goes on. Writes datagen_speed.json to $OUT (else runs/datagen_speed)
after every run, and prints one line per run. (--device cpu runs the same logic on the CPU, to check
the script itself with small --batches and --new-tokens: no graphs there.)
"""
import argparse
import gc
import json
import os
import signal
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))  # this tree's semiar, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))  # random_model

import torch  # noqa: E402

from semiar.train.data import BatchGenerator  # noqa: E402

T0 = time.perf_counter()


class RunTimeout(BaseException):
    """Raised by the timer between two steps; a BaseException, so no `except Exception` swallows it."""


def on_alarm(signum, frame):
    raise RunTimeout()


def elapsed():
    return time.perf_counter() - T0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-1.5b", help="a shape of gpu/random_model.py")
    ap.add_argument("--batches", default="256,512,1024")
    ap.add_argument("--prompt-len", type=int, default=120)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--budget", type=float, default=140.0, help="seconds for the whole script")
    ap.add_argument("--run-limit", type=float, default=30.0, help="seconds for one run at most")
    ap.add_argument("--no-sampled", action="store_true", help="greedy runs only")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/datagen_speed")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "datagen_speed.json"
    signal.signal(signal.SIGALRM, on_alarm)
    res = {"model": f"random:{a.model}", "torch": torch.__version__, "prompt_len": a.prompt_len,
           "new_tokens": a.new_tokens, "token_only": True, "runs": [], "notes": []}

    def save():
        res["script_seconds"] = round(elapsed(), 1)
        out_file.write_text(json.dumps(res, indent=1))

    if cuda and not torch.cuda.is_available():
        res["notes"].append("no CUDA device")
        save()
        print("no CUDA device; nothing measured")
        return
    res["gpu"] = torch.cuda.get_device_name(0) if cuda else a.device
    from random_model import random_decoder

    dec = random_decoder(a.model, device=a.device)
    if not cuda:
        dec = dec.float()
    target = types.SimpleNamespace(decoder=dec, eos_ids=set())  # what BatchGenerator reads of a target
    res["model_seconds"] = round(elapsed(), 1)
    vocab = dec.config.vocab_size

    def prompts(B, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(100, vocab - 100, (B, a.prompt_len), generator=g).tolist()

    def cleanup():
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            sync()
        except Exception as e:  # noqa: BLE001 - recorded, the next run may still work
            res["notes"].append(f"synchronize after a run failed: {type(e).__name__}: {str(e)[:200]}")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def timed(gen, ps, n_new, temperature, limit):
        """(seconds, answer tokens) of one generate call, synchronised on both sides, under `limit` s."""
        g = torch.Generator(device=dec.device).manual_seed(0)
        sync()
        signal.setitimer(signal.ITIMER_REAL, max(limit, 0.1))
        try:
            t0 = time.perf_counter()
            out = gen.generate(ps, n_new, temperature, g)
            sync()
            dt = time.perf_counter() - t0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return dt, sum(len(t) - len(p) for p, (t, _) in zip(ps, out)), out

    # 1. graphs against eager on a few rows (a wrong capture shows here, not as a fast wrong number)
    try:
        ps = prompts(8, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g_gen = BatchGenerator(target, features=False)
            _, _, got = timed(g_gen, ps, 32, 0.0, 30)
            graphed = g_gen.graphed
            del g_gen
            _, _, ref = timed(BatchGenerator(target, features=False, cuda_graphs=False), ps, 32, 0.0, 30)
        same = [t for t, _ in got] == [t for t, _ in ref]
        res["check"] = {"rows": 8, "new_tokens": 32, "graphed": graphed, "graph_tokens_equal_eager": same,
                        "warnings": [str(w.message)[:300] for w in caught]}
        print(f"check: graphs {'on' if graphed else 'OFF'}, graph replay tokens == eager: {same}")
    except BaseException as e:  # noqa: BLE001 - recorded; the timings may still work
        res["check"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"check failed: {res['check']['error']}")
    cleanup()
    save()

    # 2. the timings: greedy at every batch size first, then sampled where time is left
    modes = [("greedy", 0.0)] + ([] if a.no_sampled else [("sampled", 0.8)])
    for mode, temp in modes:
        for B in [int(b) for b in a.batches.split(",")]:
            run = {"mode": mode, "batch": B}
            res["runs"].append(run)
            left = a.budget - elapsed() - 5  # room to write out
            if left < 10:
                run["skipped"] = "time budget"
                save()
                continue
            gen = None
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    gen = BatchGenerator(target, features=False)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    probe_new = min(17, a.new_tokens)
                    dt, n, _ = timed(gen, prompts(B, 2), probe_new, temp, min(a.run_limit, left))
                    step = dt / probe_new  # an upper bound: it holds the probe's prefill and capture
                    left = a.budget - elapsed() - 5
                    n_new = a.new_tokens
                    while n_new > 32 and 2.2 * step * n_new > min(left, 2 * a.run_limit):
                        n_new //= 2  # slow (eager?): fewer tokens rather than nothing
                    run.update(probe_seconds=round(dt, 3), new_tokens=n_new)
                    for phase, seed in (("cold", 3), ("warm", 4)):
                        left = a.budget - elapsed() - 5
                        dt, n, _ = timed(gen, prompts(B, seed), n_new, temp, min(a.run_limit, left))
                        run[phase] = {"seconds": round(dt, 3), "answer_tokens": n,
                                      "tokens_per_s": round(n / dt), "ms_per_step": round(dt / n_new * 1e3, 3)}
                    run["graphed"] = gen.graphed
                    run["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
                if caught:
                    run["warnings"] = [str(w.message)[:300] for w in caught]
                print(f"{mode:7s} B={B:5d}: cold {run['cold']['tokens_per_s']:>8,} tok/s, "
                      f"warm {run['warm']['tokens_per_s']:>8,} tok/s ({run['warm']['ms_per_step']} ms/step, "
                      f"{n_new} new), graphs {'on' if gen.graphed else 'OFF'}, peak {run['peak_gib']} GiB")
            except RunTimeout:
                run["error"] = "time limit"
                print(f"{mode:7s} B={B:5d}: time limit")
            except torch.cuda.OutOfMemoryError as e:
                run["error"] = f"OOM: {str(e).splitlines()[0][:200]}"
                print(f"{mode:7s} B={B:5d}: out of memory")
            except BaseException as e:  # noqa: BLE001 - recorded; the other sizes go on
                run["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                run["traceback"] = traceback.format_exc()[-2000:]
                print(f"{mode:7s} B={B:5d}: {run['error']}")
            gen = None
            cleanup()
            save()
    best = max((r["warm"]["tokens_per_s"] for r in res["runs"] if "warm" in r and r["mode"] == "greedy"), default=0)
    res["best_greedy_tokens_per_s"] = best
    save()
    print(f"best greedy: {best:,} answer tokens/s (goal 100,000); {out_file} ({elapsed():.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except BaseException as e:  # noqa: BLE001 - never crash the session: say what happened and exit 0
        print(f"datagen_speed failed: {type(e).__name__}: {e}")
        traceback.print_exc()
