"""Token trees: what a drafter proposes and the target verifies in one forward.

A tree hangs below a *root*: the last emitted token, which is not yet in the target's cache.
Draft nodes are numbered 0..n-1 in topological order; `parents[i]` is the parent node, or -1 for
a child of the root. In the target forward the root is row 0 and node i is row i + 1.

Example:
    >>> from semiar.tree import DraftTree
    >>> t = DraftTree(tokens=[11, 12, 13], parents=[-1, 0, -1])
    >>> t.depths, t.paths()
    ([1, 2, 1], [[0, 1], [2]])
    >>> t.attention_mask().int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .errors import InvalidArgumentError


@dataclass
class DraftTree:
    """Draft tokens as parent indices + tokens (+ the distribution each token was sampled from).

    q[i] is the draft distribution node i's token was *sampled* from, or None when the token was
    chosen deterministically (lookup, argmax, top-k): verification then treats it as q = one-hot,
    which keeps sampling lossless whatever the drafter did.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    q: Optional[list[Optional[torch.Tensor]]] = None

    def __post_init__(self):
        if len(self.tokens) != len(self.parents):
            raise ValueError("tokens and parents must have the same length")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}: nodes must come after their parents")
        if self.q is not None and len(self.q) != len(self.tokens):
            raise ValueError("q must have one entry per node")
        depths = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        self.depths = depths

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls) -> "DraftTree":
        return cls([], [])

    @classmethod
    def chain(cls, tokens: Sequence[int], q: Optional[list] = None) -> "DraftTree":
        """A tree of width 1 (plain speculative decoding)."""
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    def children(self) -> list[list[int]]:
        """children()[p + 1] lists the children of node p (index 0: children of the root)."""
        kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            kids[p + 1].append(i)
        return kids

    def attention_mask(self, device=None) -> torch.Tensor:
        """[n+1, n+1] bool: row r may attend to column c (root + nodes; ancestors and itself)."""
        n = len(self) + 1
        # built in numpy, one host-to-device copy: row by row in torch it was ~100 small tensor
        # ops per tree (168 µs for 48 nodes on this project's CPU, 10 µs this way; scripts/host_cost.py
        # mask), paid on every verification
        mask = np.zeros((n, n), dtype=bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            r = i + 1
            mask[r] = mask[p + 1]
            mask[r, r] = True
        out = torch.from_numpy(mask)
        return out.to(device) if device is not None else out

    def positions(self, start: int, device=None) -> torch.Tensor:
        """Position ids of root + nodes: prefix length + depth."""
        return torch.tensor([start] + [start + d for d in self.depths], device=device)

    def paths(self) -> list[list[int]]:
        """Root-to-leaf paths as lists of node indices."""
        kids = self.children()
        out = []

        def walk(node, path):
            ch = kids[node + 1]
            if not ch and path:
                out.append(path)
            for c in ch:
                walk(c, path + [c])

        walk(-1, [])
        return out

    def path_tokens(self, path: list[int]) -> list[int]:
        return [self.tokens[i] for i in path]


# --- static shapes ------------------------------------------------------------------------------

def parse_choices(choices: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Medusa-style static shape: each choice is a path of candidate ranks, e.g. [0, 1] = the
    top-2 candidate at depth 2 below the top-1 candidate at depth 1. Returned sorted so that every
    node comes after its parent; every prefix of a choice must be a choice too."""
    paths = sorted({tuple(int(r) for r in c) for c in choices}, key=lambda c: (len(c), c))
    known = set(paths)
    for c in paths:
        if not c or any(r < 0 for r in c):
            raise InvalidArgumentError(f"tree choice {list(c)} is empty or has a negative rank")
        if len(c) > 1 and c[:-1] not in known:
            raise InvalidArgumentError(f"tree choice {list(c)} has no parent {list(c[:-1])} in the tree")
    return paths


@dataclass(frozen=True)
class TreeSpec:
    """How a drafter should shape its proposal.

    kind: "chain" (k tokens), "static" (Medusa-style choices) or "dynamic" (EAGLE-2: expand the
    `top_k` most probable nodes per level for `depth` levels, keep the `budget` best by path
    probability).
    """

    kind: str = "chain"
    k: int = 4
    choices: tuple = ()
    depth: int = 4
    top_k: int = 4
    budget: int = 16

    @property
    def max_nodes(self) -> int:
        if self.kind == "chain":
            return self.k
        if self.kind == "static":
            return len(self.choices)
        return self.budget

    @property
    def max_depth(self) -> int:
        if self.kind == "chain":
            return self.k
        if self.kind == "static":
            return max(len(c) for c in self.choices)
        return self.depth


MAX_TREE_NODES = 256


def parse_tree_spec(spec: str) -> TreeSpec:
    """Parse `--tree`: `chain:K`, `dynamic:DEPTH,TOPK,BUDGET`, or a JSON list of choices
    (`[[0],[1],[0,0]]`) or `@file.json` holding one."""
    s = spec.strip()
    try:
        if s.startswith("chain:"):
            k = int(s[6:])
            if k <= 0:
                raise InvalidArgumentError(f"tree spec {spec!r}: k must be > 0")
            ts = TreeSpec("chain", k=k)
        elif s.startswith("dynamic:"):
            depth, top_k, budget = (int(x) for x in s[8:].split(","))
            if min(depth, top_k, budget) <= 0:
                raise InvalidArgumentError(f"tree spec {spec!r}: depth, top-k and budget must be > 0")
            ts = TreeSpec("dynamic", depth=depth, top_k=top_k, budget=budget)
        else:
            if s.startswith("@"):
                with open(s[1:]) as f:
                    s = f.read()
            choices = json.loads(s)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, list) for c in choices):
                raise InvalidArgumentError(f"tree spec {spec!r}: expected a non-empty JSON list of lists")
            ts = TreeSpec("static", choices=tuple(parse_choices(choices)))
    except InvalidArgumentError:
        raise
    except (ValueError, OSError, TypeError) as e:
        raise InvalidArgumentError(
            f"malformed tree spec {spec!r} ({e}); use chain:K, dynamic:DEPTH,TOPK,BUDGET or a JSON list of "
            "paths like [[0],[1],[0,0]]") from None
    if ts.max_nodes > MAX_TREE_NODES:
        raise InvalidArgumentError(f"tree spec {spec!r} has {ts.max_nodes} nodes; the limit is {MAX_TREE_NODES}")
    return ts


# --- building trees from a drafter's distributions ---------------------------------------------

def tree_from_choices(choices: Sequence[tuple[int, ...]], candidates: Callable[[tuple[int, ...], int], Optional[list[int]]]) -> DraftTree:
    """Fill a static shape. candidates(prefix_ranks, n) returns the top-n token ids below the node
    reached by `prefix_ranks`, or None when the drafter has nothing there (the branch is dropped)."""
    index: dict[tuple[int, ...], int] = {}
    tokens, parents = [], []
    for c in choices:
        parent = c[:-1]
        if parent and parent not in index:
            continue
        cand = candidates(parent, c[-1] + 1)
        if cand is None or len(cand) <= c[-1]:
            continue
        index[c] = len(tokens)
        tokens.append(int(cand[c[-1]]))
        parents.append(index[parent] if parent else -1)
    return DraftTree(tokens, parents)


def dynamic_tree(expand: Callable[[list[int], list[int], list[int]], torch.Tensor], depth: int, top_k: int,
                 budget: int, min_score: float = 0.0) -> DraftTree:
    """EAGLE-2-style dynamic tree.

    expand(nodes, tokens, parents) -> [len(nodes), vocab] draft probabilities for the next token
    below each given node (-1 = root), given the tree built so far (tokens, parents); or a pair
    (probs [len(nodes), C], columns), column c standing for token columns[c], for a drafter whose
    candidates are a few known tokens (a vocabulary-wide row would cost more than the lookup).
    Each level expands the `top_k` frontier nodes with the highest path score
    (product of draft probabilities), each proposing its `top_k` best tokens; at the end the
    `budget` best-scoring nodes are kept (a kept node's ancestors always score higher, so the
    result is a valid tree). Nodes scoring below `min_score` are not worth a verification slot.
    """
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    frontier = [-1]
    frontier_scores = [1.0]
    for _ in range(depth):
        out = expand(frontier, tokens, parents)  # [len(frontier), vocab], or (probs, columns)
        probs, columns = out if isinstance(out, tuple) else (out, None)
        top_p, top_t = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        cand = []
        for fi, node in enumerate(frontier):
            for p, t in zip(top_p[fi].tolist(), top_t[fi].tolist()):
                if p <= 0 or frontier_scores[fi] * p < min_score:  # nothing (worth verifying) here
                    break
                cand.append((frontier_scores[fi] * p, node, t if columns is None else columns[t]))
        new_nodes = []
        for score, parent, tok in cand:
            new_nodes.append(len(tokens))
            tokens.append(tok)
            parents.append(parent)
            scores.append(score)
        if not new_nodes:
            break
        best = heapq.nlargest(top_k, new_nodes, key=lambda i: scores[i])
        frontier = sorted(best)
        frontier_scores = [scores[i] for i in frontier]
    return best_nodes(tokens, parents, scores, budget)


class TreeBuilder:
    """Grows a DraftTree from token sequences, merging equal tokens under the same parent (a
    trie), up to `budget` nodes (None: no limit). Deterministic drafters that gather several
    candidate continuations (lookahead, copy's alternates) build their trees with it."""

    def __init__(self, budget: Optional[int] = None):
        self.budget = budget
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self._child: dict[tuple[int, int], int] = {}

    @property
    def full(self) -> bool:
        return self.budget is not None and len(self.tokens) >= self.budget

    def node(self, parent: int, token: int) -> Optional[int]:
        """The node for `token` below `parent` (-1: the root), added if new; None when full."""
        n = self._child.get((parent, token))
        if n is None and not self.full:
            n = self._child[(parent, token)] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
        return n

    def add(self, seq: Sequence[int], parent: int = -1) -> bool:
        """Merge `seq` below `parent` (as far as the budget allows); True if it added a node."""
        before = len(self.tokens)
        for t in seq:
            parent = self.node(parent, t)
            if parent is None:
                break
        return len(self.tokens) > before

    def tree(self) -> DraftTree:
        return DraftTree(list(self.tokens), list(self.parents))


def best_nodes(tokens: list[int], parents: list[int], scores: list[float], budget: int) -> DraftTree:
    """The `budget` highest-scoring nodes of a candidate tree (nodes in topological order), as a
    DraftTree. Path scores are products of probabilities, so a kept node's ancestors score at
    least as high; ties can still keep a child without its parent, so ancestors are added back."""
    keep = sorted(heapq.nlargest(budget, range(len(tokens)), key=lambda i: scores[i]))
    keep_set = set(keep)
    for i in list(keep):
        p = parents[i]
        while p >= 0 and p not in keep_set:
            keep_set.add(p)
            p = parents[p]
    keep = sorted(keep_set)
    remap = {old: new for new, old in enumerate(keep)}
    return DraftTree([tokens[i] for i in keep], [remap[parents[i]] if parents[i] >= 0 else -1 for i in keep])


def tree_from_levels(choices: Sequence[tuple[int, ...]],
                     level_logits: Callable[[int, list[list[int]]], torch.Tensor]) -> DraftTree:
    """Fill a static shape level by level, one drafter call per depth (Medusa, Hydra).

    level_logits(depth, paths) -> [len(paths), vocab] scores of the token at `depth` below each
    parent, where paths[i] lists the draft tokens from depth 1 to depth - 1 of parent i ([] for
    the root). Rank r of a parent's row is its (r+1)-th best token.
    """
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    by_depth: dict[int, list[tuple[int, ...]]] = {}
    for c in choices:
        by_depth.setdefault(len(c), []).append(c)
    for d in sorted(by_depth):
        level = [c for c in by_depth[d] if d == 1 or c[:-1] in index]
        if not level:
            break
        prefixes = list(dict.fromkeys(c[:-1] for c in level))
        paths = []
        for pre in prefixes:
            path, node = [], index.get(pre, -1)
            while node >= 0:
                path.append(tokens[node])
                node = parents[node]
            paths.append(path[::-1])
        scores = level_logits(d, paths)
        top = scores.topk(min(scores.shape[-1], 1 + max(c[-1] for c in level)), dim=-1).indices.tolist()
        row = {pre: i for i, pre in enumerate(prefixes)}
        for c in level:
            cand = top[row[c[:-1]]]
            if c[-1] >= len(cand):
                continue
            index[c] = len(tokens)
            tokens.append(int(cand[c[-1]]))
            parents.append(index[c[:-1]] if d > 1 else -1)
    return DraftTree(tokens, parents)
