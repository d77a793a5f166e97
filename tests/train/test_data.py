"""Self-distilled data: batched left-padded generation (`BatchGenerator`, the fixed-shape step that
CUDA graphs capture, run directly here) equals one-by-one greedy decoding, stops at EOS, and the
features it collects are the target's own; sampling draws from softmax(logits / T) per row."""

import pytest
import torch

from semiar.engine import Engine
from semiar.train.data import BatchGenerator, choose_tokens, generate_batch, generate_distill_data
from tiny import tiny_target

# lengths across a prompt bucket (32): rows are left-padded by different amounts
PROMPTS = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8], [40, 41], list(range(3, 40))]


def greedy(target, prompt, n):
    return prompt + Engine(target).generate(prompt, max_new_tokens=n).run().token_ids


def test_batched_generation_matches_single_greedy_and_features():
    target, _ = tiny_target()
    dec = target.decoder
    out = generate_batch(target, PROMPTS, max_new_tokens=12, temperature=[0.0] * len(PROMPTS))
    for p, (toks, feats) in zip(PROMPTS, out):
        assert toks == greedy(target, p, 12)
        full = dec(torch.tensor([toks[:-1]]), dec.new_cache(len(toks)), return_hidden=True).hidden[0]
        assert feats.shape == full.shape
        torch.testing.assert_close(feats, full, rtol=1e-4, atol=1e-4)


def test_eos_stops_each_row_and_the_batch():
    target, _ = tiny_target()
    free = generate_batch(target, PROMPTS, max_new_tokens=40, return_hidden=False)
    # EOS ids that each row says at a different step (and wherever else they say them)
    target.eos_ids = {toks[len(p) + k] for p, (toks, _), k in zip(PROMPTS, free, (3, 1, 0, 2))}
    calls = []
    forward_rows = target.decoder.forward_rows
    target.decoder.forward_rows = lambda *a, **k: calls.append(1) or forward_rows(*a, **k)
    gen = BatchGenerator(target, features=True)
    out = gen.generate(PROMPTS, max_new_tokens=40)
    for p, (toks, feats) in zip(PROMPTS, out):
        ref = greedy(target, p, 40)
        assert toks == ref
        assert feats.shape[0] == len(toks) - 1
    ends = [len(toks) - len(p) for p, (toks, _) in zip(PROMPTS, out)]
    assert len(set(ends)) > 1 and max(ends) < 40 - gen.check_every
    assert len(calls) <= max(ends) - 1 + gen.check_every  # every row stopped: the batch at the next check


def test_token_only_and_reuse_across_batches():
    target, _ = tiny_target()
    with_feats = generate_batch(target, PROMPTS, max_new_tokens=10)
    gen = BatchGenerator(target, features=False)
    first = gen.generate(PROMPTS, max_new_tokens=10)
    state = gen._state
    again = gen.generate(PROMPTS[::-1], max_new_tokens=10)  # same shape: the same static state
    assert gen._state is state
    assert [t for t, _ in first] == [t for t, _ in with_feats] == [t for t, _ in again[::-1]]
    assert all(f is None for _, f in first)
    other = gen.generate(PROMPTS[:2], max_new_tokens=7)  # another shape: rebuilt
    assert [t for t, _ in other] == [greedy(target, p, 7) for p in PROMPTS[:2]]


def test_per_row_temperature():
    target, _ = tiny_target()
    prompts = [[5, 17, 33]] * 3
    temps = [0.0, 1.5, 1e-4]
    out = generate_batch(target, prompts, 20, temps, torch.Generator().manual_seed(0), return_hidden=False)
    ref = greedy(target, prompts[0], 20)
    assert out[0][0] == ref  # the greedy row is the greedy answer
    assert out[1][0] != ref  # the sampled row is not (with overwhelming probability)
    assert out[2][0] == ref  # a temperature near 0 is (nearly) greedy: the noise is scaled right
    again = generate_batch(target, prompts, 20, temps, torch.Generator().manual_seed(0), return_hidden=False)
    assert again == out  # the device generator decides the samples


def test_choose_tokens_samples_the_tempered_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    temps = torch.full((20000,), 2.0)
    greedy_rows = torch.zeros(20000, dtype=torch.bool)
    greedy_rows[:10] = True
    noise = torch.empty_like(logits).exponential_(generator=g)
    tok = choose_tokens(logits, greedy_rows, temps, noise)
    assert (tok[:10] == 0).all()
    freq = torch.bincount(tok[10:], minlength=4).float() / tok[10:].numel()
    torch.testing.assert_close(freq, (logits[0] / 2).softmax(-1), atol=0.015, rtol=0)


def test_distill_data_token_only():
    from semiar.bench.tasks import Prompt

    target, _ = tiny_target()
    target.encode = lambda text, chat=True, system=None: [3 + ord(c) % 80 for c in text]
    prompts = [Prompt(task="chat", id=str(i), prompt=t) for i, t in enumerate(["hello", "a longer prompt here", "hi"])]
    full = generate_distill_data(target, prompts, max_new_tokens=6, batch_size=2, progress=False)
    tok = generate_distill_data(target, prompts, max_new_tokens=6, batch_size=2, progress=False, features=False)
    assert tok.hidden is None and full.hidden is not None
    assert torch.equal(tok.ids, full.ids) and torch.equal(tok.response, full.response)
    assert full.hidden.shape[0] == full.n_tokens
