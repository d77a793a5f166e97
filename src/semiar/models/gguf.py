"""GGUF -> Hugging Face-format directory (config.json, tokenizer, and on request model.safetensors).

The directory is written without weights first: the CPU default (`--dtype q4`) runs the GGUF's
quantized blocks (`models.quant`, cached beside it). Dense fp32 weights are written only when a
dense dtype is asked for (`ensure_dense_weights`): dequantising takes tens of seconds for 1.5B
parameters and 4 bytes a weight on disk, so it happens at most once per file.

Example:
    >>> from semiar.models.gguf import convert_gguf                    # doctest: +SKIP
    >>> convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import ModelFileError, SemiarError

ARCHS = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM")}
STAMP = "semiar_source.json"
# Tokens that end a turn besides the file's eos (llama.cpp treats these as end-of-generation too).
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> Optional[str]:
    """token_embd.weight -> model.embed_tokens.weight, blk.3.attn_q.bias -> model.layers.3.self_attn.q_proj.bias;
    None for tensors HF recomputes (rope_freqs)."""
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
    return None


def open_reader(path: Path):
    """A GGUFReader for path, or a ModelFileError saying what is wrong with the file."""
    import gguf

    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e}") from None
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (bad magic): corrupt, or the wrong file")
    try:
        reader = gguf.GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # gguf/numpy raise ValueError, IndexError, struct errors... on a cut file
        raise ModelFileError(f"{path} looks truncated or corrupt ({type(e).__name__}: {e}); re-download it") from None
    size = path.stat().st_size
    if end > size:
        raise ModelFileError(f"{path} looks truncated: its tensor data ends at byte {end} but the file has {size}")
    return reader


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_metadata(path) -> dict:
    """Architecture and hyper-parameters of a GGUF file (tokenizer arrays left out), as a dict."""
    reader = open_reader(Path(path))
    return {k: _field(reader, k) for k in reader.fields if not k.startswith(("tokenizer.ggml.", "GGUF."))}


def _llama3_rope(reader, theta: float, dim: int) -> dict:
    """Llama 3.x files store per-frequency divisors (`rope_freqs`) instead of the rope_scaling
    parameters: find the standard parameters that give those divisors."""
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    got = np.asarray(t.data, dtype=np.float64).reshape(-1)
    inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    wavelen = 2 * math.pi / inv
    for factor in (8.0, 16.0, 32.0, 4.0):
        old, lo, hi = 8192, 1.0, 4.0
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0, 1)
        want = 1.0 / ((1 - smooth) / factor + smooth)
        if want.shape == got.shape and np.allclose(want, got, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
                    "original_max_position_embeddings": old}
    raise SemiarError("this GGUF has rope frequency factors (rope_freqs) that match no llama3 rope scaling "
                      "semiar knows; it is not supported")


def hf_config(reader) -> dict:
    """HF `config.json` dict for an open GGUF (llama or qwen2); SemiarError for other architectures."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise SemiarError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    model_type, cls = ARCHS[arch]
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads, hidden = int(g("attention.head_count")), int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ModelFileError("the GGUF has no token_embd.weight tensor; it is not a complete model")
    head_dim = int(g("attention.key_length", g("rope.dimension_count", hidden // heads)))
    cfg = {
        "architectures": [cls], "model_type": model_type, "vocab_size": int(emb.shape[-1]), "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")), "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,  # llama.cpp writes output only when untied
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32", "hidden_act": "silu",
    }
    if model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["mlp_bias"] = False
    elif "blk.0.attn_q.bias" not in names:
        raise ModelFileError("this qwen2 GGUF has no attention biases (blk.0.attn_q.bias); it is not a complete model")
    scale_type = g("rope.scaling.type")
    if scale_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif scale_type not in (None, "none"):
        raise SemiarError(f"GGUF rope scaling {scale_type!r} is not supported (only linear)")
    if "rope_freqs.weight" in names:
        cfg["rope_scaling"] = _llama3_rope(reader, cfg["rope_theta"], head_dim)
    return cfg


def end_token_ids(reader) -> list[int]:
    """The file's eos id first, then its eot/eom ids and end-of-turn control tokens (<|endoftext|>...)."""
    ids = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ids += [i for i, tok in enumerate(_field(reader, "tokenizer.ggml.tokens", [])) if tok in _END_TOKENS]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its rope pairs adjacent dims, HF's pairs halves)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 numpy, in torch's dim order (GGUF lists dims innermost first)."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise SemiarError(f"tensor {tensor.name} is {tensor.tensor_type.name}, a type gguf {gguf.__version__} "
                          "cannot dequantise; upgrade gguf or use another quantisation") from None
    except (ValueError, IndexError) as e:
        raise ModelFileError(f"tensor {tensor.name} looks corrupt ({e})") from None
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _write_dense(reader, cfg: dict, out_file: Path, label: str, progress: bool) -> None:
    """Every weight of the GGUF dequantised to fp32, HF-named, into one safetensors file."""
    from rich.progress import Progress
    from safetensors.torch import save_file

    llama = cfg["model_type"] == "llama"
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"dequantising {label}", total=len(reader.tensors))
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                w = dequantize(t)
                proj = name.split(".")[-2]
                if llama and proj in heads:
                    w = unpermute(w, heads[proj])
                tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
            bar.advance(task)
    save_file(tensors, str(out_file), metadata={"format": "pt"})


def convert_gguf(gguf_path, out_dir, progress: bool = True, tokenizer: bool = True,
                 sha256: Optional[str] = None, weights: bool = True) -> Path:
    """Write an HF-format directory (config, generation config, tokenizer with chat template and,
    with weights=True, dense fp32 model.safetensors) for a llama/qwen2 GGUF file; returns out_dir.

    Written into `<out_dir>.tmp-<pid>` and renamed; `semiar_source.json` is written last, so a
    directory without it is incomplete. tokenizer=False skips the tokenizer (tests)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_reader(gguf_path)
    cfg = hf_config(reader)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if weights:
            _write_dense(reader, cfg, tmp / "model.safetensors", gguf_path.name, progress)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": end_token_ids(reader) or cfg["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
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
    """transformers' tokenizer for the GGUF, saved with the chat template inside tokenizer_config.json."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise ModelFileError(f"cannot build a tokenizer from {gguf_path}: {type(e).__name__}: {e}") from None
    template = _field(reader, "tokenizer.chat_template")
    if template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    tok.save_pretrained(str(out), save_jinja_files=False)


def has_dense_weights(out_dir) -> bool:
    """Whether a converted directory holds the dense fp32 weights."""
    return (Path(out_dir) / "model.safetensors").is_file()


def ensure_dense_weights(out_dir, gguf_path, progress: bool = True) -> Path:
    """Write the dense fp32 model.safetensors into a converted directory if it is not there yet
    (temporary name, then renamed); returns out_dir."""
    out_dir, gguf_path = Path(out_dir), Path(gguf_path)
    if not has_dense_weights(out_dir):
        reader = open_reader(gguf_path)
        tmp = out_dir / f"model.safetensors.tmp-{os.getpid()}"
        try:
            _write_dense(reader, hf_config(reader), tmp, gguf_path.name, progress)
            tmp.replace(out_dir / "model.safetensors")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out_dir


def source_of(out_dir) -> Optional[Path]:
    """The GGUF a converted directory was made from (its stamp), if it is still there."""
    try:
        src = Path(json.loads((Path(out_dir) / STAMP).read_text())["source"])
    except (OSError, KeyError, ValueError):
        return None
    return src if src.is_file() else None


def is_complete(out_dir) -> bool:
    """Whether a converted directory was finished (its stamp is written last)."""
    return (Path(out_dir) / STAMP).exists()
