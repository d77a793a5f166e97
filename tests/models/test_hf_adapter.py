import torch

from semiar.drafters.lookup import PromptLookupDrafter
from semiar.engine import Engine
from semiar.models.decoder import DecoderConfig
from semiar.models.hf_adapter import HFDecoder
from semiar.models.loading import LoadedModel
from tiny import tiny_target


def test_hf_adapter_speculative_equals_native_ar():
    native, hf = tiny_target("llama")
    adapter = LoadedModel(name="hf", path=None, decoder=HFDecoder(hf), tokenizer=None,
                          config=DecoderConfig.from_hf(hf.config.to_dict()), eos_ids=set())
    prompt = [1, 2, 3, 1, 2, 3, 4, 1, 2]
    ref = Engine(native).generate(prompt, max_new_tokens=20).run().token_ids
    assert Engine(adapter).generate(prompt, max_new_tokens=20).run().token_ids == ref
    gen = Engine(adapter, PromptLookupDrafter(k=4)).generate(prompt, max_new_tokens=20).run()
    assert gen.token_ids == ref
