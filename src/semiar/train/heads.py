"""Head losses for Medusa and Hydra drafters (the target frozen, as Medusa-1).

On a teacher-forced sequence (target features h, tokens x), head d at position t predicts the
token x_{t+1+d}, whose target distribution is p = softmax(LM_head(h_{t+d})). The loss is
Falcon's soft/hard pair on each head, 0.9 KL(p || q_d) + 0.1 CE(argmax p), weighted 0.8^(d-1)
as in the Medusa paper (later heads are less often reached). The target's logits at a position
serve every head that predicts it, so each row of the vocabulary-sized teacher is made once.

Example:
    >>> from semiar.train.heads import head_weights
    >>> head_weights(3)
    [1.0, 0.8, 0.64]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .csgd import LossParts, argmax_tokens, autocast_ctx

RANKS = 10  # candidates per head whose held-out accuracy is measured (the calibrated tree's ranks)


def head_weights(heads: int, decay: float = 0.8) -> list[float]:
    return [round(decay ** d, 6) for d in range(heads)]


@dataclass
class HeadBatch:
    feats: torch.Tensor  # [B, T, H] h_t (zeros past the end)
    next_emb_ids: torch.Tensor  # [B, T + K] x_{t+1} at index t (0 past the end): Hydra's inputs
    count: torch.Tensor  # [B, T] bool: x_{s+1} is a response token (the target position s counts)
    lengths: list[int]


def make_head_batch(seqs, heads: int, device, dtype) -> HeadBatch:
    """seqs: (ids [L], hidden [L, H], response [L]) per sequence, right-padded."""
    T = max(len(s[0]) for s in seqs)
    B, H = len(seqs), seqs[0][1].shape[1]
    feats = torch.zeros(B, T, H, dtype=dtype)
    nxt = torch.zeros(B, T + heads, dtype=torch.long)
    count = torch.zeros(B, T, dtype=torch.bool)
    for b, (ids, hid, resp) in enumerate(seqs):
        L = len(ids)
        feats[b, :L] = hid[:L]
        nxt[b, :L - 1] = ids[1:]
        count[b, :L - 1] = resp[1:]
    return HeadBatch(feats.to(device), nxt.to(device), count.to(device), [len(s[0]) for s in seqs])


def heads_step(net, batch: HeadBatch, embed: torch.nn.Embedding, lm_head_weight: torch.Tensor,
               autocast: Optional[torch.dtype] = None, chunk: int = 2048, alpha: float = 0.9,
               backward: bool = True) -> LossParts:
    """One training step's forward *and backward* of all heads (the caller clips and steps).
    The vocabulary-sized logits are made `chunk` rows at a time and back-propagated chunk by
    chunk into the heads' outputs, then once through the heads: memory stays at one chunk of
    logits whatever the number of heads. `acc` is head 1's top-1 agreement with the target."""
    core = getattr(net, "module", net)
    K = core.config.heads
    B, T, _ = batch.feats.shape
    with autocast_ctx(batch.feats.device.type, autocast):
        outs = net(batch.feats, embed(batch.next_emb_ids))  # K x [B, T, H]
    leaves = [o.detach().requires_grad_(backward) for o in outs]
    weights = head_weights(K)
    denom = max(1, int(batch.count[:, 1:].sum()))  # head-1 positions: every head's weight means the same
    loss_sum, soft_sum, hard_sum, correct, n_first = 0.0, 0.0, 0.0, 0, 0
    step = max(1, chunk // B)
    for a in range(0, T, step):
        b = min(T, a + step)
        with torch.no_grad():  # the target's distribution at positions s in [a, b)
            p_logits = F.linear(batch.feats[:, a:b].to(lm_head_weight.dtype), lm_head_weight).float()
            logp = p_logits.log_softmax(-1)
            top = p_logits.argmax(-1)
            del p_logits
        for d in range(1, K + 1):
            lo = max(a, d)  # head d at t = s - d predicts what h_s predicts
            if lo >= b:
                continue
            sel = batch.count[:, lo:b]
            if not bool(sel.any()):
                continue
            with torch.enable_grad():
                q_logits = F.linear(leaves[d - 1][:, lo - d:b - d][sel].to(lm_head_weight.dtype), lm_head_weight).float()
                lp, tp = logp[:, lo - a:][sel], top[:, lo - a:][sel]
                logq = q_logits.log_softmax(-1)
                soft = (lp.exp() * (lp - logq)).sum()
                hard = F.nll_loss(logq, tp, reduction="sum")
                part = weights[d - 1] * (alpha * soft + (1 - alpha) * hard) / denom
                if backward:
                    part.backward()
            loss_sum += float(part.detach())
            if d == 1:
                soft_sum += float(soft.detach())
                hard_sum += float(hard.detach())
                correct += int((q_logits.argmax(-1) == tp).sum())
                n_first += int(sel.sum())
    if backward:
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        torch.autograd.backward(outs, grads)
    loss = torch.tensor(loss_sum)
    return LossParts(loss, 0.0, soft_sum / denom, hard_sum / denom, correct / max(1, n_first), n_first)


@torch.no_grad()
def evaluate_heads(net, seqs, embed, lm_w, device, feat_dtype, autocast=None, batches=None) -> dict:
    """Held-out accuracy of every head: rank_acc[d][r] = how often head d+1's rank-r candidate is
    the target's own token (teacher-forced prefix for Hydra); feeds Medusa's calibrated tree."""
    K = net.config.heads
    hits = torch.zeros(K, RANKS, dtype=torch.long)
    counts = [0] * K
    for group in batches or [list(range(len(seqs)))]:
        b = make_head_batch([seqs[i] for i in group], K, device, feat_dtype)
        T = b.feats.shape[1]
        with autocast_ctx(torch.device(device).type, autocast):
            outs = net(b.feats, embed(b.next_emb_ids))
        truth = argmax_tokens(b.feats, lm_w)  # [B, T]: the target's token after s
        for d in range(1, K + 1):
            if d >= T:
                continue
            sel = b.count[:, d:]
            rows, want = outs[d - 1][:, :T - d][sel], truth[:, d:][sel]
            for i in range(0, rows.shape[0], 1024):
                cand = F.linear(rows[i:i + 1024].to(lm_w.dtype), lm_w).topk(RANKS, -1).indices
                hits[d - 1] += (cand == want[i:i + 1024].unsqueeze(1)).sum(0).cpu()
            counts[d - 1] += int(sel.sum())
    rank_acc = [[round(int(h) / c, 4) if c else 0.0 for h in hits[d]] for d, c in enumerate(counts)]
    return {"rank_acc": rank_acc, "acc_by_head": [r[0] for r in rank_acc], "positions": counts[0] if counts else 0}
