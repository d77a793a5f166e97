"""GGUF -> dense directory, on tiny GGUF files written in the test (F32 and Q8_0 tensors, a tiny
byte-level BPE tokenizer with a chat template); the real SmolLM2 file against transformers' own
GGUF reader (`real`), and Qwen2.5-Coder-0.5B the same way (`slow`)."""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from semiar.errors import ModelFileError, SemiarError
from semiar.models.gguf import convert_gguf, hf_name
from semiar.models.registry import dense_dir_for_gguf
from semiar.models.loading import load_model
from tiny import tiny_hf_model

GGUF_NAMES = {v: k for k, v in {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}.items()}

# A byte-level BPE vocabulary: 256 byte symbols, a few merges, three control tokens.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ w"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = [bytes_to_unicode()[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + SPECIALS
EOS, BOS = len(TOKENS) - 1, len(TOKENS) - 3
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def llamacpp_permute(w, n_head):
    """What llama.cpp's converter does to llama q/k rows (the converter under test must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta, dim, factor, old=8192, lo=1.0, hi=4.0):
    """The per-frequency divisors llama.cpp stores as `rope_freqs` for a Llama 3.x model."""
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


def write_tiny_gguf(path, family="qwen2", quantize_ffn=False, tie=True, arch=None, rope_factor=None):
    hf = tiny_hf_model(family, tie=tie, vocab=len(TOKENS))
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
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if family == "qwen2" else "default")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (len(TOKENS) - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    if rope_factor:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(10000.0, c.head_dim, rope_factor))
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and tie:
            continue
        parts = name.split(".")
        if name.startswith("model.layers."):
            layer, mod = parts[2], ".".join(parts[3:5]) if parts[3] in ("self_attn", "mlp") else parts[3]
            gname = f"blk.{layer}.{GGUF_NAMES[mod]}.{parts[-1]}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        arr = t.detach().numpy().astype(np.float32)
        if family == "llama" and ".attn_q." in gname:
            arr = llamacpp_permute(arr, c.num_attention_heads)
        if family == "llama" and ".attn_k." in gname:
            arr = llamacpp_permute(arr, c.num_key_value_heads)
        if quantize_ffn and ".ffn_up." in gname:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("family,tie", [("qwen2", True), ("llama", False)])
def test_convert_roundtrip(tmp_path, family, tie):
    """Exact weights, config round trip, same logits in transformers and in our decoder."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf = write_tiny_gguf(tmp_path / "m.gguf", family, tie=tie)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "dense", progress=False)
    sd, ref_sd = load_file(out / "model.safetensors"), hf.state_dict()
    assert set(sd) == set(ref_sd) - ({"lm_head.weight"} if tie else set())
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)  # F32: bit exact, q/k permutation undone
    cfg = json.loads((out / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert cfg[key] == getattr(hf.config, key), key
    assert cfg["model_type"] == family and cfg["eos_token_id"] == EOS and cfg["bos_token_id"] == BOS
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"][0] == EOS
    assert json.loads((out / "semiar_source.json").read_text())["size"] == (tmp_path / "m.gguf").stat().st_size
    assert not list(tmp_path.glob("dense.tmp-*"))

    ids = torch.tensor([[3, 9, 27, 81, 4, 100, EOS]])
    with torch.no_grad():
        ref = hf(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    m = load_model(str(out))
    assert (m.decoder(ids, m.decoder.new_cache(16)).logits - ref).abs().max().item() < 1e-4
    assert m.config.tie_word_embeddings == tie


def test_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    write_tiny_gguf(tmp_path / "m.gguf")
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "dense", progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "the weather<|im_end|> in 2024!"
    ids = tok(text)["input_ids"]
    assert ids == ref(text)["input_ids"] and EOS in ids and tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_q8_tensor_is_close(tmp_path):
    hf = write_tiny_gguf(tmp_path / "q.gguf", "qwen2", quantize_ffn=True)
    out = convert_gguf(tmp_path / "q.gguf", tmp_path / "dense", progress=False, tokenizer=False)
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    ref = hf.state_dict()["model.layers.0.mlp.up_proj.weight"]
    got = sd["model.layers.0.mlp.up_proj.weight"]
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 0.01 * ref.abs().max().item()
    assert torch.equal(sd["model.norm.weight"], hf.state_dict()["model.norm.weight"])


def test_bad_files(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    rng = np.random.default_rng(0)
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "head.gguf").write_bytes(data[:2000])  # cut inside the metadata
    (tmp_path / "junk.gguf").write_bytes(rng.bytes(5000))
    (tmp_path / "magic.gguf").write_bytes(b"GGUF" + rng.bytes(5000))
    for name, needle in (("cut.gguf", "truncated"), ("head.gguf", "truncated"), ("junk.gguf", "not a GGUF"),
                         ("magic.gguf", "truncated or corrupt"), ("missing.gguf", "not found")):
        with pytest.raises(ModelFileError, match=needle):
            dense_dir_for_gguf(tmp_path / name, progress=False)
    assert not (Path(os.environ["SEMIAR_HOME"]) / "converted").exists() or not any(
        (Path(os.environ["SEMIAR_HOME"]) / "converted").iterdir())


def test_unsupported_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "p.gguf", "llama", arch="phi3")
    with pytest.raises(SemiarError, match="'phi3' is not supported"):
        convert_gguf(tmp_path / "p.gguf", tmp_path / "dense", progress=False)
    assert not (tmp_path / "dense").exists()


def test_llama3_rope_freqs(tmp_path):
    """rope_freqs (Llama 3.x) becomes rope_scaling llama3; logits match HF with that scaling."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    hf = write_tiny_gguf(tmp_path / "m.gguf", "llama", rope_factor=32.0)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "dense", progress=False, tokenizer=False)
    rope = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    ref_cfg = LlamaConfig(**{**hf.config.to_dict(), "rope_parameters": {"rope_theta": 10000.0, **rope}})
    ref = LlamaForCausalLM(ref_cfg).eval()
    ref.load_state_dict(hf.state_dict())
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        want, plain = ref(ids).logits, hf(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (got - want).abs().max().item() < 1e-4 < (plain - want).abs().max().item()


def test_dense_dir_is_cached(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    out = dense_dir_for_gguf(tmp_path / "m.gguf", progress=False)
    assert out.parent == Path(os.environ["SEMIAR_HOME"]) / "converted" and len(out.name) == 16
    stamp = (out / "semiar_source.json").stat().st_mtime_ns
    assert dense_dir_for_gguf(tmp_path / "m.gguf", progress=False) == out
    assert (out / "semiar_source.json").stat().st_mtime_ns == stamp  # not converted twice


def test_name_mapping():
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def _check_against_transformers_gguf(name, monkeypatch):
    """Logits of transformers on our dense dir vs transformers' own dequantised GGUF load, and the tokenizers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from semiar.models import registry

    monkeypatch.setenv("SEMIAR_HOME", os.environ.get("SEMIAR_TEST_HOME") or str(Path.home() / ".cache" / "semiar"))
    out = registry.pull(name, progress=False)
    src = registry.gguf_path(name)
    tok = AutoTokenizer.from_pretrained(out)
    ref_tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    for text in ("Hello, world", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"):
        ids = tok(text)["input_ids"]
        assert ids == ref_tok(text)["input_ids"] and tok.decode(ids) == ref_tok.decode(ids) == text
    assert tok.chat_template and tok.chat_template == ref_tok.chat_template
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Write fizzbuzz."}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32,
                                                   quantization_config=GgufConfig(dequantize=True)).eval()(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-3
    return tok


@pytest.mark.real
def test_smollm2_conversion_matches_transformers_gguf(monkeypatch):
    tok = _check_against_transformers_gguf("smollm2-135m-instruct", monkeypatch)
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_qwen05_conversion_matches_transformers_gguf(monkeypatch):
    tok = _check_against_transformers_gguf("qwen2.5-coder-0.5b-instruct", monkeypatch)
    assert tok.eos_token == "<|im_end|>"
