import torch

from semiar.engine import Engine
from semiar.sampling import SamplingParams
from tiny import tiny_target


def test_ar_greedy_matches_transformers_generate():
    target, hf = tiny_target("qwen2")
    prompt = [5, 17, 33, 8, 60]
    gen = Engine(target).generate(prompt, max_new_tokens=24).run()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert gen.token_ids == ref
    assert gen.stats.target_forwards == 24 and gen.stats.tau == 1.0
    assert gen.stop_reason == "length"


def test_ar_stops_on_eos_and_budget():
    target, _ = tiny_target("llama")
    prompt = [3, 4, 5]
    free = Engine(target).generate(prompt, max_new_tokens=12).run().token_ids
    target.eos_ids = {free[5]}
    gen = Engine(target).generate(prompt, max_new_tokens=12).run()
    first = free.index(free[5])
    assert gen.token_ids == free[:first + 1] and gen.stop_reason == "eos"


def test_ar_sampling_seeded_is_reproducible():
    target, _ = tiny_target("qwen2")
    s = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    a = Engine(target).generate([1, 2, 3], 16, s).run().token_ids
    b = Engine(target).generate([1, 2, 3], 16, s).run().token_ids
    assert a == b


def test_a_forced_text_is_emitted_with_the_targets_own_choices_checked():
    import pytest

    from semiar.errors import InvalidArgumentError
    from semiar.methods import make_drafter

    m, _ = tiny_target("qwen2")
    prompt = [3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3]
    ref = Engine(m).generate(prompt, max_new_tokens=16).run().token_ids
    for method in ("pld", "copy"):
        g = Engine(m, make_drafter(method, m)).generate(prompt, max_new_tokens=16, forced=ref).run()
        assert g.token_ids == ref and g.departures == []
    # another text (one token changed): emitted as given; the change is a departure with its gap
    other = list(ref)
    other[5] = (ref[5] + 1) % m.config.vocab_size
    g = Engine(m, make_drafter("pld", m)).generate(prompt, max_new_tokens=16, forced=other).run()
    assert g.token_ids == other
    assert g.departures and g.departures[0][0] == 5 and g.departures[0][1] > 0
    # shorter than the budget: the request ends with the text
    assert Engine(m).generate(prompt, max_new_tokens=16, forced=ref[:4]).run().token_ids == ref[:4]
    with pytest.raises(InvalidArgumentError, match="greedy"):
        Engine(m).generate(prompt, forced=ref, sampling=SamplingParams(temperature=1.0))
    with pytest.raises(InvalidArgumentError, match="relaxed"):
        Engine(m, _Relaxed()).generate(prompt, forced=ref)


class _Relaxed:
    """A drafter with its own (relaxed) acceptance rule, as medusa-typical has."""

    name = "relaxed"

    @staticmethod
    def acceptance(*args):
        return None


def test_the_loop_waits_on_the_device_only_for_drafters_that_use_it(monkeypatch):
    import semiar.engine as engine
    from semiar.methods import make_drafter

    m, _ = tiny_target("qwen2")
    prompt = [3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3]
    waits = []
    monkeypatch.setattr(engine, "_sync", lambda device: waits.append(device))
    for method in (None, "copy", "pld", "ngram", "lookahead"):
        waits.clear()
        drafter = make_drafter(method, m) if method else None
        g = Engine(m, drafter).generate(prompt, max_new_tokens=12).run()
        assert len(waits) == 2, method  # the prefill's timing and the request's end, none per step
        assert g.stats.target_forwards > 1
    waits.clear()
    g = Engine(m, make_drafter("draft", m, draft_model=tiny_target("qwen2", seed=1)[0])).generate(
        prompt, max_new_tokens=12).run()
    assert len(waits) == 2 + g.stats.target_forwards  # a model drafter's work is timed as drafting


def test_auto_waits_on_the_device_only_in_steps_where_it_asked_a_model_arm(monkeypatch):
    import semiar.engine as engine
    from semiar.drafters.auto import AutoDrafter
    from semiar.methods import make_drafter

    m, _ = tiny_target("qwen2")
    prompt = [3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3]
    waits = []
    monkeypatch.setattr(engine, "_sync", lambda device: waits.append(device))
    draft = make_drafter("draft", m, draft_model=tiny_target("qwen2", seed=1)[0])
    asked = []
    propose = draft.propose
    draft.propose = lambda tokens: asked.append(1) or propose(tokens)
    import itertools

    auto = AutoDrafter({"pld": make_drafter("pld", m), "draft": draft}, clock=itertools.count().__next__)
    g = Engine(m, auto).generate(prompt, max_new_tokens=24).run()
    assert len(waits) == 2 + len(asked)  # prefill and end, then one per step that asked the draft model
    assert 0 < len(asked) < g.stats.target_forwards



def test_a_full_context_stops_with_its_own_reason():
    """A prompt that leaves fewer positions than max_new_tokens stops with 'context', not 'length';
    the budget that ends exactly at the context is still 'length' (what was asked for came)."""
    from semiar.drafters.lookup import PromptLookupDrafter

    target, _ = tiny_target("qwen2")  # context 512
    target.eos_ids = set()
    prompt = [(7 * i) % 50 + 1 for i in range(500)]
    for drafter in (None, PromptLookupDrafter()):
        gen = Engine(target, drafter).generate(prompt, max_new_tokens=40).run()
        assert len(gen.token_ids) == 12 and gen.stop_reason == "context"
    assert Engine(target).generate(prompt, max_new_tokens=12).run().stop_reason == "length"
    assert Engine(target).generate(prompt[:100], max_new_tokens=12).run().stop_reason == "length"
