"""A decode step's layer as five Triton kernels (CUDA graphs of one-token steps).

Compiled, a one-token step of qwen2.5-coder-1.5b on an H200 was ~405 kernels: the 113 matrix
products and ~236 small ones around them (norms, rotary, cache writes, masked softmax, SiLU, residual
adds), each a launch and a ramp at ~1.4 us, about a fifth of the step. Here a layer is

    qkv  = norm1(x) @ Wqkv + b            row_product, the RMSNorm folded in
    a    = attention(rope(q), cache)      decode_attention: rotary, the cache write, flash-decoding
                                          over 64-slot splits (attention_split) and their merge
    x    = x + a @ Wo                     row_product, the residual add in its epilogue
    act  = silu(g) * u, [g|u] = norm2(x) @ Wgu    row_product, norm folded in, SwiGLU epilogue
    x    = x + act @ Wdown                row_product, residual epilogue

and attention reads only the cache's filled slots, not the captured window. H200, 1.5B: 1.63 ->
1.18 ms per step (docs/benchmarks.md).

Numerics follow the compiled layer's bf16 roundings where it has them (the qkv and gate/up outputs,
rotated q and k, the attention scores, each product's output before the residual add), with fp32
arithmetic in between, and differ in two places: RMSNorm's scale is one number per row, so it is
summed alongside the product and applied after it (the row times the norm's weight is rounded
once, where the compiled layer rounds the scaled row and then its product with the weight), and
the attention probabilities are rounded before they are normalised (as `block_attention`, which
the tree forwards use, does too). With the summation order of the kernels, a fused step can
differ from the block forward in the last bf16 bit of a logit.

On Hopper and later the kernels are launched with programmatic dependent launch (PDL): each lets
the next one start as soon as all its own programs run, and each reads its first weights (attention:
the cached keys and values) before it waits for the previous kernel's results, so one kernel's
start-up overlaps the last one's tail. SEMIAR_PDL=0 turns that off.

`install(decoder)` turns it on for `Decoder.forward_static`'s one-token blocks (CUDA and Triton,
a power-of-two head size of at least 16); `SEMIAR_FUSED=0/1` turns it off / forces it (the CPU
tests run it under Triton's interpreter): it installs `row_layer` as the decoder's `row_layer` hook
(`models.decoder`, the static seam), None where it is off.
The 2-64-token forwards that verify trees (and prefill chunks) keep the compiled layer, with
cuBLAS for the qkv, o and down products: three whole Triton layers for them lost to it (the second,
with the fused norm/SwiGLU/residual, split-K and a deterministic fix-up, took 2.36 against 2.00 ms
for 16 tokens on the H200; the third, this module's design for blocks with swapped operands and
PDL, 2.88 against 1.82 ms, its products 57 against 39 us per layer; docs/benchmarks.md). Two pieces of it are kernels from here: attention goes
through `block_attention`, the same split-and-merge kernels under the tree mask over the filled
slots only (on where the fused step is; SEMIAR_BLOCK_ATTENTION=0/1), and the MLP's gate/up product
with SwiGLU through `block_swiglu`, whose swapped operands put the weight tile on the wide side of
the tensor-core product (on where the fused step is; SEMIAR_BLOCK_MLP=0/1). Both round as the one-token
step does.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Optional

import torch


def env_switch(name: str, otherwise: str) -> Optional[bool]:
    """An on/off environment switch: True for 1, False for 0, None when unset; any other value
    warns (saying what happens `otherwise`) and counts as unset."""
    env = os.environ.get(name, "")
    if env not in ("", "0", "1"):
        warnings.warn(f"{name}={env!r} is not 0 or 1; {otherwise}", stacklevel=3)
    return {"0": False, "1": True}.get(env)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no kernel
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import fused_kernels as k

    return k.row_product, k.attention_split, k.block_attention_split, k.attention_merge, k.HAS_GDC


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


#: programmatic dependent launch between the fused kernels (see row_product's kernel); None: not
#: decided yet (on at first use where the GPU and Triton have it, unless SEMIAR_PDL=0)
PDL: Optional[bool] = None


def _pdl_on(device: torch.device) -> bool:
    global PDL
    if device.type != "cuda" or _interpreted():
        return False
    if PDL is None:
        PDL = (env_switch("SEMIAR_PDL", "using PDL where it works") is not False and _kernels()[4]
               and torch.cuda.get_device_capability(device)[0] >= 9)
    return bool(PDL)


#: row_product loads the next chunk of weights before this chunk's products (two loads in flight per
#: program): H200, 1.5B, one-token step 1.181 -> 1.137 ms on one machine, 1.125-1.138 -> 1.124 on another
#: (docs/benchmarks.md); SEMIAR_ROW_PREFETCH=0 turns it off
PREFETCH = os.environ.get("SEMIAR_ROW_PREFETCH", "1") != "0"


def row_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, swiglu: bool = False,
                residual: Optional[torch.Tensor] = None, pdl: Optional[bool] = None) -> torch.Tensor:
    """One row times a weight, with the layer's work around it fused: `norm_weight`: RMSNorm the
    row first; `swiglu`: the weight is [gate; up] and the result silu(gate) * up; `residual`: added
    to the result. x: [..., K] with one row in all; returns [..., N] (N = rows, or rows / 2 with swiglu).
    pdl=False launches it without programmatic dependent launch (default: `PDL`'s choice)."""
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
    pdl = pdl is not False and _pdl_on(x.device)
    kernel[grid](x, weight, weight if bias is None else bias, x if norm_weight is None else norm_weight,
                 y if residual is None else residual.contiguous(), y, N, K, weight.stride(0), float(eps),
                 HAS_BIAS=bias is not None, NORM=norm_weight is not None, SWIGLU=swiglu, RESIDUAL=residual is not None,
                 PDL=pdl, PREFETCH=PREFETCH, **({"launch_pdl": True} if pdl else {}))
    return y


#: the most tokens a block forward attends through `block_attention` (tree verification, prefill chunks)
MAX_BLOCK = 64


#: cache slots per attention program (a split); a step reads only the splits up to the new token
ATTENTION_SPLIT = 64


def _heads_unsupported(head_dim: int, heads: int, kv_heads: int) -> Optional[str]:
    """Why the attention kernels cannot take these heads, or None."""
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head size {head_dim} is not a power of two of at least 16"
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} kv heads"
    return None


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
    why = _heads_unsupported(D, num_heads, num_kv_heads)
    if why:
        raise ValueError(f"decode_attention needs a power-of-two head size of at least 16 and whole query groups: {why}")
    G = num_heads // num_kv_heads
    C = ATTENTION_SPLIT
    NS = -(-(window or k_cache.shape[2]) // C)
    dev = qkv.device
    m = torch.empty(num_heads, NS, dtype=torch.float32, device=dev)
    l = torch.empty(num_heads, NS, dtype=torch.float32, device=dev)
    acc = torch.empty(num_heads, NS, D, dtype=torch.float32, device=dev)
    out = torch.empty(*qkv.shape[:-1], num_heads * D, dtype=qkv.dtype, device=dev)
    _, split, _, merge, _ = _kernels()
    pdl = _pdl_on(dev)
    launch = {"launch_pdl": True} if pdl else {}
    split[(num_kv_heads, NS)](qkv.contiguous(), cos.contiguous(), sin.contiguous(), k_cache, v_cache, start, m, l, acc,
                              k_cache.stride(1), k_cache.stride(2), 1.0 / math.sqrt(D), NS,
                              H=num_heads, KVH=num_kv_heads, G=G, GP=max(16, 1 << (G - 1).bit_length()), D=D, C=C,
                              IEEE=qkv.dtype == torch.float32 or _interpreted(),
                              PDL=pdl, num_warps=4, **launch)
    merge[(num_heads,)](m, l, acc, start, out, NS, 1, num_heads, C=C, D=D, SB=16, TOKEN_MAJOR=False, PDL=pdl,
                        num_warps=4, **launch)
    return out


def block_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                    slots: torch.Tensor, token_major: bool = False) -> torch.Tensor:
    """Attention of a block of S query tokens (a token tree) over a cache that already holds their
    keys and values: q [1, heads, S, head_dim] (rotated); caches [1, kv_heads, capacity, head_dim];
    mask [S, W] bool, which of the first W slots each token sees (the cached prefix, then the tree);
    slots: [S] long on the device, the block's slots start..start + S - 1, so that a CUDA graph reads
    only the filled ones. Returns [1, heads, S, head_dim], or with token_major [1, S, heads * head_dim],
    the layout the o product reads (the merge writes it, where a transpose was a kernel of its own).

    The same flash-decoding as `decode_attention`: a program per kv head, tile of 64 query rows (the
    group's heads times the block's tokens) and split of ATTENTION_SPLIT slots, then a merge."""
    _, H, S, D = q.shape
    KVH = k_cache.shape[1]
    why = _heads_unsupported(D, H, KVH)
    if why:
        raise ValueError(f"block_attention needs a power-of-two head size of at least 16 and whole query groups: {why}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    G, C, W = H // KVH, ATTENTION_SPLIT, mask.shape[-1]
    NS = -(-W // C)
    BM = 16 if _interpreted() else 64
    dev = q.device
    m = torch.empty(H * S, NS, dtype=torch.float32, device=dev)
    l = torch.empty(H * S, NS, dtype=torch.float32, device=dev)
    acc = torch.empty(H * S, NS, D, dtype=torch.float32, device=dev)
    out = torch.empty(*((1, S, H * D) if token_major else (1, H, S, D)), dtype=q.dtype, device=dev)
    mask = mask.contiguous().view(torch.uint8)
    _, _, split, merge, _ = _kernels()
    pdl = _pdl_on(dev)
    launch = {"launch_pdl": True} if pdl else {}
    split[(KVH, -(-G * S // BM), NS)](q, k_cache, v_cache, mask, slots, m, l, acc, q.stride(1), q.stride(2),
                                      k_cache.stride(1), k_cache.stride(2), mask.stride(0), 1.0 / math.sqrt(D), S, NS,
                                      G=G, D=D, BM=BM, C=C, IEEE=q.dtype == torch.float32 or _interpreted(), PDL=pdl,
                                      num_warps=4, **launch)
    merge[(H * S,)](m, l, acc, slots, out, NS, S, H, C=C, D=D, SB=16, TOKEN_MAJOR=token_major, PDL=pdl,
                    num_warps=4, **launch)
    return out


@torch.library.custom_op("semiar::block_attention", mutates_args=())
def block_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                       slots: torch.Tensor) -> torch.Tensor:
    """`block_attention(..., token_major=True)` as a PyTorch custom op, so the compiled layer calls it as one
    opaque kernel: [1, S, heads * head_dim]."""
    return block_attention(q, k_cache, v_cache, mask, slots, token_major=True)


@block_attention_op.register_fake
def _(q, k_cache, v_cache, mask, slots):
    _, H, S, D = q.shape
    return q.new_empty(1, S, H * D)


def norm_fold(x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm split as the fused products take it: (x * norm_weight rounded to x's dtype, the rows'
    scale rsqrt(mean(x^2) + eps) in fp32 [..., rows]); the product of the first times a weight, scaled
    by the second, is the normed rows' product. Plain torch, so the compiled layer fuses it."""
    xf = x.float()
    return (xf * norm_weight.float()).to(x.dtype), torch.rsqrt(xf.pow(2).mean(-1) + eps)


def block_swiglu(xn: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A block's gate/up product and SwiGLU in one kernel: silu(g) * u with [g | u] = (xn @ weight.T) * rstd,
    for 1..MAX_BLOCK rows; with (xn, rstd) = `norm_fold(h, norm_weight, eps)` that is the MLP's first
    half on RMSNorm(h), rounded as `row_product(norm_weight=..., swiglu=True)` rounds one row (so a tree's
    MLP rounds as the one-token step does). xn: [1, T, K]; rstd: [1, T] fp32; weight: [2N, K] (gate rows,
    then up rows). Returns [1, T, N]. The compiled layer took two kernels after the norm (cuBLAS's
    product, SiLU * up) for the same (docs/benchmarks.md)."""
    T, K = xn.shape[-2], xn.shape[-1]
    if xn.dim() != 3 or xn.shape[0] != 1 or not 1 <= T <= MAX_BLOCK or tuple(rstd.shape) != (1, T):
        raise ValueError(f"block_swiglu takes [1, T <= {MAX_BLOCK}, K] rows and their [1, T] scales, "
                         f"got {tuple(xn.shape)} and {tuple(rstd.shape)}")
    if weight.shape[1] != K or weight.shape[0] % 2 or weight.stride(1) != 1:
        raise ValueError(f"weight {tuple(weight.shape)} (row-major, [gate; up]) does not fit {K} features")
    N = weight.shape[0] // 2
    y = torch.empty(1, T, N, dtype=xn.dtype, device=xn.device)
    from .fused_kernels import block_swiglu as kernel

    pdl = _pdl_on(xn.device)
    grid = lambda meta: ((N + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)  # noqa: E731
    kernel[grid](xn.contiguous(), rstd.float().contiguous(), weight, y, T, N, K, weight.stride(0),
                 IEEE=xn.dtype == torch.float32 or _interpreted(), PDL=pdl, BM=max(16, 1 << (T - 1).bit_length()),
                 **({"launch_pdl": True} if pdl else {}))
    return y


@torch.library.custom_op("semiar::block_swiglu", mutates_args=())
def block_swiglu_op(xn: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`block_swiglu` as a PyTorch custom op, so the compiled layer calls it as one opaque kernel."""
    return block_swiglu(xn, rstd, weight)


@block_swiglu_op.register_fake
def _(xn, rstd, weight):
    return xn.new_empty(*xn.shape[:-1], weight.shape[0] // 2)


def row_layer(layer, x, cos, sin, k_cache, v_cache, slots, mask):
    """`decoder.call_layer` for a one-token block, in five kernels (see the module doc); `mask` is
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
    why = _heads_unsupported(cfg.head_dim, cfg.num_heads, cfg.num_kv_heads)
    if why:
        return why
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
    Returns whether it is on; on, `decoder.row_layer` is `row_layer`, else None."""
    if force is None:
        force = env_switch("SEMIAR_FUSED", "using the default")
    why = supported(decoder)
    on = force is not False and why is None and (force or decoder.device.type == "cuda")
    if force and why:
        warnings.warn(f"the fused one-token step cannot serve this model ({why}); using the plain layers", stacklevel=2)
    if on and decoder.device.type == "cuda":
        on = _works_on(decoder.device)
    decoder.row_layer = row_layer if on else None
    return on


def _block_switch(decoder, on: Optional[bool], env: str) -> bool:
    """The decision of `install_block_attention` / `install_block_mlp`: `on`, else the environment
    switch `env` (0/1), else on where the fused one-token step is (CUDA, kernels that ran: `_works_on`);
    and only for a decoder `supported` takes."""
    if on is None:
        on = env_switch(env, "using the default")
        if on is None:
            on = getattr(decoder, "row_layer", None) is row_layer and decoder.device.type == "cuda"
    return bool(on) and supported(decoder) is None


def block_path(T: int, start, mask) -> bool:
    """Whether a layer's forward of T tokens is a fixed-shape block that the block kernels serve
    (2 to MAX_BLOCK tokens, the slots as a tensor, one [T, W] mask), where they are installed."""
    return 1 < T <= MAX_BLOCK and isinstance(start, torch.Tensor) and mask.dim() == 2


def block_attention_hook(q, k_cache, v_cache, slots, mask) -> Optional[torch.Tensor]:
    """`Attention.block_kernel` (the decoder's hook): `block_attention_op` for the blocks `block_path`
    takes, None (the plain attention) for the others."""
    if not block_path(q.shape[2], slots, mask):
        return None
    return block_attention_op(q, k_cache, v_cache, mask, slots)


def block_mlp_hook(x, norm, gate_up_weight, slots, mask) -> Optional[torch.Tensor]:
    """`MLP.block_kernel` (the decoder's hook): the SwiGLU activation of norm(x) through `block_swiglu_op`
    for the blocks `block_path` takes, None (the plain MLP) for the others."""
    if not block_path(x.shape[1], slots, mask):
        return None
    return block_swiglu_op(*norm_fold(x, norm.weight, norm.eps), gate_up_weight)


def install_block_attention(decoder, on: Optional[bool] = None) -> bool:
    """Attention of the compiled layer's fixed-shape forwards of 2 to MAX_BLOCK tokens (tree
    verification, prefill chunks) through `block_attention`, over the filled slots only, instead of
    the compiled matmul-softmax-matmul over the whole window (H200, 1.5B: 16/32/64-token forwards
    2.05/2.12/2.26 -> 1.96/2.04/2.21 ms). on=None: SEMIAR_BLOCK_ATTENTION=0/1 decides, else on where
    the fused one-token step is; on=True also serves the CPU tests under Triton's interpreter.
    Returns whether it is on."""
    on = _block_switch(decoder, on, "SEMIAR_BLOCK_ATTENTION")
    for layer in decoder.layers:
        layer.self_attn.block_kernel = block_attention_hook if on else None
    return on


def install_block_mlp(decoder, on: Optional[bool] = None) -> bool:
    """The compiled layer's fixed-shape forwards of 2 to MAX_BLOCK tokens do the MLP's gate/up product
    and SwiGLU in one kernel (`block_swiglu`, after `norm_fold`) instead of two. on=None:
    SEMIAR_BLOCK_MLP=0/1 decides, else on where the fused one-token step is; on=True also serves the
    CPU tests under Triton's interpreter. Returns whether it is on."""
    on = _block_switch(decoder, on, "SEMIAR_BLOCK_MLP")
    for layer in decoder.layers:
        layer.mlp.block_kernel = block_mlp_hook if on else None
    return on


def _works_on(device) -> bool:
    """Run the kernels once on small inputs; a Triton that cannot launch them with PDL gets them
    without, one that cannot build them leaves the plain layers (with a warning)."""
    global PDL
    for attempt in range(2):
        try:
            x = torch.randn(1, 1, 64, device=device, dtype=torch.bfloat16)
            w = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
            row_product(x, w, norm_weight=x[0, 0], residual=x[..., :32])
            cache = torch.zeros(1, 1, 64, 16, device=device, dtype=torch.bfloat16)
            decode_attention(x[..., :48], x[..., :16], x[..., :16], cache, cache.clone(),
                             torch.tensor([3], device=device), 1, 1)
            block_attention(torch.randn(1, 1, 3, 16, device=device, dtype=torch.bfloat16), cache, cache.clone(),
                            torch.ones(3, 64, dtype=torch.bool, device=device), torch.arange(3, 6, device=device))
            block_swiglu(x.expand(1, 3, 64).contiguous(), x[0, :, :3].float(), w)
            torch.cuda.synchronize(device)
            return True
        except Exception as e:  # noqa: BLE001 - whatever Triton raised, the plain layers still work
            if attempt == 0 and _pdl_on(device):
                warnings.warn(f"the fused kernels failed with programmatic dependent launch ({type(e).__name__}: "
                              f"{str(e)[:200]}); launching them without", stacklevel=3)
                PDL = False
                continue
            warnings.warn(f"the fused one-token kernels failed ({type(e).__name__}: {str(e)[:200]}); "
                          "using the plain layers", stacklevel=3)
            return False
    return False
