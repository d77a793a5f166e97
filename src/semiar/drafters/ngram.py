"""Adaptive n-gram drafting (in the spirit of ADED): a store of n-gram continuation counts, seeded
from the prompt (and an optional corpus), updated with every emitted token, proposing a small
tree of the most frequent continuations. Backs off from the longest context with data.

Example:
    >>> from semiar.drafters.ngram import NgramDrafter
    >>> d = NgramDrafter(n=2, depth=3, top_k=2, budget=6)
    >>> d.start([1, 2, 3, 1, 2, 4, 1, 2, 3], None)
    >>> sorted(d.propose([1, 2, 3, 1, 2]).tokens[:2])   # after "1 2": 3 (twice) or 4 (once)
    [3, 4]
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional, Sequence

import torch

from ..errors import InvalidArgumentError
from ..tree import DraftTree, dynamic_tree
from .base import DraftLength, Drafter


class NgramStore:
    """Counts of the next token after every context of length 1..n."""

    def __init__(self, n: int):
        self.n = n
        self.counts: dict[tuple, Counter] = defaultdict(Counter)

    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        """Count the continuations of tokens[i] for i >= start."""
        for i in range(max(start, 1), len(tokens)):
            nxt = tokens[i]
            for m in range(1, self.n + 1):
                if i - m < 0:
                    break
                self.counts[tuple(tokens[i - m:i])][nxt] += 1

    def next_counts(self, context: Sequence[int]) -> Optional[Counter]:
        for m in range(min(self.n, len(context)), 0, -1):
            c = self.counts.get(tuple(context[-m:]))
            if c:
                return c
        return None


class NgramDrafter(Drafter):
    name = "ngram"
    on_device = False  # host-only: no wait on the device before verifying

    def __init__(self, n: int = 3, depth: int = 6, top_k: int = 2, budget: int = 10,
                 corpus_ids: Optional[Sequence[Sequence[int]]] = None, min_score: float = 0.15):
        if min(n, depth, top_k, budget) <= 0:
            raise InvalidArgumentError("ngram drafter: n, depth, top-k and budget must be > 0")
        self.n, self.depth, self.top_k, self.budget = n, depth, top_k, budget
        self.corpus_ids = [list(c) for c in (corpus_ids or [])]
        self.store = NgramStore(n)
        self.seen = 0
        self.min_score = min_score
        self.length = DraftLength(min(3, depth), depth)  # tree depth adapts to acceptance
        self.last_depth = 0

    @property
    def max_nodes(self) -> int:
        return self.budget

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        self.store = NgramStore(self.n)
        for doc in self.corpus_ids:
            self.store.add(doc)
        self.store.add(prompt_ids)
        self.seen = len(prompt_ids)
        self.length.reset()

    def propose(self, tokens: list[int]) -> DraftTree:
        if len(tokens) > self.seen:  # emitted since the last step: learn from them first
            self.store.add(tokens, start=self.seen)
            self.seen = len(tokens)

        context = tokens[-self.n:]  # all a lookup reads

        def expand(frontier, tree_tokens, parents):
            rows = []
            for node in frontier:
                path = []
                while node >= 0:
                    path.append(tree_tokens[node])
                    node = parents[node]
                rows.append(self.store.next_counts(context + path[::-1]))
            # the few tokens seen after these contexts, as columns (not a vocabulary-wide row: on a
            # GPU host, zeroing and ranking 152k columns took most of this drafter's ~0.3 ms per step)
            columns = sorted({t for c in rows if c for t in c})
            col = {t: i for i, t in enumerate(columns)}
            probs = [[0.0] * len(columns) for _ in rows]
            for r, c in enumerate(rows):
                if c:
                    total = sum(c.values())
                    for t, v in c.items():
                        probs[r][col[t]] = v / total
            return torch.tensor(probs).reshape(len(rows), len(columns)), columns

        tree = dynamic_tree(expand, self.length.k, self.top_k, self.budget, self.min_score)
        self.last_depth = tree.depth
        return tree

    def observe(self, accepted, n_draft_accepted, hidden=None):
        self.length.update(self.last_depth, n_draft_accepted)
