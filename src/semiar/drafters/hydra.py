"""Hydra: Medusa heads that read the tokens already drafted in their branch.

Paper: Ankner, Parthasarathy, Nrusimha, Rinard, Ragan-Kelley, Brandon, *Hydra: Sequentially-
Dependent Draft Heads for Medusa Decoding* (COLM 2024). A Medusa head guesses the token d places
ahead from the target's feature alone, so every branch of the tree gets the same guesses at
depth d; a Hydra head also reads the branch it extends:

    head d input  = [h_t; E(x_{t+1}); E(y_1); ...; E(y_{d-1})]     # x_{t+1}: the root, y: drafted
    head d output = LM_head(ResBlocks(h_t + W_in · input))            # W_in = 0 at the start

so the candidates below a node depend on the path to it. Training (`semiar train-drafter --method
hydra`) teacher-forces the target's own tokens as the drafted prefix, on the same data as Medusa.
Tree, checkpoint, calibration and verification are Medusa's (`drafters/medusa.py`); the tree is
filled level by level, one batched head call per depth. `hydra-typical` is the lossy
typical-acceptance variant.

Example:
    >>> import torch
    >>> from semiar.drafters.hydra import HydraNet
    >>> from semiar.drafters.medusa import HeadsConfig
    >>> net = HydraNet(HeadsConfig(vocab_size=64, hidden_size=32, heads=2))
    >>> [o.shape for o in net(torch.zeros(1, 5, 32), torch.zeros(1, 7, 32))]
    [torch.Size([1, 5, 32]), torch.Size([1, 5, 32])]
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .medusa import HeadsConfig, MedusaDrafter, MedusaNet, ResBlock, load_heads

METHOD = "hydra"


class HydraNet(MedusaNet):
    method = METHOD

    def __init__(self, cfg: HeadsConfig):
        super().__init__(cfg)
        H = cfg.hidden_size
        # head d (1-based) reads h and d embeddings: the root and the d - 1 tokens drafted above
        self.inputs = nn.ModuleList(nn.Linear((d + 1) * H, H, bias=False) for d in range(1, cfg.heads + 1))
        for lin in self.inputs:
            nn.init.zeros_(lin.weight)
        for head in self.heads:
            assert isinstance(head[0], ResBlock)

    def forward(self, feats: torch.Tensor, tok_emb: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """feats [B, T, H] = h_t; tok_emb [B, >= T + K, H] = E(x_{t+1}) at index t (shifted by
        one: tok_emb[:, t] is the embedding of the token after position t)."""
        x = feats.to(self.dtype)
        e = tok_emb.to(self.dtype)
        T = x.shape[1]
        outs = []
        for d, (lin, head) in enumerate(zip(self.inputs, self.heads), start=1):
            cat = torch.cat([x] + [e[:, j:j + T] for j in range(d)], -1)  # [B, T, (d+1)H]
            outs.append(head(x + lin(cat)))
        return outs

    def head_features(self, feat: torch.Tensor, depth: int, path_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = path_emb.shape[0]
        x = feat.to(self.dtype).expand(n, -1)
        cat = torch.cat([x, path_emb.to(self.dtype).reshape(n, -1)], -1)  # [n, (depth+1)H]
        return self.heads[depth - 1](x + self.inputs[depth - 1](cat))


def load_hydra(path: str | Path, target, device=None, dtype=None) -> tuple[HydraNet, Optional[list]]:
    return load_heads(path, target, HydraNet, device, dtype)


class HydraDrafter(MedusaDrafter):
    """Medusa's static tree, filled with branch-dependent candidates."""

    name = METHOD

    def _level(self, depth: int, paths: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor(paths, device=self.net.device)  # [n, depth]: root + drafted tokens
        return self.lm_head(self.net.head_features(self.last, depth, self.embed(ids))).float()
