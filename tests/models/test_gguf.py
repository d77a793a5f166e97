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

from semiar.errors import ModelFileError, SemiarError
from semiar.models.gguf import convert_gguf, hf_name
from semiar.models.registry import dense_dir_for_gguf
from semiar.models.loading import load_model
from tiny import GGUF_TEMPLATE, gguf_tokens, tiny_gguf

TOKENS = gguf_tokens()
EOS, BOS = len(TOKENS) - 1, len(TOKENS) - 3
TEMPLATE = GGUF_TEMPLATE


def write_tiny_gguf(path, family="qwen2", quantize_ffn=False, tie=True, arch=None, rope_factor=None):
    """F32 tensors (ffn_up Q8_0 with quantize_ffn), the byte-level tokenizer and chat template."""
    return tiny_gguf(path, family, tie=tie, types={"ffn_up": "Q8_0"} if quantize_ffn else {}, tokenizer=True,
                     arch=arch, rope_factor=rope_factor)


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
    m = load_model(str(out), dtype="fp32")
    assert (m.decoder(ids, m.decoder.new_cache(16)).logits - ref).abs().max().item() < 1e-4
    assert m.config.tie_word_embeddings == tie
    q = load_model(str(out))  # the CPU default for a GGUF's directory: its weights quantized (F32: 8 bits)
    assert q.weights == "q4" and q.dtype_spec is None  # a draft beside it takes its own default
    assert (q.decoder(ids, q.decoder.new_cache(16)).logits - ref).abs().max().item() < 0.1


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


def _check_against_transformers_gguf(name):
    """Logits of transformers on our dense dir vs transformers' own dequantised GGUF load, and the tokenizers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from semiar.models import registry

    from semiar.models.gguf import ensure_dense_weights

    out = registry.pull(name, progress=False)
    src = registry.gguf_path(name)
    ensure_dense_weights(out, src, progress=False)  # a pull writes no dense weights; transformers reads them
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
def test_smollm2_conversion_matches_transformers_gguf(real_home):
    tok = _check_against_transformers_gguf("smollm2-135m-instruct")
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_qwen05_conversion_matches_transformers_gguf(real_home):
    tok = _check_against_transformers_gguf("qwen2.5-coder-0.5b-instruct")
    assert tok.eos_token == "<|im_end|>"
