"""Input-guided (aggressive) decoding for edits: the input text itself is the draft.

When the answer is a rewrite of the prompt (add type hints, fix a bug, refactor, translate a
docstring), most of it is the input again. The drafter keeps a pointer into the *source* (the
prompt) where the output currently copies from and drafts a long block from there (up to k tokens,
default 32) every step; the target verifies the block in one forward. After a mismatch (the edit
itself) it re-aligns: it looks the output's last few tokens up in the source and continues from
the occurrence nearest to where the copy was expected to be (forward preferred), so a few inserted
or changed tokens cost a step or two, not the rest of the copy.

How it differs from `pld`: pld takes the *latest* occurrence of the last 1-3 tokens anywhere in
the context and drafts at most 10 tokens; copy stays anchored to the input (continuity beats
recency, one-token re-alignment is allowed only near the pointer) and drafts long blocks, growing
the block while whole blocks are accepted.

Example:
    >>> from semiar.drafters.copy import CopyDrafter
    >>> d = CopyDrafter(k=4)
    >>> src = [1, 10, 11, 12, 13, 14, 15, 2]        # prompt: "... a b c d e f ..."
    >>> d.start(src, None)
    >>> d.propose(src + [9, 10, 11]).tokens          # output "... a b": copy on from "c"
    [12, 13, 14, 15]
    >>> d.observe([12, 99], 1)                       # target took "c", then wrote its own token
    >>> d.propose(src + [9, 10, 11, 12, 99, 14]).tokens   # "99" replaced "d": re-align after "e"
    [15, 2]
"""

from __future__ import annotations

from typing import Optional

from ..errors import InvalidArgumentError
from ..tree import DraftTree
from .base import Drafter


class CopyDrafter(Drafter):
    """Long chains copied from the prompt, anchored by a pointer that re-aligns after mismatches."""

    name = "copy"

    def __init__(self, k: int = 32, k_start: int = 16, max_match: int = 6, near: int = 48):
        if k <= 0:
            raise InvalidArgumentError(f"k must be > 0, got {k}")
        self.k_max, self.k_start = k, min(k_start, k)
        self.max_match = max_match
        self.near = near  # a match of 1 token only counts within this distance of the pointer
        self.k = self.k_start
        self.source: list[int] = []
        self.index: dict[tuple, list[int]] = {}
        self.ptr: Optional[int] = None  # source index of the next token to copy
        self.last_proposed = 0

    @property
    def max_nodes(self) -> int:
        return self.k_max

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        self.source = list(prompt_ids)
        self.index = {}
        for end in range(1, len(self.source) + 1):  # n-gram -> where its continuation starts
            for m in range(1, min(self.max_match, end) + 1):
                self.index.setdefault(tuple(self.source[end - m:end]), []).append(end)
        self.ptr = None
        self.k = self.k_start
        self.last_proposed = 0

    def _aligned(self, tokens: list[int]) -> bool:
        p = self.ptr
        if p is None or p <= 0 or p >= len(self.source):
            return False
        return self.source[p - 1] == tokens[-1]

    def _realign(self, tokens: list[int]) -> Optional[int]:
        """Source position to copy from after the output's longest suffix found in the source,
        the occurrence nearest to the pointer (a step back costs twice a step forward)."""
        expected = self.ptr if self.ptr is not None else 0
        for m in range(min(self.max_match, len(tokens)), 0, -1):
            ends = self.index.get(tuple(tokens[-m:]))
            if not ends:
                continue
            ends = [e for e in ends if e < len(self.source)]
            if m == 1:  # one token is too common to trust, except next to where the copy was
                ends = [e for e in ends if self.ptr is not None and abs(e - expected) <= self.near]
            if ends:
                return min(ends, key=lambda e: (e - expected) if e >= expected else 2 * (expected - e))
        return None

    def propose(self, tokens: list[int]) -> DraftTree:
        if not self._aligned(tokens):
            self.ptr = self._realign(tokens)
        if self.ptr is None:
            self.last_proposed = 0
            return DraftTree.empty()
        block = self.source[self.ptr:self.ptr + self.k]
        self.last_proposed = len(block)
        return DraftTree.chain(block)

    def observe(self, accepted, n_draft_accepted, hidden=None):
        if self.last_proposed == 0:
            return
        # the accepted block was source[ptr:ptr+a]; the pointer moves past it and past the target's
        # own token when that token is the source's next one (propose() re-aligns if it is not)
        self.ptr += n_draft_accepted
        if self.ptr < len(self.source) and accepted and accepted[-1] == self.source[self.ptr]:
            self.ptr += 1
        if n_draft_accepted >= self.last_proposed:
            self.k = min(2 * self.k, self.k_max)  # whole block accepted: copying, draft longer
        else:
            self.k = max(4, min(self.k_start, 2 * (n_draft_accepted + 1)))
