"""The one decode loop every method shares: prefill -> draft -> verify -> accept -> cache.

The target's cache always holds the context except its last token (the *root*). Each step the
drafter proposes a tree below the root; one target forward over root + tree gives the logits of
every node; the verifier picks the accepted path and the target's next token; the cache keeps
only root + accepted path. Autoregressive decoding is the same loop with an empty tree, so the
baseline and every method share stop rules, sampling and timing.

Example:
    >>> from semiar.engine import Engine                                        # doctest: +SKIP
    >>> from semiar.models import load_model                                   # doctest: +SKIP
    >>> target = load_model("smollm2-135m-instruct")                           # doctest: +SKIP
    >>> gen = Engine(target).generate(target.encode("Hi", chat=True), max_new_tokens=16)  # doctest: +SKIP
    >>> for chunk in gen: print(chunk.text, end="")                             # doctest: +SKIP
    >>> gen.stats.tau                                                           # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from .drafters.base import Drafter
from .errors import InvalidArgumentError
from .models.decoder import input_device
from .sampling import SamplingParams
from .tree import DraftTree
from .verify import Verdict, verify, verify_forced


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # decode forwards (the prefill is not counted)
    draft_tokens: int = 0  # draft nodes sent to the target
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    seconds: float = 0.0  # wall time of the whole request, prefill included
    attempted_at_depth: list = field(default_factory=list)
    accepted_at_depth: list = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per target forward (1.0 for autoregressive decoding)."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def accept_by_depth(self) -> list[float]:
        """Fraction of steps whose tree reached depth d where the path was accepted to depth d."""
        return [a / t if t else 0.0 for a, t in zip(self.accepted_at_depth, self.attempted_at_depth)]

    def to_dict(self) -> dict:
        other = self.seconds - self.prefill_seconds - self.draft_seconds - self.verify_seconds
        return {
            "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens,
            "seconds": round(self.seconds, 4), "tokens_per_s": round(self.tokens_per_s, 3),
            "tau": round(self.tau, 4), "target_forwards": self.target_forwards,
            "draft_tokens": self.draft_tokens,
            "accept_by_depth": [round(x, 4) for x in self.accept_by_depth],
            "time_split": {"prefill": round(self.prefill_seconds, 4), "draft": round(self.draft_seconds, 4),
                           "verify": round(self.verify_seconds, 4), "other": round(max(other, 0.0), 4)},
        }


@dataclass
class Chunk:
    """What one step adds: token ids and the text they complete (may be empty mid-character)."""

    token_ids: list[int]
    text: str


class _Detokenizer:
    """Incremental text with stop strings, one decode per step (not per token) over a short window.

    Decoding every generated id again for each new token made a step's host work grow with the
    output, quadratic over a request: with the Qwen tokenizer 10 µs per token on average over a
    128-token output (this project's CPU), where a copy step on the H200 emits ~7 tokens in ~3 ms;
    this way, 2 µs, and flat in the output's length (scripts/host_cost.py text). Here each step
    decodes only the ids from the previous step's start (`_prefix`) on and subtracts the text those
    older ids gave: that keeps context for tokenizers whose text depends on the token before
    (SentencePiece's leading space), and text that ends in an incomplete UTF-8 character is held
    back until a later step completes it. Stop strings are searched in the text a step adds; only a
    step that completes one is walked token by token, to find the token that completed it."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # text decoded so far (streamed up to _sent)
        self._sent = 0
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] produced the tail of the text already released
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _pending(self) -> tuple[str, bool]:
        """(the text that ids[_read:] add, whether it is complete: False while a character is
        broken at its end, whose bytes are then left out)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if not after.startswith(before):  # the window's text is not a clean suffix: decode it all
            before, after = self.text, self._decode(self.ids)
            if not after.startswith(before):
                return "", False
        if after.endswith("\ufffd"):  # a character not complete yet: its text waits, stop strings do not
            return after[len(before):].rstrip("\ufffd"), False
        return after[len(before):], True

    def _stop_at(self, new: str) -> int:
        """Where in self.text + new the first stop string starts, if it ends in `new`; else -1."""
        if not self.stop:
            return -1
        full = self.text + new
        lo = max(0, len(self.text) - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (full.find(s, lo) for s in self.stop) if i >= 0]
        return min(hits) if hits else -1

    def extend(self, token_ids: Sequence[int], last: bool = False) -> tuple[int, str]:
        """Add a step's tokens: (how many of them to keep, the text to stream now). Fewer are kept
        when a stop string ends inside the step: up to the token that completes it, the text cut
        where the stop string starts (`stopped` is then set). Text that could be the start of a
        stop string is held back until it is not, or until `last` (the request ends here)."""
        if self.tok is None:
            self.ids.extend(token_ids)
            return len(token_ids), ""
        mark = len(self.ids)
        self.ids.extend(token_ids)
        new, complete = self._pending()
        if self._stop_at(new) < 0:
            self._take(new, complete)
            return len(token_ids), self._send(last)
        del self.ids[mark:]  # a stop string ends in this step: find the token that completes it
        for n, t in enumerate(token_ids, 1):
            self.ids.append(t)
            new, complete = self._pending()
            at = self._stop_at(new)
            if at >= 0:
                self.text = (self.text + new)[:at]
                self.stopped = True
                return n, self._send(True)
            self._take(new, complete)
        raise AssertionError("a stop string found in a step was not found token by token")

    def _take(self, new: str, complete: bool) -> None:
        if complete:
            self.text += new
            self._prefix, self._read = self._read, len(self.ids)

    def _send(self, last: bool) -> str:
        end = len(self.text)
        if not last and self.stop:  # hold back a tail that a stop string may begin with
            longest = min(len(self.text), max(len(s) for s in self.stop) - 1)
            end -= next((k for k in range(longest, 0, -1)
                         if any(s.startswith(self.text[-k:]) for s in self.stop)), 0)
        delta = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return delta


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generation:
    """One request in flight. Iterate for streaming `Chunk`s; afterwards `token_ids`, `text`,
    `stats` and `stop_reason` hold the result: 'eos' (an end-of-sequence token), 'stop' (a stop
    string), 'length' (max_new_tokens reached) or 'context' (the model's context is full before
    max_new_tokens: the answer was cut by the context, not by the budget asked for)."""

    def __init__(self, engine: "Engine", prompt_ids: list[int], max_new_tokens: int,
                 sampling: SamplingParams, stop: Sequence[str], forced: Optional[Sequence[int]] = None):
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop = list(stop)
        self.forced = None if forced is None else list(forced)
        self.token_ids: list[int] = []
        self.text = ""
        self.stats = Stats(prompt_tokens=len(prompt_ids))
        self.stop_reason: Optional[str] = None
        #: with `forced`: (output index, logit gap) wherever the target's own greedy choice differed
        self.departures: list[tuple[int, float]] = []
        self._iter = self._run()

    def __iter__(self) -> Iterator[Chunk]:
        return self._iter

    def __next__(self) -> Chunk:
        return next(self._iter)

    def run(self) -> "Generation":
        """Consume the whole generation; returns self."""
        for _ in self._iter:
            pass
        return self

    def _run(self) -> Iterator[Chunk]:
        try:
            yield from self._decode()
        finally:  # the request ended: finished, stopped, or the caller abandoned the stream
            if self.engine.drafter:
                self.engine.drafter.finish()

    def _decode(self) -> Iterator[Chunk]:
        eng = self.engine
        target, drafter, stats = eng.target, eng.drafter, self.stats
        dec = target.runner  # the decoder, or its CUDA-graph replay (models.cuda.graphs)
        device = dec.device
        in_dev = input_device(dec)  # the host for graph replays: their inputs go over in one copy
        prompt = self.prompt_ids
        target.check_prompt(len(prompt))
        room = target.context_length - len(prompt)  # positions left in the model's context
        budget = min(self.max_new_tokens, room)
        if self.forced is not None:
            budget = min(budget, len(self.forced))
        max_nodes = drafter.max_nodes if drafter else 0
        cache = dec.new_cache(len(prompt) + budget + max_nodes + 1)
        generator = self.sampling.generator(device)
        detok = _Detokenizer(target.tokenizer, self.stop)
        needs_hidden = bool(drafter and drafter.needs_hidden)
        needs_argmax = bool(drafter and drafter.needs_node_argmax)
        needs_logits = bool(drafter and drafter.needs_node_logits)

        t0 = time.perf_counter()
        prompt_hidden = None
        if len(prompt) > 1:
            out = dec(torch.tensor([prompt[:-1]], device=in_dev), cache, logits_at=slice(0, 0),
                      return_hidden=needs_hidden)
            prompt_hidden = out.hidden[0] if needs_hidden else None
        _sync(device)
        stats.prefill_seconds = time.perf_counter() - t0
        if drafter:
            td = time.perf_counter()
            drafter.start(prompt, self.sampling, generator, prompt_hidden)
            stats.draft_seconds += time.perf_counter() - td

        accept = drafter.acceptance if drafter and drafter.acceptance else verify  # relaxed only if opted in
        if self.forced is not None:
            accept = self._follow_forced  # benchmarks: another run's text, the target's own choices checked
        tokens = list(prompt)  # the whole context; tokens[-1] is the root, not yet in the cache
        while len(self.token_ids) < budget and self.stop_reason is None:
            remaining = budget - len(self.token_ids)
            td = time.perf_counter()
            tree = drafter.propose(tokens) if drafter else DraftTree.empty()
            if len(tree) and tree.depth > remaining - 1:
                tree = prune_depth(tree, remaining - 1)
            if drafter and drafter.on_device:  # its forwards, timed as drafting; a host-only drafter
                _sync(device)  # (and `ar`) leaves the accept decision the loop's one host sync
            tv = time.perf_counter()
            stats.draft_seconds += tv - td

            start = cache.length
            ids = torch.tensor([[tokens[-1]] + tree.tokens], device=in_dev)
            if len(tree):
                out = dec(ids, cache, positions=tree.positions(start, in_dev).unsqueeze(0),
                          tree_mask=tree.attention_mask(in_dev), return_hidden=needs_hidden)
            else:
                out = dec(ids, cache, return_hidden=needs_hidden)
            verdict = accept(tree, out.logits[0], self.sampling, generator)
            keep = [0] + [i + 1 for i in verdict.path]
            cache.keep(start, keep)
            stats.verify_seconds += time.perf_counter() - tv
            stats.target_forwards += 1
            stats.draft_tokens += len(tree)
            self._count_depths(tree, len(verdict.path))

            emitted = list(verdict.tokens[:remaining])
            eos = next((i for i, t in enumerate(emitted) if t in target.eos_ids), None)
            if eos is not None:
                del emitted[eos + 1:]
            kept, step_text = detok.extend(emitted, last=eos is not None or len(self.token_ids) + len(emitted) >= budget)
            if detok.stopped:
                self.stop_reason = "stop"
            elif eos is not None:
                self.stop_reason = "eos"
            del emitted[kept:]
            self.token_ids.extend(emitted)
            tokens.extend(emitted)
            stats.new_tokens = len(self.token_ids)
            if drafter and self.stop_reason is None:
                td = time.perf_counter()
                hidden = out.hidden[0, keep] if needs_hidden else None
                kw = {}
                if needs_argmax:  # the target's greedy guess at every node (Jacobi drafters); greedy
                    # verification has it already, sampling costs one argmax and one host copy
                    kw["node_argmax"] = verdict.argmax or out.logits[0].argmax(-1).tolist()
                if needs_logits:  # the target's whole distribution at every node (Speculative Jacobi)
                    kw["node_logits"] = out.logits[0]
                drafter.observe(emitted, len(verdict.path), hidden, **kw)
                stats.draft_seconds += time.perf_counter() - td
            self.text = detok.text
            yield Chunk(emitted, step_text)
        if self.stop_reason is None:
            # the context, not max_new_tokens, ended it: callers tell the user the answer was cut
            self.stop_reason = "context" if room < self.max_new_tokens and len(self.token_ids) >= room else "length"
        _sync(device)
        stats.seconds = time.perf_counter() - t0

    def _follow_forced(self, tree: DraftTree, logits: torch.Tensor, sampling, generator) -> Verdict:
        """`verify`'s signature over `verify_forced`: the forced text from the next output token on,
        departures recorded at their output index."""
        done = len(self.token_ids)
        verdict = verify_forced(tree, logits, self.forced[done:])
        self.departures += [(done + i, gap) for i, gap in verdict.departures]
        return verdict

    def _count_depths(self, tree: DraftTree, accepted: int) -> None:
        s = self.stats
        while len(s.attempted_at_depth) < tree.depth:
            s.attempted_at_depth.append(0)
            s.accepted_at_depth.append(0)
        for d in range(tree.depth):
            s.attempted_at_depth[d] += 1
            if d < accepted:
                s.accepted_at_depth[d] += 1


def prune_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """The tree without nodes deeper than max_depth (no use drafting past the token budget)."""
    keep = [i for i, d in enumerate(tree.depths) if d <= max_depth]
    remap = {old: new for new, old in enumerate(keep)}
    return DraftTree([tree.tokens[i] for i in keep],
                     [remap[tree.parents[i]] if tree.parents[i] >= 0 else -1 for i in keep],
                     None if tree.q is None else [tree.q[i] for i in keep])


class Engine:
    """A target model plus an optional drafter. Without a drafter it decodes autoregressively."""

    def __init__(self, target, drafter: Optional[Drafter] = None):
        self.target = target
        self.drafter = drafter

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 128,
                 sampling: SamplingParams = SamplingParams(), stop: Sequence[str] = (),
                 forced: Optional[Sequence[int]] = None) -> Generation:
        """forced (benchmarks only, greedy): emit these ids, another run's greedy output of the same
        prompt, instead of this run's own choices, verifying each step exactly as greedy decoding does
        (one forward, one argmax); where the target would have chosen otherwise, `departures` of the
        generation records the output index and the logit gap. Methods then compare on one text."""
        if max_new_tokens <= 0:
            raise InvalidArgumentError(f"max-new-tokens must be > 0, got {max_new_tokens}")
        if forced is not None:
            if not sampling.greedy:
                raise InvalidArgumentError("a forced text is for greedy decoding only (temperature 0)")
            if self.drafter is not None and self.drafter.acceptance is not None:
                raise InvalidArgumentError(f"{self.drafter.name} accepts by its own (relaxed) rule; a forced text "
                                           "is for lossless methods")
            if not len(forced):
                raise InvalidArgumentError("a forced text needs at least one token")
        return Generation(self, prompt_ids, max_new_tokens, sampling, stop, forced)
