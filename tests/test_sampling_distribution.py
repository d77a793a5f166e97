"""End to end through the engine: under sampling, the first tokens a speculative method emits
follow the target's own distribution (chi-square against exact probabilities), on dense fp32
weights and on the quantized path (`--dtype q4`)."""

from collections import Counter

import pytest
import torch

from semiar.drafters.draft_model import DraftModelDrafter
from semiar.drafters.auto import AutoDrafter
from semiar.drafters.copy import CopyDrafter
from semiar.drafters.lookahead import LookaheadDrafter
from semiar.drafters.ngram import NgramDrafter
from semiar.engine import Engine
from semiar.sampling import SamplingParams, target_probs
from semiar.tree import TreeSpec
from stats import chi_square_pvalue
from semiar.models.cpu import qdot
from tiny import tiny_quant_target, tiny_target

V = 8
PROMPT = [1, 2, 3, 1, 2]
PARAMS = SamplingParams(temperature=0.9, top_p=0.95, seed=11)


def exact_joint(target):
    """P(first two tokens) under the target with PARAMS, computed from its logits."""
    dec = target.decoder
    c = dec.new_cache(16)
    p1 = target_probs(dec(torch.tensor([PROMPT]), c).logits[0, -1], PARAMS)
    joint = torch.zeros(V, V)
    for a in range(V):
        c = dec.new_cache(16)
        p2 = target_probs(dec(torch.tensor([PROMPT + [a]]), c).logits[0, -1], PARAMS)
        joint[a] = p1[a] * p2
    return joint.flatten().tolist()


def run_counts(target, drafter, n):
    counts = Counter()
    engine = Engine(target, drafter)
    gen_params = PARAMS
    for i in range(n):
        params = SamplingParams(temperature=gen_params.temperature, top_p=gen_params.top_p, seed=1000 + i)
        ids = engine.generate(PROMPT, max_new_tokens=2, sampling=params).run().token_ids
        counts[ids[0] * V + ids[1]] += 1
    return [counts[i] for i in range(V * V)]


def falcon_drafter(target, k=2, draft_vocab=0):
    from semiar.drafters.falcon import FalconConfig, FalconDrafter, FalconNet

    torch.manual_seed(3)
    net = FalconNet(FalconConfig.for_target(target.config, k=k, draft_vocab=draft_vocab))
    net.reset_parameters(std=0.2)
    if draft_vocab:  # a reduced vocabulary: some tokens the target samples can never be drafted
        net.vocab_ids.copy_(torch.randperm(target.config.vocab_size)[:draft_vocab].sort().values)  # a confident, often-wrong drafter: both accept and reject paths run
    return FalconDrafter(net, target, TreeSpec("dynamic", depth=2, top_k=2, budget=5))


def heads_drafter(target, method, typical=False):
    from semiar.drafters.hydra import HydraDrafter, HydraNet
    from semiar.drafters.medusa import HeadsConfig, MedusaDrafter, MedusaNet

    torch.manual_seed(3)
    cls, drafter = (MedusaNet, MedusaDrafter) if method == "medusa" else (HydraNet, HydraDrafter)
    net = cls(HeadsConfig(vocab_size=V, hidden_size=target.config.hidden_size, heads=2))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05 if p.dim() == 2 else 0.0)
    return drafter(net.eval(), target, TreeSpec("static", choices=((0,), (1,), (0, 0), (1, 0))), typical=typical)


def eagle_drafter(target):
    from semiar.drafters.eagle import EagleDrafter, eagle_config
    from semiar.drafters.falcon import FalconNet

    torch.manual_seed(3)
    net = FalconNet(eagle_config(target.config))
    net.reset_parameters(std=0.2)
    return EagleDrafter(net, target, TreeSpec("dynamic", depth=2, top_k=2, budget=5))


MODELS = {"fp32": lambda seed=0: tiny_target("qwen2", seed=seed, vocab=V)[0],
          "q4": lambda seed=0: tiny_quant_target("qwen2", seed=seed, vocab=V)}
if qdot.available():  # the VNNI kernel's layout (SEMIAR_Q4_KERNEL=vnni)
    MODELS["q4v"] = lambda seed=0: tiny_quant_target("qwen2", seed=seed, vocab=V, kernel="vnni")


METHODS = ["ar", "draft-chain", "draft-tree", "ngram", "falcon", "falcon-vocab", "lookahead", "copy", "copy-tree", "auto",
           "medusa", "hydra", "eagle"]
#: on the quantized path the default run samples these (a chain and a tree verifier, a learned drafter
#: over a reduced vocabulary, deterministic siblings); every other method's q4 run is `slow` (each is
#: ~4x an fp32 one on 2 cores)
Q4_DEFAULT = {"ar", "draft-tree", "falcon-vocab", "copy-tree"}


@pytest.mark.parametrize("method,weights", [
    (m, w) if w == "fp32" or m in Q4_DEFAULT else pytest.param(m, w, marks=pytest.mark.slow)
    for m in METHODS for w in MODELS])
def test_first_two_tokens_follow_target(method, weights):
    target, draft = MODELS[weights](), MODELS[weights](seed=5)
    drafter = {
        "ar": None,
        "draft-chain": lambda: DraftModelDrafter(draft, target=target, tree=TreeSpec("chain", k=2)),
        "draft-tree": lambda: DraftModelDrafter(draft, target=target, tree=TreeSpec("dynamic", depth=2, top_k=2, budget=4)),
        "ngram": lambda: NgramDrafter(n=2, depth=2, top_k=2, budget=4),
        "falcon": lambda: falcon_drafter(target),
        "falcon-vocab": lambda: falcon_drafter(target, draft_vocab=V // 3),
        "lookahead": lambda: LookaheadDrafter(window=3, ngram=3, candidates=3),
        "copy": lambda: CopyDrafter(k=4),
        "copy-tree": lambda: CopyDrafter(k=4, alternates=3, alt_len=2, budget=8),  # deterministic siblings
        "auto": lambda: AutoDrafter({"copy": CopyDrafter(k=4), "lookahead": LookaheadDrafter(window=2, ngram=2, candidates=2),
                                     "draft": DraftModelDrafter(draft, target=target, tree=TreeSpec("chain", k=2))}),
        "medusa": lambda: heads_drafter(target, "medusa"),
        "hydra": lambda: heads_drafter(target, "hydra"),
        "eagle": lambda: eagle_drafter(target),
    }[method]
    counts = run_counts(target, drafter() if drafter else None, 2500)
    _, _, pval = chi_square_pvalue(counts, exact_joint(target))
    assert pval > 1e-3


def test_distribution_test_catches_a_lossy_sampler(monkeypatch):
    """Make verification keep every draft token: the same test must fail."""
    import semiar.engine as engine_mod
    from semiar.verify import Verdict

    def lossy(tree, logits, params, generator):
        if len(tree):
            kids = tree.children()[0]
            path = [kids[0]]
            return Verdict(path, [tree.tokens[kids[0]], int(torch.multinomial(target_probs(logits[1], params), 1, generator=generator))])
        return Verdict([], [int(torch.multinomial(target_probs(logits[0], params), 1, generator=generator))])

    monkeypatch.setattr(engine_mod, "verify", lossy)
    target, _ = tiny_target("qwen2", vocab=V)
    draft, _ = tiny_target("qwen2", seed=5, vocab=V)
    counts = run_counts(target, DraftModelDrafter(draft, target=target, tree=TreeSpec("chain", k=2)), 1500)
    _, _, pval = chi_square_pvalue(counts, exact_joint(target))
    assert pval < 1e-6


def test_typical_acceptance_is_caught_as_lossy():
    """medusa-typical is labelled lossy, and the distribution test shows why."""
    target, _ = tiny_target("qwen2", vocab=V)
    drafter = heads_drafter(target, "medusa", typical=True)
    assert not drafter.lossless
    counts = run_counts(target, drafter, 1500)
    _, _, pval = chi_square_pvalue(counts, exact_joint(target))
    assert pval < 1e-6
