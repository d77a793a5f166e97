"""GGUF quantized blocks re-expressed in the layout of torch's int4 weight-only CPU kernel
(`aten._weight_int4pack_mm_for_cpu`: w = (q - 8) * scale + zero per group of 32 along K).

Issue 27, first piece: the repacking only; the decoder does not use it yet. Q4_K maps exactly
(scale = d*sc, zero = 8*d*sc - dmin*m per sub-block of 32), before the scales are rounded to the
activation dtype.

Example:
    >>> import numpy as np
    >>> blocks = np.zeros((2, 144), dtype=np.uint8)            # two rows of one Q4_K block each
    >>> q, sz = q4k_to_int4(blocks)
    >>> tuple(q.shape), tuple(sz.shape)
    ((2, 256), (8, 2, 2))
"""

from __future__ import annotations

import numpy as np
import torch

Q4K_BLOCK, Q4K_BYTES, GROUP = 256, 144, 32


def q4k_to_int4(data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K rows (uint8 [N, K/256*144], the GGUF tensor's data) -> (q int32 [N, K] in 0..15,
    scales_and_zeros fp32 [K/32, N, 2]) such that (q - 8) * scale + zero is the dequantised weight."""
    n = data.shape[0]
    b = np.ascontiguousarray(data).reshape(n, -1, Q4K_BYTES)  # [N, blocks, 144]
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [N, nb, 1]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    s = b[..., 4:16].astype(np.int32)  # 12 bytes: 8 six-bit scales and 8 six-bit mins
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = b[..., 16:].reshape(n, -1, 4, 32)  # 4 chunks of 32 bytes: low nibbles sub-block 2i, high 2i+1
    q = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(n, -1)  # [N, K], sub-block order
    scale = (d * sc).reshape(n, -1)  # [N, K/32]
    zero = (8 * scale - (dmin * mn).reshape(n, -1))
    sz = np.stack([scale.T, zero.T], axis=-1)  # [K/32, N, 2]
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(np.ascontiguousarray(sz, dtype=np.float32))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w.T with w in torch's int4 CPU layout (`_convert_weight_to_int4pack_for_cpu(q, 1)`)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros.to(x.dtype))
