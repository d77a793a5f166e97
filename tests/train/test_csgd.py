"""CSGD pieces: batch alignment, the glancing schedule and what a glance replaces, loss descent."""

import torch

from semiar.drafters.falcon import FalconConfig, FalconNet
from semiar.train.csgd import (apply_glances, choose_glances, csgd_step, distill_loss, glance_lambda,
                               make_batch)
from tiny import tiny_target


def seq(L, H=4, n_prompt=3):
    ids = torch.arange(100, 100 + L)
    hid = torch.arange(L).float().unsqueeze(1).repeat(1, H)  # feature t == t
    resp = torch.zeros(L, dtype=torch.bool)
    resp[n_prompt:] = True
    return ids, hid, resp


def test_make_batch_aligns_inputs_and_targets():
    b = make_batch([seq(8), seq(5)], k=2, device="cpu", dtype=torch.float32)
    assert b.feats.shape == (2, 7, 4)
    # position t: input (h_t, x_{t+1}), target h_{t+2}, glance token x_{t+3}
    assert b.feats[0, :, 0].tolist() == list(range(7))
    assert b.next_ids[0].tolist() == list(range(101, 108))
    assert b.target_feats[0, :6, 0].tolist() == list(range(2, 8))
    assert b.glance_ids[0, :5].tolist() == list(range(103, 108))
    # counted: the token predicted (x_{t+3}) is generated (index >= 3), and h_{t+2} exists
    assert b.mask[0].tolist() == [True] * 6 + [False]
    assert b.mask[1].tolist() == [True, True, True, False, False, False, False]
    assert not b.glance_ok[0, 5] and b.glance_ok[0, 4]


def test_glance_schedule_and_choice():
    assert glance_lambda(0.0) == 0.4 and glance_lambda(0.5) == 0.2 and glance_lambda(1.0) == 0.0
    g = torch.Generator().manual_seed(0)
    assert choose_glances(0, [0, 2, 4], 2, 0.4, g) == []
    got = choose_glances(10, [0, 2, 4, 6, 8, 10], 2, 0.4, g)  # 4 single positions at block starts
    assert len(got) == 4 and all(p % 2 == 0 for p in got)
    runs = choose_glances(12, [0, 3, 6, 9, 12, 15], 3, 0.5, g)  # runs of 1..2 from block starts
    assert runs and all(p % 3 in (0, 1) for p in runs)


def test_glance_replaces_feature_and_token_together():
    b = make_batch([seq(12)], k=2, device="cpu", dtype=torch.float32)
    wrong_guess = torch.zeros_like(b.next_ids)  # every guess wrong
    truth = torch.ones_like(b.next_ids)
    g = torch.Generator().manual_seed(1)
    out, n = apply_glances(b, wrong_guess, truth, k=2, offset=0, lam=0.4, gen=g)
    changed = (out.feats[0, :, 0] != b.feats[0, :, 0]).nonzero().flatten().tolist()
    assert n == len(changed) > 0
    for p in changed:
        assert p % 2 == 0  # block starts
        assert out.feats[0, p, 0] == p + 2 and out.next_ids[0, p] == 100 + p + 3  # h_{p+k}, x_{p+k+1}
    # nothing wrong, nothing glanced
    same, n0 = apply_glances(b, truth, truth, k=2, offset=0, lam=0.4, gen=g)
    assert n0 == 0 and torch.equal(same.feats, b.feats)


def test_distill_loss_is_zero_only_for_a_perfect_prediction():
    torch.manual_seed(0)
    W = torch.randn(10, 4)
    y = torch.randn(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    perfect = distill_loss(y.clone(), y, mask, W)
    assert perfect.reg == 0 and abs(perfect.soft) < 1e-5 and perfect.acc == 1.0
    worse = distill_loss(y + 1.0, y, mask, W)
    assert worse.loss > perfect.loss


def test_training_steps_reduce_the_loss():
    target, _ = tiny_target()
    dec = target.decoder
    torch.manual_seed(0)
    seqs = []
    for s in range(4):
        ids = torch.randint(3, 90, (40,))
        out = dec(ids[None], dec.new_cache(40), return_hidden=True)
        seqs.append((ids, out.hidden[0], torch.ones(40, dtype=torch.bool)))
    batch = make_batch(seqs, 2, "cpu", torch.float32)
    net = FalconNet(FalconConfig.for_target(target.config, k=2))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(60):
        parts, _ = csgd_step(net, batch, dec.embed_tokens, dec.lm_head.weight, step / 60, g, noise=0.05)
        opt.zero_grad()
        parts.loss.backward()
        opt.step()
        losses.append(float(parts.loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_gradients_reach_only_the_drafter():
    target, _ = tiny_target()
    dec = target.decoder
    for p in dec.parameters():
        p.requires_grad_(False)
    ids = torch.randint(3, 90, (30,))
    out = dec(ids[None], dec.new_cache(30), return_hidden=True)
    batch = make_batch([(ids, out.hidden[0], torch.ones(30, dtype=torch.bool))], 2, "cpu", torch.float32)
    net = FalconNet(FalconConfig.for_target(target.config, k=2))
    parts, _ = csgd_step(net, batch, dec.embed_tokens, dec.lm_head.weight, 0.5, torch.Generator().manual_seed(0))
    parts.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(p.grad is None for p in dec.parameters())
    assert not any(k.startswith(("embed", "lm_head")) for k in net.state_dict())  # shared, never copied
