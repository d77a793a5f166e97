"""The Triton kernels of `models.cuda.fused` (imported only where Triton is installed; see that module)."""

import os

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off (`_pdl_on`)
    gdc_launch_dependents = gdc_wait = None

configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
           for n, k, w in [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (8, 256, 4), (8, 512, 4),
                           (8, 512, 8), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (16, 1024, 8), (32, 128, 4),
                           (32, 256, 8), (32, 512, 8), (64, 256, 8)]]  # the last two: wide LM heads (models.cuda.gemv)
if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU tests: one small config, no timing
    configs = [triton.Config({"BLOCK_N": 4, "BLOCK_K": 32}, num_warps=1)]


@triton.jit
def _chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, cols, col_ok, NORM: tl.constexpr, SWIGLU: tl.constexpr):
    # one BLOCK_K chunk of the row against its weight rows w (and the up rows wu)
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if NORM:  # RMSNorm's scale is one number per row: summed alongside, applied at the end; the
        ss += x * x  # row times the norm's weight is rounded once to the model's dtype
        x = (x * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)).to(w.dtype).to(tl.float32)
    acc += w.to(tl.float32) * x[None, :]
    if SWIGLU:
        acc_up += wu.to(tl.float32) * x[None, :]
    return acc, acc_up, ss


@triton.jit
def _weight_rows(w_ptr, rows, row_ok, cols, col_ok, N, stride_wn, SWIGLU: tl.constexpr):
    # the weight tile [rows, cols] (evicted first: read once), and with SWIGLU the up rows N further on
    ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
    wu = w
    if SWIGLU:
        wu = tl.load(w_ptr + (rows[:, None] + N) * stride_wn + cols[None, :], mask=ok, other=0.0,
                     eviction_policy="evict_first")
    return w, wu


@triton.jit
def _swiglu(gate, up, y_ptr):
    # silu(g) * u of the gate/up product's outputs, rounded to y's dtype (the model's) first, fp32 after
    dt = y_ptr.dtype.element_ty
    gate = gate.to(dt).to(tl.float32)
    up = up.to(dt).to(tl.float32)
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.autotune(configs=configs, key=["N", "K", "NORM", "SWIGLU", "RESIDUAL", "PREFETCH"])
@triton.jit
def row_product(x_ptr, w_ptr, b_ptr, nw_ptr, r_ptr, y_ptr, N, K, stride_wn, eps,
                HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                PDL: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # y[N] = x[K] @ W.T (+ b); NORM: x := rmsnorm(x) * nw; SWIGLU: W holds [gate; up] (2N rows)
    # and y = silu(gate) * up; RESIDUAL: y += r.
    # PDL (programmatic dependent launch): the next kernel may start once every program here has
    # begun, and this one reads its first weight chunk before it waits for the previous kernel's
    # results: the weights never depend on them, so a kernel's start overlaps the last one's tail
    if PDL:
        gdc_launch_dependents()
    dt = y_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    w, wu = _weight_rows(w_ptr, rows, row_ok, cols, col_ok, N, stride_wn, SWIGLU)
    if PDL:
        gdc_wait()  # from here on: the row, the residual, and every store
    if PREFETCH:  # the next chunk's weights are loaded before this chunk's products: two loads in flight
        for k0 in range(BLOCK_K, K, BLOCK_K):
            nxt = k0 + tl.arange(0, BLOCK_K)
            nxt_ok = nxt < K
            w_next, wu_next = _weight_rows(w_ptr, rows, row_ok, nxt, nxt_ok, N, stride_wn, SWIGLU)
            acc, acc_up, ss = _chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, cols, col_ok, NORM, SWIGLU)
            w, wu, cols, col_ok = w_next, wu_next, nxt, nxt_ok
        acc, acc_up, ss = _chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, cols, col_ok, NORM, SWIGLU)
    else:
        acc, acc_up, ss = _chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, cols, col_ok, NORM, SWIGLU)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            w, wu = _weight_rows(w_ptr, rows, row_ok, cols, col_ok, N, stride_wn, SWIGLU)
            acc, acc_up, ss = _chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, cols, col_ok, NORM, SWIGLU)
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
        y = _swiglu(y, up, y_ptr)
    if RESIDUAL:
        y = y.to(dt).to(tl.float32) + tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(dt), mask=row_ok)


@triton.jit
def _partial_store(q, kb, vb, seen, row, row_ok, m_ptr, l_ptr, acc_ptr, scale, D: tl.constexpr, IEEE: tl.constexpr):
    # one split's share of attention for query rows q [R, D] over keys kb / values vb [C, D], the
    # pairs `seen` [R, C] visible: stores per row (index `row`) the scores' max m, l = sum exp(s - m)
    # and acc = sum exp(s - m) v, which `attention_merge` combines across splits
    dt = kb.dtype
    # scores as the block forward rounds them: q.k in the model's dtype, then scaled in fp32
    if IEEE:  # fp32 models (and Triton's interpreter, whose bf16 dot is broken): exact fp32 products
        s = tl.dot(q.to(tl.float32), tl.trans(kb.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kb))
    s = tl.where(seen, s.to(dt).to(tl.float32) * scale, float("-inf"))
    m = tl.max(s, axis=1)  # -inf for a row that sees nothing in this split
    p = tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
    if IEEE:
        acc = tl.dot(p.to(dt).to(tl.float32), vb.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(p.to(dt), vb)  # [R, D]
    d = tl.arange(0, D)
    tl.store(m_ptr + row, m, mask=row_ok)
    tl.store(l_ptr + row, tl.sum(p, axis=1), mask=row_ok)
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def attention_split(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, start_ptr, m_ptr, l_ptr, acc_ptr,
                    stride_kh, stride_ks, scale, NS, H: tl.constexpr, KVH: tl.constexpr, G: tl.constexpr,
                    GP: tl.constexpr, D: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    # program (kv head, split): the G query heads of one kv head over cache slots [split*C, split*C + C)
    # qkv: [(H + 2 KVH) * D] of the new token; caches: [KVH, capacity, D]; writes per query head
    # and split the scores' max m, the sum l of exp(s - m) and acc = sum exp(s - m) v
    # PDL: the cached slots before `start` were written by earlier steps, and `start` before the
    # first layer, so they are read before waiting on the qkv product
    if PDL:
        gdc_launch_dependents()
    dt = qkv_ptr.dtype.element_ty
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(start_ptr)
    c0 = split * C
    d = tl.arange(0, D)
    pos = c0 + tl.arange(0, C)
    kc = kc_ptr + kvh * stride_kh
    vc = vc_ptr + kvh * stride_kh
    old = pos < start
    kb = tl.load(kc + pos[:, None] * stride_ks + d[None, :], mask=old[:, None], other=0.0)  # [C, D]
    vb = tl.load(vc + pos[:, None] * stride_ks + d[None, :], mask=old[:, None], other=0.0)
    if PDL:
        gdc_wait()  # every program waits, so this kernel ends after the one before it
    if c0 <= start:  # splits past the new token have nothing to read (and are never combined)
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
        _partial_store(q, kb, vb, (pos <= start)[None, :], heads * NS + split, g_ok, m_ptr, l_ptr, acc_ptr,
                       scale, D, IEEE)


@triton.jit
def attention_merge(m_ptr, l_ptr, acc_ptr, len_ptr, out_ptr, NS, new, H, C: tl.constexpr, D: tl.constexpr,
                    SB: tl.constexpr, TOKEN_MAJOR: tl.constexpr, PDL: tl.constexpr):
    # program per query row (a head of the one-token step, head * S + token of a block): its splits
    # merged by their maxima; the filled slots are len + new (one token: len is the new token's
    # slot, new 1; a block: len its first slot, new S), and a split the row saw nothing of has
    # m = -inf and weighs nothing. Output [H, S, D], or with TOKEN_MAJOR [S, H, D] (H heads)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    n = (tl.load(len_ptr) + new + C - 1) // C
    d = tl.arange(0, D)
    big_m = tl.max(tl.full((SB,), float("-inf"), tl.float32), axis=0)
    big_l = tl.sum(tl.zeros((SB,), dtype=tl.float32), axis=0)
    out = tl.zeros((D,), dtype=tl.float32)
    for s0 in range(0, n, SB):
        sp = s0 + tl.arange(0, SB)
        ok = sp < n
        m = tl.load(m_ptr + row * NS + sp, mask=ok, other=float("-inf"))
        m_new = tl.maximum(big_m, tl.max(m, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.where(ok, tl.exp(m - m_ref), 0.0)
        old = tl.exp(big_m - m_ref)
        big_l = big_l * old + tl.sum(w * tl.load(l_ptr + row * NS + sp, mask=ok, other=0.0), axis=0)
        a = tl.load(acc_ptr + (row * NS + sp[:, None]) * D + d[None, :], mask=ok[:, None], other=0.0)
        out = out * old + tl.sum(w[:, None] * a, axis=0)
        big_m = m_new
    at = row
    if TOKEN_MAJOR:
        at = (row % new) * H + row // new
    tl.store(out_ptr + at * D + d, (out / big_l).to(out_ptr.dtype.element_ty))


@triton.jit
def block_attention_split(q_ptr, kc_ptr, vc_ptr, mask_ptr, slot_ptr, m_ptr, l_ptr, acc_ptr,
                          stride_qh, stride_qs, stride_kh, stride_ks, stride_mask, scale, S, NS,
                          G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr,
                          PDL: tl.constexpr):
    # program (kv head, tile of BM query rows, split of C cache slots); query row r of a kv head is
    # head kvh * G + r // S at block token r % S; the block's keys are in the cache at slots
    # [start, start + S) (start = slots[0]), [0, start) are the prefix; mask[token, slot] says which
    # it sees; writes per row and split m, l and acc as attention_split. PDL: the prefix slots were
    # written by earlier steps and are read before waiting on the block's own
    if PDL:
        gdc_launch_dependents()
    kvh = tl.program_id(0)
    split = tl.program_id(2)
    start = tl.load(slot_ptr)
    end = start + S
    c0 = split * C
    d = tl.arange(0, D)
    pos = c0 + tl.arange(0, C)
    kc = kc_ptr + kvh * stride_kh + pos[:, None] * stride_ks + d[None, :]
    vc = vc_ptr + kvh * stride_kh + pos[:, None] * stride_ks + d[None, :]
    old = (pos < start)[:, None]
    kb = tl.load(kc, mask=old, other=0.0)
    vb = tl.load(vc, mask=old, other=0.0)
    if PDL:
        gdc_wait()
    if c0 < end:
        if c0 + C > start:  # the split holds some of the block's own keys
            new = ((pos >= start) & (pos < end))[:, None]
            kb = tl.where(old, kb, tl.load(kc, mask=new, other=0.0))
            vb = tl.where(old, vb, tl.load(vc, mask=new, other=0.0))
        r = tl.program_id(1) * BM + tl.arange(0, BM)
        r_ok = r < G * S
        head = kvh * G + r // S
        tok = r % S
        q = tl.load(q_ptr + head[:, None] * stride_qh + tok[:, None] * stride_qs + d[None, :], mask=r_ok[:, None],
                    other=0.0)  # [BM, D]
        p_ok = pos < end
        seen = tl.load(mask_ptr + tok[:, None] * stride_mask + pos[None, :], mask=r_ok[:, None] & p_ok[None, :],
                       other=0).to(tl.int1)
        _partial_store(q, kb, vb, seen, (head * S + tok) * NS + split, r_ok, m_ptr, l_ptr, acc_ptr, scale, D, IEEE)


# (BLOCK_N, BLOCK_K, warps, stages); H200, 1.5B gate/up (17920 x 1536) alone, swapped operands: 16 rows
# 15.7 us against cuBLAS's 17.7 (64, 128, 4, 3), 64 rows 17.5 against 18.8 (64, 64, 4, 4) (scripts/gpu/skinny.py)
mlp_configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
               for n, k, w, st in [(64, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 4), (32, 128, 4, 4), (64, 64, 8, 3),
                                   (128, 64, 8, 3)]]
if os.environ.get("TRITON_INTERPRET") == "1":
    mlp_configs = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]


@triton.autotune(configs=mlp_configs, key=["BM", "N", "K"])
@triton.jit
def block_swiglu(x_ptr, r_ptr, w_ptr, y_ptr, M, N, K, stride_wn, IEEE: tl.constexpr, PDL: tl.constexpr,
                 BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A block's gate/up product and SwiGLU for M <= BM rows: y = silu(g) * u, [g | u] = (x @ W.T) * r, where
    # x is the normed rows before their scale (the row times the norm's weight, rounded) and r [M] the
    # scale; W [2N, K]. Operands swapped (acc[BLOCK_N, BM] = W_tile @ x_tile.T) so that the weight tile is
    # the wide side of the tensor-core product; g and u rounded, as `row_product`'s NORM + SWIGLU
    if PDL:
        gdc_launch_dependents()
    dt = y_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m = tl.arange(0, BM)
    m_ok = m < M
    acc = tl.zeros((BLOCK_N, BM), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BM), dtype=tl.float32)
    if PDL:
        gdc_wait()
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w, wu = _weight_rows(w_ptr, rows, row_ok, cols, col_ok, N, stride_wn, True)
        xt = tl.load(x_ptr + m[None, :] * K + cols[:, None], mask=m_ok[None, :] & col_ok[:, None], other=0.0)
        if IEEE:  # fp32 models and Triton's interpreter (whose bf16 dot is broken): exact fp32 products
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            acc_up += tl.dot(wu.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
            acc_up = tl.dot(wu, xt, acc_up)
    r = tl.load(r_ptr + m, mask=m_ok, other=0.0)[None, :]
    y = _swiglu(acc * r, acc_up * r, y_ptr)
    tl.store(y_ptr + m[None, :] * N + rows[:, None], y.to(dt), mask=row_ok[:, None] & m_ok[None, :])


HAS_GDC = gdc_wait is not None
