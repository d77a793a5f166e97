"""Peers measured in the same run as our methods, through their own public APIs:
transformers `generate` (plain, assisted with a draft model, prompt lookup), llama.cpp's own
`llama-server` binary when found (`--llamacpp-bin DIR`, or on PATH) and otherwise, when installed,
llama-cpp-python. Each peer takes prompt ids and returns (new token ids, seconds)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import torch

from ..errors import InvalidArgumentError

PEERS = {
    "hf-ar": "transformers generate(), same dense weights and dtype",
    "hf-assisted": "transformers assisted generation with assistant_model=<draft model>",
    "hf-pld": "transformers prompt lookup (prompt_lookup_num_tokens=10)",
    "llamacpp": "llama.cpp on the same GGUF: its llama-server binary (--llamacpp-bin DIR or PATH), else llama-cpp-python",
    "llamacpp-pld": "llama-cpp-python with its prompt-lookup draft model (optional)",
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dense(linear) -> Optional[torch.Tensor]:
    return getattr(linear, "weight", None)


def hf_state_views(decoder) -> Optional[dict]:
    """Hugging Face-named views of our native decoder's dense weights (q/k/v and gate/up are
    row slices of our fused projections, so they are views, not copies), or None when the
    decoder keeps no dense copy (packed-only CPU weights)."""
    c = decoder.config
    sd = {"model.embed_tokens.weight": decoder.embed_tokens.weight, "model.norm.weight": decoder.norm.weight}
    lm = _dense(decoder.lm_head)
    if lm is None:
        return None
    sd["lm_head.weight"] = lm
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i, layer in enumerate(decoder.layers):
        p = f"model.layers.{i}."
        a, m = layer.self_attn, layer.mlp
        qkv, o, gu, down = _dense(a.qkv_proj), _dense(a.o_proj), _dense(m.gate_up_proj), _dense(m.down_proj)
        if any(w is None for w in (qkv, o, gu, down)):
            return None
        for name, part in zip("qkv", qkv.split([q, kv, kv])):
            sd[f"{p}self_attn.{name}_proj.weight"] = part
        if a.qkv_proj.bias is not None:
            for name, part in zip("qkv", a.qkv_proj.bias.split([q, kv, kv])):
                sd[f"{p}self_attn.{name}_proj.bias"] = part
        sd[p + "self_attn.o_proj.weight"] = o
        gate, up = gu.split(c.intermediate_size)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
        sd[p + "mlp.down_proj.weight"] = down
        sd[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    return {k: v.detach() for k, v in sd.items()}


def hf_model_for(loaded, dtype: torch.dtype):
    """transformers' model of the same checkpoint. On our native decoder it shares our dense
    weights (no second copy in memory: a CPU bench would otherwise hold the target three times);
    otherwise, or if sharing fails, it loads the checkpoint itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sd = hf_state_views(loaded.decoder) if hasattr(loaded.decoder, "layers") else None
    if sd is not None and next(iter(sd.values())).dtype == dtype:
        try:
            config = AutoConfig.from_pretrained(str(loaded.path))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
            missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
            if missing or unexpected:
                raise ValueError(f"names differ: {missing[:3]} {unexpected[:3]}")
            device = loaded.decoder.device
            # non-persistent buffers (the rotary tables) were made on the meta device: rebuild them
            for parent in list(model.modules()):
                for name, child in list(parent.named_children()):
                    if any(b.is_meta for b in child.buffers(recurse=False)):
                        setattr(parent, name, type(child)(config=config).to(device))
            if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
                raise ValueError("tensors left on the meta device")
            return model.eval()
        except Exception:  # an architecture we do not map: load the checkpoint instead
            pass
    if getattr(loaded, "gguf", None) is not None:  # a q4 target: transformers runs the dense weights
        from ..models.gguf import ensure_dense_weights

        ensure_dense_weights(loaded.path, loaded.gguf, progress=False)
    return AutoModelForCausalLM.from_pretrained(str(loaded.path), dtype=dtype).to(loaded.decoder.device).eval()


class HFPeer:
    """transformers generate() on the same dense weights our native decoder loads (shared with it
    when possible: see `hf_model_for`)."""

    def __init__(self, name: str, target, device: str, dtype: torch.dtype, eos_ids,
                 draft=None, sampling=None):
        self.name = name
        self.model = hf_model_for(target, dtype)
        self.assistant = None
        if name == "hf-assisted":
            if draft is None:
                raise InvalidArgumentError("peer hf-assisted needs --draft-model")
            self.assistant = hf_model_for(draft, dtype)
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


def find_llama_server(bin_dir: Optional[str] = None) -> Optional[Path]:
    """llama.cpp's `llama-server` in bin_dir (or bin_dir/bin), else on PATH; None when absent.
    A bin_dir without one is an error the user can act on."""
    if bin_dir:
        for cand in (Path(bin_dir) / "llama-server", Path(bin_dir) / "bin" / "llama-server"):
            if cand.is_file() and os.access(cand, os.X_OK):
                return cand
        raise InvalidArgumentError(f"--llamacpp-bin {bin_dir}: no executable llama-server there (or in its bin/); "
                                   "build llama.cpp (docs/bench.md) and pass its build/bin directory")
    found = shutil.which("llama-server")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServerPeer:
    """llama.cpp's own `llama-server` on the GGUF, given our prompt ids (chat template already applied)
    through /completion, greedy (top-k 1), prompt cache off, stopping at its end-of-generation token
    or the budget. Seconds are the server's own prompt + generation times (no HTTP in them);
    `last_prefill_seconds` keeps the prompt's part of the last run (for decode-only tokens/s)."""

    def __init__(self, name: str, server: Path, gguf_path, threads: int, n_ctx: int = 4096,
                 start_timeout: float = 180.0):
        self.name, self.port = name, _free_port()
        self.last_prefill_seconds: Optional[float] = None
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(server), "-m", str(gguf_path), "-t", str(threads), "-tb", str(threads), "-c", str(n_ctx),
               "--host", "127.0.0.1", "--port", str(self.port), "-np", "1", "--no-webui"]
        self.log = tempfile.TemporaryFile()  # its output, quoted when it fails to start
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise InvalidArgumentError(f"llama-server exited with code {self.proc.returncode} at start "
                                           f"({' '.join(cmd)}): {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise InvalidArgumentError(f"llama-server did not come up within {start_timeout:.0f} s")
            time.sleep(0.2)

    def run(self, prompt_ids: list[int], max_new_tokens: int, seed: int) -> tuple[list[int], float]:
        body = {"prompt": list(prompt_ids), "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True, "seed": seed}
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=3600) as r:
            out = json.loads(r.read())
        wall = time.perf_counter() - t0
        t = out.get("timings") or {}
        secs = (t.get("prompt_ms", 0.0) + t.get("predicted_ms", 0.0)) / 1e3 if t else wall
        self.last_prefill_seconds = t["prompt_ms"] / 1e3 if "prompt_ms" in t else None
        return [int(x) for x in out.get("tokens", [])], secs

    def _log_tail(self, n: int = 600) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:].strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
