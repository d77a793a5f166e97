"""`semiar bench --tasks image`: the image methods on one image-token model in one process, with
speed, steps and acceptance beside a quality figure, so a relaxation's cost is in the same table.

Each variant draws `n_per_class` images of every class with the same seeds (image i of class c
uses seed + 1000 c + i), interleaved image by image, so load on the machine falls on every variant
alike (the variants' order rotates from image to image). Speedup is `ar`'s wall time over the variant's, both from this run. Quality comes from the
shipped MNIST judge (bench/image_quality.py): its accuracy on the samples (share classified as the
class asked for) and the Fréchet distance of its features on all samples against the real digits.
A variant is `method` or `method:ARGS`: `lantern:K,DELTA`, `gsd:GROUP`, `sjd:WINDOW` (the window of
every variant is --k otherwise).

Example:
    >>> from semiar.bench.image import parse_variant
    >>> parse_variant("lantern:16,0.3")
    ('lantern', {'lantern_k': 16, 'delta': 0.3})
"""

from __future__ import annotations

import gc
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..engine import Engine
from ..errors import InvalidArgumentError
from ..methods import IMAGE_METHODS, LOSSY, make_drafter
from ..sampling import SamplingParams


@dataclass
class ImageBenchConfig:
    target: str = "mnist-vq"
    methods: list = field(default_factory=lambda: ["ar", "sjd", "lantern", "gsd"])
    classes: list = field(default_factory=lambda: list(range(10)))
    n_per_class: int = 4
    cfg: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    k: Optional[int] = None
    seed: int = 0
    out: str = "runs/bench-image"
    threads: Optional[int] = None


def parse_variant(spec: str) -> tuple[str, dict]:
    """'lantern:K,DELTA' | 'gsd:GROUP' | 'sjd:WINDOW' | a bare method -> (method, make_drafter kwargs)."""
    method, _, args = spec.partition(":")
    if method not in IMAGE_METHODS:
        raise InvalidArgumentError(f"{method!r} is not an image method; choose from {', '.join(IMAGE_METHODS)}")
    if not args:
        return method, {}
    try:
        parts = args.split(",")
        if method == "lantern" and len(parts) == 2:
            return method, {"lantern_k": int(parts[0]), "delta": float(parts[1])}
        if method == "gsd" and len(parts) == 1:
            return method, {"group": int(parts[0])}
        if method == "sjd" and len(parts) == 1:
            return method, {"k": int(parts[0])}
    except ValueError:
        pass
    raise InvalidArgumentError(f"malformed image variant {spec!r}; use lantern:K,DELTA, gsd:GROUP or sjd:WINDOW")


def split_variants(methods: str) -> list:
    """'ar,sjd,lantern:8,0.2,gsd:4' -> ['ar', 'sjd', 'lantern:8,0.2', 'gsd:4'] (a variant's own commas
    follow its colon)."""
    out = []
    for part in methods.split(","):
        if out and ":" in out[-1] and part and (part[0].isdigit() or part[0] == "."):
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


def run_image_bench(cfg: ImageBenchConfig, progress: bool = True) -> dict:
    """Run every variant; write results.json and report.md under cfg.out; return the results."""
    from ..models.image import load_image_model
    from .image_quality import load_judge

    if cfg.n_per_class <= 0:
        raise InvalidArgumentError(f"n-prompts (images per class) must be > 0, got {cfg.n_per_class}")
    if len(set(cfg.methods)) != len(cfg.methods) or not cfg.methods:
        raise InvalidArgumentError("give each image variant once")
    if "ar" not in cfg.methods:  # the speedup's baseline, always from the same run
        cfg.methods = ["ar"] + list(cfg.methods)
    variants = {spec: parse_variant(spec) for spec in cfg.methods}
    SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p)  # validates
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    target = load_image_model(cfg.target)
    if cfg.cfg != 1.0:
        target = target.guided(cfg.cfg)
    for c in cfg.classes:
        target.prompt(c)  # validates
    engines = {}
    for spec, (method, kw) in variants.items():
        kw = {"k": cfg.k, **kw}
        engines[spec] = Engine(target, make_drafter(method, target, **kw))
    judge = load_judge()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # warm-up: one image per variant, not counted
    for eng in engines.values():
        eng.generate(target.prompt(cfg.classes[0]), target.tokens_per_image,
                     SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, seed=-1 % 2**31)).run()
    runs = {spec: {"codes": [], "classes": [], "seconds": 0.0, "forwards": 0, "tokens": 0, "drafted": 0}
            for spec in engines}
    order = list(engines)
    gc.collect()
    gc.freeze()  # as the text bench: no full collection walks the loaded models mid-timing
    try:
        _timed_runs(cfg, target, engines, runs, order, progress)
    finally:
        gc.unfreeze()
    base = runs.get("ar")
    summary = {}
    for spec, r in runs.items():
        images = target.decode(torch.tensor(r["codes"]))
        labels = torch.tensor(r["classes"])
        accs = [judge.score(images[labels == c], cls=c)["accuracy"] for c in cfg.classes]
        n_img = len(r["codes"])
        summary[spec] = {
            "method": variants[spec][0], "settings": variants[spec][1], "lossy": variants[spec][0] in LOSSY,
            "images": n_img, "seconds": round(r["seconds"], 3),
            "speedup": round(base["seconds"] / r["seconds"], 3) if base else None,
            "steps_per_image": round(r["forwards"] / n_img, 2),
            "tau": round(r["tokens"] / r["forwards"], 3),
            "acceptance": round((r["tokens"] - r["forwards"]) / r["drafted"], 4) if r["drafted"] else None,
            "accuracy": round(sum(accs) / len(accs), 4),
            "fd": round(judge.score(images)["fd"], 3),
        }
        if spec == cfg.methods[0] or spec in ("ar", "sjd"):
            from ..api import save_image_grid

            save_image_grid(images, str(out / f"grid-{spec.replace(':', '_').replace(',', '_')}.png"),
                            columns=cfg.n_per_class)
    results = {"target": target.name, "config": asdict(cfg), "summary": summary,
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "torch": torch.__version__, "threads": torch.get_num_threads()}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(render_image_report(results))
    return results


def _timed_runs(cfg, target, engines, runs, order, progress) -> None:
    n = 0
    for c in cfg.classes:
        for i in range(cfg.n_per_class):
            sampling = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, seed=cfg.seed + 1000 * c + i)
            rotated = order[n % len(order):] + order[:n % len(order)]  # no variant always first
            n += 1
            for spec in rotated:
                g = engines[spec].generate(target.prompt(c), target.tokens_per_image, sampling).run()
                r = runs[spec]
                r["codes"].append(g.token_ids)
                r["classes"].append(c)
                r["seconds"] += g.stats.seconds
                r["forwards"] += g.stats.target_forwards
                r["tokens"] += g.stats.new_tokens
                r["drafted"] += g.stats.draft_tokens
        if progress:
            print(f"class {c}: done", flush=True)


def render_image_report(results: dict) -> str:
    c = results["config"]
    lines = [f"# image bench: {results['target']}", "",
             f"{len(c['classes'])} classes x {c['n_per_class']} images, cfg {c['cfg']}, temperature {c['temperature']}, "
             f"top-k {c['top_k']}, window {c['k'] or 'default'}", "",
             "| variant | speedup | steps/image | tau | acceptance | judge accuracy | FD |",
             "|---|---|---|---|---|---|---|"]
    for spec, r in results["summary"].items():
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        lines.append(f"| {spec}{' (lossy)' if r['lossy'] else ''} | {sp} | {r['steps_per_image']:.1f} | {r['tau']:.2f} | "
                     f"{acc} | {r['accuracy']:.3f} | {r['fd']:.2f} |")
    return "\n".join(lines) + "\n"
