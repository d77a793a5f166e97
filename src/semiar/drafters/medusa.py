"""Medusa: extra decoding heads on the target's last hidden state, and a static sparse tree.

Paper: Cai, Li, Geng, Peng, Lee, Chen, Dao, *Medusa: Simple LLM Inference Acceleration Framework
with Multiple Decoding Heads* (ICML 2024). What semiar builds (Medusa-1: the target stays frozen):

- **Heads.** Head d (d = 1..K) reads the target's final-layer feature h_t (after the final norm,
  what the LM head reads) through `num_layers` residual blocks x + SiLU(W x + b) (W = 0 at the
  start, so every head starts as the target's own next-token head) and the target's LM head,
  shared and frozen. The target's feature at t predicts the root (x_{t+1}); head d predicts the
  token d places below it, x_{t+1+d}. Only the residual blocks are trained and stored.
- **Tree.** A static sparse tree of rank paths (`[[0], [1], [0, 0], ...]`: the top-1 candidate of
  head 1, its top-2, the top-1 of head 2 below head 1's top-1, ...), filled from each head's top
  candidates (`tree.tree_from_levels`). The default shape is *calibrated*, as in the paper: after
  training, the held-out top-r accuracy of every head gives each rank path an expected acceptance
  (the product of its heads' accuracies), and the `budget` paths with the highest expectation make
  the tree (`calibrated_choices`). `--tree '[[0],[0,0],...]'` sets another shape.
- **Verification** is the engine's: greedy or lossless speculative sampling (drafts are chosen by
  rank, so q = one-hot). Medusa's *typical acceptance* is the separate method `medusa-typical`:
  faster under sampling, **not lossless** (`semiar.verify.verify_typical`).

Hydra (`drafters/hydra.py`) is the same with heads that also read the tokens drafted above them.

Example:
    >>> import torch
    >>> from semiar.drafters.medusa import HeadsConfig, MedusaNet
    >>> net = MedusaNet(HeadsConfig(vocab_size=64, hidden_size=32, heads=3))
    >>> [o.shape for o in net(torch.zeros(2, 5, 32))]       # one [B, T, H] feature per head
    [torch.Size([2, 5, 32]), torch.Size([2, 5, 32]), torch.Size([2, 5, 32])]
    >>> calibrated_choices([[0.6, 0.2], [0.4, 0.1]], budget=3)
    [(0,), (1,), (0, 0)]
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import InvalidArgumentError, ModelFileError
from ..tree import DraftTree, TreeSpec, tree_from_levels
from .base import Drafter
from .checkpoint import check_identity, config_from_dict, read_drafter_dir, write_drafter_dir

METHOD = "medusa"
DEFAULT_BUDGET = 16


@dataclass
class HeadsConfig:
    vocab_size: int
    hidden_size: int
    heads: int = 4  # K: head d drafts depth d below the root
    num_layers: int = 1  # residual blocks per head

    @classmethod
    def from_dict(cls, d: dict) -> "HeadsConfig":
        return config_from_dict(cls, d, "heads")


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W = 0 at the start (an identity block, as Medusa initialises it)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


class MedusaNet(nn.Module):
    """K heads of residual blocks; their outputs go through the target's LM head."""

    method = METHOD

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        if cfg.heads < 1 or cfg.num_layers < 1:
            raise InvalidArgumentError(f"{self.method} needs heads >= 1 and layers >= 1, got {cfg.heads}, {cfg.num_layers}")
        self.config = cfg
        self.heads = nn.ModuleList(nn.Sequential(*[ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)])
                                   for _ in range(cfg.heads))

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def forward(self, feats: torch.Tensor, tok_emb: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """feats: [B, T, H] target features h_t; tok_emb (Hydra only): [B, T + K, H] embeddings of
        x_0..; returns K tensors [B, T, H]: head d's feature at t, for token x_{t+1+d}."""
        x = feats.to(self.dtype)
        return [head(x) for head in self.heads]

    def head_features(self, feat: torch.Tensor, depth: int, path_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pre-LM-head features of head `depth` (1-based) for n branches: feat [H] is the feature
        below the root; path_emb (Hydra) [n, depth, H] the embeddings of root + drafted tokens."""
        n = 1 if path_emb is None else path_emb.shape[0]
        return self.heads[depth - 1](feat.to(self.dtype).expand(n, -1))


def calibrated_choices(rank_acc: list[list[float]], budget: int = DEFAULT_BUDGET) -> list[tuple[int, ...]]:
    """Medusa's sparse tree: rank_acc[d][r] = how often head d+1's rank-r candidate is the
    target's token (held out). A rank path's expected acceptance is the product of its heads'
    accuracies; the `budget` best paths (each with its parent, which scores at least as high)
    make the tree, in topological order."""
    heap = [(-a, (r,)) for r, a in enumerate(rank_acc[0]) if a > 0] if rank_acc else []
    heapq.heapify(heap)
    chosen = []
    while heap and len(chosen) < budget:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        d = len(path)
        if d < len(rank_acc):
            for r, a in enumerate(rank_acc[d]):
                if a > 0:
                    heapq.heappush(heap, (neg * a, path + (r,)))
    return sorted(chosen, key=lambda c: (len(c), c))


def default_choices(heads: int, budget: int = DEFAULT_BUDGET) -> list[tuple[int, ...]]:
    """Without held-out accuracies: assume head d's rank r is right 0.5^d / (r + 1) of the time."""
    return calibrated_choices([[0.5 ** (d + 1) / (r + 1) for r in range(8)] for d in range(heads)], budget)


def load_heads(path: str | Path, target, net_cls, device=None, dtype=None) -> tuple[nn.Module, Optional[list]]:
    """(net, held-out rank accuracies or None) of a medusa/hydra drafter directory for `target`."""
    meta, sd = read_drafter_dir(path, net_cls.method)
    check_identity(meta, target, str(path))
    cfg = HeadsConfig.from_dict(meta["config"])
    if cfg.hidden_size != target.config.hidden_size:
        raise ModelFileError(f"{path}: heads of width {cfg.hidden_size} for a target of width {target.config.hidden_size}")
    net = net_cls(cfg)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}/model.safetensors does not match its config ({str(e).splitlines()[0]})") from None
    rank_acc = ((meta.get("training") or {}).get("val") or {}).get("rank_acc")
    return net.to(device=device or target.device, dtype=dtype or target.dtype).eval(), rank_acc


def save_heads(path: str | Path, net: nn.Module, target, training: Optional[dict] = None) -> Path:
    return write_drafter_dir(path, net.method, asdict(net.config), net.state_dict(), target, training)


def load_medusa(path: str | Path, target, device=None, dtype=None) -> tuple[MedusaNet, Optional[list]]:
    return load_heads(path, target, MedusaNet, device, dtype)


class MedusaDrafter(Drafter):
    """Fills a static sparse tree from the heads' top candidates (see the module docstring).
    rank_acc: held-out accuracies for the calibrated default tree (`tree` overrides it);
    typical: Medusa's typical acceptance instead of the engine's lossless verification."""

    name = METHOD
    needs_hidden = True

    def __init__(self, net: MedusaNet, target, tree: Optional[TreeSpec] = None, rank_acc: Optional[list] = None,
                 typical: bool = False):
        self.net = net.eval()
        if typical:  # opt-in, lossy under sampling: see verify.verify_typical
            from ..verify import verify_typical

            self.acceptance = verify_typical
            self.name = f"{self.name}-typical"
        self.target = target
        K = net.config.heads
        if tree is None:
            choices = calibrated_choices(rank_acc, DEFAULT_BUDGET) if rank_acc else default_choices(K)
            tree = TreeSpec("static", choices=tuple(choices))
        if tree.kind != "static":
            raise InvalidArgumentError(f"{self.name} fills a static tree: use --tree '[[0],[1],[0,0],...]' (rank paths)")
        if tree.max_depth > K:
            raise InvalidArgumentError(f"tree depth {tree.max_depth} exceeds the drafter's {K} heads")
        self.tree = tree
        self.embed = target.decoder.embed_tokens
        self.lm_head = target.decoder.lm_head
        self.last: Optional[torch.Tensor] = None  # target feature of the position before the root

    @property
    def max_nodes(self) -> int:
        return self.tree.max_nodes

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        self.last = None if prompt_hidden is None or not len(prompt_hidden) else prompt_hidden[-1]

    def observe(self, accepted, n_draft_accepted, hidden=None):
        if hidden is not None:
            self.last = hidden[-1]

    def _level(self, depth: int, paths: list[list[int]]) -> torch.Tensor:
        """[len(paths), vocab] logits of head `depth` below each branch (paths: root + drafted)."""
        # Medusa's heads do not read the branch: one row serves every parent at this depth
        return self.lm_head(self.net.head_features(self.last, depth)).float().expand(len(paths), -1)

    @torch.no_grad()
    def propose(self, tokens: list[int]) -> DraftTree:
        if self.last is None:
            return DraftTree.empty()
        root = tokens[-1]
        return tree_from_levels(self.tree.choices, lambda d, paths: self._level(d, [[root] + p for p in paths]))
