"""Speculative Jacobi decoding and the relaxed visual rules on the engine: greedy sjd is greedy ar
token for token (with and without CFG); sampled sjd follows the target's distribution (chi-square);
lantern and gsd are labelled lossy, and the same test shows it for lantern."""

from collections import Counter

import pytest
import torch

from semiar.engine import Engine
from semiar.errors import InvalidArgumentError
from semiar.methods import LOSSY, make_drafter
from semiar.models.image import ImageGPT, ImageGPTConfig, LoadedImageModel
from semiar.models.vq import VQConfig, VQModel
from semiar.sampling import SamplingParams, target_probs
from semiar.verify import GroupedAcceptance, LanternAcceptance
from stats import chi_square_pvalue


def image_model(vocab=32, grid=4, cfg_scale=1.0, seed=0, std=0.3):
    torch.manual_seed(seed)
    gpt = ImageGPT(ImageGPTConfig(vocab_size=vocab, dim=32, n_layer=2, n_head=2, multiple_of=32, num_classes=3, grid=grid))
    for p in gpt.parameters():
        torch.nn.init.normal_(p, std=std)
    vq = VQModel(VQConfig(codebook_size=vocab, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=32,
                          num_res_blocks=1, in_channels=1, image_size=grid * 2))
    m = LoadedImageModel("tiny", None, gpt.eval(), vq.eval())
    return m.guided(cfg_scale) if cfg_scale != 1.0 else m


@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("window", [1, 4, 16])
def test_greedy_sjd_is_greedy_ar(cfg, window):
    m = image_model(cfg_scale=cfg, std=0.15)  # flat-ish distributions: many rejections
    for cls in range(3):
        ar = Engine(m).generate(m.prompt(cls), max_new_tokens=16).run()
        sjd = Engine(m, make_drafter("sjd", m, k=window)).generate(m.prompt(cls), max_new_tokens=16).run()
        assert sjd.token_ids == ar.token_ids and len(ar.token_ids) == 16
        assert sjd.stats.target_forwards <= ar.stats.target_forwards


def test_greedy_lossy_methods_stay_exact():
    m = image_model()
    ar = Engine(m).generate(m.prompt(1), max_new_tokens=16).run().token_ids
    for method in ("lantern", "gsd"):
        d = make_drafter(method, m, k=8)
        assert not d.lossless and method in LOSSY
        assert Engine(m, d).generate(m.prompt(1), max_new_tokens=16).run().token_ids == ar


V = 8
PARAMS = dict(temperature=1.0, top_k=6)


def exact_joint(m):
    """P(first two codes) under the guided model, from its logits."""
    run = m.runner
    params = SamplingParams(**PARAMS)
    cls = m.prompt(1)[0]
    p1 = target_probs(run(torch.tensor([[cls]]), run.new_cache(4)).logits[0, -1], params)
    joint = torch.zeros(V, V)
    for a in range(V):
        p2 = target_probs(run(torch.tensor([[cls, a]]), run.new_cache(4)).logits[0, -1], params)
        joint[a] = p1[a] * p2
    return joint.flatten().tolist()


def counts(m, method, n, **kw):
    c = Counter()
    engine = Engine(m, make_drafter(method, m, k=4, **kw))
    for i in range(n):
        # three codes: the second is drafted from the first forward's stale row (a Jacobi guess)
        ids = engine.generate(m.prompt(1), max_new_tokens=3, sampling=SamplingParams(**PARAMS, seed=500 + i)).run().token_ids
        c[ids[0] * V + ids[1]] += 1
    return [c[i] for i in range(V * V)]


def test_sampled_sjd_follows_the_target():
    m = image_model(vocab=V, grid=2, cfg_scale=2.0, std=0.5)
    _, _, pval = chi_square_pvalue(counts(m, "sjd", 1500), exact_joint(m))
    assert pval > 1e-3


def test_lantern_is_caught_as_lossy():
    """A code outside the target's top-k (p = 0) is accepted on its neighbours' mass: the same
    test fails outright."""
    m = image_model(vocab=V, grid=2, cfg_scale=2.0, std=0.5)
    _, _, pval = chi_square_pvalue(counts(m, "lantern", 400, lantern_k=4, delta=0.3), exact_joint(m))
    assert pval < 1e-6


def test_lantern_credits_latent_neighbours_within_delta():
    nb = torch.tensor([[1, 2], [0, 2], [1, 0]])
    p = torch.tensor([0.2, 0.15, 0.65])
    rule = LanternAcceptance(nb, k=2, delta=0.2)
    group, mass = rule.mass(p, 0)  # code 1 (0.15) fits the budget, then code 2 (0.65) would not
    assert group.tolist() == [0, 1] and mass == pytest.approx(0.35)
    assert rule.accept_probability(p, None, 0) == pytest.approx(0.35)
    assert LanternAcceptance(nb, k=2, delta=0.0).accept_probability(p, None, 0) == pytest.approx(0.2)
    q = torch.tensor([0.5, 0.25, 0.25])
    assert rule.accept_probability(p, q, 0) == pytest.approx(0.35 / 0.75)
    with pytest.raises(InvalidArgumentError):
        LanternAcceptance(nb, k=3)


def test_gsd_group_mass():
    p = torch.tensor([0.3, 0.25, 0.25, 0.2])
    rule = GroupedAcceptance(group=2)
    assert rule.accept_probability(p, None, 1) == pytest.approx(0.55)  # in the top 2: the group's mass
    assert rule.accept_probability(p, None, 3) == pytest.approx(0.2)  # outside: the exact test
    with pytest.raises(InvalidArgumentError):
        GroupedAcceptance(group=0)


def test_relaxed_methods_need_an_image_model():
    from tiny import tiny_target

    target, _ = tiny_target("qwen2", vocab=V)
    assert make_drafter("sjd", target).name == "sjd"  # sjd itself works on text too
    for method in ("lantern", "gsd"):
        with pytest.raises(InvalidArgumentError):
            make_drafter(method, target)
    with pytest.raises(InvalidArgumentError):
        make_drafter("sjd", target, tree="chain:4")
