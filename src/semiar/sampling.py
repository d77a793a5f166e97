"""Sampling settings and the one function that turns target logits into the distribution sampled
from. Autoregressive sampling and speculative verification both call `target_probs`, so the
distribution a lossless method reproduces is exactly the one AR samples from.

Example:
    >>> import torch
    >>> from semiar.sampling import SamplingParams, target_probs
    >>> p = target_probs(torch.tensor([2.0, 1.0, 0.0]), SamplingParams(temperature=1.0, top_k=2))
    >>> p[2].item()
    0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 means no top-k cut; top_p 1 means no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        if not (self.temperature >= 0):  # also rejects NaN
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidArgumentError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise InvalidArgumentError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device="cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Distribution to sample from: temperature, then top-k, then top-p. logits: [..., vocab].

    Greedy settings return a one-hot of the argmax, so greedy is a special case of sampling.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (always keeps the first)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token id from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator).item())
