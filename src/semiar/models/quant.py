"""The GGUF's quantized weights kept quantized on the CPU (`--dtype q4`, the CPU default for a GGUF).

Every linear layer (LM head included) multiplies through torch's int4 weight-only CPU kernel
(`aten._weight_int4pack_mm_for_cpu`, bf16 activations, fp32 accumulation): per group of 32
weights along K a plane computes (u - 8) * scale + zero with u in 0..15. A GGUF block maps onto
one or two such planes:

- 4-bit blocks (Q4_0, Q4_1, Q4_K): one plane, exact (Q4_K: scale = d*sc, zero = 8*d*sc - dmin*m).
- 5- and 8-bit blocks (Q5_0, Q5_1, Q5_K, Q8_0): two planes, exact: the integer code v (a signed
  byte) splits into v = 16*hi + lo; the lo plane has the block's scale, the hi plane 16x it.
- Q6_K (scales per 16 weights, the kernel's groups are 32): two planes; a group of 32 whose two
  sub-block scales combine into one integer scale with codes in a signed byte is exact, any
  other is re-quantised to 8 bits, symmetric (`QuantReport` counts them); other types (F16, F32,
  Q2_K, Q3_K, ...) are re-quantised the same way.

Exact means: equal to gguf's own dequantisation before the kernel rounds scales and zeros to
bf16 (8-bit mantissa, as its activations). The embedding keeps the GGUF's own blocks and
dequantises only the rows it looks up (gguf's reference dequantiser): exact, at the file's bytes.

The kernel's result for a row does not depend on how many rows are multiplied with it (checked
in the tests), which is what keeps speculative decoding on this path identical to `ar` on it.

Example:
    >>> import numpy as np, torch, gguf
    >>> w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    >>> blocks = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    >>> lin = QuantLinear([repack(blocks, gguf.GGMLQuantizationType.Q8_0, 64)])
    >>> ref = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0))
    >>> x = torch.randn(3, 64)
    >>> bool((lin(x) - x @ ref.T).abs().max() < 0.1)
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import ModelFileError, SemiarError

GROUP = 32  # the kernel's group along K
ROW_BLOCK = 64  # the kernel's packing is row-separable in blocks of 64 rows (N pads to 16)
CACHE_NAME = "model.q4.safetensors"
_VERSION = "2"  # 2: linear layers stored merged (qkv, gate_up)
_CHUNK_ROWS = 8192  # rows repacked at a time (keeps the fp32 intermediates near 50 MB)


def quant_available() -> bool:
    """Whether this torch build has the int4 CPU kernels the quantized path needs."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


KERNELS = ("int4", "vnni")


def quant_kernel() -> str:
    """The products the quantized path runs: "int4" (torch's int4 weight-only kernel, bf16
    activations; the default) or "vnni" (`models.cpu.qdot`: the GGUF's blocks against int8
    activations, AVX512-VNNI; opt-in with SEMIAR_Q4_KERNEL=vnni where the CPU has it)."""
    want = os.environ.get("SEMIAR_Q4_KERNEL", "int4") or "int4"
    if want not in KERNELS:
        raise SemiarError(f"SEMIAR_Q4_KERNEL={want!r}: use one of {', '.join(KERNELS)}")
    if want == "vnni":
        from .cpu import qdot

        if not qdot.cpu_supported():
            raise SemiarError("SEMIAR_Q4_KERNEL=vnni needs a CPU with AVX512-VNNI; unset it to use the int4 kernel")
    return want


def cache_name(kernel: str) -> str:
    """The cache file of a kernel's layout, beside the converted model."""
    return CACHE_NAME if kernel == "int4" else "model.q4v.safetensors"


@dataclass
class Plane:
    """One int4 plane in the kernel's layout: packed uint8 [N16, K/2], scales_zeros bf16 [K/32, N16, 2];
    rows beyond `n` are padding."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor


@dataclass
class Repacked:
    """A GGUF weight [n, k] as planes, with how many of its groups of 32 had to be re-quantised."""

    n: int
    k: int
    planes: list
    qtype: str
    requantized: int = 0
    groups: int = 0


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as fp32 [rows, blocks]."""
    return np.ascontiguousarray(raw[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _codes(w: np.ndarray, s: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Integer codes v with w = s*v + o per group of 32 (w [n, k]; s, o [n, k/32]); 0 where s is 0."""
    n, k = w.shape
    sg = np.repeat(s, GROUP, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.rint((w - np.repeat(o, GROUP, axis=1)) / sg)
    return np.where(sg == 0, 0, v).astype(np.int32)


def _groups(qtype, raw: np.ndarray, w: np.ndarray):
    """(v int [n, k], s [n, k/32], o [n, k/32], requantised groups, kind) for a chunk of rows:
    w = s*v + o per group; kind "s4" (v in -8..7), "u4" (0..15): one plane, "byte" (-128..127): two."""
    import gguf

    T = gguf.GGMLQuantizationType
    n, k = w.shape
    G = k // GROUP
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        nbytes = raw.shape[1] // G
        b = raw.reshape(n, G, nbytes)
        s = _f16(b, 0)
        o = _f16(b, 2) if qtype in (T.Q4_1, T.Q5_1) else np.zeros_like(s)
        kind = {T.Q4_0: "s4", T.Q4_1: "u4"}.get(qtype, "byte")
        return _codes(w, s, o), s, o, 0, kind
    if qtype in (T.Q4_K, T.Q5_K):
        b = raw.reshape(n, -1, raw.shape[1] // (k // 256))  # [n, superblocks, bytes]
        d, dmin = _f16(b, 0)[..., None], _f16(b, 2)[..., None]
        sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
        s = (d * sc.reshape(n, -1, 8).astype(np.float32)).reshape(n, G)  # as gguf computes them
        o = -(dmin * m.reshape(n, -1, 8).astype(np.float32)).reshape(n, G)
        return _codes(w, s, o), s, o, 0, "u4" if qtype == T.Q4_K else "byte"
    if qtype == T.Q6_K:
        b = raw.reshape(n, -1, 210)
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.int32)  # [n, sb, 16]
        d = _f16(b, 208)[..., None]
        q = np.rint(w.reshape(n, -1, 16, 16) / np.where(sc == 0, 1, d * sc)[..., None]).astype(np.int32)
        q = np.where(sc[..., None] == 0, 0, q)  # q - 32 per sub-block of 16
        pair = sc.reshape(n, -1, 8, 2)  # the two sub-blocks of each group of 32
        g = np.gcd(pair[..., 0], pair[..., 1])
        g = np.where(g == 0, 1, g)
        t = (q.reshape(n, -1, 8, 2, 16) * (pair // g[..., None])[..., None]).reshape(n, G, GROUP)
        exact = (t.min(-1) >= -128) & (t.max(-1) <= 127)
        s_exact = (d.reshape(n, -1, 1) * g).reshape(n, G)
        s_req, v_req = _symmetric8(w)
        s = np.where(exact, s_exact, s_req)
        v = np.where(exact[..., None], t, v_req.reshape(n, G, GROUP)).reshape(n, k)
        return v, s, np.zeros_like(s), int((~exact).sum()), "byte"
    s, v = _symmetric8(w)
    return v, s, np.zeros_like(s), n * G, "byte"


def _symmetric8(w: np.ndarray):
    """8-bit symmetric re-quantisation per group of 32: (s [n, k/32], v int [n, k] in -127..127)."""
    n, k = w.shape
    wg = w.reshape(n, -1, GROUP)
    s = np.abs(wg).max(-1) / 127.0
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(s[..., None] == 0, 0, np.rint(wg / s[..., None]))
    return s.astype(np.float32), np.clip(v, -127, 127).astype(np.int32).reshape(n, k)


def _pack(u: np.ndarray, s: np.ndarray, z: np.ndarray) -> Plane:
    """codes u [n, k] in 0..15, scale and zero [n, k/32] -> a Plane (rows padded to 16)."""
    n, k = u.shape
    pad = (-n) % 16
    if pad:
        u = np.pad(u, ((0, pad), (0, 0)), constant_values=8)
        s, z = np.pad(s, ((0, pad), (0, 0))), np.pad(z, ((0, pad), (0, 0)))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(u.astype(np.int32)), 1)
    sz = torch.from_numpy(np.ascontiguousarray(np.stack([s.T, z.T], axis=-1), dtype=np.float32))
    return Plane(packed, sz.to(torch.bfloat16).contiguous())


def _planes(v, s, o, kind: str) -> list:
    """Codes of one chunk -> its codes and scales per plane [(u, s, z)]: w = sum (u - 8)*s + z."""
    if kind == "s4":
        return [(v + 8, s, o)]
    if kind == "u4":
        return [(v, s, 8 * s + o)]
    lo, hi = v & 15, v >> 4  # v = 16*hi + lo, hi in -8..7
    return [(lo, s, 8 * s + o), (hi + 8, 16 * s, np.zeros_like(s))]


def repack(raw: np.ndarray, qtype, k: int) -> Repacked:
    """A GGUF tensor's data (uint8 [n, bytes per row], or float [n, k]) of type `qtype` -> Repacked."""
    import gguf

    qtype = gguf.GGMLQuantizationType(qtype)
    raw = np.ascontiguousarray(raw)
    n = raw.shape[0]
    if k % GROUP:
        raise SemiarError(f"a weight with {k} columns cannot run quantized (the kernel's groups are {GROUP})")
    chunks, requant = [], 0
    for a in range(0, n, _CHUNK_ROWS):
        part = raw[a:a + _CHUNK_ROWS]
        w = np.asarray(gguf.quants.dequantize(part, qtype), dtype=np.float32).reshape(part.shape[0], k)
        v, s, o, r, kind = _groups(qtype, part, w)
        requant += r
        chunks.append(_planes(v, s, o, kind))
    n_planes = max(len(c) for c in chunks)
    planes = []
    for p in range(n_planes):
        u = np.concatenate([c[p][0] if p < len(c) else np.full_like(c[0][0], 8) for c in chunks])
        s = np.concatenate([c[p][1] if p < len(c) else np.zeros_like(c[0][1]) for c in chunks])
        z = np.concatenate([c[p][2] if p < len(c) else np.zeros_like(c[0][2]) for c in chunks])
        planes.append(_pack(u, s, z))
    return Repacked(n, k, planes, qtype.name, requant, n * (k // GROUP))


def merge_parts(parts: list) -> list:
    """Consecutive Repacked parts of one linear layer concatenated along N where the kernel's packing
    allows (the previous part ends a row block of 64 and both have as many planes)."""
    merged: list[Repacked] = []
    for p in parts:
        last = merged[-1] if merged else None
        if last is not None and last.n % ROW_BLOCK == 0 and len(last.planes) == len(p.planes):
            planes = [Plane(torch.cat([a.packed, b.packed]), torch.cat([a.scales_zeros, b.scales_zeros], 1))
                      for a, b in zip(last.planes, p.planes)]
            merged[-1] = Repacked(last.n + p.n, p.k, planes, last.qtype)
        else:
            merged.append(p)
    return merged


#: the decoder's linear layers per layer and the GGUF tensors (HF names) each one holds, in order
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn.o_proj": ("self_attn.o_proj",),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}


class QuantLinear(nn.Module):
    """A linear layer over int4 planes: the outputs of its parts (one per GGUF tensor, merged where
    their layouts allow) side by side; x in any float dtype, multiplied in bf16, summed in fp32,
    returned in x's dtype. Inference only."""

    def __init__(self, parts: list, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features = parts[0].k
        self.out_features = sum(p.n for p in parts)
        merged = merge_parts(parts)  # a no-op for parts stored merged (the cache file's layout)
        self.parts = [(p.n, [(pl.packed, pl.scales_zeros) for pl in p.planes]) for p in merged]
        self.bias = bias

    #: below this many weights the product runs on one thread: the kernel splits any size over the
    #: thread pool, and on a loaded 2-core machine a tiny split waits ~1 ms for the second thread
    #: (measured: a 96 x 64 product 3 us on one thread, 0.8-2.5 ms on two while another process ran)
    SINGLE_THREAD_BELOW = 1 << 18

    def forward(self, x):
        if self._small and torch.get_num_threads() > 1:
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return self._forward(x)
            finally:
                torch.set_num_threads(n)
        return self._forward(x)

    @property
    def _small(self) -> bool:
        return self.in_features * self.out_features < self.SINGLE_THREAD_BELOW

    def _forward(self, x):
        # a 1.5B step calls this ~110 times: each op saved here is ~0.3 ms a token (see docs/models.md)
        shape = x.shape
        x16 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        outs = []
        for n, planes in self.parts:
            y = mm(x16, planes[0][0], GROUP, planes[0][1]).float()
            for packed, sz in planes[1:]:
                y += mm(x16, packed, GROUP, sz)  # the bf16 product added in fp32, in place
            outs.append(y if y.shape[1] == n else y[:, :n])
        y = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        if self.bias is not None:
            y += self.bias
        y = y.reshape(*shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, planes={[len(p) for _, p in self.parts]}"


class QuantEmbedding(nn.Module):
    """An embedding over the GGUF's own blocks (uint8 [vocab, bytes per row]): the rows looked up
    are dequantised by gguf (exact, fp32)."""

    def __init__(self, raw: torch.Tensor, qtype: int, dim: int):
        super().__init__()
        self.raw, self.qtype, self.embedding_dim = raw, int(qtype), dim
        self.num_embeddings = raw.shape[0]

    def forward(self, ids):
        import gguf

        rows = self.raw[ids.reshape(-1).cpu()].numpy()
        w = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(self.qtype))
        return torch.from_numpy(np.asarray(w, dtype=np.float32).reshape(*ids.shape, self.embedding_dim))


@dataclass
class QuantReport:
    """What `write_quant_cache` did per GGUF type: tensors, weights, groups re-quantised."""

    per_type: dict

    def summary(self) -> str:
        return ", ".join(f"{t}: {v['tensors']} tensors, {v['requantized']}/{v['groups']} groups re-quantised"
                         for t, v in sorted(self.per_type.items()))


def write_quant_cache(gguf_path, out_file, progress: bool = True, kernel: str = "int4") -> QuantReport:
    """Repack a llama/qwen2 GGUF's weights into `out_file` (safetensors: planes, or for the vnni kernel
    its packed blocks, the embedding's raw blocks, fp32 norms and biases; written to a temporary name
    and renamed)."""
    from rich.progress import Progress
    from safetensors.torch import save_file

    from .gguf import hf_config, hf_name, open_reader, unpermute

    import gguf

    if not quant_available():
        raise SemiarError("this torch build has no int4 CPU kernel (_weight_int4pack_mm_for_cpu); use --dtype fp32")
    gguf_path, out_file = Path(gguf_path), Path(out_file)
    reader = open_reader(gguf_path)
    cfg = hf_config(reader)
    llama = cfg["model_type"] == "llama"
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    per_type: dict[str, dict] = {}
    reps: dict[str, Repacked] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"repacking {gguf_path.name}", total=len(reader.tensors))
        for t in reader.tensors:
            name = hf_name(t.name)
            bar.advance(task)
            if name is None:
                continue
            shape = tuple(int(d) for d in reversed(t.shape))
            data = np.asarray(t.data)
            if len(shape) == 1:
                tensors[name] = torch.from_numpy(np.array(gguf.quants.dequantize(data, t.tensor_type),
                                                          dtype=np.float32).reshape(shape))
                continue
            data = data.reshape(shape[0], -1)
            proj = name.split(".")[-2]
            if llama and proj in heads:
                data = unpermute(data, heads[proj])
            base = name[:-len(".weight")]
            if name == "model.embed_tokens.weight":
                raw = np.ascontiguousarray(data).view(np.uint8).reshape(shape[0], -1)  # the blocks' bytes
                tensors["model.embed_tokens.raw"] = torch.from_numpy(raw.copy())
                meta["model.embed_tokens"] = {"qtype": int(t.tensor_type), "dim": shape[1]}
                if not cfg["tie_word_embeddings"]:
                    continue
                base = "lm_head"
            if kernel == "vnni":
                from .cpu import qdot

                fmt, arrays, requantized = qdot.pack(data, t.tensor_type, shape[1], _CHUNK_ROWS)
                for field, a in zip(qdot.FIELDS[fmt], arrays):
                    tensors[f"{base}.{field}"] = torch.from_numpy(np.ascontiguousarray(a))
                meta[base] = {"qtype": gguf.GGMLQuantizationType(t.tensor_type).name, "requantized": requantized,
                              "groups": shape[0] * (shape[1] // GROUP), "fmt": fmt, "n": shape[0], "k": shape[1]}
                c = per_type.setdefault(meta[base]["qtype"], {"tensors": 0, "requantized": 0, "groups": 0})
                c["tensors"] += 1
                c["requantized"] += requantized
                c["groups"] += meta[base]["groups"]
                continue
            r = repack(data, t.tensor_type, shape[1])
            reps[base] = r
            meta[base] = {"qtype": r.qtype, "requantized": r.requantized, "groups": r.groups}
            c = per_type.setdefault(r.qtype, {"tensors": 0, "requantized": 0, "groups": 0})
            c["tensors"] += 1
            c["requantized"] += r.requantized
            c["groups"] += r.groups
    # stored merged as each QuantLinear holds them: merging at load would copy the parts out of the
    # file's memory map, which stays mapped, and the pair's RSS held both (0.7 GB extra for the 1.5B)
    modules: dict[str, list] = {}
    targets = {f"model.layers.{i}.{mod}": [f"model.layers.{i}.{p}" for p in parts]
               for i in range(cfg["num_hidden_layers"]) for mod, parts in FUSED.items()}
    targets["lm_head"] = ["lm_head"]
    for mod, bases in targets.items():
        if kernel == "vnni":
            modules[mod] = bases
            continue
        modules[mod] = []
        for j, r in enumerate(merge_parts([reps.pop(b) for b in bases])):
            key = f"{mod}.{j}"
            for i, pl in enumerate(r.planes):
                tensors[f"{key}.{i}.w"] = pl.packed
                tensors[f"{key}.{i}.sz"] = pl.scales_zeros
            meta[key] = {"n": r.n, "k": r.k, "planes": len(r.planes), "qtype": r.qtype}
            modules[mod].append(key)
    meta["modules"] = modules
    tmp = out_file.with_name(out_file.name + f".tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"semiar_quant": _VERSION, "kernel": kernel, "layout": json.dumps(meta),
                                               "source_size": str(gguf_path.stat().st_size)})
        tmp.replace(out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return QuantReport(per_type)


def read_quant_report(cache_file) -> QuantReport:
    """The per-type counts stored in a cache file's layout."""
    from safetensors import safe_open

    with safe_open(str(cache_file), "pt") as f:
        layout = json.loads(f.metadata()["layout"])
    per_type: dict[str, dict] = {}
    for v in layout.values():
        if isinstance(v, dict) and "requantized" in v:
            c = per_type.setdefault(v["qtype"], {"tensors": 0, "requantized": 0, "groups": 0})
            c["tensors"] += 1
            c["requantized"] += v["requantized"]
            c["groups"] += v["groups"]
    return QuantReport(per_type)


def _cache_valid(cache_file: Path, gguf_path: Path, kernel: str = "int4") -> bool:
    from safetensors import safe_open

    if not cache_file.is_file():
        return False
    try:
        with safe_open(str(cache_file), "pt") as f:
            md = f.metadata() or {}
    except Exception:
        return False
    return (md.get("semiar_quant") == _VERSION and md.get("kernel", "int4") == kernel
            and md.get("source_size") == str(gguf_path.stat().st_size))


def ensure_quant_cache(gguf_path, cache_dir, progress: bool = True, kernel: Optional[str] = None) -> Path:
    """`cache_dir/model.q4.safetensors` (or the vnni kernel's `model.q4v.safetensors`) for the GGUF,
    repacked on first use; kernel None: `quant_kernel()`."""
    kernel = kernel or quant_kernel()
    out = Path(cache_dir) / cache_name(kernel)
    if not _cache_valid(out, Path(gguf_path), kernel):
        write_quant_cache(gguf_path, out, progress=progress, kernel=kernel)
    return out


def load_quant_decoder(cfg, cache_file) -> nn.Module:
    """A `Decoder` for `cfg` (DecoderConfig) whose linear layers, LM head and embedding are the
    quantized ones stored in `cache_file` (fp32 norms, biases, KV cache and residual stream)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .decoder import Attention, Decoder, RMSNorm, rope_inv_freq

    try:
        sd = load_file(str(cache_file))
        with safe_open(str(cache_file), "pt") as f:
            layout = json.loads(f.metadata()["layout"])
            kernel = f.metadata().get("kernel", "int4")
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ModelFileError(f"quantized cache {cache_file} is corrupt ({e}); delete it to rebuild it") from None
    if "modules" not in layout:
        raise ModelFileError(f"quantized cache {cache_file} is from an older semiar; delete it to rebuild it")

    def linear(mod: str, bias=None):
        if kernel == "vnni":
            from .cpu.qdot import FIELDS, VnniLinear

            vparts = []
            for key in layout["modules"][mod]:
                m = layout[key]
                vparts.append((m["fmt"], m["n"], {f: sd.pop(f"{key}.{f}") for f in FIELDS[m["fmt"]]}))
            return VnniLinear(layout[layout["modules"][mod][0]]["k"], vparts, bias)
        parts = []
        for key in layout["modules"][mod]:
            m = layout[key]
            planes = [Plane(sd.pop(f"{key}.{i}.w"), sd.pop(f"{key}.{i}.sz")) for i in range(m["planes"])]
            parts.append(Repacked(m["n"], m["k"], planes, m["qtype"]))
        return QuantLinear(parts, bias)

    def cat_bias(names):
        if names[0] not in sd:
            return None
        return torch.cat([sd.pop(n) for n in names])

    with torch.device("meta"):
        dec = Decoder(cfg)
    for i, layer in enumerate(dec.layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        layer.self_attn.qkv_proj = linear(a + "qkv_proj", cat_bias([a + f"{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]))
        layer.self_attn.o_proj = linear(a + "o_proj")
        layer.mlp.gate_up_proj = linear(m + "gate_up_proj")
        layer.mlp.down_proj = linear(m + "down_proj")
        layer.input_layernorm.weight = nn.Parameter(sd.pop(f"model.layers.{i}.input_layernorm.weight"), False)
        layer.post_attention_layernorm.weight = nn.Parameter(
            sd.pop(f"model.layers.{i}.post_attention_layernorm.weight"), False)
    e = layout["model.embed_tokens"]
    dec.embed_tokens = QuantEmbedding(sd.pop("model.embed_tokens.raw"), e["qtype"], e["dim"])
    dec.lm_head = linear("lm_head")
    dec.norm.weight = nn.Parameter(sd.pop("model.norm.weight"), False)
    dec.inv_freq = rope_inv_freq(cfg)
    # the int4 kernel is row-invariant; the fp32 parts are made so too (see Attention.row_exact):
    # otherwise their last-bit differences, rounded into bf16 activations, part speculation from ar
    for m in dec.modules():
        if isinstance(m, (Attention, RMSNorm)):
            m.row_exact = True
    left = [n for n, p in dec.named_parameters() if p.is_meta]
    if sd or left:
        raise ModelFileError(f"quantized cache {cache_file} does not match the config (left over {list(sd)[:3]}, "
                             f"missing {left[:3]}); delete it to rebuild it")
    return dec.eval()

