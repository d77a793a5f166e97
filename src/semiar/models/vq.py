"""VQ image tokenizer: a convolutional encoder, a vector quantizer over an l2-normalised codebook,
and a decoder that turns a grid of codes back into pixels.

The module tree and parameter names are those of LlamaGen's `VQModel` (encoder.conv_blocks.N.res.M,
quantize.embedding, quant_conv, post_quant_conv, ...), so a LlamaGen tokenizer checkpoint loads with
`load_vq_state_dict` unchanged; only the image channels (3 in LlamaGen, 1 for MNIST) and the base
width are options here. The codebook also gives the image methods their notion of *similar codes*
(`code_neighbours`, used by `lantern`).

Example:
    >>> import torch
    >>> from semiar.models.vq import VQConfig, VQModel
    >>> vq = VQModel(VQConfig(codebook_size=16, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), norm_groups=8,
    ...                       z_channels=32, in_channels=1, num_res_blocks=1)).eval()
    >>> codes = vq.encode_codes(torch.zeros(2, 1, 8, 8))
    >>> codes.shape, vq.decode_codes(codes).shape
    (torch.Size([2, 4, 4]), torch.Size([2, 1, 8, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)  # one entry per resolution; the grid is image / 2**(len - 1)
    z_channels: int = 256
    num_res_blocks: int = 2
    in_channels: int = 3
    image_size: int = 256
    norm_groups: int = 32  # GroupNorm groups (LlamaGen: 32); a narrow model needs fewer

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "ch_mult" in d:
            d["ch_mult"] = tuple(d["ch_mult"])
        return cls(**d)


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=ch, eps=1e-6, affine=True)


def _swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))  # [b, hw, c]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: H -> H/2 exactly


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(res: list, attn: bool, groups: int, resample=None) -> nn.Module:
    m = nn.Module()
    m.res = nn.ModuleList(res)
    m.attn = nn.ModuleList(AttnBlock(r.conv2.out_channels, groups) for r in res) if attn else nn.ModuleList()
    if resample is not None:
        name, module = resample
        setattr(m, name, module)
    return m


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        n, g = len(c.ch_mult), c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        cin = c.ch
        for i, mult in enumerate(c.ch_mult):
            res = []
            for _ in range(c.num_res_blocks):
                res.append(ResnetBlock(cin, c.ch * mult, g))
                cin = c.ch * mult
            self.conv_blocks.append(_level(res, i == n - 1, g, None if i == n - 1 else ("downsample", Downsample(cin))))
        self.mid = nn.ModuleList([ResnetBlock(cin, cin, g), AttnBlock(cin, g), ResnetBlock(cin, cin, g)])
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, c.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        n, g = len(c.ch_mult), c.norm_groups
        cin = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(cin, cin, g), AttnBlock(cin, g), ResnetBlock(cin, cin, g)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            res = []
            for _ in range(c.num_res_blocks + 1):
                res.append(ResnetBlock(cin, c.ch * c.ch_mult[i], g))
                cin = c.ch * c.ch_mult[i]
            self.conv_blocks.append(_level(res, i == n - 1, g, None if i == 0 else ("upsample", Upsample(cin))))
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, c.in_channels, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            for i, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[i](h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        self.l2_norm = c.codebook_l2_norm
        self.embedding = nn.Embedding(c.codebook_size, c.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / c.codebook_size, 1.0 / c.codebook_size)

    def codebook(self) -> torch.Tensor:
        """[codebook_size, embed_dim] code vectors as the quantizer compares them."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z):
        """z [B, D, H, W] -> (quantised z with a straight-through gradient, codes [B, H, W], loss)."""
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codebook()
        codes = torch.cdist(z.reshape(-1, z.shape[-1]), e).argmin(-1).view(z.shape[:-1])
        zq = e[codes]
        loss = F.mse_loss(zq, z.detach()) + 0.25 * F.mse_loss(z, zq.detach())  # codebook + commitment
        zq = z + (zq - z).detach()
        return zq.permute(0, 3, 1, 2), codes, loss


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def forward(self, x):
        """Training: (reconstruction, codes, quantisation loss)."""
        zq, codes, loss = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(zq)), codes, loss

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, H, W] in [-1, 1] -> codes [B, h, w]."""
        return self.quantize(self.quant_conv(self.encoder(x)))[1]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> pixels [B, C, H, W] (about [-1, 1])."""
        zq = self.quantize.codebook()[codes].permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(zq))


def code_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """[V, k] long: for every code, the k other codes nearest to it in the codebook's latent space
    (Euclidean, nearest first). Computed in blocks, so a 16384-code book needs no V x V matrix."""
    k = min(k, codebook.shape[0] - 1)
    out = []
    for block in codebook.float().split(1024):
        d = torch.cdist(block, codebook.float())
        rows = torch.arange(len(block)) + len(out) * 1024
        d[torch.arange(len(block)), rows] = float("inf")  # a code is not its own neighbour
        out.append(d.topk(k, largest=False).indices)
    return torch.cat(out)


_LLAMAGEN_EXTRA = ("quantize.codebook_used",)


def load_vq_state_dict(model: VQModel, sd: dict) -> None:
    """Load our own or LlamaGen-format VQ weights (its `codebook_used` usage buffer is dropped; a
    `model`/`ema` wrapper and DDP `module.` prefixes are unwrapped)."""
    sd = unwrap_checkpoint(sd)
    sd = {k: v for k, v in sd.items() if k not in _LLAMAGEN_EXTRA}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"VQ weights do not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}")


def unwrap_checkpoint(sd: dict) -> dict:
    """A checkpoint's state dict without `ema`/`model`/`module`/`state_dict` wrappers and DDP or
    torch.compile prefixes (how LlamaGen and most trainers save)."""
    for key in ("ema", "model", "module", "state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
