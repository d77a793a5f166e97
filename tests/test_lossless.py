"""Greedy identity: every method emits exactly what autoregressive greedy decoding emits, on dense
fp32 weights and on the quantized path (`--dtype q4`: a tiny GGUF with quantized tensors)."""

import random

import pytest
import torch

from semiar.drafters.base import Drafter
from semiar.drafters.draft_model import DraftModelDrafter
from semiar.drafters.lookup import PromptLookupDrafter
from semiar.drafters.auto import AutoDrafter
from semiar.drafters.copy import CopyDrafter
from semiar.drafters.lookahead import LookaheadDrafter
from semiar.drafters.ngram import NgramDrafter
from semiar.engine import Engine
from semiar.models.cpu import qdot
from semiar.tree import DraftTree, TreeSpec
from tiny import tiny_quant_target, tiny_target

# a tiny model per weight format: make(family, seed=...) -> LoadedModel
MODELS = {"fp32": lambda family="qwen2", **kw: tiny_target(family, **kw)[0], "q4": tiny_quant_target}
if qdot.available():  # the VNNI kernel's layout (SEMIAR_Q4_KERNEL=vnni), where this CPU has the instructions
    MODELS["q4v"] = lambda family="qwen2", **kw: tiny_quant_target(family, kernel="vnni", **kw)


class OracleDrafter(Drafter):
    """Drafts from a known continuation, corrupting some tokens and adding wrong siblings, so
    both the accept and the reject paths of verification run."""

    name = "oracle"

    def __init__(self, truth, prompt_len, k=4, p_wrong=0.3, width=2, vocab=96, seed=0):
        self.truth, self.n0, self.k, self.p_wrong, self.width, self.vocab = truth, prompt_len, k, p_wrong, width, vocab
        self.rng = random.Random(seed)

    @property
    def max_nodes(self):
        return self.k * self.width

    def propose(self, tokens):
        pos = len(tokens) - self.n0
        chain = self.truth[pos:pos + self.k]
        toks, parents = [], []
        prev = -1
        for t in chain:
            good = t if self.rng.random() > self.p_wrong else (t + 1) % self.vocab
            for w in range(1, self.width):  # a wrong sibling before the main node
                toks.append((good + 7 * w) % self.vocab)
                parents.append(prev)
            toks.append(good)
            parents.append(prev)
            prev = len(toks) - 1
        return DraftTree(toks, parents)


def ar_tokens(target, prompt, n):
    return Engine(target).generate(prompt, max_new_tokens=n).run().token_ids


PROMPTS = [[5, 17, 33, 8, 60], [1, 2, 3, 1, 2, 3, 1, 2], [40] * 3 + [41, 42, 43, 40, 41], list(range(10, 40))]


@pytest.mark.parametrize("weights", list(MODELS))
@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("p_wrong,width", [(0.0, 1), (0.3, 1), (0.3, 3), (1.0, 2)])
def test_oracle_tree_greedy_identity(family, p_wrong, width, weights):
    target = MODELS[weights](family)
    for prompt in PROMPTS:
        for n in (1, 7, 30):
            ref = ar_tokens(target, prompt, n)
            drafter = OracleDrafter(ref + [0] * 8, len(prompt), p_wrong=p_wrong, width=width)
            gen = Engine(target, drafter).generate(prompt, max_new_tokens=n).run()
            assert gen.token_ids == ref
            if p_wrong == 0.0 and n > 1:
                assert gen.stats.tau > 2


@pytest.mark.parametrize("weights", list(MODELS))
@pytest.mark.parametrize("make", [
    lambda t, mk: PromptLookupDrafter(k=5, max_ngram=3),
    lambda t, mk: NgramDrafter(n=3, depth=4, top_k=2, budget=10),
    lambda t, mk: DraftModelDrafter(mk("qwen2", seed=0), target=t, tree=TreeSpec("chain", k=4)),
    lambda t, mk: DraftModelDrafter(mk("qwen2", seed=1), target=t, tree=TreeSpec("chain", k=3)),
    lambda t, mk: DraftModelDrafter(mk("qwen2", seed=1), target=t,
                                tree=TreeSpec("dynamic", depth=3, top_k=2, budget=8)),
    lambda t, mk: DraftModelDrafter(mk("qwen2", seed=0), target=t,
                                tree=TreeSpec("dynamic", depth=4, top_k=3, budget=12)),
    lambda t, mk: LookaheadDrafter(window=3, ngram=3, candidates=3),
    lambda t, mk: LookaheadDrafter(window=5, ngram=4, candidates=5),
    lambda t, mk: LookaheadDrafter(window=2, ngram=2, candidates=0, pool_from_context=False),
    lambda t, mk: CopyDrafter(k=8),
    lambda t, mk: CopyDrafter(k=16, alternates=4, alt_len=4, budget=24),
    lambda t, mk: AutoDrafter({"copy": CopyDrafter(), "pld": PromptLookupDrafter(), "lookahead": LookaheadDrafter(),
                           "draft": DraftModelDrafter(mk("qwen2", seed=1), target=t)}),
], ids=["pld", "ngram", "draft-self", "draft-other", "draft-tree-other", "draft-tree-self",
        "lookahead-3-3-3", "lookahead-5-4-5", "lookahead-jacobi-only", "copy", "copy-tree", "auto"])
def test_drafters_greedy_identity(make, weights):
    target = MODELS[weights]("qwen2")
    for prompt in PROMPTS:
        drafter = make(target, MODELS[weights])
        for n in (1, 9, 40):
            ref = ar_tokens(target, prompt, n)
            gen = Engine(target, drafter).generate(prompt, max_new_tokens=n).run()
            assert gen.token_ids == ref, (prompt, n)
            assert gen.stats.new_tokens == n


def test_self_draft_is_accepted():
    target, _ = tiny_target("qwen2")
    drafter = DraftModelDrafter(tiny_target("qwen2")[0], target=target, tree=TreeSpec("chain", k=4))
    drafter.min_confidence = 0.0
    gen = Engine(target, drafter).generate([3, 4, 5], max_new_tokens=40).run()
    assert gen.stats.tau > 4.5  # 4 drafts + bonus nearly every step
    assert all(a > 0.99 for a in gen.stats.accept_by_depth)


@pytest.mark.parametrize("weights", list(MODELS))
def test_cache_equals_ar_cache_after_speculation(weights):
    """After any accept/reject sequence, the target cache equals AR's cache on the same tokens."""
    target = MODELS[weights]("llama")
    prompt = [9, 8, 7, 6]
    ref = ar_tokens(target, prompt, 20)
    drafter = OracleDrafter(ref + [0] * 8, len(prompt), p_wrong=0.4, width=2)
    gen = Engine(target, drafter).generate(prompt, max_new_tokens=20)
    captured = {}
    orig = target.decoder.new_cache

    def spy(capacity, batch=1):
        captured["cache"] = orig(capacity, batch)
        return captured["cache"]

    target.decoder.new_cache = spy
    try:
        gen.run()
    finally:
        target.decoder.new_cache = orig
    cache = captured["cache"]
    seq = prompt + gen.token_ids[:-1]  # the last emitted token is the next root, not cached
    assert cache.length == len(seq)
    ref_cache = target.decoder.new_cache(64)
    target.decoder(torch.tensor([seq]), ref_cache)
    L = len(seq)
    assert torch.allclose(cache.k[..., :L, :], ref_cache.k[..., :L, :], atol=1e-5)
    assert torch.allclose(cache.v[..., :L, :], ref_cache.v[..., :L, :], atol=1e-5)
