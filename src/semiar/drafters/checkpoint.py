"""One checkpoint format for every trained drafter: a directory with

- ``config.json``: ``{"method": ..., "config": {...}, "target": {...identity...}, "training": {...}}``
- ``model.safetensors``: the drafter's own weights only (a learned drafter shares the target's
  embedding and LM head, frozen, so they are never copied into the checkpoint).

The target identity (name, family, sizes, and a hash of the embedding matrix) lets loading refuse a
drafter trained for another model with a clear error, instead of drafting garbage.

Example:
    >>> from semiar.drafters.checkpoint import read_drafter_dir        # doctest: +SKIP
    >>> meta, weights = read_drafter_dir("runs/falcon-qwen1.5b")       # doctest: +SKIP
    >>> meta["method"]                                                  # doctest: +SKIP
    'falcon'
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import DrafterMismatchError, ModelFileError, SemiarError

FORMAT_VERSION = 1


def embedding_hash(decoder) -> str:
    """sha256 of a strided sample of the target's embedding rows, rounded to bf16 so the same
    weights hash alike whether loaded in fp32, bf16 or q4 (whose embedding rows are the GGUF's,
    dequantised exactly as the fp32 conversion does), on CPU or GPU."""
    emb = decoder.embed_tokens
    w = getattr(emb, "weight", None)
    n = w.shape[0] if w is not None else emb.num_embeddings
    rows = torch.arange(0, n, max(1, n // 4096), device=decoder.device)
    with torch.no_grad():
        picked = w.detach().index_select(0, rows) if w is not None else emb(rows)
    sample = picked.to(torch.bfloat16).float().cpu().contiguous()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:32]


def target_identity(target) -> dict:
    """What a drafter must match in its target (a LoadedModel)."""
    c = target.config
    return {"name": target.name, "model_type": c.model_type, "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "num_layers": c.num_layers, "embedding_sha256": embedding_hash(target.decoder)}


def check_identity(meta: dict, target, where: str) -> None:
    """Refuse a drafter trained for another target; the message says which field differs."""
    want = meta.get("target") or {}
    have = target_identity(target)
    for key in ("hidden_size", "vocab_size", "model_type", "num_layers", "embedding_sha256"):
        if key in want and want[key] != have[key]:
            raise DrafterMismatchError(
                f"drafter {where} was trained for target {want.get('name')!r} ({key}={want[key]}), "
                f"but the target is {have['name']!r} ({key}={have[key]}); train a drafter for this target "
                "with `semiar train-drafter`")


SHIPPED = Path(__file__).resolve().parent.parent / "data" / "drafters"


def shipped_drafter(method: str, target_name: str) -> Optional[Path]:
    """The drafter directory the package ships for a known target (data/drafters/TARGET-METHOD),
    used when --drafter is not given; None when there is none."""
    d = SHIPPED / f"{target_name}-{method}"
    return d if (d / "config.json").is_file() else None


_SCALE = ".int8_scale"


def quantize_int8(tensors: dict) -> dict:
    """Float matrices -> int8 with a per-row fp32 scale (symmetric); other tensors unchanged."""
    out = {}
    for k, v in tensors.items():
        if v.is_floating_point() and v.dim() == 2 and v.numel() >= 4096:
            w = v.float()
            scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
            out[k] = (w / scale).round().clamp(-127, 127).to(torch.int8)
            out[k + _SCALE] = scale.squeeze(1)
        else:
            out[k] = v
    return out


def dequantize_int8(tensors: dict) -> dict:
    """The inverse of quantize_int8 (fp32 matrices; the loader casts to the target's dtype)."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(_SCALE):
            continue
        s = tensors.get(k + _SCALE)
        out[k] = v.float() * s.float().unsqueeze(1) if s is not None and v.dtype == torch.int8 else v
    return out


def write_drafter_dir(out: str | Path, method: str, config: dict, state_dict: dict, target,
                      training: Optional[dict] = None, store: str = "bf16") -> Path:
    """Write config.json + model.safetensors (atomically: a crash leaves the old files).
    store: "bf16" writes the tensors as given; "int8" per-row int8 matrices (see quantize_int8)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_VERSION, "method": method, "config": config, "target": target_identity(target),
            "training": training or {}, "store": store}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if store == "int8":
        tensors = quantize_int8(tensors)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"method": method})
    tmp.replace(out / "model.safetensors")
    (out / "config.json.tmp").write_text(json.dumps(meta, indent=2))
    (out / "config.json.tmp").replace(out / "config.json")
    return out


def read_drafter_dir(path: str | Path, method: Optional[str] = None) -> tuple[dict, dict]:
    """(meta, state_dict) of a drafter directory, with clear errors for every way it can be wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise SemiarError(f"drafter directory {p} does not exist; train one with `semiar train-drafter`")
    cfg, weights = p / "config.json", p / "model.safetensors"
    for f in (cfg, weights):
        if not f.is_file():
            raise ModelFileError(f"drafter directory {p} has no {f.name}; is it a semiar drafter?")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{cfg} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "method" not in meta or "config" not in meta:
        raise ModelFileError(f"{cfg} is not a semiar drafter config (no 'method'/'config')")
    if method is not None and meta["method"] != method:
        raise SemiarError(f"{p} holds a {meta['method']!r} drafter, not {method!r}; use --method {meta['method']}")
    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{weights} is truncated or corrupt ({e}); re-train or copy it again") from None
    if meta.get("store") == "int8":
        sd = dequantize_int8(sd)
    return meta, sd


def config_from_dict(cls, d: dict, what: str):
    """A drafter config dataclass from its config.json dict, refusing fields it does not know
    (a config written by another method or version)."""
    from dataclasses import fields

    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ModelFileError(f"{what} config has unknown fields {sorted(unknown)}")
    return cls(**d)
