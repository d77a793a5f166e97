"""`semiar bench`: every method and the peers on the same prompts, in one process, interleaved,
with the speedup always a ratio against `ar` measured in the same run.

Example:
    >>> from semiar.bench.run import BenchConfig, run_bench                     # doctest: +SKIP
    >>> run_bench(BenchConfig(target="smollm2-135m-instruct", methods=["ar", "pld"],
    ...                       tasks=["edit"], n_prompts=2, out="runs/demo"))   # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..engine import Engine
from ..errors import InvalidArgumentError, SemiarError
from ..methods import LEARNED, LOSSY, METHODS, make_drafter
from ..sampling import SamplingParams
from .peers import PEERS, HFPeer, LlamaCppPeer, LlamaServerPeer, find_llama_server, llamacpp_available
from .tasks import load_tasks

#: lossless methods and the baseline their greedy output must equal
BASELINE_OF = {"hf-assisted": "hf-ar", "hf-pld": "hf-ar", "llamacpp-pld": "llamacpp"}


def method_of(entry: str) -> str:
    """The method a `--methods` entry runs: 'falcon@chain2' -> 'falcon'. An engine method can be listed
    several times under labels (`METHOD@LABEL`), each with its own `--tree`/`--drafter` entry (e.g.
    two trees or two drafters of one method compared in one run)."""
    return entry.partition("@")[0]


@dataclass
class BenchConfig:
    target: str = "qwen2.5-coder-1.5b-instruct"
    draft_model: Optional[str] = None
    drafter: Optional[str] = None  # trained drafter directory, or 'medusa=DIR,falcon=DIR'

    methods: list = field(default_factory=lambda: ["ar", "pld", "ngram"])
    tasks: list = field(default_factory=lambda: ["code", "edit"])
    n_prompts: int = 5
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repeats: int = 1
    seed: int = 0
    out: str = "runs/bench"
    device: str = "cpu"
    dtype: Optional[str] = None
    threads: Optional[int] = None
    #: llama.cpp's build/bin directory (its llama-server runs the `llamacpp` peer); None: PATH, else llama-cpp-python
    llamacpp_bin: Optional[str] = None
    prompts_file: Optional[str] = None
    tree: Optional[str] = None
    k: Optional[int] = None
    chat: bool = True
    allow_near_ties: bool = False
    cuda_graphs: bool = True  # on CUDA: replay forwards as CUDA graphs (models.cuda.graphs)
    compile: bool = True  # on CUDA: torch.compile the graphed forwards before capturing them
    #: greedy only: every lossless engine method emits `ar`'s text of the same prompt from this run
    #: (`Engine.generate(forced=...)`), its own choices checked at every position
    same_text: bool = False

    def validate(self) -> None:
        known = list(METHODS) + list(PEERS)
        bad = [m for m in self.methods if method_of(m) not in known]
        if bad:
            raise InvalidArgumentError(f"unknown method/peer {', '.join(bad)}; choose from {', '.join(known)}")
        odd = [m for m in self.methods if "@" in m and (method_of(m) not in METHODS or method_of(m) in ("ar", "auto")
                                                        or not m.partition("@")[2].replace("-", "").replace("_", "").isalnum())]
        if odd:
            raise InvalidArgumentError(f"bad method variant {', '.join(odd)}: use METHOD@LABEL (letters, digits, - and _) "
                                       "for an engine method other than ar and auto")
        if not self.methods:
            raise InvalidArgumentError("no methods given")
        if len(set(self.methods)) != len(self.methods):
            raise InvalidArgumentError("a method is listed twice")
        if self.max_new_tokens <= 0:
            raise InvalidArgumentError(f"max-new-tokens must be > 0, got {self.max_new_tokens}")
        if self.repeats <= 0:
            raise InvalidArgumentError(f"repeats must be > 0, got {self.repeats}")
        SamplingParams(self.temperature, self.top_k, self.top_p)  # validates
        if self.same_text and self.temperature != 0:
            raise InvalidArgumentError("--same-text is for greedy runs (temperature 0): sampled texts are "
                                       "compared by distribution, not token by token")


def _on_sigterm_interrupt():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(old) -> None:
    import signal

    if old is not None:
        signal.signal(signal.SIGTERM, old)


def _per_method(value: str, sep: str, allowed, option: str, what: str) -> dict:
    """Parse 'METHOD=VALUE<sep>METHOD=VALUE' for a bench option that can differ per method."""
    out = {}
    for part in value.split(sep):
        if not part.strip():
            continue
        name, _, v = part.partition("=")
        name = name.strip()
        if name not in allowed or not v.strip():
            raise InvalidArgumentError(f"bad {option} entry {part!r}: use METHOD={what} with METHOD in {', '.join(allowed)}")
        out[name] = v.strip()
    return out


def tree_per_method(tree: Optional[str], methods: list) -> dict:
    """`--tree SPEC` applies to every engine method; `--tree 'falcon=dynamic:8,4,32;pld=chain:8'` gives
    each method its own shape (methods not named keep their default)."""
    if not tree:
        return {}
    if "=" not in tree.split(":", 1)[0]:
        return {m: tree for m in methods if method_of(m) in METHODS and m not in ("ar", "auto")}
    out = _per_method(tree, ";", list(METHODS) + [m for m in methods if "@" in m], "--tree", "SPEC")
    for m in methods:  # a variant without its own entry takes its method's
        if m not in out and method_of(m) in out:
            out[m] = out[method_of(m)]
    return out


def drafter_per_method(drafter: Optional[str], methods: list) -> dict:
    """`--drafter DIR` serves every learned method; `--drafter 'medusa=DIR,falcon=DIR'` gives each
    its own (`medusa-typical` uses medusa's unless named)."""
    if not drafter:
        return {}
    if "=" not in drafter:
        return {m: drafter for m in methods if method_of(m) in LEARNED}
    out = _per_method(drafter, ",", list(LEARNED) + [m for m in methods if "@" in m], "--drafter", "DIR")
    for m in methods:
        base = method_of(m)
        if base in LEARNED and m not in out:
            mine = out.get(base) or out.get(LEARNED[base])
            if mine:
                out[m] = mine
    return out


def machine_info(device: str) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SemiarError(f"output directory {out} is not writable: {e.strerror or e}") from None


class Runner:
    """Loads the target once and runs any method or peer on prompt ids."""

    def __init__(self, cfg: BenchConfig, console=None):
        from ..models.loading import load_model

        self.cfg = cfg
        self.sampling = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, seed=cfg.seed)
        fast = dict(cuda_graphs=cfg.cuda_graphs, compile=cfg.compile)
        if cfg.draft_model and any(m in ("draft", "auto") for m in cfg.methods):
            from ..drafters.draft_model import check_tokenizers_first

            check_tokenizers_first(cfg.target, cfg.draft_model)  # before the target's weights load
        self.target = load_model(cfg.target, device=cfg.device, dtype=cfg.dtype, **fast)
        self.draft = None
        if cfg.draft_model and any(m in ("draft", "hf-assisted", "auto") for m in cfg.methods):
            # on the CPU its 1-2 token steps take the kernel timed fastest at load (models.md)
            self.draft = load_model(cfg.draft_model, device=cfg.device, dtype=self.target.dtype_spec, **fast)
        self.engines = {}
        self.peers = {}
        self.peer_info = {}
        trees = tree_per_method(cfg.tree, cfg.methods)
        drafters = drafter_per_method(cfg.drafter, cfg.methods)
        for m in cfg.methods:
            if method_of(m) in METHODS:
                # auto chooses among the training-free methods, the draft model and a Falcon drafter
                mine = drafters.get("falcon") if m == "auto" else drafters.get(m)
                drafter = make_drafter(method_of(m), self.target, draft_model=self.draft, tree=trees.get(m), k=cfg.k,
                                       device=cfg.device, drafter=mine, compile=cfg.compile)
                self.engines[m] = Engine(self.target, drafter)
            elif m.startswith("hf-"):
                self.peers[m] = HFPeer(m, self.target, cfg.device, self.target.dtype, self.target.eos_ids,
                                       draft=self.draft, sampling=self.sampling)
            elif m.startswith("llamacpp"):
                gguf = self._gguf_path()
                threads = cfg.threads or os.cpu_count() or 1
                server = find_llama_server(cfg.llamacpp_bin) if m == "llamacpp" else None
                if server is not None:
                    self.peers[m] = LlamaServerPeer(m, server, gguf, threads)
                    self.peer_info[m] = f"llama-server {server}"
                else:
                    self.peers[m] = LlamaCppPeer(m, gguf, threads)
                    self.peer_info[m] = "llama-cpp-python"

    def close(self) -> None:
        """Stop what the peers started (llama-server processes)."""
        for p in self.peers.values():
            if hasattr(p, "close"):
                p.close()

    def _gguf_path(self):
        from ..models import registry

        if self.cfg.target in registry.KNOWN_MODELS:
            return registry.model_dir(self.cfg.target) / "model.gguf"
        if str(self.cfg.target).endswith(".gguf"):
            return self.cfg.target
        raise InvalidArgumentError("llamacpp peers need a GGUF target (a known model or a .gguf file)")

    def run(self, method: str, ids: list[int], max_new: int, seed: int, forced: Optional[list] = None) -> dict:
        if method in self.engines:
            s = self.sampling
            sampling = SamplingParams(s.temperature, s.top_k, s.top_p, seed=seed)
            chosen = getattr(self.engines[method].drafter, "choices", None)  # auto: steps per arm so far
            before = dict(chosen) if chosen is not None else None
            gen = self.engines[method].generate(ids, max_new_tokens=max_new, sampling=sampling, forced=forced).run()
            d = gen.stats.to_dict()
            d["token_ids"] = gen.token_ids
            d["stop_reason"] = gen.stop_reason  # 'context': the prompt left fewer positions than max_new
            if chosen is not None:  # which arm drafted how many of this run's steps
                d["arm_steps"] = {a: n - before.get(a, 0) for a, n in chosen.items() if n - before.get(a, 0)}
            if forced is not None:
                d["departures"] = [[i, round(gap, 5)] for i, gap in gen.departures]
            return d
        peer = self.peers[method]
        out, secs = peer.run(ids, max_new, seed)
        d = {"new_tokens": len(out), "seconds": round(secs, 4),
             "tokens_per_s": round(len(out) / secs, 3) if secs > 0 else 0.0,
             "tau": None, "target_forwards": None, "accept_by_depth": [], "time_split": None, "token_ids": out}
        prefill = getattr(peer, "last_prefill_seconds", None)  # llama-server reports its prompt time
        if prefill is not None:
            d["prefill_seconds"] = round(prefill, 4)
        return d


def context_stops(results: dict) -> list[str]:
    """'task/prompt_id' of every prompt whose engine runs stopped at the model's context (their
    outputs are shorter than max_new_tokens asked for), in run order."""
    seen: list[str] = []
    for runs in results["runs"].values():
        for r in runs:
            key = f"{r.get('task')}/{r.get('prompt_id')}"
            if r.get("stop_reason") == "context" and key not in seen:
                seen.append(key)
    return seen


def _median_record(runs: list[dict]) -> dict:
    """The repeat with the median time stands for the prompt (its stats stay consistent)."""
    runs = sorted(runs, key=lambda r: r["seconds"])
    rec = dict(runs[len(runs) // 2])
    rec["seconds_all"] = [r["seconds"] for r in runs]
    return rec


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the benchmark, write results.json, report.md and plots to cfg.out; return the results.
    Raises SemiarError when a lossless method's greedy output differs from its baseline
    (after writing everything)."""
    from rich.console import Console

    cfg.validate()
    server = find_llama_server(cfg.llamacpp_bin) if "llamacpp" in cfg.methods else None

    def peer_missing(m: str) -> bool:
        return m.startswith("llamacpp") and not (m == "llamacpp" and server) and not llamacpp_available()

    for m in cfg.methods:
        if peer_missing(m):
            Console(stderr=True).print(f"[yellow]skipping {m}: no llama-server found (--llamacpp-bin DIR) and "
                                       "llama-cpp-python is not installed[/]")
    cfg.methods = [m for m in cfg.methods if not peer_missing(m)]
    if "ar" not in cfg.methods:
        cfg.methods = ["ar"] + cfg.methods  # every speedup is a ratio against ar from this run
    prompts = load_tasks(cfg.tasks, cfg.n_prompts, cfg.prompts_file)
    out = Path(cfg.out)
    _check_writable(out)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    console = Console(stderr=True)
    console.print(f"loading {cfg.target}" + (f" + {cfg.draft_model}" if cfg.draft_model else ""))
    runner = Runner(cfg, console)
    try:
        return _run_loaded(cfg, runner, prompts, out, console, progress)
    finally:
        runner.close()


def _run_loaded(cfg: BenchConfig, runner: Runner, prompts, out: Path, console, progress: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    encoded = []
    for p in prompts:
        ids = runner.target.encode(p.prompt, chat=cfg.chat, system=p.system)
        runner.target.check_prompt(len(ids))
        encoded.append(ids)

    machine = machine_info(cfg.device)
    kernel = getattr(runner.target.decoder, "one_row_kernel", None)
    if kernel:  # which CPU kernel multiplies one row (models.decoder.PackedLinear): it sets ar's speed
        machine["cpu_one_row_kernel"] = kernel
    machine["weights"] = runner.target.weights  # q4 (the GGUF's quantized blocks, models.quant) or a dense dtype
    if runner.peer_info:
        machine["peers"] = runner.peer_info
    gpu_rows = getattr(runner.target.decoder, "gpu_row_kernel", None)
    if gpu_rows:  # per weight shape: one-row products through the Triton kernel or cuBLAS (models.cuda.gemv)
        machine["gpu_row_kernel"] = gpu_rows
    if getattr(runner.target.decoder, "row_layer", None) is not None:  # one-token steps as fused kernels (models.cuda.fused)
        from ..models.cuda import fused

        machine["gpu_fused_step"] = {"on": True, "pdl": bool(fused.PDL), "block_attention": (
            getattr(runner.target.decoder.layers[0].self_attn, "block_kernel", None) is not None)}
    results = {"settings": asdict(cfg), "machine": machine, "target": runner.target.name,
               "draft_model": runner.draft.name if runner.draft else None, "interrupted": False,
               "prompts": [{"task": p.task, "id": p.id, "prompt_tokens": len(ids)} for p, ids in zip(prompts, encoded)],
               "runs": {m: [] for m in cfg.methods}}
    results["failed"] = {}

    def attempt(m, *args):
        """runner.run, except that a method that raises is dropped from the run (reported, with
        its error, in results.json and report.md) instead of losing every other method's numbers."""
        try:
            return runner.run(m, *args)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as e:
            results["failed"][m] = f"{type(e).__name__}: {e}"
            console.print(f"[red]{m} failed and is left out: {type(e).__name__}: {e}[/]")
            return None

    # warm-up (excluded): first calls pay allocator growth, lazy init, thread pools
    for m in list(cfg.methods):
        attempt(m, encoded[0], min(8, cfg.max_new_tokens), cfg.seed)
    _drop_failed(results, cfg)
    # Python's collector, kept out of the timings: what is loaded by now (models, compiled code,
    # tokenizers: over half a million objects after torch.compile) is frozen, so that a full collection
    # no longer walks it (0.3 s for a tiny compiled model on a 2-core CPU), and each run starts after
    # a collection. (The suspected cause of single 0.6-0.8 s stalls in GPU runs; docs/benchmarks.md)
    gc.collect()
    gc.freeze()

    total = len(prompts) * cfg.repeats * len(cfg.methods)
    # `timeout` and job schedulers stop with SIGTERM: treat it like Ctrl-C and keep what finished
    old_term = _on_sigterm_interrupt()
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, disable=not progress) as bar:
            task = bar.add_task("bench", total=total)
            for pi, (p, ids) in enumerate(zip(prompts, encoded)):
                per_method: dict[str, list] = {m: [] for m in cfg.methods}
                for rep in range(cfg.repeats):
                    # rotate the order so no method always runs first (caches, thermal state)
                    k = (pi * cfg.repeats + rep) % len(cfg.methods)
                    order = cfg.methods[k:] + cfg.methods[:k]
                    if cfg.same_text and rep == 0:  # ar's text first: the others follow it
                        order = ["ar"] + [m for m in order if m != "ar"]
                    for m in order:
                        if m in results["failed"]:
                            continue
                        bar.update(task, description=f"{m:12s} {p.task}/{p.id}")
                        gc.collect()
                        per_method[m].append(attempt(m, ids, cfg.max_new_tokens, cfg.seed + 1000 * pi + rep,
                                                     _forced_text(cfg, m, per_method)))
                        bar.advance(task)
                _drop_failed(results, cfg)
                for m in cfg.methods:
                    rec = _median_record(per_method[m])
                    rec.update(task=p.task, prompt_id=p.id)
                    results["runs"][m].append(rec)
                # the prompts so far, for a run killed outright (no signal to catch): the same
                # records as results.json, without the identity check and the summary
                (out / "results.partial.json").write_text(json.dumps(results))
    except KeyboardInterrupt:
        results["interrupted"] = True
        console.print("[yellow]interrupted: writing the prompts that finished[/]")
    finally:
        _restore_sigterm(old_term)
        gc.unfreeze()  # the caller's process as it was: its garbage collectable again
    results["identity"] = identity_check(results, cfg)
    classify_mismatches(results["identity"], results["runs"], runner.target, encoded, prompts)
    results["summary"] = summarize(results)
    write_outputs(results, out)
    return results


def _forced_text(cfg: BenchConfig, method: str, per_method: dict) -> Optional[list]:
    """With --same-text: the text a lossless engine method must follow (ar's first run of this
    prompt), else None."""
    base = method_of(method)
    if not cfg.same_text or method == "ar" or base not in METHODS or base in LOSSY or not per_method["ar"]:
        return None
    first = per_method["ar"][0]  # None when ar failed (the run then stops with that error)
    return (first or {}).get("token_ids") or None


def _drop_failed(results: dict, cfg: BenchConfig) -> None:
    """Take the methods that raised out of the run (`ar`, every ratio's baseline, cannot be)."""
    if "ar" in results["failed"]:
        raise SemiarError(f"the baseline `ar` failed: {results['failed']['ar']}")
    cfg.methods = [m for m in cfg.methods if m not in results["failed"]]
    for m in results["failed"]:
        results["runs"].pop(m, None)


def identity_check(results: dict, cfg: BenchConfig) -> dict:
    """Greedy only: each lossless method's ids must equal its baseline's on every prompt."""
    if cfg.temperature != 0:
        return {"checked": False, "reason": "sampling: outputs are compared by distribution, not identity",
                "mismatches": []}
    n = min(len(v) for v in results["runs"].values())
    mismatches = []
    for m, runs in results["runs"].items():
        base = BASELINE_OF.get(m, "ar" if method_of(m) in METHODS and method_of(m) not in LOSSY else None)
        if base is None or base == m or base not in results["runs"]:
            continue
        for i in range(n):
            a, b = runs[i]["token_ids"], results["runs"][base][i]["token_ids"]
            if a != b:
                first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                mismatches.append({"method": m, "baseline": base, "task": runs[i]["task"],
                                   "prompt_id": runs[i]["prompt_id"], "first_difference_at": first})
            runs[i]["identical_to_baseline"] = a == b
            for at, gap in runs[i].get("departures", ()):  # --same-text: where its own choice was another
                mismatches.append({"method": m, "baseline": base, "task": runs[i]["task"],
                                   "prompt_id": runs[i]["prompt_id"], "first_difference_at": at, "forced": True,
                                   "logit_gap": gap})
    info = {"checked": True, "mismatches": mismatches}
    if "hf-ar" in results["runs"]:  # informational: two implementations of the same model
        same = sum(results["runs"]["ar"][i]["token_ids"] == results["runs"]["hf-ar"][i]["token_ids"] for i in range(n))
        info["ar_equals_hf_ar"] = f"{same}/{n}"
    if "llamacpp" in results["runs"]:  # informational: llama.cpp's own kernels on the same GGUF
        same = sum(results["runs"]["ar"][i]["token_ids"] == results["runs"]["llamacpp"][i]["token_ids"] for i in range(n))
        info["ar_equals_llamacpp"] = f"{same}/{n}"
    return info


def near_tie_tolerance(dtype) -> float:
    """Logit gap under which two implementations of the same model may legitimately disagree:
    a different kernel (1 row vs a block of rows) sums in another order. bf16/fp16 keep ~3
    significant digits, so logits of magnitude ~20 carry ~0.1 of rounding."""
    return 1e-3 if dtype == torch.float32 else 0.25


def classify_mismatches(identity: dict, runs: dict, target, encoded: list, prompts: list) -> None:
    """For each greedy mismatch, recompute the target's logits where the outputs part and record
    the gap between the two tokens chosen: a gap within rounding noise is a numerical near-tie
    (both implementations are right in exact arithmetic), a larger gap is a real bug."""
    if not identity.get("mismatches"):
        return
    dec = target.decoder
    tol = near_tie_tolerance(target.dtype)
    index = {(p.task, p.id): i for i, p in enumerate(prompts)}
    for mm in identity["mismatches"]:
        if mm.get("forced"):  # the gap was measured in the method's own forward
            mm.update(near_tie=mm["logit_gap"] <= tol, tolerance=tol)
            continue
        i = index[(mm["task"], mm["prompt_id"])]
        a = runs[mm["method"]][i]["token_ids"]
        b = runs[mm["baseline"]][i]["token_ids"]
        j = mm["first_difference_at"]
        if j >= min(len(a), len(b)):
            mm.update(near_tie=False, logit_gap=None)
            continue
        ids = encoded[i] + b[:j]
        cache = dec.new_cache(len(ids) + 1)
        logits = dec(torch.tensor([ids], device=dec.device), cache, logits_at=slice(-1, None)).logits[0, -1]
        gap = abs(float(logits[a[j]] - logits[b[j]]))
        mm.update(near_tie=gap <= tol, logit_gap=round(gap, 5), tolerance=tol)
    identity["near_ties"] = sum(bool(m.get("near_tie")) for m in identity["mismatches"])


def summarize(results: dict) -> dict:
    """Per task and overall: tokens/s (total tokens / total seconds), speedup vs ar, tau, split."""
    tasks = sorted({r["task"] for r in results["runs"]["ar"]})
    summary = {}
    for scope in tasks + ["all"]:
        rows = {}
        ar_runs = [r for r in results["runs"]["ar"] if scope in ("all", r["task"])]
        ar_tps = _tps(ar_runs)
        for m, runs in results["runs"].items():
            sel = [r for r in runs if scope in ("all", r["task"])]
            if not sel:
                continue
            tps = _tps(sel)
            row = {"tokens_per_s": round(tps, 3), "speedup": round(tps / ar_tps, 3) if ar_tps else None,
                   "new_tokens": sum(r["new_tokens"] for r in sel), "seconds": round(sum(r["seconds"] for r in sel), 3)}
            decode = _decode_tps(sel)
            if decode is not None:
                row["decode_tokens_per_s"] = round(decode, 3)
            if method_of(m) in LOSSY:
                row["lossy"] = True
            fw = [r["target_forwards"] for r in sel if r.get("target_forwards")]
            if fw:
                row["tau"] = round(sum(r["new_tokens"] for r in sel) / sum(fw), 3)
                split = {k: sum(r["time_split"][k] for r in sel) for k in ("prefill", "draft", "verify", "other")}
                tot = sum(split.values()) or 1.0
                row["time_split_pct"] = {k: round(100 * v / tot, 1) for k, v in split.items()}
                row["accept_by_depth"] = _pooled_accept(sel)
            rows[m] = row
        summary[scope] = rows
    return summary


def _tps(runs):
    secs = sum(r["seconds"] for r in runs)
    return sum(r["new_tokens"] for r in runs) / secs if secs else 0.0


def _prefill_of(r) -> Optional[float]:
    if r.get("time_split"):
        return r["time_split"]["prefill"]
    return r.get("prefill_seconds")


def _decode_tps(runs) -> Optional[float]:
    """Tokens over the seconds after the prefill (what llama-bench's tg figure measures), when every
    run knows its prefill time (our methods, llama-server); else None."""
    prefills = [_prefill_of(r) for r in runs]
    if not runs or any(p is None for p in prefills):
        return None
    secs = sum(r["seconds"] for r in runs) - sum(prefills)
    return sum(r["new_tokens"] for r in runs) / secs if secs > 0 else None


def _pooled_accept(runs):
    """Mean acceptance per depth over prompts (prompt-weighted)."""
    depth = max((len(r["accept_by_depth"]) for r in runs), default=0)
    out = []
    for d in range(depth):
        vals = [r["accept_by_depth"][d] for r in runs if len(r["accept_by_depth"]) > d]
        out.append(round(statistics.mean(vals), 4) if vals else 0.0)
    return out


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.partial.json").unlink(missing_ok=True)
    (out / "report.md").write_text(render_report(results))
    try:
        from .plots import plot_acceptance, plot_speedup

        plot_speedup(results, out / "speedup.png")
        plot_acceptance(results, out / "acceptance.png")
    except Exception as e:  # a plot must never lose the numbers
        (out / "plot-error.txt").write_text(f"{type(e).__name__}: {e}\n")


def render_report(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    lines = [f"# semiar bench: {results['target']}", "",
             f"- draft model: {results['draft_model'] or '-'}; tasks: {', '.join(s['tasks'])}; "
             f"{s['n_prompts']} prompts/task; max new tokens {s['max_new_tokens']}; temperature {s['temperature']}; "
             f"repeats {s['repeats']} (median)",
             f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + f"; torch {m['torch']}, transformers {m['transformers']}"
             + (f"; weights {m['weights']}" if m.get("weights") else ""),
             ""]
    for peer, how in (m.get("peers") or {}).items():
        lines.insert(-1, f"- peer {peer}: {how}")
    if results.get("interrupted"):
        lines += ["**Interrupted**: only the prompts that finished are included.", ""]
    for meth, err in (results.get("failed") or {}).items():
        lines += [f"**{meth} failed** and is left out: `{err}`", ""]
    ident = results["identity"]
    if s.get("same_text"):
        lines += ["**Same text** (`--same-text`): every lossless engine method emitted `ar`'s greedy text of each "
                  "prompt, verifying each step as greedy decoding does; its own choices were checked at every "
                  "position (below, where one differed). Speeds compare on identical texts.", ""]
    if not ident["checked"]:
        lines.append(f"Identity check: not applicable ({ident['reason']}).")
    elif not ident["mismatches"]:
        lines.append("Identity check: **every lossless method produced exactly its baseline's greedy output** "
                     "(ours vs `ar`, transformers' vs `hf-ar`).")
    else:
        lines.append(f"Identity check: **{len(ident['mismatches'])} mismatch(es)**, of which "
                     f"{ident.get('near_ties', 0)} at numerical near-ties (the two tokens' logits differ by less "
                     "than the rounding noise of the dtype):")
        for mm in ident["mismatches"]:
            kind = "near-tie" if mm.get("near_tie") else "REAL MISMATCH"
            if mm.get("forced"):
                lines.append(f"- {mm['method']} on {mm['task']}/{mm['prompt_id']}: its own greedy choice at token "
                             f"{mm['first_difference_at']} was not {mm['baseline']}'s, logit gap {mm.get('logit_gap')} ({kind})")
                continue
            lines.append(f"- {mm['method']} vs {mm['baseline']} on {mm['task']}/{mm['prompt_id']}: first difference "
                         f"at token {mm['first_difference_at']}, logit gap {mm.get('logit_gap')} ({kind})")
    lossy = [m for m in results["runs"] if method_of(m) in LOSSY]
    if lossy:
        lines.append(f"**Lossy** (opt-in relaxed acceptance, not counted as lossless, not identity-checked): "
                     f"{', '.join(lossy)}. Greedy output still equals `ar`'s; sampled output does not follow the "
                     "target's distribution exactly.")
    if "ar_equals_hf_ar" in ident:
        lines.append(f"(Informational: our `ar` equals transformers' `hf-ar` on {ident['ar_equals_hf_ar']} prompts.)")
    if "ar_equals_llamacpp" in ident:
        lines.append(f"(Informational: our `ar` equals llama.cpp's greedy output on {ident['ar_equals_llamacpp']} prompts.)")
    lines.append("")
    for scope, rows in results["summary"].items():
        lines += [f"## {scope}", "", "| method | tokens/s | speedup vs ar | decode tokens/s | tau | draft % | verify % | tokens |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for meth, r in rows.items():
            split = r.get("time_split_pct") or {}
            label = f"{meth} (lossy)" if method_of(meth) in LOSSY else meth
            decode = f"{r['decode_tokens_per_s']:.2f}" if r.get("decode_tokens_per_s") is not None else "-"
            lines.append(f"| {label} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | {decode} | "
                         f"{r.get('tau', '-') if r.get('tau') is not None else '-'} | "
                         f"{split.get('draft', '-')} | {split.get('verify', '-')} | {r['new_tokens']} |")
        lines.append("")
    for meth, runs in results["runs"].items():  # auto: which arm drafted its steps, per task
        by_task: dict = {}
        for r in runs:
            for arm, n in (r.get("arm_steps") or {}).items():
                by_task.setdefault(r["task"], {}).setdefault(arm, 0)
                by_task[r["task"]][arm] += n
        if by_task:
            lines += [f"`{meth}`'s steps by the arm that drafted them (the median repeat of each prompt): "
                      + "; ".join(f"{task}: " + ", ".join(f"{a} {n}" for a, n in sorted(c.items(), key=lambda x: -x[1]))
                                  for task, c in by_task.items()), ""]
    lines += ["![speedup](speedup.png)", "", "![acceptance](acceptance.png)", ""]
    return "\n".join(lines)
