"""Any transformers `AutoModelForCausalLM` as a target, behind the native decoder's interface
(forward over a block with positions + tree mask, a cache that can keep selected positions).
Slower than the native decoder (dynamic cache, generic masks) but works for any architecture
transformers supports.

Example:
    >>> from semiar.models import load_model                       # doctest: +SKIP
    >>> m = load_model("path/to/hf-dir", backend="hf")             # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional

import torch

from .decoder import DecoderOutput


class HFCache:
    """Wraps a transformers DynamicCache with the KVCache verbs the engine uses."""

    def __init__(self, capacity: int):
        from transformers import DynamicCache

        self.dc = DynamicCache()
        self.capacity = capacity
        self.length = 0

    def _layers(self):
        return self.dc.layers

    def keep(self, start: int, keep_idx: list[int]) -> None:
        n = len(keep_idx)
        if list(keep_idx) != list(range(n)):
            for layer in self._layers():
                idx = torch.tensor(keep_idx, device=layer.keys.device) + start
                layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys.index_select(2, idx)], 2)
                layer.values = torch.cat([layer.values[:, :, :start], layer.values.index_select(2, idx)], 2)
        self.truncate(start + n)

    def truncate(self, n: int) -> None:
        if n < self.length:  # slice directly: crop()'s signature changed across transformers releases
            for layer in self._layers():
                layer.keys = layer.keys[:, :, :n]
                layer.values = layer.values[:, :, :n]
        self.length = min(self.length, n)


class HFDecoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "HFDecoder":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        return cls(model.to(device))

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def new_cache(self, capacity: int, batch: int = 1) -> HFCache:
        return HFCache(capacity)

    @torch.no_grad()
    def forward(self, input_ids, cache: HFCache, positions=None, tree_mask=None,
                logits_at=None, return_hidden: bool = False) -> DecoderOutput:
        B, T = input_ids.shape
        start = cache.length
        end = start + T
        if positions is None:
            positions = torch.arange(start, end, device=input_ids.device).unsqueeze(0).expand(B, T)
        if tree_mask is not None and tree_mask.shape[1] == end:
            allowed = tree_mask
        else:
            allowed = torch.ones(T, end, dtype=torch.bool, device=input_ids.device)
            allowed[:, start:] = tree_mask if tree_mask is not None else torch.ones(T, T, dtype=torch.bool).tril()
        # 4D additive mask: transformers uses a custom mask of this shape as given
        mask = torch.zeros(B, 1, T, end, dtype=self.dtype, device=input_ids.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                         past_key_values=cache.dc, use_cache=True, output_hidden_states=return_hidden)
        cache.length = end
        logits = out.logits if logits_at is None else out.logits[:, logits_at]
        hidden = out.hidden_states[-1] if return_hidden else None
        return DecoderOutput(logits=logits.float(), hidden=hidden)
