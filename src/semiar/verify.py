"""Acceptance rules: given the target's logits over a whole token tree (one forward), decide which
draft path to keep and which token the target adds after it.

- `verify_greedy`: the longest path whose every token is the target's argmax, plus the bonus token.
- `verify_sampling`: recursive rejection sampling over siblings (SpecInfer / EAGLE; for a chain it
  is Leviathan et al. / Chen et al.). The emitted tokens follow exactly the target's distribution
  after `target_probs` (temperature, top-k, top-p), the same function the AR sampler uses.
- `verify_typical`: Medusa's typical acceptance, opt-in and **lossy** under sampling.
- `LanternAcceptance`, `GroupedAcceptance`: the visual methods' relaxed rules (`lantern`, `gsd`),
  opt-in and **lossy** under sampling: a draft image code is credited with the mass of codes that
  look alike (its VQ latent neighbours, or the target's top group).
- `verify_forced`: for benchmarks only (`semiar bench --same-text`): the output follows given ids
  (another run's greedy text) instead of the argmax, and every position where the argmax differs
  is reported with its logit gap, so methods can be timed on one and the same text.

Example:
    >>> import torch
    >>> from semiar.tree import DraftTree
    >>> from semiar.verify import verify_greedy
    >>> logits = torch.eye(4)[[1, 2, 0]] * 5  # root -> argmax 1, node0 -> 2, node1 -> 0
    >>> verify_greedy(DraftTree.chain([1, 3]), logits)
    Verdict(path=[0], tokens=[1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import InvalidArgumentError
from .sampling import SamplingParams, target_probs
from .tree import DraftTree


@dataclass
class Verdict:
    path: list[int]  # accepted draft nodes, root downwards
    tokens: list[int]  # emitted: accepted draft tokens, then the target's own next token
    #: the target's argmax at root + every node, when the rule computed it (greedy)
    argmax: Optional[list[int]] = field(default=None, repr=False, compare=False)
    #: verify_forced only: (index into `tokens`, logit gap) where the forced token is not the argmax
    departures: list = field(default_factory=list, repr=False, compare=False)


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> Verdict:
    """logits: [n+1, vocab] for root + nodes (row i+1 = node i)."""
    best = logits.argmax(-1).tolist()  # one device->host copy for the whole tree
    if not len(tree):
        return Verdict([], [best[0]], best)
    path, out = _follow(tree, lambda row, depth: best[row])
    return Verdict(path, out, best)


def _follow(tree: DraftTree, want, limit: Optional[int] = None) -> tuple[list[int], list[int]]:
    """Walk down from the root: at each node (row r of the logits, depth d) emit want(r, d) and go
    on to the child holding that token, until none does (that token is the bonus) or `limit` tokens
    are out. Returns (accepted path, emitted tokens)."""
    kids = tree.children()
    node, path, out = -1, [], []
    while limit is None or len(out) < limit:
        token = want(node + 1, len(out))
        out.append(token)
        nxt = next((c for c in kids[node + 1] if tree.tokens[c] == token), None)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path, out


def verify_sampling(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                    generator: torch.Generator) -> Verdict:
    """Lossless speculative sampling over a tree.

    At a node with target distribution p, children x_1..x_m are tried in order: child i (drawn
    from q_i, one-hot when the drafter gave no distribution) is accepted with probability
    min(1, p(x_i)/q_i(x_i)); on rejection p <- norm(max(0, p - q_i)). If all are rejected the
    target's token is drawn from what remains of p. By induction the emitted token is distributed
    exactly as p, and the subtree below an accepted child continues the same way.
    """
    return _sample_walk(tree, logits, params, generator, None)


def _sample_walk(tree: DraftTree, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 relaxed) -> Verdict:
    """verify_sampling's walk; `relaxed(p, q, x)` (q None: one-hot), when given, is the acceptance
    probability of draft token x in place of min(1, p(x)/q(x)) (the lossy visual rules below);
    rejection and the residual are the exact rule's either way."""
    kids = tree.children()
    node, path, out = -1, [], []
    gen_device = generator.device
    while True:
        p = target_probs(logits[node + 1], params)
        accepted = None
        for c in kids[node + 1]:
            x = tree.tokens[c]
            q = tree.q[c] if tree.q is not None else None
            u = float(torch.rand((), generator=generator, device=gen_device))
            if relaxed is not None:
                if u < relaxed(p, q, x):
                    accepted = c
                    break
            else:
                px = float(p[x])
                qx = 1.0 if q is None else float(q[x])
                if qx > 0 and u * qx < px:  # u < min(1, px / qx) without dividing
                    accepted = c
                    break
            if q is None:
                p = p.clone()
                p[x] = 0.0
            else:
                p = (p - q.to(p.device, p.dtype)).clamp_min(0.0)
            total = float(p.sum())
            if total <= 0.0:
                # only reachable through rounding when q covered p entirely; p is then spent
                # on tokens q over-proposed, and the original p is the exact fallback.
                p = target_probs(logits[node + 1], params)
            else:
                p = p / total
        if accepted is None:
            out.append(int(torch.multinomial(p, 1, generator=generator)))
            return Verdict(path, out)
        path.append(accepted)
        out.append(tree.tokens[accepted])
        node = accepted


class RelaxedAcceptance:
    """A lossy acceptance rule over the exact sampling walk: subclasses say how likely a draft token
    is to be kept (`accept_probability(p, q, x)`); rejections resample from the exact residual, and
    greedy decoding stays exact (verify_greedy)."""

    def accept_probability(self, p: torch.Tensor, q: Optional[torch.Tensor], x: int) -> float:
        raise NotImplementedError

    def __call__(self, tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator) -> Verdict:
        if params.greedy:
            return verify_greedy(tree, logits)
        return _sample_walk(tree, logits, params, generator, self.accept_probability)


class LanternAcceptance(RelaxedAcceptance):
    """LANTERN's relaxed acceptance (Jang et al. 2024): **lossy** (method `lantern`). Image codes
    that lie close in the VQ latent space decode to near-identical patches, so a draft code x is
    credited with the target mass of its latent neighbours: A = {x} plus x's nearest codes, nearest
    first, among its k nearest, as long as the mass moved onto x stays within the total-variation
    budget delta (p(A - {x}) <= delta, which bounds the TV distance between p and the distribution
    that gave x that mass). x is accepted with probability min(1, p(A) / q(A)); a rejection
    resamples from the exact residual. Greedy decoding (temperature 0) stays exact (verify_greedy).
    neighbours: [vocab, >= k] codes by latent distance (models.vq.code_neighbours)."""

    def __init__(self, neighbours: torch.Tensor, k: int = 8, delta: float = 0.2):
        if k < 1 or k > neighbours.shape[1]:
            raise InvalidArgumentError(f"lantern k must be in 1..{neighbours.shape[1]}, got {k}")
        if not 0 <= delta <= 1:
            raise InvalidArgumentError(f"lantern delta must be in [0, 1], got {delta}")
        self.neighbours, self.k, self.delta = neighbours[:, :k], k, delta

    def mass(self, p: torch.Tensor, x: int) -> tuple[torch.Tensor, float]:
        """(the codes in A, p(A))."""
        nb = self.neighbours[x].to(p.device)
        moved = p[nb].cumsum(0)
        take = nb[moved <= self.delta]
        group = torch.cat([torch.tensor([x], device=p.device), take])
        return group, float(p[x]) + (float(moved[len(take) - 1]) if len(take) else 0.0)

    def accept_probability(self, p: torch.Tensor, q: Optional[torch.Tensor], x: int) -> float:
        group, pa = self.mass(p, x)
        qa = 1.0 if q is None else float(q.to(p.device)[group].sum())
        return min(1.0, pa / qa) if qa > 0 else 0.0



class GroupedAcceptance(RelaxedAcceptance):
    """Grouped speculative decoding's acceptance (GSD; So et al. 2025), as we read it: **lossy**
    (method `gsd`). Many image codes are equally valid next tokens, so a draft is judged with its
    group instead of alone: the group is the target's `group` most probable codes at that position
    (a dynamic cluster: it follows p, not a fixed clustering of the codebook). A draft code x inside
    the group is accepted with probability min(1, p(G) / q(G)), the group's mass under the target
    over its mass under the draft; outside it, the exact test min(1, p(x) / q(x)). A rejection
    resamples from the exact residual. Greedy decoding stays exact (verify_greedy)."""

    def __init__(self, group: int = 8):
        if group < 1:
            raise InvalidArgumentError(f"gsd group size must be >= 1, got {group}")
        self.group = group

    def accept_probability(self, p: torch.Tensor, q: Optional[torch.Tensor], x: int) -> float:
        top = torch.topk(p, min(self.group, p.shape[-1])).indices
        if not bool((top == x).any()):
            qx = 1.0 if q is None else float(q[x])
            return min(1.0, float(p[x]) / qx) if qx > 0 else 0.0
        pg = float(p[top].sum())
        qg = 1.0 if q is None else float(q.to(p.device)[top].sum())
        return min(1.0, pg / qg) if qg > 0 else 0.0



def verify_typical(tree: DraftTree, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                   epsilon: float = 0.09, delta: float = 0.3) -> Verdict:
    """Medusa's *typical acceptance*: **not lossless** (opt-in methods `medusa-typical`,
    `hydra-typical`). A draft token x below a node whose target distribution is p is accepted when
    p(x) > min(epsilon, delta * exp(-H(p))): plausible enough for a confident target, and the bar
    drops where the target itself is unsure. Among acceptable children the most probable one wins;
    where none is acceptable the target's token is sampled from p. Greedy decoding (temperature 0)
    uses `verify_greedy`, so greedy output stays exact; sampled output does not follow p exactly.
    epsilon, delta: the paper's posterior threshold and alpha (0.09, 0.3)."""
    if params.greedy:
        return verify_greedy(tree, logits)
    kids = tree.children()
    node, path, out = -1, [], []
    while True:
        p = target_probs(logits[node + 1], params)
        entropy = float(-(p * p.clamp_min(1e-20).log()).sum())
        bar = min(epsilon, delta * float(torch.exp(torch.tensor(-entropy))))
        ok = [(float(p[tree.tokens[c]]), c) for c in kids[node + 1] if float(p[tree.tokens[c]]) > bar]
        if not ok:
            out.append(int(torch.multinomial(p, 1, generator=generator)))
            return Verdict(path, out)
        _, best = max(ok)
        path.append(best)
        out.append(tree.tokens[best])
        node = best


def verify_forced(tree: DraftTree, logits: torch.Tensor, forced: list[int]) -> Verdict:
    """Greedy verification that follows `forced` (the tokens the output must have next, at least one)
    instead of the argmax: the longest path of the tree along `forced`, then forced's next token (none
    when `forced` ends there). Where a token emitted is not the argmax of its row, `departures` holds
    its index and the logit gap (argmax's logit minus the forced token's): the same forward would
    have chosen otherwise there, by that margin. The work per step (one forward, one argmax, one
    host copy) is verify_greedy's, so a method's speed on a given text is measured exactly."""
    if not forced:
        raise ValueError("verify_forced needs at least one forced token")
    best = logits.argmax(-1).tolist()
    departures = []

    def want(row, depth):
        if best[row] != forced[depth]:
            departures.append((depth, float(logits[row, best[row]] - logits[row, forced[depth]])))
        return forced[depth]

    path, out = _follow(tree, want, limit=len(forced))
    return Verdict(path, out, best, departures)


def verify(tree: DraftTree, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> Verdict:
    """Greedy when temperature is 0, lossless speculative sampling otherwise."""
    if params.greedy:
        return verify_greedy(tree, logits)
    return verify_sampling(tree, logits, params, generator)
