"""Resolve what a user names as a model and load it as a target (or draft) model.

A model can be a known name (`semiar models list`), a local `.gguf` file, a local Hugging Face
format directory (config.json + safetensors + tokenizer), or a hub id already in the HF cache.
Every route ends in an HF-format directory (config, tokenizer). On the CPU a GGUF runs as its
quantized weights (`--dtype q4`, the default there: `models.quant`, repacked once and cached beside
it); a dense dtype (fp32, bf16) reads dense fp32 safetensors, written from the GGUF on first use.

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
from .quant import quant_available

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def default_dtype(device: str) -> torch.dtype:
    """The dense default: bf16 on CUDA, fp32 on the CPU (a GGUF on the CPU runs as q4 instead:
    `load_model`). bf16 on a CPU with native bf16 (AVX512-BF16, AMX) is faster
    (`--dtype bf16`: a qwen2.5-coder-1.5b step 1.7-1.9x faster on an AMD EPYC, docs/models.md), but bf16's rounding
    differs between the kernels for one row and for a block, so greedy speculative output then
    departs from greedy `ar` at near-ties (SmolLM2 in bf16: 10 such cases over 6 prompts), as it
    does on GPUs; fp32 keeps them identical, so it stays the CPU default."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


QUANT = "q4"  # the dtype name of the quantized path (models.quant)


def parse_dtype(name: Optional[str], device: str):
    """A torch dtype for a dense dtype name, "q4" for the quantized path; None/auto: the dense default."""
    if name in (None, "auto"):
        return default_dtype(device)
    if name == QUANT:
        return QUANT
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise SemiarError(f"unknown dtype {name!r}; use one of q4, fp32, bf16, fp16, auto")
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
    #: the GGUF the model came from, when it came from one
    gguf: Optional[Path] = None
    #: the weights' format: "q4" (quantized, models.quant) or a dense torch dtype's name ("float32", ...)
    weights: str = ""

    def __post_init__(self):
        if self.runner is None:
            self.runner = self.decoder
        if not self.weights:
            self.weights = str(self.decoder.dtype).replace("torch.", "")

    @property
    def dtype_spec(self) -> Optional[torch.dtype]:
        """What to pass as `load_model(dtype=...)` for a draft model beside this one: a dense
        model's dtype; for a q4 model None, the draft's own default (q4 for a GGUF on the CPU)."""
        return None if self.weights == QUANT else self.dtype

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
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return self.encode_messages(messages)
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(ids)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation ({"role", "content"} dicts) through the chat template, ending
        where the assistant's next answer begins."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise SemiarError(f"model {self.name} has no chat template; drop --chat")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
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


def resolve_model_source(spec: str, progress: bool = True) -> tuple[str, Path, Optional[Path]]:
    """Map a user's model name/path/hub id to (display name, HF-format directory, the GGUF it
    comes from or None). The directory may lack dense weights (`resolve_model_dir` has them)."""
    from . import registry
    from .gguf import source_of

    if spec in registry.KNOWN_MODELS:
        return spec, registry.ensure_model(spec, progress=progress), registry.gguf_path(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelFileError(f"GGUF file not found: {path}")
        return path.stem, registry.dense_dir_for_gguf(path, progress=progress), path.resolve()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelFileError(f"{path} is not a model directory: it has no config.json")
        return path.name, path, source_of(path)
    return spec, resolve_model_dir(spec, progress)[1], None


def resolve_model_dir(spec: str, progress: bool = True) -> tuple[str, Path]:
    """Map a user's model name/path/hub id to (display name, dense HF-format directory); a GGUF's
    dense fp32 weights are written on first use."""
    from . import registry
    from .gguf import ensure_dense_weights, has_dense_weights

    path = Path(spec).expanduser()
    if spec in registry.KNOWN_MODELS or path.suffix == ".gguf" or path.is_file() or path.is_dir():
        name, out, src = resolve_model_source(spec, progress)
        if not has_dense_weights(out) and src is not None:
            ensure_dense_weights(out, src, progress=progress)
        return name, out
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

    from .quant import CACHE_NAME, cache_name

    files = sorted(f for f in path.glob("*.safetensors") if f.name not in (CACHE_NAME, cache_name("vnni")))
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


def peek_tokenizer(spec: "str | LoadedModel", progress: bool = True) -> tuple[str, object]:
    """(name, tokenizer) of a model without loading its weights: a second or two, where the weights
    of a 1.5B take ~20 s and 14 GB; for checks that must come before the big load."""
    if isinstance(spec, LoadedModel):
        return spec.name, spec.tokenizer
    # the source, not the dense directory: for a GGUF that wrote (and dequantised) the fp32 weights
    # just to read a tokenizer (a q4 bench of the Qwen pair peaked at 8.9 GB RSS and wrote 9.6 GB)
    name, path, _ = resolve_model_source(spec, progress=progress)
    return name, load_tokenizer(path)


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

    dtype: "q4" runs a GGUF's quantized weights on the CPU (`models.quant`; the default there for
        a GGUF), a dense dtype (fp32, bf16, fp16 or a torch dtype) dense weights; None/"auto": q4 for a
        GGUF on the CPU, fp32 for other CPU models, bf16 on CUDA.
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
    name, path, gguf_file = resolve_model_source(spec, progress=progress)
    on_cpu = not str(device).startswith("cuda")
    if dtype in (None, "auto") and on_cpu and gguf_file is not None and backend == "native" and quant_available():
        dt = QUANT  # the GGUF's own quantized weights: the CPU default for a GGUF
    if dt == QUANT:
        if gguf_file is None:
            raise SemiarError(f"--dtype q4 runs a GGUF's quantized weights; {spec!r} is not a GGUF model "
                              "(use fp32 or bf16)")
        if not on_cpu:
            raise SemiarError("--dtype q4 runs on the CPU only; on CUDA use bf16 (the default there)")
        if backend != "native":
            raise SemiarError("--dtype q4 needs the native backend")
        if not quant_available():
            raise SemiarError("this torch build lacks the int4 CPU kernels --dtype q4 needs; use --dtype fp32")
    elif gguf_file is not None:
        from .gguf import ensure_dense_weights

        ensure_dense_weights(path, gguf_file, progress=progress)
    hf_config = load_hf_config(path)
    model_type = hf_config.get("model_type")
    tokenizer = load_tokenizer(path)
    if dt == QUANT:
        from .quant import ensure_quant_cache, load_quant_decoder

        cfg = DecoderConfig.from_hf(hf_config)
        if model_type not in SUPPORTED_TYPES:
            raise SemiarError(f"model type {model_type!r} is not supported by the native decoder")
        decoder = load_quant_decoder(cfg, ensure_quant_cache(gguf_file, path, progress=progress))
    elif backend == "hf":
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
                       eos_ids=eos_ids_of(path, hf_config, tokenizer), runner=runner, gguf=gguf_file,
                       weights=QUANT if dt == QUANT else "")

