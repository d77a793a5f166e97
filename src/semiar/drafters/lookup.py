"""Prompt lookup decoding (PLD): the continuation of the most recent earlier occurrence of the
context's last n tokens is the draft. No model, no training; shines when the output copies from
the input (edits, summaries with quotes, code refactors).

Example:
    >>> from semiar.drafters.lookup import PromptLookupDrafter
    >>> d = PromptLookupDrafter(k=3, max_ngram=2)
    >>> d.propose([1, 2, 3, 4, 5, 9, 2, 3]).tokens   # "2 3" was followed by "4 5 9"
    [4, 5, 9]

The draft length adapts (`DraftLength`): up to k while drafts are accepted, short after misses.
"""

from __future__ import annotations

from ..errors import InvalidArgumentError
from ..tree import DraftTree
from .base import DraftLength, Drafter


class NgramIndex:
    """Positions where each n-gram (min_n..max_n) ends in a growing token list, kept incrementally."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.last_end: dict[tuple, int] = {}  # n-gram -> end index (exclusive) of its latest occurrence
        self.prev_end: dict[tuple, int] = {}  # the occurrence before that
        self.tokens: list[int] = []

    def sync(self, tokens: list[int]) -> None:
        n_common = 0
        limit = min(len(self.tokens), len(tokens))
        while n_common < limit and self.tokens[n_common] == tokens[n_common]:
            n_common += 1
        if n_common < len(self.tokens):  # context rewound (a new request): rebuild
            self.last_end.clear()
            self.prev_end.clear()
            self.tokens = []
            n_common = 0
        for end in range(len(self.tokens) + 1, len(tokens) + 1):
            for n in range(self.min_n, self.max_n + 1):
                if end - n < 0:
                    break
                key = tuple(tokens[end - n:end])
                if key in self.last_end:
                    self.prev_end[key] = self.last_end[key]
                self.last_end[key] = end
        self.tokens = list(tokens)

    def earlier_match(self, n: int) -> int | None:
        """End index of the latest occurrence of the last n tokens before the current end."""
        if len(self.tokens) < n:
            return None
        key = tuple(self.tokens[-n:])
        end = self.last_end.get(key)
        if end == len(self.tokens):
            end = self.prev_end.get(key)
        return end


class PromptLookupDrafter(Drafter):
    """Chain of up to k tokens copied after the longest (max_ngram..min_ngram) matching suffix."""

    name = "pld"

    def __init__(self, k: int = 8, max_ngram: int = 3, min_ngram: int = 1):
        if k <= 0:
            raise InvalidArgumentError(f"k must be > 0, got {k}")
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgumentError(f"need 1 <= min n-gram <= max n-gram, got {min_ngram}..{max_ngram}")
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram
        self.index = NgramIndex(min_ngram, max_ngram)
        self.length = DraftLength(min(4, k), k)
        self.last_proposed = 0

    @property
    def max_nodes(self) -> int:
        return self.k

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        self.index = NgramIndex(self.min_ngram, self.max_ngram)
        self.length.reset()

    def propose(self, tokens: list[int]) -> DraftTree:
        self.index.sync(tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            end = self.index.earlier_match(n)
            if end is not None:
                cont = tokens[end:end + self.length.k]
                if cont:
                    self.last_proposed = len(cont)
                    return DraftTree.chain(cont)
        self.last_proposed = 0
        return DraftTree.empty()

    def observe(self, accepted, n_draft_accepted, hidden=None):
        self.length.update(self.last_proposed, n_draft_accepted)
