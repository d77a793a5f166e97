"""Quantized weight x int8 activation products on the CPU (AVX512-VNNI), compiled on first use.

The kernels (qdot.cpp) are built with torch's C++ extension tooling into torch's extension cache
(`$TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions), named by a hash of the source, the torch
version and the compiler flags, the first time they are needed (about 40 s on 2 cores), and loaded
from there afterwards. They run where the CPU has
AVX512-VNNI (`available()`); elsewhere the quantized path falls back to torch's int4 kernel.

Example:
    >>> from semiar.models.cpu import qdot
    >>> qdot.available() in (True, False)
    True
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("qdot.cpp")
# -ffp-contract=off: the scalar tails must round alike in every build, whatever the compiler fuses
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c",
          "-ffp-contract=off", "-fopenmp"]
_NEEDED = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma", "f16c")


@lru_cache(maxsize=None)
def cpu_supported() -> bool:
    """Whether this CPU has the instructions the kernels use (Linux: /proc/cpuinfo's flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return all(f in flags for f in _NEEDED)
    return False


def available() -> bool:
    """Whether the VNNI kernels can run here (the CPU has the instructions; SEMIAR_NO_VNNI=1 turns them off)."""
    return os.environ.get("SEMIAR_NO_VNNI", "") in ("", "0") and cpu_supported()


@lru_cache(maxsize=None)
def ops():
    """The compiled module (quantize_act, mm_k4, mm_k6, mm_b8); builds it on first use."""
    from torch.utils import cpp_extension

    src = _SOURCE.read_bytes()
    key = hashlib.sha256(src + torch.__version__.encode() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    try:  # into torch's extension cache ($TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), by name
        return cpp_extension.load(name=f"semiar_qdot_{key}", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as e:  # no compiler, no ninja, a failed build
        from ...errors import SemiarError

        raise SemiarError(f"could not build the VNNI kernel ({str(e).splitlines()[0][:200]}); "
                          "unset SEMIAR_Q4_KERNEL to use the int4 kernel") from None


def _f16(raw, at: int):
    import numpy as np

    return np.ascontiguousarray(raw[..., at:at + 2]).view(np.float16)[..., 0]


def pack_k4(raw):
    """Q4_K blocks (uint8 [n, K/256*144]) -> (codes uint8 [n, K/2], scm uint8 [n, K/16], dd fp16 [n, K/128])."""
    import gguf
    import numpy as np

    n = raw.shape[0]
    b = raw.reshape(n, -1, 144)
    S = b.shape[1]
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
    scm = np.concatenate([sc.reshape(n, S, 8), m.reshape(n, S, 8)], axis=-1).astype(np.uint8)
    qs = b[..., 16:].reshape(n, S, 4, 32)
    u = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, S, 256)  # weight 64j + 32h + i
    u = u.reshape(n, S, 2, 2, 64)  # [half, low/high, i]
    codes = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).astype(np.uint8).reshape(n, -1)
    dd = np.stack([_f16(b, 0), _f16(b, 2)], axis=-1).reshape(n, -1)
    return codes, scm.reshape(n, -1), dd


def pack_k6(raw, w):
    """Q6_K blocks and their dequantised weights [n, K] -> (codes uint8 [n, K], sc int8 [n, K/16], d fp16 [n, K/256])."""
    import numpy as np

    n, K = w.shape
    b = raw.reshape(n, -1, 210)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8)  # [n, S, 16]
    d = _f16(b, 208)  # [n, S]
    step = d.astype(np.float32)[..., None] * sc.astype(np.float32)  # [n, S, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(w.reshape(n, -1, 16, 16) / step[..., None])
    q = np.where(step[..., None] == 0, 0, q) + 32
    return np.clip(q, 0, 63).astype(np.uint8).reshape(n, K), np.ascontiguousarray(sc).reshape(n, -1), d


def pack_b8(v, s):
    """Signed codes v [n, K] (-128..127) and fp16-exact scales s [n, K/32] -> (codes uint8, s fp16)."""
    import numpy as np

    return (v + 128).astype(np.uint8), s.astype(np.float16)


def pack(raw, qtype, k: int, chunk_rows: int = 8192):
    """A GGUF tensor's data (uint8 [n, bytes per row] or float [n, k]) -> (format, arrays, re-quantised
    groups of 32): Q4_K -> "k4", Q6_K -> "k6" (both exact), Q8_0 / Q5_0 / Q4_0 -> "b8" (exact), anything
    else -> "b8" re-quantised to 8 bits per group of 32 (symmetric, fp16 scale)."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    qtype = T(qtype)
    raw = np.ascontiguousarray(raw)
    n = raw.shape[0]
    if k % 32:
        raise ValueError(f"a weight with {k} columns cannot run quantized (groups of 32)")
    if qtype == T.Q4_K:
        return "k4", [np.concatenate(a) for a in zip(*(pack_k4(raw[i:i + chunk_rows]) for i in range(0, n, chunk_rows)))], 0
    parts, requant = [], 0
    for i in range(0, n, chunk_rows):
        part = raw[i:i + chunk_rows]
        w = np.asarray(gguf.quants.dequantize(part, qtype), dtype=np.float32).reshape(part.shape[0], k)
        if qtype == T.Q6_K:
            parts.append(pack_k6(part, w))
            continue
        if qtype in (T.Q8_0, T.Q5_0, T.Q4_0):
            G = k // 32
            b = part.reshape(part.shape[0], G, -1)
            s = _f16(b, 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.rint(w.reshape(-1, G, 32) / s.astype(np.float32)[..., None])
            v = np.where(s[..., None] == 0, 0, v).reshape(w.shape).astype(np.int32)
        else:
            wg = w.reshape(w.shape[0], -1, 32)
            s = (np.abs(wg).max(-1) / 127.0).astype(np.float16)
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(s[..., None] == 0, 0, np.rint(wg / s.astype(np.float32)[..., None]))
            v = np.clip(v, -127, 127).astype(np.int32).reshape(w.shape)
            requant += s.size
        parts.append(pack_b8(v, s))
    fmt = "k6" if qtype == T.Q6_K else "b8"
    return fmt, [np.concatenate(a) for a in zip(*parts)], requant


#: the arrays' names per format, in pack's order
FIELDS = {"k4": ("codes", "scm", "dd"), "k6": ("codes", "sc", "d"), "b8": ("codes", "s")}


class VnniLinear(torch.nn.Module):
    """A linear layer over packed parts [(format, n, {field: tensor})], their outputs side by side;
    x in any float dtype (quantised per block of 256, or 32 where K is not a multiple of 256, to
    int8), returned in x's dtype, products summed in int32 and scaled in fp32. Inference only."""

    #: below this many weights the product runs on one thread (a tiny split waits for the second one)
    SINGLE_THREAD_BELOW = 1 << 18

    def __init__(self, k: int, parts: list, bias=None):
        super().__init__()
        self.in_features = k
        self.out_features = sum(n for _, n, _ in parts)
        self.parts = parts
        self.bias = bias
        self.block = 256 if k % 256 == 0 else 32
        if self.block != 256 and any(f != "b8" for f, _, _ in parts):
            raise ValueError("k4/k6 weights need K to be a multiple of 256")
        self.grain = self.out_features if k * self.out_features < self.SINGLE_THREAD_BELOW else 16

    def forward(self, x):
        m = ops()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        xq, dx, xs16, xs32, X = m.quantize_act(x2, self.block)
        y = torch.empty(x2.shape[0], self.out_features)
        col = 0
        for fmt, n, t in self.parts:
            if fmt == "k4":
                m.mm_k4(y, col, xq, dx, xs32, t["codes"], t["scm"], t["dd"], self.grain)
            elif fmt == "k6":
                m.mm_k6(y, col, xq, dx, xs16, t["codes"], t["sc"], t["d"], self.grain)
            else:
                m.mm_b8(y, col, xq, dx, X, t["codes"], t["s"], self.grain)
            col += n
        if self.bias is not None:
            y += self.bias
        y = y.reshape(*shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, formats={[f for f, _, _ in self.parts]}"
