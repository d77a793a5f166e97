"""The seam every method plugs into. A drafter proposes a token tree from the current context and
may observe what the target accepted; it never touches the target's cache (the engine owns it).

Example (a drafter that always guesses the last token repeats):
    >>> from semiar.drafters.base import Drafter
    >>> from semiar.tree import DraftTree
    >>> class Repeat(Drafter):
    ...     name = "repeat"
    ...     def propose(self, tokens):
    ...         return DraftTree.chain([tokens[-1]] * 3)
    >>> Repeat().propose([5, 6]).tokens
    [6, 6, 6]
"""

from __future__ import annotations

from typing import Optional

import torch

from ..tree import DraftTree


class DraftLength:
    """Adaptive draft length for chain drafters: +2 after a step whose drafts were all accepted,
    back to (accepted + 1) after a rejection, within [1, k_max]. A drafter that is often right
    drafts long; one that is often wrong costs the target little more than an AR step.
    (transformers' assisted generation uses a similar +2/-1 rule.)"""

    def __init__(self, k_start: int, k_max: int):
        self.k_max = k_max
        self.k = self.k_start = min(k_start, k_max)

    def reset(self) -> None:
        self.k = self.k_start

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted >= proposed:
            self.k = min(self.k + 2, self.k_max)
        else:
            self.k = max(1, accepted + 1)


class Drafter:
    name = "base"
    #: set when the drafter wants the target's final-layer features of accepted tokens
    needs_hidden = False
    #: set when the drafter wants the target's argmax at every node it proposed (Jacobi-style
    #: drafters): observe() then also receives node_argmax=[root, node 0, ..., node n-1]
    needs_node_argmax = False
    #: set when the drafter wants the target's logits at the root and every node it proposed
    #: ([n + 1, vocab], as the verifier saw them): observe() then also receives node_logits=
    needs_node_logits = False
    #: an opt-in relaxed acceptance rule with `verify.verify`'s signature (Medusa's typical
    #: acceptance), or None for the engine's lossless verification
    acceptance = None
    #: whether proposing queues work on the target's device (a model's forwards): the engine then
    #: waits for it before timing the verification, so drafting time is charged to drafting. Host-only
    #: drafters (the lookup ones) say False and the loop keeps one host sync per step, the accept decision
    on_device = True

    def start(self, prompt_ids: list[int], sampling, generator: Optional[torch.Generator] = None,
              prompt_hidden: Optional[torch.Tensor] = None) -> None:
        """Called once per request before the first proposal. prompt_hidden: [n_prompt - 1, hidden]
        target features for the prompt's cached part (when needs_hidden)."""

    def finish(self) -> None:
        """Called when a request ends (finished, stopped or abandoned): let go of per-request state
        that other requests may need, such as a draft model's static CUDA-graph cache."""

    def propose(self, tokens: list[int]) -> DraftTree:
        """Tree of draft tokens to follow `tokens` (the whole context; tokens[-1] is the root)."""
        raise NotImplementedError

    def situation(self, tokens: list[int]) -> int:
        """A cheap label (a small int) of the situation a proposal after `tokens` would be made in,
        for `auto`, which keeps a drafter's acceptance record per label; 0 when it has none."""
        return 0

    def observe(self, accepted: list[int], n_draft_accepted: int,
                hidden: Optional[torch.Tensor] = None) -> None:
        """After verification: the emitted tokens, how many of them were draft tokens, and (when
        needs_hidden) the target's features [len(accepted_path)+1, hidden] of root + accepted path.
        A drafter with needs_node_argmax also gets `node_argmax`: the target's argmax token at the
        root and at every node of the tree it proposed (the tree as verified: the engine may have
        cut nodes deeper than the remaining token budget); one with needs_node_logits gets
        `node_logits`, the target's logits there ([n + 1, vocab])."""

    @property
    def lossless(self) -> bool:
        """False when the output is no longer exactly the target's (a relaxed acceptance rule)."""
        return self.acceptance is None

    @property
    def max_nodes(self) -> int:
        """Upper bound on nodes per proposal (sizes the target's KV cache)."""
        return 0

    @property
    def max_depth(self) -> Optional[int]:
        """Upper bound on the depth of a proposal, where it is less than max_nodes (None: unknown)."""
        return None
