"""Peers measured in the same run as our methods, through their own public APIs:
transformers `generate` (plain, assisted with a draft model, prompt lookup) and, when installed,
llama-cpp-python. Each peer takes prompt ids and returns (new token ids, seconds)."""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..errors import InvalidArgumentError

PEERS = {
    "hf-ar": "transformers generate(), same dense weights and dtype",
    "hf-assisted": "transformers assisted generation with assistant_model=<draft model>",
    "hf-pld": "transformers prompt lookup (prompt_lookup_num_tokens=10)",
    "llamacpp": "llama-cpp-python on the GGUF (optional)",
    "llamacpp-pld": "llama-cpp-python with its prompt-lookup draft model (optional)",
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFPeer:
    """transformers generate() on the same dense weights our native decoder loads."""

    def __init__(self, name: str, target_path, device: str, dtype: torch.dtype, eos_ids,
                 draft_path=None, sampling=None):
        from transformers import AutoModelForCausalLM

        self.name = name
        self.model = AutoModelForCausalLM.from_pretrained(str(target_path), dtype=dtype).to(device).eval()
        self.assistant = None
        if name == "hf-assisted":
            if draft_path is None:
                raise InvalidArgumentError("peer hf-assisted needs --draft-model")
            self.assistant = AutoModelForCausalLM.from_pretrained(str(draft_path), dtype=dtype).to(device).eval()
        self.eos = sorted(eos_ids)
        self.sampling = sampling

    def run(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> tuple[list[int], float]:
        device = self.model.device
        ids = torch.tensor([prompt_ids], device=device)
        kw = dict(max_new_tokens=max_new_tokens, eos_token_id=self.eos or None, pad_token_id=self.eos[0] if self.eos else 0,
                  attention_mask=torch.ones_like(ids))
        s = self.sampling
        if s is None or s.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
            torch.manual_seed(seed)
        if self.name == "hf-assisted":
            kw["assistant_model"] = self.assistant
        elif self.name == "hf-pld":
            kw["prompt_lookup_num_tokens"] = 10
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, **kw)
        _sync(device)
        return out[0, len(prompt_ids):].tolist(), time.perf_counter() - t0


class LlamaCppPeer:
    def __init__(self, name: str, gguf_path, threads: int, n_ctx: int = 4096):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise InvalidArgumentError(f"peer {name} needs llama-cpp-python (pip install llama-cpp-python)") from None
        kw = {}
        if name == "llamacpp-pld":
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=10)
        self.name = name
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, verbose=False, **kw)

    def run(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> tuple[list[int], float]:
        out: list[int] = []
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            if self.llm.token_eos() == tok:
                out.append(tok)
                break
            out.append(tok)
            if len(out) >= max_new_tokens:
                break
        return out, time.perf_counter() - t0


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
