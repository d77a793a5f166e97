"""The Triton kernels of `models.fused` (imported only where Triton is installed; see that module)."""

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
                           (32, 256, 8)]]
if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU tests: one small config, no timing
    configs = [triton.Config({"BLOCK_N": 4, "BLOCK_K": 32}, num_warps=1)]


@triton.jit
def _chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, cols, col_ok, NORM: tl.constexpr, SWIGLU: tl.constexpr):
    # one BLOCK_K chunk of the row against its weight rows w (and the up rows wu)
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if NORM:  # RMSNorm's scale is one number per row: summed alongside, applied at the end; the
        ss += x * x  # row times the norm's weight is rounded as `_block_chunk` must (its dot's input)
        x = (x * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)).to(w.dtype).to(tl.float32)
    acc += w.to(tl.float32) * x[None, :]
    if SWIGLU:
        acc_up += wu.to(tl.float32) * x[None, :]
    return acc, acc_up, ss


@triton.autotune(configs=configs, key=["N", "K", "NORM", "SWIGLU", "RESIDUAL"])
@triton.jit
def row_product(x_ptr, w_ptr, b_ptr, nw_ptr, r_ptr, y_ptr, N, K, stride_wn, eps,
                HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
    ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
    wu = w
    if SWIGLU:
        wu = tl.load(w_ptr + (rows[:, None] + N) * stride_wn + cols[None, :], mask=ok, other=0.0,
                     eviction_policy="evict_first")
    if PDL:
        gdc_wait()  # from here on: the row, the residual, and every store
    acc, acc_up, ss = _chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, cols, col_ok, NORM, SWIGLU)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0,
                    eviction_policy="evict_first")
        if SWIGLU:
            wu = tl.load(w_ptr + (rows[:, None] + N) * stride_wn + cols[None, :], mask=ok, other=0.0,
                         eviction_policy="evict_first")
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
        gate = y.to(dt).to(tl.float32)
        up = up.to(dt).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    if RESIDUAL:
        y = y.to(dt).to(tl.float32) + tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(dt), mask=row_ok)


# (BLOCK_N, BLOCK_K, SPLIT, warps, stages): a block's rows are re-read by every program, so BLOCK_N
# is wide (the re-reads are BM / BLOCK_N of the weight bytes) and SPLIT splits K for enough programs
block_configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT": sp}, num_warps=w, num_stages=st)
                 for n, k, sp, w, st in [(32, 128, 4, 4, 4), (64, 64, 4, 4, 4), (64, 128, 2, 4, 4), (64, 128, 4, 4, 4),
                                         (64, 128, 8, 4, 3), (128, 64, 4, 4, 4), (128, 128, 2, 8, 3),
                                         (128, 128, 4, 8, 3), (64, 256, 1, 4, 3)]]
if os.environ.get("TRITON_INTERPRET") == "1":  # two splits: the CPU tests run the fix-up
    block_configs = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": 2}, num_warps=1)]


@triton.jit
def _block_chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, m, m_ok, cols, col_ok, K, NORM: tl.constexpr,
                 SWIGLU: tl.constexpr, IEEE: tl.constexpr):
    # one BLOCK_K chunk of the block's rows [BM, BLOCK_K] against weight rows w (and up rows wu)
    x = tl.load(x_ptr + m[:, None] * K + cols[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
    if NORM:  # as `_chunk`: squares summed alongside, the row times the norm's weight rounded
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
        x = (xf * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]).to(w.dtype)
    if IEEE:  # fp32 models and Triton's interpreter (whose bf16 dot is broken): exact fp32 products
        acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        if SWIGLU:
            acc_up += tl.dot(x.to(tl.float32), tl.trans(wu.to(tl.float32)), input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w), acc)
        if SWIGLU:
            acc_up = tl.dot(x, tl.trans(wu), acc_up)
    return acc, acc_up, ss


@triton.jit
def _block_epilogue(acc, acc_up, ss, b_ptr, r_ptr, y_ptr, m, m_ok, rows, row_ok, N, K, eps, HAS_BIAS: tl.constexpr,
                    NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
    # row_product's epilogue for a tile [BM, BLOCK_N]: the norm's scale, bias, SwiGLU, residual
    dt = y_ptr.dtype.element_ty
    y = acc
    if NORM:
        rstd = tl.rsqrt(ss / K + eps)
        y = y * rstd[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        up = acc_up
        if NORM:
            up = up * rstd[:, None]
        gate = y.to(dt).to(tl.float32)
        up = up.to(dt).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    at = m[:, None] * N + rows[None, :]
    out_ok = m_ok[:, None] & row_ok[None, :]
    if RESIDUAL:
        y = y.to(dt).to(tl.float32) + tl.load(r_ptr + at, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + at, y.to(dt), mask=out_ok)


@triton.autotune(configs=block_configs, key=["BM", "N", "K", "NORM", "SWIGLU", "RESIDUAL"])
@triton.jit
def block_product(x_ptr, w_ptr, b_ptr, nw_ptr, r_ptr, y_ptr, part_ptr, ss_ptr, count_ptr, M, N, K, stride_wn, eps,
                  HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr,
                  IEEE: tl.constexpr, PDL: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    # `row_product` for a block of M <= BM rows (a token tree): y[M, N] = x[M, K] @ W.T through
    # tensor-core products with the same epilogues, roundings and PDL order. Program (tile of
    # BLOCK_N weight rows, split of K): with SPLIT > 1 each writes its partial sums (and the rows'
    # partial sums of squares) to part / ss, and the tile's last program to finish (a counter per
    # tile, reset by it) adds them in split order, so the result does not depend on which was last
    if PDL:
        gdc_launch_dependents()
    tile = tl.program_id(0)
    split = tl.program_id(1)
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m = tl.arange(0, BM)
    m_ok = m < M
    acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
    k_lo = split * per_split
    k_hi = tl.minimum(K, k_lo + per_split)
    cols = k_lo + tl.arange(0, BLOCK_K)
    col_ok = cols < k_hi
    ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0, eviction_policy="evict_first")
    wu = w
    if SWIGLU:
        wu = tl.load(w_ptr + (rows[:, None] + N) * stride_wn + cols[None, :], mask=ok, other=0.0,
                     eviction_policy="evict_first")
    if PDL:
        gdc_wait()
    acc, acc_up, ss = _block_chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, m, m_ok, cols, col_ok, K, NORM, SWIGLU,
                                   IEEE)
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_hi
        ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=ok, other=0.0,
                    eviction_policy="evict_first")
        if SWIGLU:
            wu = tl.load(w_ptr + (rows[:, None] + N) * stride_wn + cols[None, :], mask=ok, other=0.0,
                         eviction_policy="evict_first")
        acc, acc_up, ss = _block_chunk(acc, acc_up, ss, w, wu, x_ptr, nw_ptr, m, m_ok, cols, col_ok, K, NORM,
                                       SWIGLU, IEEE)
    if SPLIT == 1:
        _block_epilogue(acc, acc_up, ss, b_ptr, r_ptr, y_ptr, m, m_ok, rows, row_ok, N, K, eps, HAS_BIAS, NORM, SWIGLU,
                        RESIDUAL)
    else:
        # part: [SPLIT, 2, BM, N] fp32 (the up half for SwiGLU); ss: [tiles, SPLIT, BM]
        at = m[:, None] * N + rows[None, :]
        tl.store(part_ptr + split * 2 * BM * N + at, acc, mask=row_ok[None, :])
        if SWIGLU:
            tl.store(part_ptr + (split * 2 + 1) * BM * N + at, acc_up, mask=row_ok[None, :])
        if NORM:
            tl.store(ss_ptr + (tile * SPLIT + split) * BM + m, ss)
        tl.debug_barrier()  # every thread's partial stored before the counter moves
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:  # the last of the tile's splits: the sum, in split order
            acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
            ss = tl.zeros((BM,), dtype=tl.float32)
            for sp in tl.static_range(SPLIT):
                acc += tl.load(part_ptr + sp * 2 * BM * N + at, mask=row_ok[None, :], other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    acc_up += tl.load(part_ptr + (sp * 2 + 1) * BM * N + at, mask=row_ok[None, :], other=0.0,
                                      cache_modifier=".cg")
                if NORM:
                    ss += tl.load(ss_ptr + (tile * SPLIT + sp) * BM + m, cache_modifier=".cg")
            _block_epilogue(acc, acc_up, ss, b_ptr, r_ptr, y_ptr, m, m_ok, rows, row_ok, N, K, eps, HAS_BIAS, NORM,
                            SWIGLU, RESIDUAL)
            tl.atomic_xchg(count_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next product


@triton.jit
def block_rope(qkv_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr, S, stride_kh, stride_ks,
               H: tl.constexpr, KVH: tl.constexpr, HP: tl.constexpr, VP: tl.constexpr, D: tl.constexpr,
               PDL: tl.constexpr):
    # program per block token s: rotary on its H query and KVH key heads as `attention_split` does
    # for one token; q goes to q [H, S, D], the key and value to the caches at slot slots[s]
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    dt = qkv_ptr.dtype.element_ty
    s = tl.program_id(0)
    d = tl.arange(0, D)
    rot = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + s * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + s * D + d).to(tl.float32)
    row = qkv_ptr + s * (H + 2 * KVH) * D
    hh = tl.arange(0, HP)  # the query heads, then the key heads
    h_ok = hh < H + KVH
    x = tl.load(row + hh[:, None] * D + d[None, :], mask=h_ok[:, None], other=0.0).to(tl.float32)
    xr = tl.load(row + hh[:, None] * D + rot[None, :], mask=h_ok[:, None], other=0.0).to(tl.float32)
    y = (x * cos[None, :] + sign[None, :] * xr * sin[None, :]).to(dt)
    tl.store(q_ptr + (hh[:, None] * S + s) * D + d[None, :], y, mask=(hh < H)[:, None])
    slot = tl.load(slot_ptr + s)
    kv = tl.where(hh >= H, hh - H, 0)
    tl.store(kc_ptr + kv[:, None] * stride_kh + slot * stride_ks + d[None, :], y, mask=((hh >= H) & h_ok)[:, None])
    vv = tl.arange(0, VP)
    v_ok = vv < KVH
    v = tl.load(row + (H + KVH + vv[:, None]) * D + d[None, :], mask=v_ok[:, None], other=0.0)
    tl.store(vc_ptr + vv[:, None] * stride_kh + slot * stride_ks + d[None, :], v, mask=v_ok[:, None])


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
def attention_merge(m_ptr, l_ptr, acc_ptr, len_ptr, out_ptr, NS, new, S, H, C: tl.constexpr, D: tl.constexpr,
                    SB: tl.constexpr, TOKEN_MAJOR: tl.constexpr, PDL: tl.constexpr):
    # program per query row (a head of the one-token step, head * S + token of a block): its splits
    # merged by their maxima; the filled slots are len + new (one token: len is the new token's
    # slot, new 1; a block: len its first slot, new S), and a split the row saw nothing of has
    # m = -inf and weighs nothing. Output row `row`, or TOKEN_MAJOR: token-major [S, H, D]
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
        at = (row % S) * H + row // S
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


HAS_GDC = gdc_wait is not None
