"""Lookahead decoding (Fu et al. 2024): Jacobi iteration over a window of future positions, run in
the same target forward that verifies, plus a pool of n-grams collected from the Jacobi
trajectories; the pool's n-grams that start with the current token are verified in that forward.

The window holds N-1 *levels* of W guesses. Level 0 is the current guess for the W positions after
the root; level l at column i guesses the token l positions after level 0's column i, so the
column (level 0 .. N-2 at column i) is one trajectory of consecutive positions. We send the window
to the target as part of the draft tree:

    root -> w0[0] -> w0[1] -> ... -> w0[W-1]        level 0 is a chain
                 |         |
                 w1[0]     w1[1] ...                 level l, column i hangs below level l-1, column i
                 |         |
                 w2[0]     w2[1] ...

so w_l[i] sees the prefix, level 0 up to column i and its own column below it: the same context
the paper's 2-D lookahead mask gives it. The target's argmax at w_{N-2}[i] is the new guess for the
next position of trajectory i (a Jacobi step); (w0[i], ..., w_{N-2}[i], new[i]) is an n-gram for the
pool, and the window slides up one level. Pool candidates (n-grams whose first token is the root)
are chains below the root in the same tree. Nodes with the same parent and token are merged (same
context, same output).

Unlike the paper, the window tokens are ordinary draft nodes: where they match the target they are
accepted too (verification makes that lossless). The pool is also seeded with the n-grams that
really occur in the prompt and the output (tried before the Jacobi n-grams).

Example:
    >>> from semiar.drafters.lookahead import LookaheadDrafter
    >>> d = LookaheadDrafter(window=3, ngram=3, candidates=2)
    >>> d.start([5, 6, 7, 5, 6, 8], None)
    >>> d.context_pool.candidates(5)              # the prompt's 3-grams that start with 5, newest first
    [(6, 8), (6, 7)]
    >>> t = d.propose([5, 6, 7, 5, 6, 8, 5])      # window (3 guesses, 1 level so far) + both candidates
    >>> len(t) <= d.max_nodes, t.depth >= 2
    (True, True)
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Optional

from ..errors import InvalidArgumentError
from ..tree import DraftTree, TreeBuilder
from .base import Drafter


class NgramPool:
    """n-grams keyed by their first token: the newest `per_key` continuations of each key."""

    def __init__(self, n: int, per_key: int):
        self.n, self.per_key = n, per_key
        self.pool: dict[int, OrderedDict] = {}

    def add(self, gram) -> None:
        cont = tuple(gram[1:])
        d = self.pool.setdefault(gram[0], OrderedDict())
        if cont in d:
            d.move_to_end(cont)
            return
        d[cont] = None
        if len(d) > self.per_key:
            d.popitem(last=False)

    def add_sequence(self, tokens: list[int], start: int = 0) -> None:
        """Add every n-gram of `tokens` that ends at index >= start (exclusive end > start)."""
        for end in range(max(start + 1, self.n), len(tokens) + 1):
            self.add(tokens[end - self.n:end])

    def candidates(self, key: int) -> list[tuple]:
        """Continuations of `key`, newest first."""
        d = self.pool.get(key)
        return list(reversed(d)) if d else []


def parse_lookahead_spec(spec: str) -> tuple[int, int, int]:
    """`lookahead:W,N,G` (or `W,N,G`) -> (W, N, G)."""
    s = spec.strip()
    if s.startswith("lookahead:"):
        s = s[len("lookahead:"):]
    try:
        w, n, g = (int(x) for x in s.split(","))
    except ValueError:
        raise InvalidArgumentError(
            f"malformed lookahead spec {spec!r}; use --tree lookahead:W,N,G (window, n-gram size, candidates), "
            "e.g. lookahead:5,4,5") from None
    return w, n, g


class LookaheadDrafter(Drafter):
    """Lookahead decoding: window W, n-gram size N, at most G pool candidates per step."""

    name = "lookahead"
    on_device = False  # host-only: no wait on the device before verifying
    needs_node_argmax = True

    def __init__(self, window: int = 3, ngram: int = 3, candidates: int = 3, pool_from_context: bool = True,
                 seed: int = 0):
        if window < 1 or ngram < 2 or candidates < 0:
            raise InvalidArgumentError(
                f"lookahead needs W >= 1, N >= 2 and G >= 0; got W={window}, N={ngram}, G={candidates}")
        if window * (ngram - 1) + candidates * (ngram - 1) > 256:
            raise InvalidArgumentError(
                f"lookahead W={window}, N={ngram}, G={candidates} makes a tree of "
                f"{(window + candidates) * (ngram - 1)} nodes; the limit is 256")
        self.W, self.N, self.G = window, ngram, candidates
        self.pool_from_context = pool_from_context
        self.seed = seed
        self._reset([])

    def _reset(self, prompt_ids: list[int]) -> None:
        self.jacobi_pool = NgramPool(self.N, max(self.G, 1))
        self.context_pool = NgramPool(self.N, max(self.G, 1))
        rng = random.Random(self.seed)
        vocab = prompt_ids or [0]
        self.levels: list[list[int]] = [[rng.choice(vocab) for _ in range(self.W)]]
        self.seen = 0
        self.window_nodes: list[list[int]] = []  # window_nodes[l][i] = tree node of level l, column i
        self.tree_len = 0

    @property
    def max_nodes(self) -> int:
        return (self.W + self.G) * (self.N - 1)

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        self._reset(list(prompt_ids))
        if self.pool_from_context:
            self.context_pool.add_sequence(list(prompt_ids))
        self.seen = len(prompt_ids)

    def propose(self, tokens: list[int]) -> DraftTree:
        if self.pool_from_context and len(tokens) > self.seen:
            self.context_pool.add_sequence(tokens, start=self.seen)  # n-grams ending in new tokens
        self.seen = len(tokens)
        tree = TreeBuilder()
        node = tree.node

        # the window; built level by level, so every node comes after its parent
        self.window_nodes = []
        prev = -1
        row = []
        for t in self.levels[0]:
            prev = node(prev, t)
            row.append(prev)
        self.window_nodes.append(row)
        for level in self.levels[1:]:
            row = [node(p, t) for p, t in zip(self.window_nodes[-1], level)]
            self.window_nodes.append(row)
        # verification branch: pool n-grams that continue the root
        root, seen_cont, n_cand = tokens[-1], set(), 0
        for cont in self.context_pool.candidates(root) + self.jacobi_pool.candidates(root):
            if n_cand >= self.G:
                break
            if cont in seen_cont:
                continue
            seen_cont.add(cont)
            n_cand += 1
            tree.add(cont)
        self.tree_len = len(tree.tokens)
        return tree.tree()

    def observe(self, accepted, n_draft_accepted, hidden=None, node_argmax: Optional[list[int]] = None):
        if node_argmax is None or len(node_argmax) != self.tree_len + 1:
            return  # no outputs for this tree (or the engine cut it at the token budget): keep the window
        new = [node_argmax[n + 1] for n in self.window_nodes[-1]]
        if len(self.levels) < self.N - 1:  # warming up: the window grows one level per step
            self.levels.append(new)
            return
        for i in range(self.W):
            self.jacobi_pool.add([lvl[i] for lvl in self.levels] + [new[i]])
        self.levels = self.levels[1:] + [new]
