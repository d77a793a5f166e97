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


# GGUF types given to a tiny model's tensors by `tiny_gguf`: every layout the quantized path maps
# (one plane, two planes, parts that merge and parts that do not), F32 norms and biases.
TINY_GGUF_TYPES = {"attn_q": "Q4_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_1",
                   "ffn_gate": "Q5_1", "ffn_up": "Q4_0", "ffn_down": "Q8_0", "token_embd": "Q5_0", "output": "Q8_0"}
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


# A byte-level BPE vocabulary for GGUFs with a tokenizer: 256 byte symbols, a few merges, three control tokens.
GGUF_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ w"]
GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gguf_tokens() -> list:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in GGUF_MERGES] + GGUF_SPECIALS


def llamacpp_permute(w, n_head):
    """What llama.cpp's converter does to llama q/k rows (the loaders must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta, dim, factor, old=8192, lo=1.0, hi=4.0):
    """The per-frequency divisors llama.cpp stores as `rope_freqs` for a Llama 3.x model."""
    import numpy as np

    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tiny_gguf(path, family="qwen2", seed=0, vocab=VOCAB, tie=True, types=None, tokenizer=False, arch=None,
              rope_factor=None):
    """Write a tiny random model as a GGUF and return the HF reference model it was made from.

    types: GGUF type per tensor kind (`TINY_GGUF_TYPES` by default; {} keeps every tensor F32);
    tokenizer=True adds the byte-level BPE tokenizer and chat template (the vocabulary is then its
    265 tokens); arch overrides the architecture name; rope_factor adds llama3 `rope_freqs`."""
    import gguf
    import numpy as np

    types = TINY_GGUF_TYPES if types is None else types
    tokens = gguf_tokens() if tokenizer else None
    hf = tiny_hf_model(family, seed=seed, vocab=len(tokens) if tokens else vocab, tie=tie)
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch or family)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if tokens:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if family == "qwen2" else "default")
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - len(GGUF_SPECIALS)) + [3] * len(GGUF_SPECIALS))
        w.add_token_merges(GGUF_MERGES)
        w.add_bos_token_id(len(tokens) - 3)
        w.add_eos_token_id(len(tokens) - 1)
        w.add_add_bos_token(False)
        w.add_chat_template(GGUF_TEMPLATE)
    if rope_factor:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(10000.0, c.head_dim, rope_factor))
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and tie:
            continue
        parts = name.split(".")
        if name.startswith("model.layers."):
            mod = ".".join(parts[3:5]) if parts[3] in ("self_attn", "mlp") else parts[3]
            base = _GGUF_NAMES[mod]
            gname = f"blk.{parts[2]}.{base}.{parts[-1]}"
        else:
            base = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                    "lm_head.weight": "output"}[name]
            gname = f"{base}.weight"
        arr = t.detach().numpy().astype(np.float32)
        if family == "llama" and base in ("attn_q", "attn_k"):
            arr = llamacpp_permute(arr, c.num_attention_heads if base == "attn_q" else c.num_key_value_heads)
        qtype = types.get(base) if arr.ndim == 2 else None
        if qtype:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType[qtype])
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


_QUANT_DECODERS: dict = {}


def tiny_quant_target(family: str = "qwen2", seed: int = 0, vocab: int = VOCAB, tie: bool = True,
                      kernel: str = "int4"):
    """A LoadedModel on the quantized path (`--dtype q4`): a tiny random model written as a GGUF with
    quantized tensors (`tiny_gguf`), repacked for `kernel` ("int4" or "vnni") and loaded as the loader
    does; built once per process."""
    import tempfile
    from pathlib import Path

    from semiar.models.decoder import DecoderConfig
    from semiar.models.gguf import hf_config, open_reader
    from semiar.models.loading import LoadedModel
    from semiar.models.quant import load_quant_decoder, write_quant_cache

    key = (family, seed, vocab, tie, kernel)
    if key not in _QUANT_DECODERS:
        d = Path(tempfile.mkdtemp(prefix="semiar-tiny-gguf-"))
        tiny_gguf(d / "m.gguf", family, seed=seed, vocab=vocab, tie=tie)
        write_quant_cache(d / "m.gguf", d / "q4.safetensors", progress=False, kernel=kernel)
        cfg = DecoderConfig.from_hf(hf_config(open_reader(d / "m.gguf")))
        _QUANT_DECODERS[key] = load_quant_decoder(cfg, d / "q4.safetensors")
    dec = _QUANT_DECODERS[key]
    return LoadedModel(name=f"tiny-q4{'v' if kernel == 'vnni' else ''}-{family}-{seed}", path=None, decoder=dec, tokenizer=None,
                       config=dec.config, eos_ids=set(), weights="q4")
