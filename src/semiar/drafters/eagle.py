"""EAGLE-style feature drafting: an autoregressive drafter over the target's features with the
EAGLE-2 dynamic draft tree.

Papers: Li, Wei, Zhang, Zhang, *EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty* (ICML 2024) and *EAGLE-2: Faster Inference of Language Models with Dynamic Draft
Trees* (EMNLP 2024). What semiar builds (EAGLE-1's drafter, EAGLE-2's tree):

- **Drafter.** Position t reads (h_t, x_{t+1}): the target's final-layer feature and the embedding
  of the token after it, fused by fc([E(x_{t+1}); h_t]) into one Llama-style decoder layer shaped
  like the target's (no input norm, no final norm). Its output regresses h_{t+1}; the target's
  frozen LM head turns it into the next token. It keeps its own KV cache across steps.
- **Tree.** Each pass feeds the `top_k` frontier nodes (by path score, the product of draft
  probabilities) and adds their `top_k` best tokens; after DEPTH passes the BUDGET best nodes are
  re-ranked by score and verified (`--tree dynamic:DEPTH,TOPK,BUDGET`, default `dynamic:5,4,16`).
- **Training**: `semiar train-drafter --method eagle`: SmoothL1 on the features + 0.1 x (KL + CE)
  through the LM head, with input noise, on the target's self-distilled answers.

This is Falcon's drafter (`drafters/falcon.py`) with one token per pass (k = 1, where Falcon's
relaxed mask is the causal mask and its block tree is EAGLE-2's tree) and one layer, so the
network, its cache, the tree and the training loop are shared code, not a copy. Not built:
EAGLE-3's multi-layer feature fusion and training-time test.

Example:
    >>> from semiar.drafters.eagle import eagle_config
    >>> from semiar.models.decoder import DecoderConfig
    >>> c = eagle_config(DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    ...                                num_heads=4, num_kv_heads=2))
    >>> c.k, c.num_layers
    (1, 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import InvalidArgumentError
from ..tree import TreeSpec
from .falcon import FalconConfig, FalconDrafter, FalconNet, load_falcon

METHOD = "eagle"
DEFAULT_TREE = TreeSpec("dynamic", depth=5, top_k=4, budget=16)


def eagle_config(target_cfg, num_layers: int = 1) -> FalconConfig:
    """A one-token-per-pass drafter with `num_layers` decoder layers shaped like the target's."""
    return FalconConfig.for_target(target_cfg, k=1, num_layers=num_layers)


def load_eagle(path: str | Path, target, device=None, dtype=None) -> FalconNet:
    net = load_falcon(path, target, device, dtype, method=METHOD)
    if net.config.k != 1:
        raise InvalidArgumentError(f"{path}: an eagle drafter drafts one token per pass, this one k={net.config.k}")
    return net


class EagleDrafter(FalconDrafter):
    """FalconDrafter with k = 1: every pass adds one level to the EAGLE-2 tree."""

    name = METHOD

    def __init__(self, net: FalconNet, target, tree: Optional[TreeSpec] = None, min_score: float = 0.0,
                 graphs: Optional[bool] = None, compile: bool = False):
        if net.config.k != 1:
            raise InvalidArgumentError(f"eagle drafts one token per pass; this network has k={net.config.k} (use falcon)")
        super().__init__(net, target, tree or DEFAULT_TREE, min_score, graphs=graphs, compile=compile)
