import gguf
import numpy as np
import torch
import torch.nn.functional as F

from semiar.models.quant import Q4K_BYTES, int4_matmul, q4k_to_int4


def _random_q4k(n, k, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, k // 256, Q4K_BYTES), dtype=np.uint8)
    b[..., 0:2] = rng.uniform(1e-3, 2e-2, (n, k // 256)).astype(np.float16).view(np.uint8).reshape(n, k // 256, 2)
    b[..., 2:4] = rng.uniform(1e-3, 2e-2, (n, k // 256)).astype(np.float16).view(np.uint8).reshape(n, k // 256, 2)
    return b.reshape(n, -1)


def test_q4k_repack_is_exact_against_gguf_dequantisation():
    n, k = 8, 512
    data = _random_q4k(n, k)
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K).reshape(n, k)
    q, sz = q4k_to_int4(data)
    scale = sz[..., 0].T.repeat_interleave(32, 1)
    zero = sz[..., 1].T.repeat_interleave(32, 1)
    w = (q.float() - 8) * scale + zero
    assert torch.allclose(w, torch.from_numpy(ref), atol=1e-5, rtol=1e-5)


def test_int4_kernel_matches_dequantised_linear():
    n, k = 64, 512
    data = _random_q4k(n, k, seed=1)
    ref = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K).reshape(n, k).copy())
    q, sz = q4k_to_int4(data)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    x = torch.randn(3, k)
    want = F.linear(x, ref)
    assert (int4_matmul(x, packed, sz) - want).abs().max() < 1e-3
    got16 = int4_matmul(x.bfloat16(), packed, sz).float()
    assert (got16 - want).abs().max() < 0.05 * want.abs().max()
