"""GGUF -> dense Hugging Face-format directory (config.json + model.safetensors + tokenizer).

Dequantising takes a while (minutes for 1.5B parameters), so it happens once per file; later
loads read the dense safetensors in seconds.

Example:
    >>> from semiar.models.gguf import convert_gguf                    # doctest: +SKIP
    >>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import ModelFileError, SemiarError

ARCHS = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
STAMP = "semiar_source.json"

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> Optional[str]:
    """token_embd.weight -> model.embed_tokens.weight, blk.3.attn_q.bias -> model.layers.3.self_attn.q_proj.bias"""
    base, _, kind = gguf_name.rpartition(".")
    if base == "token_embd":
        return f"model.embed_tokens.{kind}"
    if base == "output_norm":
        return f"model.norm.{kind}"
    if base == "output":
        return f"lm_head.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None  # e.g. rope_freqs: recomputed from the config


def _open(path: Path):
    import gguf

    if not path.exists():
        raise ModelFileError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFileError(f"{path} is not a GGUF file (bad magic); is it the right file?")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ModelFileError(f"{path} looks truncated or corrupt ({type(e).__name__}: {e}); re-download it") from None
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ModelFileError(f"{path} is truncated: tensor data ends at byte {end} but the file has {size}")
    return reader


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_metadata(path) -> dict:
    """Architecture and hyper-parameters of a GGUF file, as a dict."""
    reader = _open(Path(path))
    return {k: _field(reader, k) for k in reader.fields if not k.startswith("tokenizer.ggml.")}


def hf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise SemiarError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    model_type, cls = ARCHS[arch]
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = g("attention.head_count")
    hidden = g("embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(emb.shape[1]) if len(emb.shape) > 1 else vocab
    cfg = {
        "architectures": [cls], "model_type": model_type, "vocab_size": int(vocab), "hidden_size": int(hidden),
        "intermediate_size": int(g("feed_forward_length")), "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": int(heads), "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32", "hidden_act": "silu",
    }
    if model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = False
    scale_type = g("rope.scaling.type")
    if scale_type == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif scale_type not in (None, "none"):
        raise SemiarError(f"GGUF rope scaling {scale_type!r} is not supported")
    return cfg


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rope pairs adjacent dims, HF's pairs halves)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(shape)


def convert_gguf(gguf_path, out_dir, progress: bool = True, tokenizer: bool = True,
                 sha256: Optional[str] = None) -> Path:
    """Write a dense fp32 HF-format directory for a GGUF file; returns out_dir."""
    from rich.progress import Progress
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open(gguf_path)
    cfg = hf_config(reader)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    llama = cfg["model_type"] == "llama"
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"dequantising {gguf_path.name}", total=len(reader.tensors))
            for t in reader.tensors:
                name = hf_name(t.name)
                if name is not None:
                    w = dequantize(t)
                    if llama and name.endswith(("q_proj.weight", "q_proj.bias")):
                        w = _unpermute(w, cfg["num_attention_heads"])
                    elif llama and name.endswith(("k_proj.weight", "k_proj.bias")):
                        w = _unpermute(w, cfg["num_key_value_heads"])
                    tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
                bar.advance(task)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2))
        if tokenizer:
            _write_tokenizer(reader, gguf_path, tmp)
        (tmp / STAMP).write_text(json.dumps({"source": str(gguf_path), "size": gguf_path.stat().st_size,
                                             "sha256": sha256}, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_tokenizer(reader, gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise ModelFileError(f"cannot build a tokenizer from {gguf_path}: {type(e).__name__}: {e}") from None
    template = _field(reader, "tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    tok.save_pretrained(str(out))


def is_complete(out_dir: Path) -> bool:
    return (Path(out_dir) / STAMP).exists()


def dense_dir_for_gguf(path, progress: bool = True) -> Path:
    """Dense directory for a user's local .gguf file, converted on first use and cached in
    $SEMIAR_HOME/converted/<key> (key: size + first and last MiB)."""
    from .registry import semiar_home

    path = Path(path).expanduser().resolve()
    _open(path)  # validate before hashing
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    out = semiar_home() / "converted" / h.hexdigest()[:16]
    if not is_complete(out):
        convert_gguf(path, out, progress=progress)
    return out
