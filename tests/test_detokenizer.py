"""Streaming text and stop strings (engine._Detokenizer): one windowed decode per step gives the
same text, the same stop token and the same cut as decoding every id again for each token."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from semiar.engine import _Detokenizer

from tiny import char_tokenizer

TEXT = ("def f(x):\n    return x * 2  # double\n\nprint('héllo wörld ✓ 数据 🚀 done')\n"
        "for i in range(10):\n    print(i, f(i))\n") * 3


def byte_bpe():
    """A byte-level BPE (like Qwen's and SmolLM2's) trained here, with multi-byte characters that
    several tokens share."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


def per_token_reference(tok, ids, stop):
    """The old rule: after each token decode all ids; stop at the first token whose text holds a stop string."""
    for n in range(1, len(ids) + 1):
        full = tok.decode(ids[:n], skip_special_tokens=True)
        hits = [i for i in (full.find(s) for s in stop) if i >= 0]
        if hits:
            return n, full[:min(hits)]
    full = tok.decode(ids, skip_special_tokens=True)
    return len(ids), full.rstrip("\ufffd")


def stream(tok, ids, stop, seed):
    rng = random.Random(seed)
    d = _Detokenizer(tok, stop)
    pos, kept, out = 0, 0, ""
    while pos < len(ids):
        step = ids[pos:pos + rng.randint(1, 9)]
        pos += len(step)
        n, delta = d.extend(step, last=pos >= len(ids))
        kept += n
        out += delta
        if d.stopped:
            break
    return kept, out, d.text


@pytest.mark.parametrize("make", [byte_bpe, char_tokenizer])
@pytest.mark.parametrize("stop", [[], ["print(i"], ["数据", "🚀"], ["\n\n", "zzz"], ["ö"]])
def test_stepwise_text_equals_per_token_decoding(make, stop):
    tok = make()
    ids = tok.encode(TEXT, add_special_tokens=False)
    ref_kept, ref_text = per_token_reference(tok, ids, stop)
    for seed in range(5):
        kept, streamed, text = stream(tok, ids, stop, seed)
        assert kept == ref_kept and text == ref_text and streamed == ref_text, seed


def test_text_that_may_begin_a_stop_string_is_held_back():
    tok = char_tokenizer()
    d = _Detokenizer(tok, ["END"])
    assert d.extend(tok.encode("abcE", add_special_tokens=False)) == (4, "abc")
    assert d.extend(tok.encode("Nx", add_special_tokens=False)) == (2, "ENx")  # not the stop string after all
    n, delta = d.extend(tok.encode("yEND", add_special_tokens=False) + tok.encode("zz", add_special_tokens=False))
    assert (n, delta, d.stopped, d.text) == (4, "y", True, "abcENxy")
