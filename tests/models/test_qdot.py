"""The VNNI kernels (models.cpu.qdot): packing exact per GGUF type, products against a reference
with the same int8 activations, rows independent of the block, and the tiny model's block forward
equal to its one-token steps."""

import gguf
import numpy as np
import pytest
import torch

from semiar.models.cpu import qdot
from semiar.models.cpu.qdot import FIELDS, VnniLinear

from test_quant import _blocks

pytestmark = pytest.mark.skipif(not qdot.available(), reason="needs a CPU with AVX512-VNNI")
T = gguf.GGMLQuantizationType


def _weights(fmt, a, k):
    """The weights a packed part stands for, in fp32 [n, k] (the formats' definitions in qdot.cpp)."""
    n = a[0].shape[0]
    if fmt == "k4":
        codes, scm, dd = a
        c = codes.reshape(n, -1, 2, 64)
        u = np.stack([c & 15, c >> 4], axis=3).reshape(n, -1, 256).astype(np.float32)
        scm = scm.reshape(n, -1, 16).astype(np.float32)
        dd = dd.reshape(n, -1, 2).astype(np.float32)
        sc = np.repeat(scm[..., :8], 32, -1) * dd[..., :1]
        m = np.repeat(scm[..., 8:], 32, -1) * dd[..., 1:]
        return (sc * u - m).reshape(n, k)
    if fmt == "k6":
        codes, sc, d = a
        step = np.repeat(sc.reshape(n, -1, 16).astype(np.float32) * d.astype(np.float32)[..., None], 16, -1)
        return (step.reshape(n, k) * (codes.astype(np.float32) - 32))
    codes, s = a
    return np.repeat(s.astype(np.float32), 32, 1) * (codes.astype(np.float32) - 128)


@pytest.mark.parametrize("qtype,fmt", [(T.Q4_K, "k4"), (T.Q6_K, "k6"), (T.Q8_0, "b8"), (T.Q5_0, "b8"), (T.Q4_0, "b8")])
def test_pack_is_exact(qtype, fmt):
    raw = _blocks(qtype, 24, 512, seed=3)
    got_fmt, arrays, requant = qdot.pack(raw, qtype, 512, chunk_rows=10)
    want = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(24, 512)
    assert (got_fmt, requant) == (fmt, 0)
    np.testing.assert_array_equal(_weights(fmt, arrays, 512), want)


def test_other_types_are_requantised_to_8_bits():
    w = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    fmt, arrays, requant = qdot.pack(w, T.F32, 64)
    assert (fmt, requant) == ("b8", 16)
    assert np.abs(_weights(fmt, arrays, 64) - w).max() < np.abs(w).max() / 100


def _linear(specs, k):
    parts, ws = [], []
    for qtype, n, seed in specs:
        raw = _blocks(qtype, n, k, seed=seed)
        fmt, arrays, _ = qdot.pack(raw, qtype, k)
        parts.append((fmt, n, {f: torch.from_numpy(np.ascontiguousarray(a)) for f, a in zip(FIELDS[fmt], arrays)}))
        ws.append(_weights(fmt, arrays, k))
    return VnniLinear(k, parts), np.concatenate(ws)


def _int8_reference(x, w, block):
    """x quantised per block to int8 as the kernel does, times w, in float64."""
    xb = x.reshape(x.shape[0], -1, block).astype(np.float64)
    d = np.abs(xb).max(-1, keepdims=True) / 127
    xd = (np.rint(xb / np.where(d == 0, 1, d)) * d).reshape(x.shape)
    return xd @ w.astype(np.float64).T


@pytest.mark.parametrize("k,specs", [
    (512, [(T.Q4_K, 40, 1), (T.Q6_K, 24, 2), (T.Q8_0, 16, 3)]),  # activations per block of 256
    (96, [(T.Q8_0, 20, 4), (T.Q5_0, 12, 5)]),                     # per block of 32, groups left after 16
    (1024, [(T.Q4_0, 8, 6)]),
])
def test_products_match_the_int8_reference(k, specs):
    lin, w = _linear(specs, k)
    x = torch.randn(5, k)
    ref = _int8_reference(x.numpy(), w, lin.block)
    got = lin(x).double().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert lin(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_rows_do_not_depend_on_how_many_are_multiplied():
    lin, _ = _linear([(T.Q4_K, 64, 7), (T.Q6_K, 32, 8), (T.Q8_0, 32, 9)], 512)
    x = torch.randn(9, 512)
    block = lin(x)
    for i in range(9):
        assert torch.equal(lin(x[i:i + 1]), block[i:i + 1])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_vnni_block_forward_equals_one_token_steps(family):
    from tiny import tiny_quant_target

    model = tiny_quant_target(family, kernel="vnni")
    dec = model.decoder
    assert isinstance(dec.layers[0].mlp.gate_up_proj, VnniLinear)
    ids = torch.tensor([[5, 17, 33, 8, 60, 1, 2, 3, 9, 11]])
    block = dec(ids, dec.new_cache(32)).logits[:, 3:]
    cache = dec.new_cache(32)
    dec(ids[:, :3], cache)
    steps = torch.cat([dec(ids[:, t:t + 1], cache).logits for t in range(3, 10)], 1)
    assert torch.equal(block, steps)
    # close to the int4 kernel's model of the same file (both are the GGUF's weights)
    ref = tiny_quant_target(family).decoder(ids, tiny_quant_target(family).decoder.new_cache(32)).logits
    full = dec(ids, dec.new_cache(32)).logits
    assert (full - ref).abs().max() < 0.05 * ref.abs().max()


def test_unknown_kernel_is_refused(monkeypatch):
    from semiar.errors import SemiarError
    from semiar.models.quant import quant_kernel

    monkeypatch.setenv("SEMIAR_Q4_KERNEL", "avx9")
    with pytest.raises(SemiarError, match="SEMIAR_Q4_KERNEL"):
        quant_kernel()
