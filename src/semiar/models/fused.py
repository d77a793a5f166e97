"""A decode step's layer as five Triton kernels (CUDA graphs of one-token steps).

Compiled, a one-token step of qwen2.5-coder-1.5b on an H200 was ~405 kernels: the 113 matrix
products and ~236 small ones around them (norms, rotary, cache writes, masked softmax, SiLU, residual
adds), each a launch and a ramp at ~1.4 us, about a fifth of the step. Here a layer is

    qkv  = norm1(x) @ Wqkv + b            row_product, the RMSNorm in its prologue
    a    = attention(rope(q), cache)      decode_attention: rotary, the cache write and both passes
    x    = x + a @ Wo                     row_product, the residual add in its epilogue
    act  = silu(g) * u, [g|u] = norm2(x) @ Wgu    row_product, norm prologue, SwiGLU epilogue
    x    = x + act @ Wdown                row_product, residual epilogue

and attention reads only the cache's `start` filled slots, not the captured window.

Numerics follow the compiled layer's bf16 roundings where it has them (the normed row, the qkv
and gate/up outputs, rotated q and k, the attention scores and probabilities, each product's
output before the residual add), with fp32 arithmetic in between; the summation order differs, so
a fused step may differ from the block forward in the last bf16 bit, as the one-row kernel does.

`install(decoder)` turns it on for `Decoder.forward_static`'s one-token blocks (CUDA and Triton,
a head size that is a power of two); `SEMIAR_FUSED=0/1` turns it off / forces it (the CPU tests run
it under Triton's interpreter). The choice is kept as `decoder.fused_row_step`.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Optional

import torch

from .gemv import triton_available


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
               for n, k, w in [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4),
                               (8, 512, 8), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (16, 1024, 8), (32, 128, 4),
                               (32, 256, 8)]]
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU tests: one small config, no timing
        configs = [triton.Config({"BLOCK_N": 4, "BLOCK_K": 32}, num_warps=1)]

    @triton.autotune(configs=configs, key=["N", "K", "NORM", "SWIGLU", "RESIDUAL"])
    @triton.jit
    def row_product(x_ptr, w_ptr, b_ptr, nw_ptr, r_ptr, y_ptr, N, K, stride_wn, eps,
                    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # y[N] = x[K] @ W.T (+ b); NORM: x := rmsnorm(x) * nw; SWIGLU: W holds [gate; up] (2N rows)
        # and y = silu(gate) * up; RESIDUAL: y += r
        dt = y_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            ok = row_ok[:, None] & col_ok[None, :]
            # the weight loads first: nothing they need waits on the row's norm
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0,
                        eviction_policy="evict_first")
            if SWIGLU:
                wu = tl.load(w_ptr + (rows[:, None] + N) * stride_wn + cols[None, :], mask=ok, other=0.0,
                             eviction_policy="evict_first")
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if NORM:  # RMSNorm's scale is one number per row: summed alongside, applied at the end
                ss += x * x
                x = x * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
            if SWIGLU:
                acc_up += wu.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if NORM:
            rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            y = y * rstd
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if SWIGLU:  # the gate/up product's outputs are rounded, silu(g) * u is not (one fused kernel)
            up = tl.sum(acc_up, axis=1)
            if NORM:
                up = up * rstd
            gate = y.to(dt).to(tl.float32)
            up = up.to(dt).to(tl.float32)
            y = gate / (1.0 + tl.exp(-gate)) * up
        if RESIDUAL:
            y = y.to(dt).to(tl.float32) + tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(dt), mask=row_ok)

    @triton.jit
    def attention_split(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, start_ptr, m_ptr, l_ptr, acc_ptr,
                        stride_kh, stride_ks, scale, NS, H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr,
                        GP: tl.constexpr, D: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr):
        # program (kv head, split): the G query heads of one kv head over cache slots [split*C, split*C + C)
        # qkv: [(H + 2 KVH) * D] of the new token; caches: [KVH, capacity, D]; writes per query head
        # and split the scores' max m, the sum l of exp(s - m) and acc = sum exp(s - m) v
        dt = qkv_ptr.dtype.element_ty
        kvh = tl.program_id(0)
        split = tl.program_id(1)
        start = tl.load(start_ptr)
        c0 = split * C
        if c0 <= start:  # splits past the new token have nothing to read (and are never combined)
            d = tl.arange(0, D)
            rot = (d + D // 2) % D  # rotate_half: [-x2, x1]
            sign = tl.where(d < D // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + d).to(tl.float32)
            sin = tl.load(sin_ptr + d).to(tl.float32)
            gi = tl.arange(0, GP)
            g_ok = gi < G
            heads = kvh * G + gi
            q = tl.load(qkv_ptr + heads[:, None] * D + d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
            q_rot = tl.load(qkv_ptr + heads[:, None] * D + rot[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
            q = (q * cos[None, :] + sign[None, :] * q_rot * sin[None, :]).to(dt)  # [GP, D]
            pos = c0 + tl.arange(0, C)
            kc = kc_ptr + kvh * stride_kh
            vc = vc_ptr + kvh * stride_kh
            old = pos < start
            kb = tl.load(kc + pos[:, None] * stride_ks + d[None, :], mask=old[:, None], other=0.0)  # [C, D]
            vb = tl.load(vc + pos[:, None] * stride_ks + d[None, :], mask=old[:, None], other=0.0)
            if start < c0 + C:  # this split holds the new token: its rotated key and its value, also
                k_at = qkv_ptr + (H + kvh) * D  # written to the caches (one program per kv head does)
                k_new = (tl.load(k_at + d).to(tl.float32) * cos
                         + sign * tl.load(k_at + rot).to(tl.float32) * sin).to(dt)
                v_new = tl.load(qkv_ptr + (H + KVH + kvh) * D + d)
                tl.store(kc + start * stride_ks + d, k_new)
                tl.store(vc + start * stride_ks + d, v_new)
                new = pos[:, None] == start
                kb = tl.where(new, k_new[None, :], kb)
                vb = tl.where(new, v_new[None, :], vb)
            # scores as the block forward rounds them: q.k in the model's dtype, then scaled in fp32
            if IEEE:  # fp32 models (and Triton's interpreter, whose bf16 dot is broken): exact fp32 products
                s = tl.dot(q.to(tl.float32), tl.trans(kb.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kb))
            s = s.to(dt).to(tl.float32) * scale
            s = tl.where((pos <= start)[None, :], s, float("-inf"))  # [GP, C]
            m = tl.max(s, axis=1)
            p = tl.exp(s - m[:, None])
            if IEEE:
                acc = tl.dot(p.to(dt).to(tl.float32), vb.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(p.to(dt), vb)  # [GP, D]
            row = heads * NS + split
            tl.store(m_ptr + row, m, mask=g_ok)
            tl.store(l_ptr + row, tl.sum(p, axis=1), mask=g_ok)
            tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def attention_combine(m_ptr, l_ptr, acc_ptr, start_ptr, out_ptr, NS, D: tl.constexpr, C: tl.constexpr,
                          SB: tl.constexpr):
        # program per query head: the splits that hold slots [0, start] merged by their maxima
        h = tl.program_id(0)
        n = tl.load(start_ptr) // C + 1
        d = tl.arange(0, D)
        big_m = tl.max(tl.full((SB,), float("-inf"), tl.float32), axis=0)
        big_l = tl.sum(tl.zeros((SB,), dtype=tl.float32), axis=0)
        out = tl.zeros((D,), dtype=tl.float32)
        for s0 in range(0, n, SB):
            sp = s0 + tl.arange(0, SB)
            ok = sp < n
            m = tl.load(m_ptr + h * NS + sp, mask=ok, other=float("-inf"))
            m_new = tl.maximum(big_m, tl.max(m, axis=0))
            w = tl.where(ok, tl.exp(m - m_new), 0.0)
            old = tl.exp(big_m - m_new)
            big_l = big_l * old + tl.sum(w * tl.load(l_ptr + h * NS + sp, mask=ok, other=0.0), axis=0)
            a = tl.load(acc_ptr + (h * NS + sp[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
            out = out * old + tl.sum(w[:, None] * a, axis=0)
            big_m = m_new
        tl.store(out_ptr + h * D + d, (out / big_l).to(out_ptr.dtype.element_ty))

    return row_product, attention_split, attention_combine


def row_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, swiglu: bool = False,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One row times a weight, with the layer's work around it fused: `norm_weight`: RMSNorm the
    row first; `swiglu`: the weight is [gate; up] and the result silu(gate) * up; `residual`: added
    to the result. x: [..., K] with one row in all; returns [..., N] (N = rows, or rows / 2 with swiglu)."""
    K = x.shape[-1]
    if x.numel() != K:
        raise ValueError(f"row_product takes one row, got an input of shape {tuple(x.shape)}")
    if weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} (row-major) does not fit an input of {K} features")
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    kernel = _kernels()[0]
    grid = lambda meta: ((N + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)  # noqa: E731
    kernel[grid](x, weight, weight if bias is None else bias, x if norm_weight is None else norm_weight,
                 y if residual is None else residual.contiguous(), y, N, K, weight.stride(0), float(eps),
                 HAS_BIAS=bias is not None, NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None)
    return y


#: cache slots per attention program (a split); a step reads only the splits up to the new token
ATTENTION_SPLIT = 64


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, start: torch.Tensor, num_heads: int, num_kv_heads: int,
                     window: Optional[int] = None) -> torch.Tensor:
    """Attention of one new token: rotary on its q and k, k and v written to the caches at slot
    `start` (a 0-d or 1-element long tensor on the device, so a CUDA graph replays any length), and
    attention over slots [0, start], which must lie within the first `window` slots (default: the
    capacity). qkv: [1, 1, (heads + 2 kv_heads) * head_dim]; cos, sin: [1, 1, head_dim]; caches:
    [1, kv_heads, capacity, head_dim]. Returns [1, 1, heads * head_dim].

    Flash-decoding: a program per kv head and split of ATTENTION_SPLIT slots takes all the query
    heads of its group through two small tensor-core products, and a second kernel merges the
    splits. The probabilities are rounded to the model's dtype before they multiply the values
    unnormalised (the block forward rounds them normalised): another rounding of the same size."""
    D = qkv.shape[-1] // (num_heads + 2 * num_kv_heads)
    if D & (D - 1) or D < 16 or num_heads % num_kv_heads:
        raise ValueError(f"decode_attention needs a power-of-two head size of at least 16 and whole query "
                         f"groups, got head size {D}, {num_heads} heads over {num_kv_heads} kv heads")
    G = num_heads // num_kv_heads
    C = ATTENTION_SPLIT
    NS = -(-(window or k_cache.shape[2]) // C)
    dev = qkv.device
    m = torch.empty(num_heads, NS, dtype=torch.float32, device=dev)
    l = torch.empty(num_heads, NS, dtype=torch.float32, device=dev)
    acc = torch.empty(num_heads, NS, D, dtype=torch.float32, device=dev)
    out = torch.empty(*qkv.shape[:-1], num_heads * D, dtype=qkv.dtype, device=dev)
    _, split, combine = _kernels()
    split[(num_kv_heads, NS)](qkv.contiguous(), cos.contiguous(), sin.contiguous(), k_cache, v_cache, start, m, l, acc,
                              k_cache.stride(1), k_cache.stride(2), 1.0 / math.sqrt(D), NS,
                              H=num_heads, KVH=num_kv_heads, G=G, GP=max(16, 1 << (G - 1).bit_length()), D=D, C=C,
                              IEEE=qkv.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
                              num_warps=4)
    combine[(num_heads,)](m, l, acc, start, out, NS, D=D, C=C, SB=16, num_warps=4)
    return out


def row_layer(layer, x, cos, sin, k_cache, v_cache, slots, mask):
    """`decoder._call_layer` for a one-token block, in five kernels (see the module doc); `mask` is
    not needed: the token sees the cache's first `slots[0]` slots and itself."""
    attn, mlp = layer.self_attn, layer.mlp
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    qkv = row_product(x, attn.qkv_proj.weight, attn.qkv_proj.bias, norm_weight=n1.weight, eps=n1.eps)
    a = decode_attention(qkv, cos, sin, k_cache, v_cache, slots, attn.h, attn.kvh, window=mask.shape[-1])
    x = row_product(a, attn.o_proj.weight, attn.o_proj.bias, residual=x)
    act = row_product(x, mlp.gate_up_proj.weight, None, norm_weight=n2.weight, eps=n2.eps, swiglu=True)
    return row_product(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=x)


def supported(decoder) -> Optional[str]:
    """Why the fused step cannot serve this decoder, or None when it can."""
    cfg = decoder.config
    if not triton_available():
        return "Triton is not installed"
    if cfg.head_dim & (cfg.head_dim - 1) or cfg.head_dim < 16:
        return f"head size {cfg.head_dim} is not a power of two of at least 16"
    if cfg.num_heads % cfg.num_kv_heads:
        return "query heads are not a multiple of kv heads"
    if decoder.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {decoder.dtype}"
    if not all(hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2
               for layer in decoder.layers for m in (layer.self_attn.qkv_proj, layer.mlp.down_proj)):
        return "the linear layers are packed (CPU)"
    return None


def install(decoder, force: Optional[bool] = None) -> bool:
    """Serve the decoder's one-token fixed-shape forwards (`forward_static` with one token) with
    `row_layer`. Default: on for a CUDA decoder it supports; force=True on any device (the CPU
    tests, under Triton's interpreter), False off; SEMIAR_FUSED=1/0 decides when force is None.
    Returns whether it is on, also kept as `decoder.fused_row_step`."""
    env = os.environ.get("SEMIAR_FUSED", "")
    if force is None and env in ("0", "1"):
        force = env == "1"
    elif env not in ("", "0", "1"):
        warnings.warn(f"SEMIAR_FUSED={env!r} is not 0 or 1; using the default", stacklevel=2)
    why = supported(decoder)
    on = force is not False and why is None and (force or decoder.device.type == "cuda")
    if force and why:
        warnings.warn(f"the fused one-token step cannot serve this model ({why}); using the plain layers", stacklevel=2)
    decoder.fused_row_step = on
    return on
