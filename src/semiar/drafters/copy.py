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

With alternates (`alternates > 0`, the tree `dynamic:LEN,ALTS,BUDGET`; the default on CUDA) the
pointer's block is the main branch of a tree, and up to ALTS other continuations of LEN tokens
hang beside it: what followed the latest earlier occurrences of the context's last 4, 3, 2, 1
tokens anywhere in prompt *and* output (merged where they share a prefix, BUDGET nodes in all).
They catch what one pointer misses: the first tokens after an edit, a pattern the output already
repeated, a second copy source. On a GPU a 48-node tree costs ~10 % more than one token to verify
(docs/benchmarks.md), so the side branches are nearly free; on a CPU they are not, and the default
there stays a chain.

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
from ..tree import DraftTree, TreeBuilder
from .base import Drafter
from .lookup import NgramIndex


class CopyDrafter(Drafter):
    """Long chains copied from the prompt, anchored by a pointer that re-aligns after mismatches."""

    name = "copy"
    on_device = False  # host-only: no wait on the device before verifying

    def __init__(self, k: int = 32, k_start: int = 16, max_match: int = 6, near: int = 48,
                 alternates: int = 0, alt_len: int = 8, budget: Optional[int] = None, alt_match: int = 4):
        if k <= 0:
            raise InvalidArgumentError(f"k must be > 0, got {k}")
        if alternates < 0 or alt_len <= 0 or (budget is not None and budget <= 0):
            raise InvalidArgumentError("copy alternates need LEN > 0, ALTS >= 0 and BUDGET > 0")
        self.k_max, self.k_start = k, min(k_start, k)
        self.max_match = max_match
        self.near = near  # a match of 1 token only counts within this distance of the pointer
        self.alternates, self.alt_len, self.alt_match = alternates, alt_len, alt_match
        # the pointer's block never takes the whole budget: room for the alternates stays
        self.budget = budget if budget is not None else k + alternates * alt_len
        self.k = self.k_start
        self.source: list[int] = []
        # every n-gram of prompt + output and where it ends: anchors (in the prompt) and alternates
        self.index = NgramIndex(1, max(max_match, alt_match))
        self.ptr: Optional[int] = None  # source index of the next token to copy
        self.last_proposed = 0
        self.last_block: list[int] = []

    @property
    def max_nodes(self) -> int:
        return min(self.budget, self.k_max + self.alternates * self.alt_len) if self.alternates else self.k_max

    @property
    def max_depth(self) -> int:
        return max(self.k_max, self.alt_len if self.alternates else 0)

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        self.source = list(prompt_ids)
        self.index = NgramIndex(1, max(self.max_match, self.alt_match))
        self.index.sync(self.source)
        self.ptr = None
        self.k = self.k_start
        self.last_proposed = 0
        self.last_block = []

    #: `situation`: the output is copying while its last this-many tokens occur in the source
    SITUATION_MATCH = 3

    def situation(self, tokens: list[int]) -> int:
        """1 while the output's last SITUATION_MATCH tokens occur in the source (it is copying), else 0."""
        n = self.SITUATION_MATCH
        if len(tokens) < n or not self.source:
            return 0
        self.index.sync(tokens)  # (indexes only what is new; propose's own sync then has nothing to do)
        return int(any(e <= len(self.source) for e in self.index.ends.get(tuple(tokens[-n:]), ())))

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
            ends = [e for e in self.index.ends.get(tuple(tokens[-m:]), ()) if e < len(self.source)]
            if m == 1:  # one token is too common to trust, except next to where the copy was
                ends = [e for e in ends if self.ptr is not None and abs(e - expected) <= self.near]
            if ends:
                return min(ends, key=lambda e: (e - expected) if e >= expected else 2 * (expected - e))
        return None

    def propose(self, tokens: list[int]) -> DraftTree:
        self.index.sync(tokens)
        if not self._aligned(tokens):
            self.ptr = self._realign(tokens)
        block = [] if self.ptr is None else self.source[self.ptr:self.ptr + self.k]
        if self.alternates:
            block = block[:max(self.budget - self.alt_len, 1)]
        self.last_block = block
        self.last_proposed = len(block)
        if not self.alternates:
            return DraftTree.chain(block)
        trie = TreeBuilder(self.budget)
        trie.add(block)
        added = 0
        # a common last token (a newline) can have hundreds of earlier ends with the same few
        # continuations: look at a bounded number, so a step's host cost stays small
        for tried, end in enumerate(self.index.latest_ends(self.alt_match)):
            if trie.add(tokens[end:end + self.alt_len]):
                added += 1
            if added >= self.alternates or trie.full or tried >= 4 * self.alternates:
                break
        return trie.tree()

    def observe(self, accepted, n_draft_accepted, hidden=None):
        if self.last_proposed == 0:
            return
        block = self.last_block
        # how far the accepted path followed the pointer's block (it may have taken a side branch)
        along = 0
        while along < min(n_draft_accepted, len(block)) and accepted[along] == block[along]:
            along += 1
        # the accepted block was source[ptr:ptr+along]; the pointer moves past it and past the
        # target's own token when that token is the source's next one (propose() re-aligns if not)
        self.ptr += along
        if along == n_draft_accepted and self.ptr < len(self.source) and len(accepted) > along \
                and accepted[along] == self.source[self.ptr]:
            self.ptr += 1
        if along >= self.last_proposed:
            self.k = min(2 * self.k, self.k_max)  # whole block accepted: copying, draft longer
        else:
            self.k = max(4, min(self.k_start, 2 * (along + 1)))
