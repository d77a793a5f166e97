"""GGUF blocks -> int4 planes: exact per type against gguf's dequantisation (before the bf16 rounding
of scales), the kernel's row invariance, and the quantized linear and embedding."""

import gguf
import numpy as np
import pytest
import torch

from semiar.models import quant
from semiar.models.quant import QuantEmbedding, QuantLinear, repack

T = gguf.GGMLQuantizationType
BYTES = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}


def _blocks(qtype, n, k, seed=0):
    """Random rows of `qtype` blocks: quantised random weights, or random bytes with sane scales (K types)."""
    rng = np.random.default_rng(seed)
    if qtype not in BYTES:
        return gguf.quants.quantize(rng.normal(0, 0.1, (n, k)).astype(np.float32), qtype)
    b = rng.integers(0, 256, size=(n, k // 256, BYTES[qtype]), dtype=np.uint8)
    f16 = lambda: rng.uniform(1e-3, 2e-2, (n, k // 256)).astype(np.float16).view(np.uint8).reshape(n, k // 256, 2)  # noqa: E731
    if qtype == T.Q6_K:
        b[..., 208:210] = f16()
        if seed % 2:  # a share of groups whose two scales share a factor (exact) and some that do not
            b[..., 192:208] = rng.choice([4, 8, 12, -16], size=(n, k // 256, 16)).astype(np.int8).view(np.uint8)
    else:
        b[..., 0:2], b[..., 2:4] = f16(), f16()
    return b.reshape(n, -1)


def _fp32_weight(qtype, raw, k):
    """sum over planes of (u - 8) * s + z in fp32, from the chunk's codes (before packing)."""
    w = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(raw.shape[0], k)
    v, s, o, requant, kind = quant._groups(qtype, raw, w)
    out = np.zeros_like(w)
    for u, sc, z in quant._planes(v, s, o, kind):
        out += (u - 8) * np.repeat(sc, 32, 1) + np.repeat(z, 32, 1)
    return out, w, requant, kind


@pytest.mark.parametrize("qtype,planes", [(T.Q4_0, 1), (T.Q4_1, 1), (T.Q4_K, 1), (T.Q5_0, 2), (T.Q5_1, 2),
                                          (T.Q5_K, 2), (T.Q8_0, 2)])
def test_exact_types(qtype, planes):
    raw = _blocks(qtype, 32, 512, seed=3)
    got, want, requant, kind = _fp32_weight(qtype, raw, 512)
    assert requant == 0 and (kind == "byte") == (planes == 2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert len(repack(raw, qtype, 512).planes) == planes


@pytest.mark.parametrize("seed", [0, 1])
def test_q6k_exact_where_scales_combine_else_8bit(seed):
    raw = _blocks(T.Q6_K, 16, 512, seed=seed)
    got, want, requant, _ = _fp32_weight(T.Q6_K, raw, 512)
    groups = 16 * 512 // 32
    step = np.abs(want).reshape(16, -1, 32).max(-1, keepdims=True) / 127
    err = np.abs(got - want).reshape(16, -1, 32)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()  # at worst half a step of the 8-bit grid
    exact = (err.max(-1) < 1e-7).sum()
    assert exact >= groups - requant
    if seed == 1:
        assert requant < groups // 2  # scales from {4, 8, 12, -16}: most pairs combine exactly


def test_f32_weights_are_requantised_to_8_bits():
    w = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    got, want, requant, _ = _fp32_weight(T.F32, w, 64)
    assert requant == 32 and np.abs(got - want).max() <= np.abs(w).max() / 127


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q8_0, T.Q6_K])
def test_quant_linear_matches_dequantised_weight(qtype):
    n, k = 80, 512  # 80 rows: padded to 96 inside the kernel's layout
    raw = _blocks(qtype, n, k, seed=5)
    ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(n, k))
    lin = QuantLinear([repack(raw, qtype, k)], bias=torch.randn(n))
    x = torch.randn(2, 3, k)
    want = x @ ref.T + lin.bias
    got = lin(x)
    assert got.shape == (2, 3, n) and got.dtype == torch.float32
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_rows_do_not_depend_on_the_block_size():
    """What keeps speculation identical to ar on this path: a row's product is the same bits
    alone or inside a block of any size."""
    raw = _blocks(T.Q4_K, 256, 512, seed=7)
    raw2 = _blocks(T.Q8_0, 64, 512, seed=8)
    lin = QuantLinear([repack(raw, T.Q4_K, 512), repack(raw2, T.Q8_0, 512)])
    x = torch.randn(70, 512)
    full = lin(x)
    for m in (1, 2, 3, 5, 8, 16, 17, 33, 64):
        assert torch.equal(lin(x[:m]), full[:m]), m
    assert torch.equal(lin(x[40:41]), full[40:41])


def test_parts_merge_only_on_64_row_boundaries():
    a, b, c = (_blocks(T.Q4_0, n, 64, seed=n) for n in (64, 48, 32))
    lin = QuantLinear([repack(a, T.Q4_0, 64), repack(b, T.Q4_0, 64), repack(c, T.Q4_0, 64)])
    assert [n for n, _ in lin.parts] == [112, 32]  # 64 + 48 merged; 48 does not end a row block
    ref = torch.from_numpy(np.concatenate([gguf.quants.dequantize(r, T.Q4_0) for r in (a, b, c)]))
    x = torch.randn(4, 64)
    assert (lin(x) - x @ ref.T).abs().max() < 0.02 * (x @ ref.T).abs().max()


def test_embedding_rows_are_exact():
    raw = _blocks(T.Q4_K, 40, 256, seed=2)
    emb = QuantEmbedding(torch.from_numpy(raw), int(T.Q4_K), 256)
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    ref = np.asarray(gguf.quants.dequantize(raw, T.Q4_K), dtype=np.float32)
    assert torch.equal(emb(ids), torch.from_numpy(ref[ids.numpy()]))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_q4_block_forward_equals_one_token_steps(family):
    """A verification block's logits are bit-identical to one-token steps over the same tokens."""
    from tiny import tiny_quant_target

    dec = tiny_quant_target(family).decoder
    assert dec.layers[0].self_attn.row_exact and dec.norm.row_exact
    ids = torch.tensor([[5, 17, 33, 8, 60, 1, 2, 3, 9, 11]])
    block = dec(ids, dec.new_cache(32)).logits[:, 3:]
    cache = dec.new_cache(32)
    dec(ids[:, :3], cache)
    steps = torch.cat([dec(ids[:, t:t + 1], cache).logits for t in range(3, 10)], 1)
    assert torch.equal(block, steps)
