"""Speculative Jacobi Decoding (SJD; Teng et al. 2024): the target's own previous Jacobi iterate is
the draft. No draft model and no training.

The window holds guesses for the next L positions, each with the distribution q it was sampled
from. One target forward over root + window gives, at every row, the target's distribution p for
the next position; verification accepts the window's prefix by min(1, p(x) / q(x)) and resamples
the first rejected position from norm(max(0, p - q)) (verify.verify_sampling), so the output
follows the target's distribution exactly. The rows *after* the accepted prefix were computed on
stale tokens; SJD keeps them anyway: a token sampled from each becomes the next guess for its
position, with that row as its q (one Jacobi step), and fresh positions at the end of the window
start as uniform random codes (q uniform). Under greedy decoding the guesses are argmaxes and the
output is exactly greedy `ar`'s. The relaxed methods `lantern` and `gsd` draft the same way and
swap only the acceptance rule (verify.LanternAcceptance, verify.GroupedAcceptance).

Example:
    >>> import torch
    >>> from semiar.drafters.sjd import SJDDrafter
    >>> from semiar.sampling import SamplingParams
    >>> d = SJDDrafter(vocab_size=8, window=3)
    >>> d.start([9], SamplingParams(), torch.Generator().manual_seed(0))
    >>> len(d.propose([9]))                             # three random codes to start
    3
    >>> d.observe([5], 0, node_logits=torch.eye(8)[[5, 1, 2, 3]])   # none accepted: rows 1..3 are the guesses
    >>> d.propose([9, 5]).tokens
    [1, 2, 3]
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidArgumentError
from ..sampling import SamplingParams, target_probs
from ..tree import DraftTree
from .base import Drafter


class SJDDrafter(Drafter):
    """window: how many future positions are guessed (and verified) per forward."""

    name = "sjd"
    needs_node_logits = True
    on_device = False  # the guesses come from the last forward's rows: nothing queued here

    def __init__(self, vocab_size: int, window: int = 8, acceptance=None, name: Optional[str] = None):
        if window < 1:
            raise InvalidArgumentError(f"the Jacobi window must be >= 1, got {window}")
        self.vocab_size, self.window = vocab_size, window
        self.acceptance = acceptance
        if name:
            self.name = name
        self._guess: list[int] = []
        self._q: list[Optional[torch.Tensor]] = []
        self._sampling = SamplingParams()
        self._gen: Optional[torch.Generator] = None

    @property
    def max_nodes(self) -> int:
        return self.window

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        self._sampling = sampling if sampling is not None else SamplingParams()
        self._gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self._guess, self._q = [], []
        self._uniform = None

    def propose(self, tokens: list[int]) -> DraftTree:
        n = self.window - len(self._guess)
        if n > 0:  # fresh positions: uniform random codes (q uniform; greedy treats them as one-hot)
            device = self._gen.device
            fresh = torch.randint(self.vocab_size, (n,), generator=self._gen, device=device).tolist()
            if self._sampling.greedy:
                q = [None] * n
            else:
                if self._uniform is None:
                    self._uniform = torch.full((self.vocab_size,), 1.0 / self.vocab_size, device=device)
                q = [self._uniform] * n
            self._guess, self._q = self._guess + fresh, self._q + q
        if self._sampling.greedy:
            return DraftTree.chain(self._guess)
        return DraftTree.chain(self._guess, list(self._q))

    def observe(self, accepted, n_draft_accepted, hidden=None, node_logits: Optional[torch.Tensor] = None):
        if node_logits is None:
            self._guess, self._q = [], []
            return
        # rows after the accepted prefix and the token emitted there: stale, kept as the next guesses
        rows = node_logits[n_draft_accepted + 1:]
        if not len(rows):
            self._guess, self._q = [], []
            return
        if self._sampling.greedy:
            self._guess, self._q = rows.argmax(-1).tolist(), [None] * len(rows)
            return
        p = target_probs(rows, self._sampling)  # [m, vocab]
        gen_p = p.to(self._gen.device) if p.device != self._gen.device else p
        self._guess = torch.multinomial(gen_p, 1, generator=self._gen).view(-1).tolist()
        self._q = list(p.unbind(0))
