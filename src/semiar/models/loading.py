"""Resolve what a user names as a model and load it as a target (or draft) model.

A model can be a known name (`semiar models list`), a local `.gguf` file, a local Hugging Face
format directory (config.json + safetensors + tokenizer), or a hub id already in the HF cache.
Every route ends in a dense HF-format directory that the native decoder loads in seconds.

Example:
    >>> from semiar.models import load_model                      # doctest: +SKIP
    >>> m = load_model("smollm2-135m-instruct")                   # doctest: +SKIP
    >>> m.encode("Hello", chat=True)[:3]                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import ContextLengthError, ModelFileError, SemiarError, UnknownModelError
from .decoder import Decoder, DecoderConfig, cpu_packing_available

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA, fp32 on the CPU. bf16 on a CPU with native bf16 (AVX512-BF16, AMX) is faster
    (`--dtype bf16`: a qwen2.5-coder-1.5b step 1.7-1.9x faster on an AMD EPYC, docs/models.md), but bf16's rounding
    differs between the kernels for one row and for a block, so greedy speculative output then
    departs from greedy `ar` at near-ties (SmolLM2 in bf16: 10 such cases over 6 prompts), as it
    does on GPUs; fp32 keeps them identical, so it stays the CPU default."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def parse_dtype(name: Optional[str], device: str) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise SemiarError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16, auto")
    return table[name]


@dataclass
class LoadedModel:
    """A model ready to decode: weights on a device, tokenizer, and what the engine needs to know."""

    name: str
    path: Path
    decoder: torch.nn.Module
    tokenizer: object
    config: DecoderConfig
    eos_ids: set = field(default_factory=set)
    #: what runs forwards: the decoder itself, or a `GraphedDecoder` replaying CUDA graphs
    runner: object = None

    def __post_init__(self):
        if self.runner is None:
            self.runner = self.decoder

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def device(self):
        return self.decoder.device

    @property
    def dtype(self):
        return self.decoder.dtype

    def encode(self, prompt: str, chat: bool = False, system: Optional[str] = None) -> list[int]:
        """Token ids for a prompt; with chat=True the model's chat template is applied."""
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise SemiarError(f"model {self.name} has no chat template; drop --chat")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_prompt(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise SemiarError("the prompt is empty")
        if n_prompt >= self.context_length:
            raise ContextLengthError(
                f"prompt has {n_prompt} tokens but {self.name} has a context of {self.context_length}; "
                "shorten the prompt")


def resolve_model_dir(spec: str, progress: bool = True) -> tuple[str, Path]:
    """Map a user's model name/path/hub id to (display name, dense HF-format directory)."""
    from . import registry

    if spec in registry.KNOWN_MODELS:
        return spec, registry.ensure_model(spec, progress=progress)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelFileError(f"GGUF file not found: {path}")
        return path.stem, registry.dense_dir_for_gguf(path, progress=progress)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFileError(f"{path} is not a model directory: it has no config.json")
        return path.name, path
    if "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        return spec, _hub_snapshot(spec)
    known = ", ".join(registry.KNOWN_MODELS)
    raise UnknownModelError(
        f"unknown model {spec!r}: not a known name ({known}), a .gguf file, a model directory or a hub id")


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:
            if offline:
                raise
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network refused, not in cache, gated, ...
        raise UnknownModelError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}); use a known name, a local .gguf or a model directory") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"no *.safetensors weights in {path}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"weight file {f} is corrupt or truncated ({e}); re-pull or re-convert it") from None
    return sd


def load_hf_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"cannot read {path / 'config.json'}: {e}") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelFileError(f"cannot load the tokenizer in {path}: {e}") from None


def eos_ids_of(path: Path, hf_config: dict, tokenizer) -> set[int]:
    ids: set[int] = set()

    def add(v):
        if v is None:
            return
        ids.update(v if isinstance(v, (list, tuple)) else [v])

    add(hf_config.get("eos_token_id"))
    gen = path / "generation_config.json"
    if gen.exists():
        try:
            add(json.loads(gen.read_text()).get("eos_token_id"))
        except json.JSONDecodeError:
            pass
    add(getattr(tokenizer, "eos_token_id", None))
    return ids


def load_model(spec: str, device: str = "cpu", dtype: Optional[str | torch.dtype] = None,
               backend: str = "native", progress: bool = True, pack: bool = True,
               cuda_graphs: Optional[bool] = None, graph_capacity: int = 2048,
               compile: bool = False) -> LoadedModel:
    """Load a model by name, GGUF path, HF directory or hub id.

    backend="native" uses semiar's own decoder (static KV cache, tree masks);
    backend="hf" wraps transformers' AutoModelForCausalLM behind the same interface (slower).
    pack: on CPU, prepack linear weights for oneDNN (see `Decoder.pack_for_cpu`); inference only.
    cuda_graphs: on CUDA (native backend), replay forwards of up to 64 tokens as CUDA graphs over a
        static cache of `graph_capacity` positions (default on; False turns it off); compile=True
        compiles the forward with torch.compile first (see `models.cuda.graphs`).
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SemiarError("--device cuda was asked for but CUDA is not available on this machine")
    dt = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    name, path = resolve_model_dir(spec, progress=progress)
    hf_config = load_hf_config(path)
    model_type = hf_config.get("model_type")
    tokenizer = load_tokenizer(path)
    if backend == "hf":
        from .hf_adapter import HFDecoder

        decoder = HFDecoder.from_pretrained(path, dtype=dt, device=device)
        cfg = DecoderConfig.from_hf(hf_config)
    elif backend == "native":
        if model_type not in SUPPORTED_TYPES:
            raise SemiarError(
                f"model type {model_type!r} is not supported by the native decoder "
                f"({', '.join(SUPPORTED_TYPES)}); try backend='hf'")
        cfg = DecoderConfig.from_hf(hf_config)
        with torch.device("meta"):
            decoder = Decoder(cfg)
        sd = _load_weights(path)
        try:
            decoder = decoder.to_empty(device="cpu").to(dt)
            decoder.load_hf_state_dict(sd)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"weights in {path} do not match its config.json: {e}") from None
        from .decoder import rope_inv_freq

        decoder.inv_freq = rope_inv_freq(cfg)  # was built on the meta device with the modules
        decoder = decoder.to(device).eval()
        if pack and decoder.device.type == "cpu" and cpu_packing_available():
            # the weights still live in safetensors' memory map of the file; the tensors that stay
            # dense (the embedding) would keep the whole 7 GB map resident next to the packed
            # copies, so own them first (the packed copies replace the rest). Owning only what
            # stays dense, after packing, copies less but peaks higher: 20 vs 14 GB for the 1.5B
            # when the dense one-row kernel is kept
            with torch.no_grad():
                for prm in decoder.parameters():
                    prm.data = prm.data.clone()
            decoder.pack_for_cpu()
    else:
        raise SemiarError(f"unknown backend {backend!r}; use native or hf")
    runner = decoder
    if backend == "native" and str(device).startswith("cuda") and cuda_graphs is not False:
        from .cuda.graphs import GraphedDecoder

        runner = GraphedDecoder(decoder, capacity=min(graph_capacity, cfg.max_position_embeddings + 128),
                                compile=compile)
    return LoadedModel(name=name, path=path, decoder=decoder, tokenizer=tokenizer, config=cfg,
                       eos_ids=eos_ids_of(path, hf_config, tokenizer), runner=runner)

