"""Token-only training data and the target's features recomputed inside each training step.

Storing a feature per token (`DistillData.hidden`) costs hidden_size * 2 bytes a token: 3 GB per
million tokens of a 1.5B target. The "online" layout keeps token ids and the response mask only;
each training step runs one batched, teacher-forced target forward (no cache, no gradients) over
its sequences and takes the final-layer features from it. On a GPU that forward is a prefill, the
fastest thing a target does, so data scales to tens of millions of tokens.

Two sources feed it:
- the target's own answers to prompts (self-distillation, `semiar.train.data`), their features
  dropped and recomputed;
- whole conversations (ShareGPT, or a JSONL of ``{"messages": [...]}``), teacher-forced: the
  tokens are the conversation's, but everything the drafter learns from (features and next-token
  distributions) is the target's own, computed on that text. This is EAGLE's fixed-data recipe;
  only the assistant turns count in the loss.

Example:
    >>> from semiar.train.online import response_mask_from_spans
    >>> response_mask_from_spans([(0, 2), (2, 5), (5, 6), (6, 9)], [(2, 6)])
    [False, True, True, True]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import InvalidArgumentError
from .csgd import Batch


def response_mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does it belong to an assistant span (by its first character), or is it the
    token right after one (the end-of-turn token the drafter must also predict)?"""
    out = [False] * len(offsets)
    si = 0
    for i, (a, _) in enumerate(offsets):
        while si < len(spans) and a >= spans[si][1]:
            if i > 0 and out[i - 1] and not out[i]:
                out[i] = True  # the token after the span
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1]:
            out[i] = True
    return out


def encode_conversations(tokenizer, conversations: list[list[dict]], max_len: int,
                         batch: int = 256) -> list[tuple[list[int], list[bool]]]:
    """Chat-template each conversation, tokenize it, mark its assistant tokens; cut at `max_len`
    tokens. Conversations with no assistant token inside the cut are dropped."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError("conversation data needs a target with a chat template")
    out = []
    for b in range(0, len(conversations), batch):
        texts, spans_all = [], []
        for msgs in conversations[b:b + batch]:
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
            spans, cur = [], 0
            for m in msgs:
                i = text.find(m["content"], cur)
                if i < 0:
                    break  # the template changed the text (e.g. stripped it): keep what matched
                if m["role"] == "assistant":
                    spans.append((i, i + len(m["content"])))
                cur = i + len(m["content"])
            texts.append(text)
            spans_all.append(spans)
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for ids, offs, spans in zip(enc["input_ids"], enc["offset_mapping"], spans_all):
            ids, offs = ids[:max_len], offs[:max_len]
            resp = response_mask_from_spans([tuple(o) for o in offs], spans)
            if any(resp[1:]):
                out.append((list(ids), resp))
    return out


def load_messages_file(path: str) -> list[list[dict]]:
    """A JSONL file, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` a line."""
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"conversation file {p} does not exist")
    convs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            msgs = obj["messages"]
            ok = isinstance(msgs, list) and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                                and isinstance(m.get("content"), str) for m in msgs)
        except (json.JSONDecodeError, KeyError, TypeError):
            ok = False
        if not ok:
            raise InvalidArgumentError(f"{p}:{n}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        convs.append(msgs)
    return convs


def load_text_source(source: str, limit: Optional[int] = None) -> list[list[dict]]:
    """`sharegpt`, `sharegpt:PATH`, or a messages JSONL file (bench prompts left out)."""
    from .prompts import bench_texts

    if source == "sharegpt" or source.startswith("sharegpt:"):
        from .sharegpt import load_conversations

        return load_conversations(source.partition(":")[2] or None, limit=limit, exclude=bench_texts())
    bench = bench_texts()
    convs = [c for c in load_messages_file(source)
             if not any(m["content"].strip() in bench for m in c if m["role"] == "user")]
    return convs[:limit] if limit is not None else convs


def pad_sequences(seqs: list[tuple[torch.Tensor, object, torch.Tensor]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, L], response [B, L], lengths [B]) right-padded, on `device`."""
    L = max(len(s[0]) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    resp = torch.zeros(len(seqs), L, dtype=torch.bool)
    lengths = torch.tensor([len(s[0]) for s in seqs])
    for b, s in enumerate(seqs):
        ids[b, :len(s[0])] = s[0]
        resp[b, :len(s[0])] = s[2]
    return ids.to(device), resp.to(device), lengths.to(device)


@torch.no_grad()
def device_batch(ids: torch.Tensor, hidden: torch.Tensor, resp: torch.Tensor, lengths: torch.Tensor, k: int) -> Batch:
    """The CSGD batch (`csgd.make_batch`'s layout) built on the device from padded ids [B, L],
    features [B, L, H], response [B, L] and lengths [B]."""
    B, L = ids.shape
    T = L - 1
    t = torch.arange(T, device=ids.device).unsqueeze(0)  # [1, T]
    n = (lengths - 1).unsqueeze(1)  # pairs per sequence
    m = (lengths - k).unsqueeze(1)  # positions with a target feature h_{t+k}
    pair = t < n
    feats = hidden[:, :T] * pair.unsqueeze(-1)
    next_ids = ids[:, 1:] * pair
    has_target = t < m
    tidx = (t + k).clamp(max=L - 1).expand(B, T)
    tfeats = torch.gather(hidden, 1, tidx.unsqueeze(-1).expand(B, T, hidden.shape[-1])) * has_target.unsqueeze(-1)
    has_glance = t < m - 1
    gidx = (t + k + 1).clamp(max=L - 1).expand(B, T)
    glance_ids = torch.gather(ids, 1, gidx) * has_glance
    ridx = torch.minimum(t + k + 1, (lengths - 1).unsqueeze(1)).clamp(min=0).expand(B, T)
    mask = torch.gather(resp, 1, ridx) & has_target
    return Batch(feats, next_ids, tfeats, glance_ids, mask, mask & has_glance)


def online_batch(target, seqs, k: int, device, autocast=None) -> Batch:
    """One training step's batch: pad, run the target teacher-forced for its features, build."""
    from .csgd import autocast_ctx

    ids, resp, lengths = pad_sequences(seqs, device)
    with autocast_ctx(torch.device(device).type, autocast):
        hidden = target.decoder.hidden_states(ids)
    return device_batch(ids, hidden.to(target.dtype), resp, lengths, k)
