"""Class-conditional image-token decoder (LlamaGen's c2i GPT) and the image model it makes with
its VQ tokenizer, behind the same forward the engine calls for text models.

An image is a raster of VQ codes. The sequence is [class token, code_0, ..., code_{n-1}]; the
class token is an id above the codebook (`class_token(c)` = codebook_size + c), and class
`num_classes` is the *null* class that classifier-free guidance (CFG) conditions on. The 2-D
rotary embedding is LlamaGen's: position p >= 1 is grid cell p - 1, rotated by its row in half
of each head's channels and by its column in the other half; the class token's rotation is zero,
as there. Because positions are explicit, token trees verify exactly as for text.

CFG (`LoadedImageModel.guided(scale)`, `ImageRunner`) runs each forward on two rows, the real class and the null
class, and returns uncond + scale * (cond - uncond): every method sees one guided distribution, so
a lossless method stays lossless with respect to it.

Parameter names follow LlamaGen's GPT (tok_embeddings, cls_embedding.embedding_table,
layers.N.attention.wqkv, layers.N.feed_forward.w1/w2/w3, ...): `load_image_model` reads a LlamaGen
checkpoint (`gpt.pt`, its `model` entry) next to a `config.json` that names the architecture
(`llamagen_config`).

Example:
    >>> import torch
    >>> from semiar.models.image import ImageGPT, ImageGPTConfig
    >>> gpt = ImageGPT(ImageGPTConfig(vocab_size=32, dim=32, n_layer=1, n_head=2, num_classes=3, grid=2)).eval()
    >>> cache = gpt.new_cache(5)
    >>> gpt(torch.tensor([[gpt.config.class_token(1), 7, 8]]), cache).logits.shape
    torch.Size([1, 3, 32])
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError, ModelFileError, SemiarError, UnknownModelError
from .decoder import DecoderOutput, KVCache
from .vq import VQConfig, VQModel, code_neighbours, load_vq_state_dict, unwrap_checkpoint


@dataclass
class ImageGPTConfig:
    vocab_size: int = 16384  # codebook size
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    grid: int = 16  # codes per side: the image is grid x grid tokens

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_dim(self) -> int:
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return -(-h // self.multiple_of) * self.multiple_of

    @property
    def seq_len(self) -> int:
        return 1 + self.grid * self.grid

    @property
    def null_class(self) -> int:
        return self.num_classes

    def class_token(self, c: int) -> int:
        """The prompt id for class c (c = num_classes: the null class)."""
        return self.vocab_size + c

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageGPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


#: LlamaGen's class-conditional sizes (n_layer, n_head, dim)
LLAMAGEN_GPT = {"GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
                "GPT-XXL": (48, 24, 1536), "GPT-XXXL": (48, 40, 2560)}


def rope_2d(cfg: ImageGPTConfig) -> torch.Tensor:
    """[seq_len, head_dim // 2, 2] (cos, sin) per position: zeros for the class token, then the
    grid in raster order, rows in the first half of the pairs and columns in the second."""
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.outer(torch.arange(cfg.grid).float(), freqs)  # [grid, head_dim // 4]
    g = cfg.grid
    ang = torch.cat([t[:, None, :].expand(g, g, -1), t[None, :, :].expand(g, g, -1)], dim=-1).flatten(0, 1)
    table = torch.stack([ang.cos(), ang.sin()], dim=-1)
    return torch.cat([torch.zeros(1, cfg.head_dim // 2, 2), table])


def _rotate(x: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] with (even, odd) channel pairs rotated by cs [B, T, D/2, 2]."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    c, s = cs[:, :, None, :, 0], cs[:, :, None, :, 1]
    out = torch.stack([xp[..., 0] * c - xp[..., 1] * s, xp[..., 1] * c + xp[..., 0] * s], dim=-1)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.h, self.kvh, self.d = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (self.h + 2 * self.kvh) * self.d, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cs, k_cache, v_cache, start, mask):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.h * self.d, self.kvh * self.d, self.kvh * self.d], dim=-1)
        q = _rotate(q.view(B, T, self.h, self.d), cs).transpose(1, 2)
        k = _rotate(k.view(B, T, self.kvh, self.d), cs).transpose(1, 2)
        v = v.view(B, T, self.kvh, self.d).transpose(1, 2)
        if k_cache is not None:
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        if self.kvh != self.h:
            k, v = k.repeat_interleave(self.h // self.kvh, 1), v.repeat_interleave(self.h // self.kvh, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.h * self.d))


class FeedForward(nn.Module):
    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cs, k_cache, v_cache, start, mask):
        h = x + self.attention(self.attention_norm(x), cs, k_cache, v_cache, start, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class _LabelEmbedder(nn.Module):
    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # + the null class


class ImageGPT(nn.Module):
    """LlamaGen-style class-conditional decoder over VQ codes, with the engine's forward signature."""

    def __init__(self, cfg: ImageGPTConfig):
        super().__init__()
        self.config = cfg
        self.cls_embedding = _LabelEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = rope_2d(cfg)

    @property
    def device(self):
        return self.output.weight.device

    @property
    def dtype(self):
        return self.output.weight.dtype

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, c.n_kv_head or c.n_head, c.head_dim, capacity, self.dtype, self.device, batch)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        V = self.config.vocab_size
        is_cls = ids >= V
        x = self.tok_embeddings(ids.clamp(max=V - 1))
        if bool(is_cls.any()):
            x = torch.where(is_cls.unsqueeze(-1), self.cls_embedding.embedding_table((ids - V).clamp(min=0)), x)
        return x

    def forward(self, input_ids: torch.Tensor, cache: Optional[KVCache] = None, positions=None, tree_mask=None,
                logits_at=None, return_hidden: bool = False) -> DecoderOutput:
        """input_ids [B, T] (class tokens above the codebook) appended to `cache` (None: one causal
        pass, for training). positions [B, T]: sequence positions (0 = the class token);
        tree_mask [T, T] among the new tokens. Returns logits over the codebook."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.capacity:
            raise ValueError(f"KV cache overflow: {start + T} > capacity {cache.capacity}")
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).unsqueeze(0).expand(B, T)
        if int(positions.max()) >= self.config.seq_len:
            raise ValueError(f"position {int(positions.max())} is past the image ({self.config.seq_len} tokens)")
        self.rope = self.rope.to(input_ids.device)
        cs = self.rope[positions]
        if positions.shape[0] != B:
            cs = cs.expand(B, *cs.shape[1:])
        block = tree_mask if tree_mask is not None else torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        mask = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device)
        mask[:, start:] = block
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            kc, vc = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            x = layer(x, cs, kc, vc, start, mask)
        if cache is not None:
            cache.length = start + T
        x = self.norm(x)
        logits = self.output(x if logits_at is None else x[:, logits_at])
        return DecoderOutput(logits=logits.float(), hidden=x if return_hidden else None)


class ImageRunner:
    """What the engine calls for an image model: the GPT without autograd, and with CFG
    (scale != 1) each forward runs [cond, uncond] as a batch of two (the null class in place of
    the class token) and mixes the logits; the cache then holds both rows."""

    def __init__(self, gpt: ImageGPT, scale: float = 1.0):
        self.gpt, self.scale = gpt, scale
        self.null = gpt.config.class_token(gpt.config.null_class)

    @property
    def device(self):
        return self.gpt.device

    def new_cache(self, capacity: int) -> KVCache:
        return self.gpt.new_cache(capacity, batch=1 if self.scale == 1.0 else 2)

    @torch.no_grad()
    def __call__(self, input_ids, cache, positions=None, tree_mask=None, logits_at=None, return_hidden=False):
        if self.scale == 1.0:
            return self.gpt(input_ids, cache, positions=positions, tree_mask=tree_mask, logits_at=logits_at,
                            return_hidden=return_hidden)
        V = self.gpt.config.vocab_size
        uncond = torch.where(input_ids >= V, torch.full_like(input_ids, self.null), input_ids)
        out = self.gpt(torch.cat([input_ids, uncond]), cache, positions=positions, tree_mask=tree_mask,
                       logits_at=logits_at, return_hidden=return_hidden)
        c, u = out.logits[:1], out.logits[1:]
        hidden = out.hidden[:1] if return_hidden else None
        return DecoderOutput(logits=u + self.scale * (c - u), hidden=hidden)


@dataclass
class LoadedImageModel:
    """An image-token target for the engine (no tokenizer, no EOS: an image is grid x grid codes)
    with its VQ tokenizer. `guided(scale)` gives the same model under classifier-free guidance."""

    name: str
    path: Optional[Path]
    gpt: ImageGPT
    vq: VQModel
    cfg_scale: float = 1.0
    tokenizer: object = None
    eos_ids: frozenset = frozenset()
    runner: object = None
    _neighbours: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.runner is None:
            self.runner = ImageRunner(self.gpt, self.cfg_scale)

    @property
    def config(self) -> ImageGPTConfig:
        return self.gpt.config

    @property
    def context_length(self) -> int:
        return self.config.seq_len

    @property
    def tokens_per_image(self) -> int:
        return self.config.grid ** 2

    @property
    def device(self):
        return self.gpt.device

    @property
    def dtype(self):
        return self.gpt.dtype

    def guided(self, scale: float) -> "LoadedImageModel":
        if not scale >= 1.0:
            raise InvalidArgumentError(f"cfg scale must be >= 1 (1 = no guidance), got {scale}")
        return replace(self, cfg_scale=float(scale), runner=None)

    def prompt(self, cls: int) -> list[int]:
        if not 0 <= cls < self.config.num_classes:
            raise InvalidArgumentError(f"class must be in 0..{self.config.num_classes - 1}, got {cls}")
        return [self.config.class_token(cls)]

    def check_prompt(self, n_prompt: int) -> None:
        if n_prompt != 1:
            raise SemiarError("an image prompt is one class token (LoadedImageModel.prompt)")

    def neighbours(self, k: int) -> torch.Tensor:
        """[V, >=k] the nearest codes of every code in the VQ latent space (cached, widest asked)."""
        if self._neighbours is None or self._neighbours.shape[1] < k:
            self._neighbours = code_neighbours(self.vq.quantize.codebook().detach(), max(k, 8))
        return self._neighbours

    @torch.no_grad()
    def decode(self, codes: list[int] | torch.Tensor) -> torch.Tensor:
        """grid*grid codes per image ([n, grid*grid] or one list) -> pixels [n, C, H, W] in [0, 1]."""
        g = self.config.grid
        t = torch.as_tensor(codes, dtype=torch.long, device=self.vq.quant_conv.weight.device).view(-1, g, g)
        return ((self.vq.decode_codes(t) + 1) / 2).clamp(0, 1)


#: the image model shipped in the package (trained here on MNIST: scripts/train_image.py)
SHIPPED = {"mnist-vq": Path(__file__).resolve().parent.parent / "data" / "image" / "mnist-vq"}


def _read_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True))


def _find(dirpath: Path, stem: str) -> Path:
    for suffix in (".safetensors", ".pt", ".pth"):
        if (dirpath / (stem + suffix)).exists():
            return dirpath / (stem + suffix)
    raise ModelFileError(f"{dirpath} has no {stem}.safetensors or {stem}.pt")


def load_gpt_state_dict(gpt: ImageGPT, sd: dict) -> None:
    """Load our own or LlamaGen-format GPT weights. LlamaGen keeps its rotary table and caches
    out of the state dict; a class table without the null row (trained without CFG dropout) is
    padded with a zero row, and CFG then has no meaning for it."""
    sd = {k: v for k, v in unwrap_checkpoint(sd).items() if not k.startswith(("freqs_cis", "causal_mask"))
          and ".kv_cache." not in k}
    table = sd.get("cls_embedding.embedding_table.weight")
    if table is not None and table.shape[0] == gpt.config.num_classes:
        sd["cls_embedding.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    missing, unexpected = gpt.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"GPT weights do not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}")


def llamagen_config(gpt: str = "GPT-B", image_size: int = 256, downsample: int = 16, codebook_size: int = 16384,
                    codebook_embed_dim: int = 8, num_classes: int = 1000) -> dict:
    """The config.json for a directory holding LlamaGen c2i weights as gpt.pt and vq.pt
    (e.g. c2i_B_256.pt and vq_ds16_c2i.pt renamed)."""
    if gpt not in LLAMAGEN_GPT:
        raise InvalidArgumentError(f"unknown LlamaGen GPT {gpt!r}; choose from {', '.join(LLAMAGEN_GPT)}")
    n_layer, n_head, dim = LLAMAGEN_GPT[gpt]
    ch_mult = [1, 1, 2, 2, 4] if downsample == 16 else [1, 2, 2, 4]
    return {"gpt": ImageGPTConfig(vocab_size=codebook_size, dim=dim, n_layer=n_layer, n_head=n_head,
                                  num_classes=num_classes, grid=image_size // downsample).to_dict(),
            "vq": VQConfig(codebook_size=codebook_size, codebook_embed_dim=codebook_embed_dim, ch_mult=tuple(ch_mult),
                           image_size=image_size).to_dict()}


def is_image_model(spec: str) -> bool:
    """Whether `spec` names an image-token model (a shipped name, or a directory whose config.json
    has gpt and vq sections)."""
    if spec in SHIPPED:
        return True
    cfg = Path(spec).expanduser() / "config.json"
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "gpt" in d and "vq" in d


def load_image_model(spec: str = "mnist-vq", device: str = "cpu", cfg_scale: float = 1.0) -> LoadedImageModel:
    """Load an image-token model: a shipped name (`mnist-vq`) or a directory with config.json
    ({"gpt": {...}, "vq": {...}}), gpt.safetensors|gpt.pt and vq.safetensors|vq.pt.

    Example:
        >>> from semiar.models.image import load_image_model
        >>> m = load_image_model("mnist-vq")
        >>> m.tokens_per_image, m.config.num_classes
        (49, 10)
    """
    path = SHIPPED.get(spec) or Path(spec).expanduser()
    if not path.is_dir():
        raise UnknownModelError(f"unknown image model {spec!r}: not {', '.join(SHIPPED)} nor a directory")
    try:
        d = json.loads((path / "config.json").read_text())
        gcfg, vcfg = ImageGPTConfig.from_dict(d["gpt"]), VQConfig.from_dict(d["vq"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}/config.json is not an image model config ({e})") from None
    gpt, vq = ImageGPT(gcfg), VQModel(vcfg)
    try:
        load_gpt_state_dict(gpt, _read_weights(_find(path, "gpt")))
        load_vq_state_dict(vq, _read_weights(_find(path, "vq")))
    except (ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: {e}") from None
    gpt, vq = gpt.float().to(device).eval(), vq.float().to(device).eval()
    name = spec if spec in SHIPPED else path.name
    model = LoadedImageModel(name, path, gpt, vq)
    return model.guided(cfg_scale) if cfg_scale != 1.0 else model
