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
    """Where each n-gram (min_n..max_n) ends in a growing token list, every occurrence, kept
    incrementally (`pld`'s latest match, `copy`'s anchors and alternates)."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.ends: dict[tuple, list[int]] = {}  # n-gram -> end indices (exclusive), ascending
        self.tokens: list[int] = []

    def sync(self, tokens: list[int]) -> None:
        """Index the tokens added since the last call. Within a request the context only grows
        (drafters start a new index per request), so only its length and the last token known
        are checked, not the whole prefix: comparing and copying the context on every step cost
        ~15 µs at 2000 tokens. A context that is shorter or differs there is indexed anew."""
        n = len(self.tokens)
        if n > len(tokens) or (n and tokens[n - 1] != self.tokens[-1]):
            self.ends, self.tokens, n = {}, [], 0
        for end in range(n + 1, len(tokens) + 1):
            for m in range(self.min_n, min(self.max_n, end) + 1):
                self.ends.setdefault(tuple(tokens[end - m:end]), []).append(end)
        self.tokens.extend(tokens[n:])

    def earlier_match(self, n: int) -> int | None:
        """End index of the latest occurrence of the last n tokens before the current end."""
        if len(self.tokens) < n:
            return None
        ends = self.ends.get(tuple(self.tokens[-n:]), ())
        earlier = [e for e in ends[-2:] if e < len(self.tokens)]
        return earlier[-1] if earlier else None

    def latest_ends(self, max_n: int | None = None):
        """Ends of earlier occurrences of the last max_n..min_n tokens (max_n: at most the
        index's): longest match first, latest first within a length, each position once."""
        seen = set()
        top = min(self.max_n if max_n is None else max_n, self.max_n, len(self.tokens))
        for m in range(top, self.min_n - 1, -1):
            for end in reversed(self.ends.get(tuple(self.tokens[-m:]), ())):
                if end < len(self.tokens) and end not in seen:
                    seen.add(end)
                    yield end


class PromptLookupDrafter(Drafter):
    """Chain of up to k tokens copied after the longest (max_ngram..min_ngram) matching suffix."""

    name = "pld"
    on_device = False  # host-only: no wait on the device before verifying

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
