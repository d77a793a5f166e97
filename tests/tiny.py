"""Tiny random models made in the test process: HF reference models and HF-format dirs."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 96


def tiny_hf_model(family: str = "qwen2", seed: int = 0, vocab: int = VOCAB, layers: int = 2, tie: bool = True):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    if family == "qwen2":
        cfg = Qwen2Config(rope_theta=10000.0, **common)
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(rope_theta=10000.0, **common)
        model = LlamaForCausalLM(cfg)
    # random init is tiny by default; widen it so logits have real structure (fewer near-ties)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    return model.eval()


def tiny_target(family: str = "qwen2", seed: int = 0, device="cpu", **kw):
    """A LoadedModel around our native decoder with tiny random weights (no tokenizer), on `device`."""
    from semiar.models.decoder import Decoder, DecoderConfig
    from semiar.models.loading import LoadedModel

    hf = tiny_hf_model(family, seed=seed, **kw)
    cfg = DecoderConfig.from_hf(hf.config.to_dict())
    dec = Decoder(cfg)
    dec.load_hf_state_dict({k: v.clone() for k, v in hf.state_dict().items()})
    return LoadedModel(name=f"tiny-{family}-{seed}", path=None, decoder=dec.to(device).eval(), tokenizer=None,
                       config=cfg, eos_ids=set()), hf


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + newline + specials), ~100 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": specials[3:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_dir(path, family="qwen2", seed=0, layers=2):
    """Write a tiny HF-format model directory (config, safetensors, tokenizer) and return it."""
    from pathlib import Path

    tok = char_tokenizer()
    model = tiny_hf_model(family, seed=seed, vocab=128, layers=layers)
    model.config.eos_token_id = tok.eos_token_id
    model.config.bos_token_id = tok.bos_token_id
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
