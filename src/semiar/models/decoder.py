"""Native decoder for the Llama / Qwen2 / SmolLM2 family, in plain PyTorch.

One forward serves every decoding method: it appends a block of T new tokens to a preallocated
KV cache, with explicit position ids and an optional attention mask among the new tokens (a token
tree for verification), and returns logits for the positions asked for. The engine then keeps
only the accepted positions with `KVCache.keep`.

Example:
    >>> import torch
    >>> from semiar.models.decoder import Decoder, DecoderConfig
    >>> cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    ...                     num_heads=4, num_kv_heads=2)
    >>> model = Decoder(cfg).eval()
    >>> cache = model.new_cache(capacity=16)
    >>> out = model(torch.tensor([[1, 2, 3]]), cache)
    >>> out.logits.shape, cache.length
    (torch.Size([1, 3, 64]), 3)

The static seam. The GPU execution path (`models.cuda`: CUDA graphs, fused Triton kernels, the
one-row kernel) builds on this module through these public names only, and this module imports
nothing of it:
- `Decoder.forward_rows`, the fixed-shape forward of a batch with a mask per row (batched decoding
  for training data, `train.data`);
- `Decoder.forward_static`, the forward with every shape fixed, and the three pieces it runs
  (`static_prologue`, `call_layer`, `static_epilogue`), which `Decoder.static_fns` may replace by
  compiled versions of the same functions;
- three hooks a kernel installs and this module calls where set (None: the plain PyTorch path):
  `Decoder.row_layer(layer, x, cos, sin, k_cache, v_cache, slots, mask) -> x`, a whole layer for
  one-token fixed-shape forwards; `Attention.block_kernel(q, k_cache, v_cache, slots, mask)` and
  `MLP.block_kernel(x, norm, gate_up_weight, slots, mask)` for fixed-shape blocks, each returning
  its piece's output (attention `[1, T, heads * head_dim]`, the SwiGLU activation `[1, T, inter]`),
  or None where it does not serve the block;
- `HostStage`, `KVCache.over` and `input_device` for the runners that replay over a static cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False  # bias on q, k, v (Qwen2 has it)
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict) -> "DecoderConfig":
        """Build from a Hugging Face `config.json` dict (llama, qwen2, smollm families)."""
        model_type = hf.get("model_type", "llama")
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        rope_theta = hf.get("rope_theta")
        rope_scaling = hf.get("rope_scaling")
        rope_params = hf.get("rope_parameters")  # transformers 5 moves rope settings here
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta or 10000.0,
            rope_scaling=rope_scaling,
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class HostStage:
    """A reusable host buffer for small host-to-device copies that do not stop the host: on CUDA it is
    pinned and copied asynchronously, and an event recorded after each copy guards the next write
    (`ready()` waits for it, usually long done); elsewhere a plain buffer and copy. A copy from
    ordinary (pageable) memory, or `torch.tensor(..., device="cuda")`, waits for the GPU to finish
    everything queued before it: a host sync in the decode loop."""

    def __init__(self, n: int, dtype: torch.dtype, device):
        self.device = torch.device(device)
        pinned = self.device.type == "cuda" and torch.cuda.is_available()
        self.host = torch.empty(n, dtype=dtype, pin_memory=pinned)
        self.event = torch.cuda.Event() if pinned else None

    def ready(self) -> torch.Tensor:
        """The host buffer, once the last copy out of it has run (fill it, then `copy_to`)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host

    def copy_to(self, out: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
        """Copy the buffer's first n elements (default: out's size) into `out` on the device."""
        n = out.numel() if n is None else n
        out.view(-1)[:n].copy_(self.host[:n], non_blocking=self.event is not None)
        if self.event is not None:  # on the stream the copy went to (the device's current one)
            self.event.record(torch.cuda.current_stream(out.device))
        return out


def input_device(runner) -> torch.device:
    """Where a caller should build a forward's inputs (ids, positions, tree mask) for `runner` (a
    `Decoder` or anything with its call signature): the host for a runner that says
    `accepts_host_inputs` (a CUDA-graph runner copies them into its buffers in one or two
    transfers), else the runner's device."""
    return torch.device("cpu") if getattr(runner, "accepts_host_inputs", False) else runner.device


class KVCache:
    """Preallocated key/value cache: `[layers, batch, kv_heads, capacity, head_dim]`.

    `length` positions are valid. A forward appends its block at `[length, length + T)`;
    `keep(start, idx)` then compacts the block so only the selected positions remain
    (the accepted path of a token tree), and `truncate(n)` drops everything after n.
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, capacity, dtype, device, batch=1):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0
        self._stage: Optional[HostStage] = None  # the keep index's host buffer, made at first use

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """An empty cache on existing storage (a CUDA-graph runner's static cache)."""
        c = cls.__new__(cls)
        c.k, c.v, c.capacity, c.length, c._stage = k, v, k.shape[3], 0, None
        return c

    def keep(self, start: int, keep_idx: list[int]) -> None:
        """Keep the positions `start + i` for i in keep_idx (ascending), packed at `start`. The
        index goes over without stopping the host (`HostStage`): the copy and the gather queue
        behind the forward on the GPU."""
        n = len(keep_idx)
        if list(keep_idx) != list(range(n)):
            if self._stage is None or self._stage.host.numel() < n:
                self._stage = HostStage(max(n, 256), torch.long, self.k.device)
            host = self._stage.ready()
            host[:n] = torch.as_tensor(keep_idx, dtype=torch.long) + start
            idx = self._stage.copy_to(torch.empty(n, dtype=torch.long, device=self.k.device))
            self.k[:, :, :, start:start + n] = self.k.index_select(3, idx)
            self.v[:, :, :, start:start + n] = self.v.index_select(3, idx)
        self.length = start + n

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def ensure(self, capacity: int, slack: int = 1024) -> "KVCache":
        """This cache if it holds `capacity` positions, else a larger copy (valid part kept)."""
        if capacity <= self.capacity:
            return self
        L, B, H, _, D = self.k.shape
        new = KVCache(L, H, D, capacity + slack, self.k.dtype, self.k.device, B)
        new.k[:, :, :, :self.length] = self.k[:, :, :, :self.length]
        new.v[:, :, :, :self.length] = self.v[:, :, :, :self.length]
        new.length = self.length
        return new


class RMSNorm(nn.Module):
    #: sum each row's squares in float64 (the quantized path, models.quant): a row's result then does
    #: not depend on how many rows the forward holds (fp32 sums may split one row across threads)
    row_exact = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        if dtype != torch.float32:  # no-op conversions still cost a dispatch each (57 norms a 1.5B step)
            x = x.float()
        if self.row_exact:
            ms = x.double().pow(2).mean(-1, keepdim=True).float()
        else:
            ms = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(ms + self.eps)
        return self.weight * (x if dtype == torch.float32 else x.to(dtype))


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """Inverse frequencies, with the scaling types the family uses (none, linear, llama3)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(is_mid, mid, scaled)
    elif kind not in (None, "default"):
        raise NotImplementedError(f"rope scaling type {kind!r} is not supported by the native decoder")
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, head_dim] for position ids [B, T] (computed in fp32)."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def cpu_packing_available() -> bool:
    """oneDNN weight prepacking (x86 CPUs): a linear layer then costs about the same for 1 token
    as for 16, which is what cheap tree verification needs; plain MKL sgemm for 2-16 rows was
    measured here at 2-3x the cost of one row. SEMIAR_NO_PACK=1 turns it off."""
    import os

    return (os.environ.get("SEMIAR_NO_PACK", "0") in ("0", "")
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """A frozen nn.Linear prepacked for oneDNN on the CPU (inference only), with an optional second
    path for inputs of at most `dense_rows` rows (autoregressive and draft-model steps).

    Blocks of more rows (tree verification) take the weight packed for 8 rows: measured on this
    project's 2-core x86 machines, a 1.5B forward over 8 tokens then costs ~1.0-1.4x one token
    instead of 3x with MKL's dense sgemm. Which kernel is fastest for ONE row depends on the
    processor: MKL's dense sgemv won on the first (Intel) machine (1.5B step 208 vs 233 ms packed
    for 8); on a later AMD EPYC one the 8-row packing itself was fastest for one row (90 ms, 130
    packed for one row, 297 dense). `small` picks the second path: "dense" keeps the dense weight
    (also what transformers' peers share), "packed1" a copy packed for one row; with
    dense_rows=0 there is none (one copy of the weights). `Decoder.pack_for_cpu` times the three
    on the model's largest layer."""

    PACK_ROWS = 8

    def __init__(self, linear: nn.Linear, dense_rows: int = 2, small: str = "dense"):
        super().__init__()
        if small not in ("dense", "packed1"):
            raise ValueError(f"small must be 'dense' or 'packed1', got {small!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, self.PACK_ROWS)
        self.small = small if dense_rows > 0 else None
        self.weight = w if self.small == "dense" else None  # the dense weight, when kept
        self.packed1 = torch.ops.mkldnn._reorder_linear_weight(w, 1) if self.small == "packed1" else None
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.dense_rows = dense_rows

    def forward(self, x):
        if self.small is not None and x.numel() <= self.dense_rows * self.in_features:
            if self.weight is not None:
                return F.linear(x, self.weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed1, self.bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def fastest_one_row_kernel(linear: nn.Linear, reps: int = 5) -> str:
    """'dense', 'packed1' or 'packed8': the fastest kernel here for one row times this weight
    (MKL's dense sgemv, oneDNN's weight packed for 1 or for 8 rows; best of `reps` after a
    warm-up, interleaved; a packed kernel must win by 10 % over dense, packed1 by 10 % over
    packed8). SEMIAR_ONE_ROW=dense|packed1|packed8 decides without timing."""
    import os
    import time

    forced = os.environ.get("SEMIAR_ONE_ROW", "")
    if forced in ("dense", "packed1", "packed8"):
        return forced
    if forced:
        import warnings

        warnings.warn(f"SEMIAR_ONE_ROW={forced!r} is not dense, packed1 or packed8; timing the kernels instead",
                      stacklevel=3)
    w = linear.weight.detach()
    x = torch.randn(1, w.shape[1], dtype=w.dtype)
    p1 = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    p8 = torch.ops.mkldnn._reorder_linear_weight(w, PackedLinear.PACK_ROWS)
    kernels = {"dense": lambda: F.linear(x, w),
               "packed1": lambda: torch.ops.mkldnn._linear_pointwise(x, p1, None, "none", [], ""),
               "packed8": lambda: torch.ops.mkldnn._linear_pointwise(x, p8, None, "none", [], "")}
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(reps + 1):
        for name, fn in kernels.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    packed = "packed1" if best["packed1"] < 0.9 * best["packed8"] else "packed8"
    return packed if best[packed] < 0.9 * best["dense"] else "dense"


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    #: static path (CUDA graphs) through SDPA instead of explicit matmuls; for measurements
    static_sdpa = False
    #: attention in float64, explicit matmuls (the quantized path, models.quant): fp32 kernels for one
    #: query row and for a block differ in the last bits, which the next layer's bf16 activations
    #: turn into different tokens at near-ties; float64 differences vanish in the cast back to fp32
    row_exact = False

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k, v in one matmul: one weight read per step instead of three launches
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.h + 2 * self.kvh) * self.d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        #: fn(q, k_cache, v_cache, slots, mask) -> [B, T, h * d] or None: the attention of fixed-shape
        #: blocks, where a kernel is installed (models.cuda.fused.install_block_attention); see the module doc
        self.block_kernel = None

    def forward(self, x, cos, sin, k_cache, v_cache, start, mask):
        # x: [B, T, hidden]; cos/sin: [B, T, d]; k_cache/v_cache: [B, kvh, capacity, d]
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        nqk = (self.h + self.kvh) * self.d
        # q and k rotated together: one rope instead of two (a one-token CPU step is op-bound)
        qk = qkv[..., :nqk].view(B, T, self.h + self.kvh, self.d).transpose(1, 2)
        qk = qk * cos.unsqueeze(1) + rotate_half(qk) * sin.unsqueeze(1)
        q, k = qk.split([self.h, self.kvh], dim=1)  # [B, h, T, d], [B, kvh, T, d]
        v = qkv[..., nqk:].view(B, T, self.kvh, self.d).transpose(1, 2)
        if k_cache is None:  # training: the whole sequence at once, nothing cached
            keys, values = k, v
        elif isinstance(start, torch.Tensor):
            # static shapes (CUDA graphs): `start` holds the T cache slots to write, and the
            # block attends over the first W slots under a [T, W] mask (W: a fixed window)
            k_cache.index_copy_(2, start, k)
            v_cache.index_copy_(2, start, v)
            W = mask.shape[-1]
            keys, values = k_cache[:, :, :W], v_cache[:, :, :W]
        else:
            end = start + T
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        if self.block_kernel is not None and isinstance(start, torch.Tensor):
            out = self.block_kernel(q, k_cache, v_cache, start, mask)  # e.g. over the filled slots only
            if out is not None:
                return self.o_proj(out)
        # GQA without copying K/V: fold the query group into the row dimension.
        g = self.h // self.kvh
        q = q.reshape(B, self.kvh, g * T, self.d)  # [B, kvh, g*T, d]
        if mask is not None and g > 1 and T > 1:
            # [T, end] -> [g*T, end]; per-row masks [B, 1, T, end] -> [B, 1, g*T, end] (one query row
            # per token: the mask's [.., 1, end] broadcasts over the group as it is)
            mask = mask.repeat(g, 1) if mask.dim() == 2 else mask.repeat(1, 1, g, 1)
        if self.row_exact:
            scores = torch.matmul(q.double(), keys.double().transpose(-1, -2)) * (1.0 / math.sqrt(self.d))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.softmax(-1), values.double()).to(q.dtype)
        elif isinstance(start, torch.Tensor) and not self.static_sdpa:
            # a few query rows over the whole static capacity: explicit matmuls spread the keys
            # over the GPU, where SDPA's fused kernels gave a few thread blocks a long serial loop
            # (measured: a 1.5B decode step 4.8 ms with SDPA over 2048 slots)
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * (1.0 / math.sqrt(self.d))
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.matmul(scores.softmax(-1).to(values.dtype), values)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.reshape(B, self.h, T, self.d).transpose(1, 2).reshape(B, T, self.h * self.d)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        #: fn(x, norm, gate_up_weight, slots, mask) -> silu(gate) * up of norm(x), or None: the first half
        #: of fixed-shape blocks, where a kernel is installed (models.cuda.fused.install_block_mlp)
        self.block_kernel = None

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, k_cache, v_cache, start, mask):
        x, d = self.forward_deferred(x, None, cos, sin, k_cache, v_cache, start, mask)
        return x + d

    def forward_deferred(self, x, d, cos, sin, k_cache, v_cache, start, mask):
        """The layer with its last residual add left to the caller: takes the previous layer's (x, d)
        (d None for the first) and returns its own, where x + d is the layer's output. Compiled one
        layer at a time, the add then fuses into the next layer's norm kernel instead of being one."""
        if d is not None:
            x = x + d
        a = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask)
        x = x + a
        if self.mlp.block_kernel is not None and isinstance(start, torch.Tensor):
            act = self.mlp.block_kernel(x, self.post_attention_layernorm, self.mlp.gate_up_proj.weight, start, mask)
            if act is not None:
                return x, self.mlp.down_proj(act)
        return x, self.mlp(self.post_attention_layernorm(x))


def call_layer(layer, x, d, cos, sin, k_cache, v_cache, start, mask):
    """One decoder layer as a free function, its last residual add deferred (`Layer.forward_deferred`):
    compiled once (`torch.compile(call_layer)`), it serves every layer of the same shapes, since the
    module's weights are inputs, not constants."""
    return layer.forward_deferred(x, d, cos, sin, k_cache, v_cache, start, mask)


def static_prologue(embed, inv_freq, input_ids, positions, start, block_mask, capacity: int):
    """What a fixed-shape forward does before the layers: the [S, capacity] attention mask from
    the cache length (the cached prefix, then the block's own mask at its slots), the slots the
    block writes, the rotary tables and the embeddings. Free of the decoder so it compiles alone."""
    S = input_ids.shape[1]
    cols = torch.arange(capacity, device=input_ids.device)
    rel = cols - start
    in_block = (rel >= 0) & (rel < S)
    mask = (cols < start).unsqueeze(0) | (block_mask[:, rel.clamp(0, S - 1)] & in_block)  # [S, cap]
    slots = start + torch.arange(S, device=input_ids.device)
    x = embed(input_ids)
    cos, sin = rope_cos_sin(inv_freq, positions, x.dtype)
    return x, cos, sin, slots, mask


def static_epilogue(norm, lm_head, x, d=None):
    """The last layer's residual add (d, when deferred), the final norm and the LM head of a
    fixed-shape forward: (logits fp32, normed features)."""
    x = norm(x if d is None else x + d)
    return lm_head(x).float(), x


@dataclass
class DecoderOutput:
    logits: Optional[torch.Tensor]  # [B, n, vocab] for the positions asked for
    hidden: Optional[torch.Tensor] = None  # [B, T, hidden], final-norm features of every new token


class Decoder(nn.Module):
    """Llama/Qwen2-family decoder with a tree-capable preallocated KV cache."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # kept in fp32 and off the module's buffers so .to(bf16) cannot round the frequencies
        self.inv_freq = rope_inv_freq(cfg)
        #: (prologue, layer, epilogue) that `forward_static` runs: compiled versions of
        #: `static_prologue`, `call_layer`, `static_epilogue` (models.cuda.graphs), or None for those
        self.static_fns = None
        #: how 1-2 row inputs multiply on the CPU after `pack_for_cpu` ("dense", "packed1", "packed8"), else None
        self.one_row_kernel = None
        #: on CUDA: per weight shape, whether one-row products use the Triton kernel (models.cuda.gemv.install)
        self.gpu_row_kernel = {}
        #: fn(layer, x, cos, sin, k_cache, v_cache, slots, mask) -> x: the layer of one-token fixed-shape
        #: forwards, where a kernel is installed (five fused Triton kernels: models.cuda.fused.install)
        self.row_layer = None
        #: fixed-shape forwards of the compiled layer defer each layer's last residual add into the
        #: next layer (`Layer.forward_deferred`); False: each layer adds its own (for measurements)
        self.defer_residual = True

    # from the final norm, which every weight format keeps dense (the quantized embedding has no .weight)
    @property
    def device(self):
        return self.norm.weight.device

    @property
    def dtype(self):
        return self.norm.weight.dtype

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity, self.dtype, self.device, batch)

    def _inv_freq_on(self, device) -> torch.Tensor:
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def _rope(self, positions):
        return rope_cos_sin(self._inv_freq_on(positions.device), positions, self.dtype)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        positions: Optional[torch.Tensor] = None,
        tree_mask: Optional[torch.Tensor] = None,
        logits_at: Optional[torch.Tensor | slice] = None,
        return_hidden: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> DecoderOutput:
        """Append `input_ids` [B, T] to `cache` and return logits.

        positions: [B, T] position ids (default: cache.length + arange(T)).
        tree_mask: [T, T] bool, True where new token i may attend to new token j (default causal);
            every new token also sees the whole cached prefix. Or [T, length + T]: a full mask,
            for drafters that grow a tree level by level inside their own cache.
        logits_at: indices/slice into the T new tokens to compute logits for (default all);
            the LM head is the single largest matmul, so callers ask only for what they use.
        attn_mask: [B, T, length + T] bool, a mask per batch row (left-padded batches); overrides
            tree_mask.
        """
        B, T = input_ids.shape
        start = cache.length
        end = start + T
        if end > cache.capacity:
            raise ValueError(f"KV cache overflow: {end} > capacity {cache.capacity}")
        if positions is None:
            positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0).expand(B, T)
        mask = None
        if attn_mask is not None:
            mask = attn_mask.unsqueeze(1)  # [B, 1, T, end], broadcast over kv heads
        elif tree_mask is not None and tree_mask.shape[1] == end:
            mask = tree_mask  # a full mask over prefix + block (trees grown inside a cache)
        elif tree_mask is not None:
            mask = torch.ones(T, end, dtype=torch.bool, device=input_ids.device)
            mask[:, start:] = tree_mask
        elif T > 1:
            mask = torch.ones(T, end, dtype=torch.bool, device=input_ids.device)
            mask[:, start:] = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        cos, sin = self._rope(positions)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], start, mask)
        cache.length = end
        x = self.norm(x)
        hidden = x if return_hidden else None
        logits = self.lm_head(x if logits_at is None else x[:, logits_at])
        return DecoderOutput(logits=logits.float(), hidden=hidden)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T, hidden] final-norm features of one causal pass without a cache
        (teacher forcing for drafter training; right padding cannot reach the real tokens)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        cos, sin = self._rope(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, None, None, 0, mask)
        return self.norm(x)

    @torch.no_grad()
    def forward_static(self, input_ids: torch.Tensor, positions: torch.Tensor, start: torch.Tensor,
                       block_mask: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       window: Optional[int] = None):
        """The forward with every shape fixed, for CUDA-graph capture (`models.cuda.graphs`).

        input_ids, positions: [1, S]; start: 0-d long tensor, the cache length before the block;
        block_mask: [S, S] bool among the block's tokens (every row must see at least itself);
        k_cache, v_cache: [layers, 1, kv_heads, capacity, head_dim], written at start..start+S;
        window: attend over the first `window` cache slots only (default all), which must hold
        start + S: attention then reads window, not capacity, keys per layer.
        Returns (logits [1, S, vocab] fp32, final-norm hidden [1, S, hidden])."""
        prologue, layer_fn, epilogue = self.static_fns or (static_prologue, call_layer, static_epilogue)
        row_layer = self.row_layer if input_ids.shape[1] == 1 else None
        x, cos, sin, slots, mask = prologue(self.embed_tokens, self._inv_freq_on(input_ids.device), input_ids,
                                            positions, start, block_mask, window or k_cache.shape[3])
        d = None
        for i, layer in enumerate(self.layers):
            if row_layer is not None:
                x = row_layer(layer, x, cos, sin, k_cache[i], v_cache[i], slots, mask)
            else:
                x, d = layer_fn(layer, x, d, cos, sin, k_cache[i], v_cache[i], slots, mask)
                if not self.defer_residual:
                    x, d = x + d, None
        return epilogue(self.norm, self.lm_head, x, d)

    @torch.no_grad()
    def forward_rows(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     mask: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     return_hidden: bool = False):
        """The fixed-shape forward of a batch whose rows each see their own cache slots, for batched
        decoding captured as one CUDA graph (`train.data.BatchGenerator`).

        input_ids, positions: [B, T]; slots: [T] long, the cache slots the block writes (the same
        for every row); mask: [B, T, W] bool, which of the cache's first W slots each token sees
        (its own slot included); k_cache, v_cache: [layers, B, kv_heads, capacity, head_dim].
        The batch-1 hooks (`row_layer`, the block kernels) and `static_fns` are not used.
        Returns (logits [B, T, vocab] in the model's dtype, final-norm hidden [B, T, hidden] or None)."""
        x = self.embed_tokens(input_ids)
        cos, sin = self._rope(positions)
        m = mask.unsqueeze(1)  # [B, 1, T, W]: one mask for every head
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, k_cache[i], v_cache[i], slots, m)
        x = self.norm(x)
        return self.lm_head(x), (x if return_hidden else None)

    def pack_for_cpu(self, dense_rows: int = 2, small: Optional[str] = None) -> bool:
        """Replace every linear layer (lm_head included) by its oneDNN-packed form when on a CPU
        that supports it, with a second path for inputs of <= dense_rows rows (0: packed for 8
        rows only, half the memory): `small` = "dense" (the dense weight), "packed1" (packed for
        one row) or "packed8" (none: the 8-row packing serves one row too); None times the three on
        the largest layer and keeps the fastest (`PackedLinear`, `fastest_one_row_kernel`).
        The embedding stays dense. Returns whether it packed; `self.one_row_kernel` says which."""
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.bfloat16) or not cpu_packing_available():
            return False
        if small is None and dense_rows > 0:
            small = fastest_one_row_kernel(self.layers[0].mlp.gate_up_proj) if len(self.layers) else "dense"
        if small == "packed8":  # the 8-row packing is fastest for one row too: one copy serves all
            dense_rows = 0
        self.one_row_kernel = small if dense_rows > 0 else "packed8"
        # (parent, name) pairs only: holding the Linear modules themselves would keep every dense
        # weight alive until the end, three copies of the model at the peak instead of two
        slots = [(m, n) for m in self.modules() for n, c in m.named_children() if isinstance(c, nn.Linear)]
        for module, name in slots:
            setattr(module, name, PackedLinear(getattr(module, name), dense_rows,
                                               small if small in ("dense", "packed1") else "dense"))
        return True

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named weights (model.layers.N.self_attn.q_proj.weight, ...),
        fusing q/k/v and gate/up into our single projections."""
        own: dict[str, torch.Tensor] = {}
        get = lambda k: sd.pop(k)  # noqa: E731 - pop so peak memory stays ~1x the weights
        prefix = "model."
        own["embed_tokens.weight"] = get(prefix + "embed_tokens.weight")
        own["norm.weight"] = get(prefix + "norm.weight")
        for i in range(self.config.num_layers):
            p = f"{prefix}layers.{i}."
            a = p + "self_attn."
            own[f"layers.{i}.self_attn.qkv_proj.weight"] = torch.cat(
                [get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")])
            if self.config.attention_bias:
                own[f"layers.{i}.self_attn.qkv_proj.bias"] = torch.cat(
                    [get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")])
            own[f"layers.{i}.self_attn.o_proj.weight"] = get(a + "o_proj.weight")
            m = p + "mlp."
            own[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")])
            own[f"layers.{i}.mlp.down_proj.weight"] = get(m + "down_proj.weight")
            own[f"layers.{i}.input_layernorm.weight"] = get(p + "input_layernorm.weight")
            own[f"layers.{i}.post_attention_layernorm.weight"] = get(p + "post_attention_layernorm.weight")
        if not self.config.tie_word_embeddings:
            own["lm_head.weight"] = get("lm_head.weight")
        else:
            sd.pop("lm_head.weight", None)
        dtype = self.dtype
        own = {k: v.to(dtype) for k, v in own.items()}
        missing, unexpected = self.load_state_dict(own, strict=False, assign=True)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected or sd:
            raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {list(sd)[:5]}")
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
