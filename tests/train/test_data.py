"""Self-distilled data: batched left-padded generation equals one-by-one greedy decoding, and the
features it collects are the target's own."""

import torch

from semiar.engine import Engine
from semiar.train.data import generate_batch
from tiny import tiny_target


def test_batched_generation_matches_single_greedy_and_features():
    target, _ = tiny_target()
    dec = target.decoder
    prompts = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8], [40, 41]]
    out = generate_batch(target, prompts, max_new_tokens=12, temperature=[0.0, 0.0, 0.0])
    for p, (toks, feats) in zip(prompts, out):
        ref = Engine(target).generate(p, max_new_tokens=12).run().token_ids
        assert toks == p + ref
        full = dec(torch.tensor([toks[:-1]]), dec.new_cache(len(toks)), return_hidden=True).hidden[0]
        assert feats.shape == full.shape
        torch.testing.assert_close(feats, full, rtol=1e-4, atol=1e-4)


def test_per_row_temperature():
    target, _ = tiny_target()
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 17, 33]] * 2
    out = generate_batch(target, prompts, max_new_tokens=20, temperature=[0.0, 1.5], generator=g)
    ref = Engine(target).generate(prompts[0], max_new_tokens=20).run().token_ids
    assert out[0][0] == prompts[0] + ref  # the greedy row is the greedy answer
    assert out[1][0] != out[0][0]  # the sampled row is not (with overwhelming probability)
