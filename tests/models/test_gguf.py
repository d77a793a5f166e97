"""GGUF -> dense directory, on tiny GGUF files written in the test (F32 and Q8_0 tensors)."""

import gguf
import numpy as np
import pytest
import torch

from semiar.errors import ModelFileError
from semiar.models.gguf import convert_gguf, dense_dir_for_gguf, hf_name
from semiar.models.loading import load_model
from tiny import char_tokenizer, tiny_hf_model

GGUF_NAMES = {v: k for k, v in {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}.items()}


def llamacpp_permute(w, n_head):
    """What llama.cpp's converter does to llama q/k rows (the converter under test must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, family="qwen2", quantize_ffn=False, tie=True):
    hf = tiny_hf_model(family, tie=tie, vocab=128)
    c = hf.config
    w = gguf.GGUFWriter(str(path), family)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
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
def test_convert_roundtrip_logits(tmp_path, family, tie):
    hf = write_tiny_gguf(tmp_path / "m.gguf", family, tie=tie)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "dense", progress=False, tokenizer=False)
    char_tokenizer().save_pretrained(out)
    m = load_model(str(out))
    ids = torch.tensor([[3, 9, 27, 81, 4, 100]])
    with torch.no_grad():
        ref = hf(ids).logits
    got = m.decoder(ids, m.decoder.new_cache(16)).logits
    assert (got - ref).abs().max().item() < 1e-4
    assert m.config.tie_word_embeddings == tie


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
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"\x00" * 1000)
    for name, needle in (("cut.gguf", "truncated"), ("junk.gguf", "not a GGUF"), ("missing.gguf", "not found")):
        with pytest.raises(ModelFileError, match=needle):
            dense_dir_for_gguf(tmp_path / name, progress=False)


def test_name_mapping():
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None
