"""Method names -> drafters. `ar` is the engine with no drafter.

Example:
    >>> from semiar.methods import METHODS
    >>> sorted(METHODS)
    ['ar', 'auto', 'copy', 'draft', 'eagle', 'falcon', 'gsd', 'hydra', 'hydra-typical', 'lantern', 'lookahead', 'medusa', 'medusa-typical', 'ngram', 'pld', 'sjd']
"""

from __future__ import annotations

from typing import Optional

from .drafters.base import Drafter
from .drafters.checkpoint import shipped_drafter
from .errors import InvalidArgumentError
from .tree import TreeSpec, parse_tree_spec

METHODS = {
    "ar": "autoregressive baseline (one target forward per token)",
    "draft": "speculative sampling with a small draft model (--draft-model)",
    "pld": "prompt lookup: copy the continuation of a matching n-gram from the context",
    "ngram": "adaptive n-gram store (prompt + output so far + optional corpus), small tree",
    "falcon": "Falcon semi-autoregressive drafter, k tokens per pass, block tree (--drafter DIR)",
    "lookahead": "lookahead decoding: Jacobi window + n-gram pool in one forward (--tree lookahead:W,N,G)",
    "copy": "input-guided drafting for edits: long blocks copied from the prompt, re-aligned after edits",
    "auto": "picks per step among copy/pld/ngram/lookahead (+ draft, falcon when given) by measured tokens/s",
    "medusa": "Medusa heads on the target's last feature, static sparse tree (--drafter DIR)",
    "hydra": "Hydra heads: Medusa heads that read the tokens drafted above them (--drafter DIR)",
    "eagle": "EAGLE-style feature drafter, one token per pass, EAGLE-2 dynamic tree (--drafter DIR)",
    "medusa-typical": "LOSSY: medusa with typical acceptance (sampled output is not the target's distribution)",
    "hydra-typical": "LOSSY: hydra with typical acceptance (sampled output is not the target's distribution)",
    "sjd": "speculative Jacobi decoding: the last forward's rows are the next draft (-k window); image or text",
    "lantern": "LOSSY, image models: sjd drafts, a code credited with its VQ-latent neighbours' mass (--lantern-k, --delta)",
    "gsd": "LOSSY, image models: sjd drafts, a code in the target's top group accepted by the group's mass (--group)",
}

#: what `auto` chooses from when no draft model or trained drafter is given
TRAINING_FREE = ("copy", "pld", "ngram", "lookahead")

#: opt-in methods whose output is NOT exactly the target's (never counted as lossless)
LOSSY = {"medusa-typical", "hydra-typical", "lantern", "gsd"}

#: the methods `semiar generate-image` runs (the others draft from text: n-grams, copies, heads)
IMAGE_METHODS = ("ar", "sjd", "lantern", "gsd")

#: methods that need a trained drafter directory, and the `train-drafter --method` that makes it
LEARNED = {"falcon": "falcon", "eagle": "eagle", "medusa": "medusa", "hydra": "hydra",
           "medusa-typical": "medusa", "hydra-typical": "hydra"}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def make_drafter(method: str, target, *, draft_model=None, tree: Optional[str | TreeSpec] = None,
                 k: Optional[int] = None, ngram: Optional[int] = None, device: str = "cpu",
                 dtype=None, corpus_ids=None, drafter=None, cuda_graphs=None, compile=False,
                 lantern_k: int = 8, delta: float = 0.2, group: int = 8) -> Optional[Drafter]:
    """Build the drafter for `method` (None for `ar`). draft_model: a name/path or a LoadedModel;
    drafter: a trained drafter directory (or a loaded FalconNet) for the learned methods;
    lantern_k, delta: lantern's neighbourhood and total-variation budget; group: gsd's group size."""
    check_method(method)
    if k is not None and k <= 0:
        raise InvalidArgumentError(f"k must be > 0, got {k}")
    spec = parse_tree_spec(tree) if isinstance(tree, str) and method != "lookahead" else tree
    if method == "ar":
        return None
    if method == "pld":
        if spec is not None and spec.kind != "chain":
            raise InvalidArgumentError("pld drafts a chain; use --tree chain:K or -k")
        kk = k or (spec.k if spec else 10)
        return _pld(kk, ngram or 3)
    if method == "ngram":
        from .drafters.ngram import NgramDrafter

        if spec is not None and spec.kind != "dynamic":
            raise InvalidArgumentError("ngram builds a dynamic tree; use --tree dynamic:DEPTH,TOPK,BUDGET")
        s = spec or TreeSpec("dynamic", depth=k or 6, top_k=2, budget=10)
        return NgramDrafter(n=ngram or 3, depth=s.depth, top_k=s.top_k, budget=s.budget, corpus_ids=corpus_ids)
    if method in ("sjd", "lantern", "gsd"):
        return _jacobi(method, target, k, tree, lantern_k, delta, group)
    if method in LEARNED:
        return _learned(method, target, drafter, spec, k, compile=compile)
    if method == "lookahead":
        from .drafters.lookahead import LookaheadDrafter, parse_lookahead_spec

        if k is not None or (tree is not None and not isinstance(tree, str)):
            raise InvalidArgumentError("lookahead is shaped by --tree lookahead:W,N,G (window, n-gram size, candidates)")
        return LookaheadDrafter(*parse_lookahead_spec(tree)) if tree is not None else LookaheadDrafter()
    if method == "copy":
        from .drafters.copy import CopyDrafter

        if spec is not None and spec.kind not in ("chain", "dynamic"):
            raise InvalidArgumentError("copy drafts a chain (--tree chain:K or -k, the longest block) or a chain "
                                       "with alternates (--tree dynamic:LEN,ALTS,BUDGET)")
        if spec is None and k is None and str(device).startswith("cuda"):
            # a 48-node verification costs ~1.1 steps on an H200; on a 2-core CPU a 32-row one
            # costs ~3.3, and the chain paid more there (docs/methods.md)
            spec = COPY_GPU_TREE
        if spec is not None and spec.kind == "dynamic":
            return CopyDrafter(k=k or 32, alternates=spec.top_k, alt_len=spec.depth, budget=spec.budget)
        return CopyDrafter(k=k or (spec.k if spec else 32))
    if method == "auto":
        from .drafters.auto import AutoDrafter

        if tree is not None or k is not None:
            raise InvalidArgumentError("auto runs each method with its defaults; --tree and -k do not apply")
        if drafter is None:
            drafter = shipped_drafter("falcon", target.name)
        names = list(TRAINING_FREE) + (["draft"] if draft_model is not None else []) + (["falcon"] if drafter is not None else [])
        return AutoDrafter({m: make_drafter(m, target, draft_model=draft_model, device=device, dtype=dtype,
                                            corpus_ids=corpus_ids, drafter=drafter, compile=compile) for m in names})
    if method == "draft":
        from .drafters.draft_model import DraftModelDrafter
        from .models.loading import LoadedModel, load_model

        if draft_model is None:
            raise InvalidArgumentError("method 'draft' needs --draft-model NAME")
        if not isinstance(draft_model, LoadedModel):
            # on the CPU its 1-2 token steps take the kernel timed fastest at load (docs/models.md)
            draft_model = load_model(draft_model, device=device, dtype=dtype or target.dtype_spec,
                                     cuda_graphs=cuda_graphs, compile=compile)
        s = spec or TreeSpec("chain", k=k or 12)
        if k is not None and s.kind == "chain":
            s = TreeSpec("chain", k=k)
        return DraftModelDrafter(draft_model, target=target, tree=s)
    raise AssertionError(method)


#: copy's default on CUDA: the pointer's block plus 8 lookup alternates of 8 tokens in 48 nodes, chosen
#: by replaying the H200 run's greedy outputs under the measured verification cost (edit tau 2.30 ->
#: 3.28, code 6.80 -> 7.54; docs/methods.md). On the CPU the default stays the chain of up to 32.
COPY_GPU_TREE = TreeSpec("dynamic", depth=8, top_k=8, budget=48)


#: sjd's window when -k is not given. On the 2-core CPU with mnist-vq (CFG 2), 8 and 16 took the
#: same steps per image (28.8, 28.7) and 8 ran faster (1.18x vs 1.05x over ar; 4: 31.4 steps,
#: 1.20x); docs/visual.md. A GPU, where a wider forward is nearly free, would favour a wider window.
SJD_WINDOW = 8


def _jacobi(method: str, target, k: Optional[int], tree, lantern_k: int, delta: float, group: int) -> Drafter:
    from .drafters.sjd import SJDDrafter
    from .verify import GroupedAcceptance, LanternAcceptance

    if tree is not None:
        raise InvalidArgumentError(f"{method} drafts a chain; set its length with -k (the Jacobi window)")
    acceptance = None
    if method == "lantern":
        if not hasattr(target, "neighbours"):
            raise InvalidArgumentError("lantern needs an image-token model (its VQ codebook gives the neighbours)")
        acceptance = LanternAcceptance(target.neighbours(lantern_k), lantern_k, delta)
    elif method == "gsd":
        if not hasattr(target, "neighbours"):
            raise InvalidArgumentError("gsd is for image-token models (semiar generate-image)")
        acceptance = GroupedAcceptance(group)
    return SJDDrafter(target.config.vocab_size, window=k or SJD_WINDOW, acceptance=acceptance, name=method)


def _pld(k: int, n: int) -> Drafter:
    from .drafters.lookup import PromptLookupDrafter

    return PromptLookupDrafter(k=k, max_ngram=n)


def _learned(method: str, target, drafter, spec: Optional[TreeSpec], k: Optional[int],
             compile: bool = False) -> Drafter:
    """A trained drafter: `drafter` is its directory (or an already built network); compile: on
    CUDA, Falcon/EAGLE compile their graphed passes."""
    kind = LEARNED[method]
    if drafter is None:
        drafter = shipped_drafter(kind, target.name)
    if drafter is None:
        raise InvalidArgumentError(
            f"method {method!r} needs --drafter DIR: train one with "
            f"`semiar train-drafter --method {kind} --target {target.name} --out DIR`")
    if k is not None:
        raise InvalidArgumentError(f"{kind}'s k is fixed by training; shape its tree with --tree")
    if kind in ("falcon", "eagle"):
        from .drafters.eagle import EagleDrafter, load_eagle
        from .drafters.falcon import FalconDrafter, FalconNet, load_falcon

        if spec is not None and spec.kind != "dynamic":
            raise InvalidArgumentError(f"{kind} builds a dynamic tree; use --tree dynamic:DEPTH,TOPK,BUDGET")
        load, cls = (load_falcon, FalconDrafter) if kind == "falcon" else (load_eagle, EagleDrafter)
        net = drafter if isinstance(drafter, FalconNet) else load(drafter, target)
        return cls(net, target, spec, compile=compile)
    from .drafters.hydra import HydraDrafter, load_hydra
    from .drafters.medusa import MedusaDrafter, MedusaNet, load_medusa

    load, cls = (load_medusa, MedusaDrafter) if kind == "medusa" else (load_hydra, HydraDrafter)
    net, rank_acc = (drafter, None) if isinstance(drafter, MedusaNet) else load(drafter, target)
    return cls(net, target, spec, rank_acc=rank_acc, typical=method in LOSSY)
