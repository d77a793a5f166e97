"""Medusa, Hydra and EAGLE drafters: training steps reduce the loss, greedy identity, checkpoints,
wrong targets refused, typical acceptance marked lossy."""

import json

import pytest
import torch

from semiar.drafters.eagle import EagleDrafter, eagle_config, load_eagle
from semiar.drafters.falcon import FalconNet, save_falcon
from semiar.drafters.hydra import HydraDrafter, HydraNet, load_hydra
from semiar.drafters.medusa import (HeadsConfig, MedusaDrafter, MedusaNet, calibrated_choices, load_medusa,
                                    save_heads)
from semiar.engine import Engine
from semiar.errors import DrafterMismatchError, InvalidArgumentError, SemiarError
from semiar.methods import LOSSY, METHODS, make_drafter
from semiar.tree import TreeSpec, parse_tree_spec, tree_from_levels
from tiny import tiny_target


def heads_net(cls, target, heads=3, std=0.3, seed=0):
    """Heads with random (not identity) blocks: confident, often-wrong drafts."""
    torch.manual_seed(seed)
    net = cls(HeadsConfig(vocab_size=target.config.vocab_size, hidden_size=target.config.hidden_size, heads=heads))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std / 4 if p.dim() == 2 else 0.0)
    return net.eval()


def eagle_net(target, std=0.3, seed=0):
    torch.manual_seed(seed)
    net = FalconNet(eagle_config(target.config))
    net.reset_parameters(std=std)
    return net.eval()


def drafter_for(method, target, **kw):
    if method == "medusa":
        return MedusaDrafter(heads_net(MedusaNet, target), target, **kw)
    if method == "hydra":
        return HydraDrafter(heads_net(HydraNet, target), target, **kw)
    return EagleDrafter(eagle_net(target), target, **kw)


def self_distilled(target, n=6, tokens=60):
    dec = target.decoder
    seqs = []
    for s in range(n):
        prompt = [3 + s, 11, 40 + s]
        ids = prompt + Engine(target).generate(prompt, max_new_tokens=tokens).run().token_ids
        out = dec(torch.tensor([ids]), dec.new_cache(len(ids)), return_hidden=True)
        resp = torch.zeros(len(ids), dtype=torch.bool)
        resp[len(prompt):] = True
        seqs.append((torch.tensor(ids), out.hidden[0], resp))
    return seqs


def test_tree_from_levels_fills_branch_dependent_candidates():
    choices = parse_tree_spec("[[0],[1],[0,0],[1,0],[0,1],[0,0,0]]").choices
    seen = []

    def level(d, paths):
        seen.append((d, paths))
        logits = torch.zeros(len(paths), 20)
        for i, p in enumerate(paths):  # best token = 10*depth + sum of the path, second best + 1
            logits[i, (10 * d + sum(p)) % 20] = 2.0
            logits[i, (10 * d + sum(p) + 1) % 20] = 1.0
        return logits

    t = tree_from_levels(choices, level)
    assert t.tokens == [10, 11, 10, 11, 11, 10] and t.parents == [-1, -1, 0, 0, 1, 2]
    assert [d for d, _ in seen] == [1, 2, 3] and seen[1][1] == [[10], [11]]  # one call per depth


def test_calibrated_tree_keeps_parents_and_budget():
    acc = [[0.6, 0.2, 0.1], [0.5, 0.1, 0.05], [0.4, 0.1, 0.0]]
    ch = calibrated_choices(acc, budget=6)
    assert len(ch) == 6 and ch[0] == (0,) and (0, 0) in ch and (0, 0, 0) in ch
    assert all(c[:-1] in set(ch) for c in ch if len(c) > 1)


PROMPTS = [[5, 17, 33, 8, 60], [1, 2, 3, 1, 2, 3, 1, 2], list(range(10, 40)), [7]]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("method", ["medusa", "hydra", "eagle"])
def test_greedy_identity(family, method):
    target, _ = tiny_target(family)
    drafter = drafter_for(method, target)
    for prompt in PROMPTS:
        ref = Engine(target).generate(prompt, max_new_tokens=40).run().token_ids
        gen = Engine(target, drafter).generate(prompt, max_new_tokens=40).run()
        assert gen.token_ids == ref
        assert gen.stats.draft_tokens > 0


@pytest.mark.parametrize("method", ["medusa", "hydra"])
def test_typical_acceptance_is_greedy_exact_and_labelled_lossy(method):
    target, _ = tiny_target()
    d = drafter_for(method, target, typical=True)
    assert not d.lossless and d.name == f"{method}-typical" and f"{method}-typical" in LOSSY
    assert "LOSSY" in METHODS[f"{method}-typical"]
    assert drafter_for(method, target).lossless
    ref = Engine(target).generate(PROMPTS[0], max_new_tokens=30).run().token_ids
    assert Engine(target, d).generate(PROMPTS[0], max_new_tokens=30).run().token_ids == ref


@pytest.mark.parametrize("method", ["medusa", "hydra", "eagle"])
def test_training_steps_reduce_the_loss(method):
    from semiar.train.trainer import TrainConfig, _method

    target, _ = tiny_target()
    seqs = self_distilled(target, n=4, tokens=40)
    cfg = TrainConfig(target="tiny", out="unused", method=method, k=None if method == "eagle" else 3)
    cfg.validate()
    torch.manual_seed(0)
    net, step, evaluate, _ = _method(cfg, target)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    dec = target.decoder
    losses = []
    for i in range(40):
        opt.zero_grad()
        parts, _ = step(net, seqs, dec.embed_tokens, dec.lm_head.weight, i / 40, gen, "cpu", torch.float32, None)
        opt.step()
        losses.append(float(parts.loss))
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])
    val = evaluate(net.eval(), seqs, dec.embed_tokens, dec.lm_head.weight, "cpu", torch.float32)
    if method != "eagle":
        assert len(val["rank_acc"]) == 3 and val["acc_by_head"][0] > 0.3


def test_hydra_learns_more_than_medusa_beyond_the_first_head():
    """Same data, same steps: Hydra's later heads see the drafted prefix and agree more often."""
    from semiar.train.trainer import TrainConfig, _method

    target, _ = tiny_target()
    seqs = self_distilled(target, n=6, tokens=60)
    dec = target.decoder
    acc = {}
    for method in ("medusa", "hydra"):
        cfg = TrainConfig(target="tiny", out="unused", method=method, k=3)
        cfg.validate()
        torch.manual_seed(0)
        net, step, evaluate, _ = _method(cfg, target)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        for i in range(60):
            opt.zero_grad()
            step(net, seqs, dec.embed_tokens, dec.lm_head.weight, 0.0, None, "cpu", torch.float32, None)
            opt.step()
        acc[method] = evaluate(net.eval(), seqs, dec.embed_tokens, dec.lm_head.weight, "cpu", torch.float32)["acc_by_head"]
    assert acc["hydra"][2] > acc["medusa"][2]


def test_checkpoints_roundtrip_and_wrong_target(tmp_path):
    target, _ = tiny_target(seed=0)
    other, _ = tiny_target(seed=1)
    for cls, load in ((MedusaNet, load_medusa), (HydraNet, load_hydra)):
        net = heads_net(cls, target)
        d = tmp_path / cls.method
        save_heads(d, net, target, training={"val": {"rank_acc": [[0.5, 0.2]] * 3}})
        assert json.loads((d / "config.json").read_text())["method"] == cls.method
        loaded, rank_acc = load(d, target)
        assert rank_acc == [[0.5, 0.2]] * 3
        for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
            torch.testing.assert_close(a, b)
        with pytest.raises(DrafterMismatchError, match="trained for target"):
            load(d, other)
        drafter = make_drafter(cls.method, target, drafter=str(d))
        assert drafter.tree.max_nodes == len(calibrated_choices([[0.5, 0.2]] * 3))
    save_falcon(tmp_path / "eagle", eagle_net(target), target, method="eagle")
    assert isinstance(make_drafter("eagle", target, drafter=str(tmp_path / "eagle")), EagleDrafter)
    with pytest.raises(DrafterMismatchError):
        load_eagle(tmp_path / "eagle", other)
    # a drafter directory of another method is refused with the method to use
    with pytest.raises(SemiarError, match="'medusa' drafter.*--method medusa"):
        make_drafter("hydra", target, drafter=str(tmp_path / "medusa"))
    with pytest.raises(SemiarError, match="'eagle' drafter"):
        make_drafter("falcon", target, drafter=str(tmp_path / "eagle"))


def test_make_drafter_arguments(tmp_path):
    target, _ = tiny_target()
    for m in ("medusa", "hydra", "eagle", "medusa-typical"):
        with pytest.raises(InvalidArgumentError, match="--drafter"):
            make_drafter(m, target)
    net = heads_net(MedusaNet, target, heads=2)
    with pytest.raises(InvalidArgumentError, match="static tree"):
        make_drafter("medusa", target, drafter=net, tree="dynamic:3,2,4")
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        make_drafter("medusa", target, drafter=net, tree="[[0],[0,0],[0,0,0]]")
    with pytest.raises(InvalidArgumentError, match="fixed by training"):
        make_drafter("medusa", target, drafter=net, k=3)
    with pytest.raises(InvalidArgumentError, match="k must be > 0"):
        make_drafter("medusa", target, drafter=net, k=0)
    with pytest.raises(InvalidArgumentError, match="one token per pass"):
        EagleDrafter(FalconNet(__import__("semiar.drafters.falcon", fromlist=["x"]).FalconConfig.for_target(target.config, k=2)), target)
    d = make_drafter("eagle", target, drafter=eagle_net(target), tree="dynamic:4,2,8")
    assert d.tree == TreeSpec("dynamic", depth=4, top_k=2, budget=8)
