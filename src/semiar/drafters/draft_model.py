"""Speculative sampling with a separate small draft model (SpS): e.g. Qwen2.5-Coder-0.5B drafting
for the 1.5B. The draft model keeps its own KV cache across steps and re-syncs it with the
context by common prefix, so accepted tokens are never recomputed twice.

Shapes: "chain" drafts up to k tokens one by one and stops early when the draft model's top
probability drops below `min_confidence` (greedy), which keeps a weak draft from wasting steps;
"dynamic" grows an EAGLE-2-style tree level by level inside the draft cache.

On a GPU (a CUDA-graphed draft model) a greedy chain is one graph replay: the draft model's
one-token forwards feed each argmax back on the device and the k tokens and their probabilities
come to the host in one copy, where the step-by-step loop waited for the device at every token
(`GraphedDecoder.greedy_chain`). The confidence cut is then made on the host after the fact: the
chain costs its k - 1 forwards whatever the cut.

Example:
    >>> from semiar.drafters.draft_model import DraftModelDrafter        # doctest: +SKIP
    >>> d = DraftModelDrafter(load_model("qwen2.5-coder-0.5b-instruct"), target=target)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidArgumentError, TokenizerMismatchError
from ..models.decoder import input_device
from ..sampling import SamplingParams, target_probs
from ..tree import DraftTree, TreeSpec, dynamic_tree
from .base import DraftLength, Drafter


def check_same_tokenizer(target, draft) -> None:
    """Refuse a draft model whose vocabulary differs from the target's."""
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is None or dt is None:
        if target.config.vocab_size != draft.config.vocab_size:
            _mismatch(target.name, draft.name, f"vocab sizes {target.config.vocab_size} vs {draft.config.vocab_size}")
        return
    _check_vocab(target.name, tt, draft.name, dt)


def check_tokenizers_first(target, draft) -> None:
    """The same refusal from the two tokenizers alone, before either model's weights load: a draft
    model of another family is refused in a second, not after the target (~20 s for the 1.5B).
    target, draft: names/paths or LoadedModels. A model without a tokenizer is left to
    `check_same_tokenizer` (vocab sizes) once it has loaded.

    Example:
        >>> check_tokenizers_first("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct")  # doctest: +SKIP
        Traceback (most recent call last):
        semiar.errors.TokenizerMismatchError: draft model smollm2-135m-instruct does not share ...
    """
    from ..models.loading import peek_tokenizer

    (tn, tt), (dn, dt) = peek_tokenizer(target), peek_tokenizer(draft)
    if tt is not None and dt is not None:
        _check_vocab(tn, tt, dn, dt)


def _check_vocab(target_name: str, tt, draft_name: str, dt) -> None:
    tv, dv = tt.get_vocab(), dt.get_vocab()
    if tv != dv:
        _mismatch(target_name, draft_name, f"vocabularies of {len(tv)} and {len(dv)} tokens differ")


def _mismatch(target_name: str, draft_name: str, detail: str):
    raise TokenizerMismatchError(
        f"draft model {draft_name} does not share the tokenizer of target {target_name} ({detail}); "
        "pick a draft model of the same family")


class DraftModelDrafter(Drafter):
    name = "draft"

    def __init__(self, draft, target=None, tree: TreeSpec = TreeSpec("chain", k=6),
                 min_confidence: float = 0.3):
        if target is not None:
            check_same_tokenizer(target, draft)
        if tree.kind == "static":
            raise InvalidArgumentError("the draft method supports chain:K and dynamic:DEPTH,TOPK,BUDGET trees")
        self.model = draft
        self.tree = tree
        self.min_confidence = min_confidence
        # chain:K is the longest chain; the length actually drafted adapts to acceptance
        self.length = DraftLength(min(tree.k, 6), tree.k) if tree.kind == "chain" else None
        self.last_proposed = 0
        self.cache = None
        self.seen: list[int] = []  # tokens whose K/V are in self.cache, in order
        self.sampling = SamplingParams()
        self.generator: Optional[torch.Generator] = None
        # a graphed draft model drafts a greedy chain in one replay (GraphedDecoder.greedy_chain):
        # its graphs are captured now, not in the first timed request
        self._chain = getattr(draft.runner, "greedy_chain", None) if tree.kind == "chain" else None
        if self._chain is not None:
            draft.runner.prepare_chains(tree.k)

    @property
    def max_nodes(self) -> int:
        return self.tree.max_nodes

    @property
    def max_depth(self) -> int:
        return self.tree.max_depth

    def finish(self):
        self.cache = None  # hand the draft model's static cache back (models/cuda/graphs.py: lease)
        self.seen = []

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        ctx = self.model.context_length
        self.cache = None  # let go of the last request's cache first (a CUDA-graph runner has one)
        # grown by `ensure` when a generation runs long
        self.cache = self.model.runner.new_cache(min(ctx, len(prompt_ids) + 512) + self.tree.max_nodes + 8)
        self.seen = []
        self.sampling = sampling
        self.generator = generator
        if self.length:
            self.length.reset()

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Bring the cache to `tokens` (common prefix reused) and return next-token logits [vocab]."""
        dec = self.model.runner
        m = 0
        limit = min(len(self.seen), len(tokens) - 1)
        while m < limit and self.seen[m] == tokens[m]:
            m += 1
        self.cache.truncate(m)
        self.cache = self.cache.ensure(len(tokens) + self.tree.max_nodes + 1)  # long generations
        ids = torch.tensor([tokens[m:]], device=input_device(dec))
        logits = dec(ids, self.cache, logits_at=slice(-1, None)).logits[0, -1]
        self.seen = list(tokens)
        return logits

    def propose(self, tokens: list[int]) -> DraftTree:
        if self.tree.kind == "dynamic":
            return self._propose_tree(tokens)
        logits = self._feed(tokens)
        dec = self.model.runner
        out, qs = [], []
        k = self.length.k
        if self.sampling.greedy and self._chain is not None:
            got = self._chain(logits, self.cache, k)
            if got is not None:  # the whole chain in one replay; cut where the confidence drops
                toks, confs = got
                self.seen.extend(toks[:k - 1])
                n = 1
                while n < k and confs[n] >= self.min_confidence:
                    n += 1
                self.last_proposed = n
                return DraftTree.chain(toks[:n])
        for i in range(k):
            if self.sampling.greedy:
                probs = logits.softmax(-1)
                conf, tok = probs.max(-1)
                if i > 0 and float(conf) < self.min_confidence:
                    break
                tok = int(tok)
                q = None
            else:
                q = target_probs(logits, self.sampling)
                tok = int(torch.multinomial(q, 1, generator=self.generator))
            out.append(tok)
            qs.append(q)
            if i + 1 < k:
                logits = dec(torch.tensor([[tok]], device=input_device(dec)), self.cache).logits[0, -1]
                self.seen.append(tok)
        self.last_proposed = len(out)
        return DraftTree.chain(out, None if self.sampling.greedy else qs)

    def observe(self, accepted, n_draft_accepted, hidden=None):
        if self.length:
            self.length.update(self.last_proposed, n_draft_accepted)

    def _propose_tree(self, tokens: list[int]) -> DraftTree:
        dec = self.model.runner
        root_logits = self._feed(tokens)
        base = self.cache.length  # the context; tree nodes are appended after it
        row_of: dict[int, int] = {}  # tree node -> row in the cache block after `base`

        def expand(frontier, tree_tokens, parents):
            new = [n for n in frontier if n >= 0 and n not in row_of]
            rows, node_logits = [], {}
            if new:
                start = self.cache.length
                for n in new:
                    row_of[n] = start - base + len(rows)
                    rows.append(n)
                T = len(new)
                mask = torch.zeros(T, start + T, dtype=torch.bool)
                mask[:, :base] = True
                pos = []
                for i, n in enumerate(new):
                    a, d = n, 0
                    while a >= 0:
                        mask[i, base + row_of[a]] = True
                        a, d = parents[a], d + 1
                    pos.append(base + d - 1)
                out = dec(torch.tensor([[tree_tokens[n] for n in new]], device=dec.device), self.cache,
                          positions=torch.tensor([pos], device=dec.device), tree_mask=mask.to(dec.device))
                node_logits = dict(zip(new, out.logits[0]))
            result = []
            for n in frontier:
                lg = root_logits if n < 0 else node_logits[n]
                result.append(lg.float().softmax(-1))
            return torch.stack(result)

        tree = dynamic_tree(expand, self.tree.depth, self.tree.top_k, self.tree.budget)
        self.cache.truncate(base)  # drop the speculative branches; the accepted ones are re-fed
        self.seen = self.seen[:base]
        return tree
