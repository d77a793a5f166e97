"""Real models (pulled from PyPI packages). SmolLM2-135M is small enough for CI (`real` marker,
run by `make test`); the Qwen pair is `slow` (`make test-slow`)."""

import pytest
import torch

from semiar.engine import Engine
from semiar.models import load_model, registry

pytestmark = pytest.mark.real

SMOL = "smollm2-135m-instruct"


@pytest.fixture
def smol(real_home):
    """SmolLM2 as the CPU runs it by default: its GGUF's quantized weights (q4), read from the suite's
    $SEMIAR_HOME (conftest.real_home)."""
    registry.pull(SMOL, progress=False)
    return load_model(SMOL)


@pytest.fixture
def smol_fp32(real_home):
    registry.pull(SMOL, progress=False)
    return load_model(SMOL, dtype="fp32")


def test_smollm2_default_is_q4_and_close_to_fp32(smol, smol_fp32):
    assert smol.weights == "q4" and smol_fp32.weights == "float32"
    ids = torch.tensor([smol.encode("def fibonacci(n):", chat=True)])
    q = smol.decoder(ids, smol.decoder.new_cache(ids.shape[1])).logits
    f = smol_fp32.decoder(ids, smol_fp32.decoder.new_cache(ids.shape[1])).logits
    assert (q.argmax(-1) == f.argmax(-1)).float().mean() > 0.8
    assert (q - f).abs().max().item() < 0.1 * f.abs().max().item()


def test_smollm2_matches_transformers(smol_fp32):
    """Our decoder vs transformers on the same dense weights, and our GGUF dequantisation vs
    transformers' own GGUF reader."""
    from transformers import AutoModelForCausalLM

    smol = smol_fp32
    ids = torch.tensor([smol.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"", chat=True)])
    ours = smol.decoder(ids, smol.decoder.new_cache(ids.shape[1])).logits
    hf = AutoModelForCausalLM.from_pretrained(str(smol.path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-3
    gguf = registry.gguf_path(SMOL)
    hf_gguf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref2 = hf_gguf(ids).logits
    assert (ours - ref2).abs().max().item() <= 1e-3


def test_smollm2_tokenizer_and_chat_template(smol):
    from transformers import AutoTokenizer

    gguf = registry.gguf_path(SMOL)
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "Hello, world! def f(x): return x ** 2"
    assert smol.tokenizer(text)["input_ids"] == ref(text)["input_ids"]
    assert smol.tokenizer.chat_template
    assert 2 in smol.eos_ids  # <|im_end|>


def test_smollm2_speculative_equals_ar(smol):
    from semiar.drafters.lookup import PromptLookupDrafter
    from semiar.drafters.ngram import NgramDrafter

    ids = smol.encode("Rewrite this with type hints:\ndef add(a, b):\n    return a + b\n", chat=True)
    ref = Engine(smol).generate(ids, max_new_tokens=40).run().token_ids
    for drafter in (PromptLookupDrafter(), NgramDrafter()):
        assert Engine(smol, drafter).generate(ids, max_new_tokens=40).run().token_ids == ref


def test_smollm2_shipped_falcon_drafter_loads_and_is_lossless(smol):
    """The drafter in the package serves smollm2-135m-instruct with no --drafter: its identity
    (hash of the embedding, sizes) matches the target converted here, and it drafts tokens that
    the target accepts."""
    from semiar.drafters.falcon import FalconDrafter
    from semiar.methods import make_drafter

    drafter = make_drafter("falcon", smol)
    assert isinstance(drafter, FalconDrafter)
    ids = smol.encode("Write a Python function that returns the sum of a list.", chat=True)
    ref = Engine(smol).generate(ids, max_new_tokens=48).run().token_ids
    gen = Engine(smol, drafter).generate(ids, max_new_tokens=48).run()
    assert gen.token_ids == ref and gen.stats.tau > 1.1


@pytest.mark.slow
def test_qwen_pair_draft_equals_ar(real_home):
    from semiar.methods import make_drafter

    target = load_model("qwen2.5-coder-1.5b-instruct")
    drafter = make_drafter("draft", target, draft_model="qwen2.5-coder-0.5b-instruct")
    ids = target.encode("Write a Python function that reverses a string.", chat=True)
    ref = Engine(target).generate(ids, max_new_tokens=48).run().token_ids
    gen = Engine(target, drafter).generate(ids, max_new_tokens=48).run()
    assert gen.token_ids == ref and gen.stats.tau > 1.5


@pytest.mark.slow
def test_qwen_shipped_falcon_drafter_loads_and_is_lossless(real_home):
    """The int8, reduced-vocabulary drafter shipped for the default target serves it with no
    --drafter, and its greedy output equals ar's."""
    from semiar.drafters.falcon import FalconDrafter
    from semiar.methods import make_drafter

    target = load_model("qwen2.5-coder-1.5b-instruct")
    drafter = make_drafter("falcon", target)
    assert isinstance(drafter, FalconDrafter) and drafter.net.config.draft_vocab == 32768
    ids = target.encode("Write a Python function that checks whether a number is prime.", chat=True)
    ref = Engine(target).generate(ids, max_new_tokens=40).run().token_ids
    gen = Engine(target, drafter).generate(ids, max_new_tokens=40).run()
    assert gen.token_ids == ref and gen.stats.tau > 1.2
