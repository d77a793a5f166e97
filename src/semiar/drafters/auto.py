"""`auto`: pick, step by step, the drafter that currently gives the most tokens per second.

Each *arm* is a drafter (copy, pld, ngram, lookahead, and draft / falcon when a draft model or a
trained drafter is given) or `ar` (an empty tree). For every arm the chooser keeps tokens emitted
per step (averaged over its recent steps, each older step weighing 0.95 times the next) and seconds
per step (its own drafting + the target forward + verification, timed from propose() to observe(),
so the wider forward of a big tree is charged to the arm that built it), both over the steps where
it drafted something. The seconds are the median of the arm's last 5 steps (the faster of its
first two while it has fewer than 3): one slow step (one-time work on an arm's first step, a
collector pause) would otherwise make the arm look dear, and an arm that looks dear is not asked,
so its estimate would not recover. Its estimated rate is tokens / seconds; `ar`'s is
1 / seconds of an empty step. A drafter may label the situation it would draft in
(`Drafter.situation`: `copy` says whether the output's last 3 tokens occur in the prompt, i.e. it
is copying); the tokens per step are then kept per label as well, and an arm with a record in the
current situation is judged on that one, so `copy`'s poor steps after an edit do not rule it out
where the output copies again.

Each step:
1. arms with too little evidence (fewer than 3 measured steps in their life, or in the situation
   they label this step) are asked first, so one unlucky step (the start of an answer or of a copy,
   lookahead's window still filling) does not rule an arm out; a lookup arm with nothing to propose
   costs nothing and is not counted. Every
   `reprobe_every` steps one arm (`ar` included) whose own interval has passed gets a step, the
   most overdue first, so a method that starts to pay (an edit reaching the quoted code) or a change
   of machine load is noticed; an arm's interval is `reprobe_every` steps times how much dearer its
   step is than the cheapest arm's (a draft model's 8 ms step on a GPU is re-tried a sixth as often
   as a 1.4 ms one; before, the arm asked longest ago was re-tried, which was nearly always it).
   A probe is skipped when it cannot pay: once an arm's cost is known (measured twice, since its
   first step may pay one-time work), its best case (its deepest possible chain all accepted,
   `max_depth + 1` tokens per step at its measured seconds per step) must beat the best estimated
   rate so far, or asking it would only spend time (a 0.5B draft model drafting 6 tokens is not
   probed while copying emits 9 tokens per step on a code task);
2. otherwise arms are tried in order of estimated rate, only while the rate beats `ar`'s by
   `margin`; the first arm that proposes a non-empty tree drafts this step (lookup arms with no
   match fall through to the next one at no cost);
3. if no arm qualifies or all proposed nothing, the step is plain autoregressive.

Costs carry over from request to request (they are properties of the machine and the model); the
acceptance record keeps a quarter of its weight at each new request (it depends on the prompt: a
code prompt's copying rate says little about a chat answer, and a record of ~20 steps at half
weight took ten steps of a new prompt to move). Whatever
the arm, verification is the engine's, so `auto` is exactly as lossless as each method.

Example (with a fake clock so that every step costs the same):
    >>> import itertools
    >>> from semiar.drafters.auto import AutoDrafter
    >>> from semiar.drafters.base import Drafter
    >>> from semiar.tree import DraftTree
    >>> class Wrong(Drafter):
    ...     name, max_nodes = "wrong", 2
    ...     def propose(self, tokens): return DraftTree.chain([-1, -1])
    >>> auto = AutoDrafter({"wrong": Wrong()}, clock=itertools.count().__next__)
    >>> auto.start([1, 2], None)
    >>> for step in range(10):
    ...     tree = auto.propose([1, 2]); auto.observe([3], 0)
    >>> auto.choices                       # three probe steps of `wrong`, then autoregressive
    Counter({'ar': 7, 'wrong': 3})
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, deque
from typing import Callable, Optional

from ..errors import InvalidArgumentError
from ..tree import DraftTree
from .base import Drafter


NEW_REQUEST_WEIGHT = 0.25  # what an arm's acceptance record weighs at the start of a new request
THIN = 3  # measured steps (over its life, and in its current situation) before an arm is judged on its record
COST_WINDOW = 5  # an arm's seconds per step: the median of its last this-many measured steps


class _Arm:
    def __init__(self, name: str, drafter: Optional[Drafter]):
        self.name, self.drafter = name, drafter
        self.tok_sum = 0.0  # tokens emitted over its recent steps (decayed)
        self.n = 0.0  # how many recent steps (decayed the same way)
        self.recent: deque = deque(maxlen=COST_WINDOW)  # seconds of its last measured steps
        # estimated seconds per step (None while unmeasured): the median of `recent`; the faster of
        # the first two while there are fewer than 3 (a first step may pay one-time work)
        self.seconds: Optional[float] = None
        self.probed_at = -1  # global step of the last measurement
        self.measured = 0  # steps measured over the arm's life (not decayed)
        self.best_case = float("inf")  # tokens one step can emit at most
        if drafter is not None:
            depth = drafter.max_depth
            self.best_case = float((depth if depth is not None else drafter.max_nodes) + 1)
        self.situation = 0  # the drafter's label of this step's situation (Drafter.situation)
        self.seen: Counter = Counter()  # measured steps per situation label (over the arm's life)
        self.by_situation: dict[int, list[float]] = {}  # label -> [tok_sum, n], decayed as the totals

    @property
    def tokens(self) -> Optional[float]:
        rec = self.by_situation.get(self.situation)
        if rec and rec[1] >= 1.0:  # enough record in this situation: judged on it
            return rec[0] / rec[1]
        return self.tok_sum / self.n if self.n else None

    @property
    def rate(self) -> float:
        """Estimated tokens/s (infinite while unmeasured)."""
        if not self.n or not self.seconds:
            return float("inf")
        return self.tokens / self.seconds

    @property
    def ceiling(self) -> float:
        """Tokens/s in the best case at the measured cost (infinite while the cost is unknown)."""
        return self.best_case / self.seconds if self.seconds else float("inf")

    def update(self, tokens: int, seconds: float, step: int, memory: float) -> None:
        self.measured += 1
        self.tok_sum = self.tok_sum * memory + tokens
        self.n = self.n * memory + 1.0
        rec = self.by_situation.setdefault(self.situation, [0.0, 0.0])
        rec[0], rec[1] = rec[0] * memory + tokens, rec[1] * memory + 1.0
        self.seen[self.situation] += 1
        self.recent.append(float(seconds))
        self.seconds = statistics.median(self.recent) if len(self.recent) >= 3 else min(self.recent)
        self.probed_at = step

    def new_request(self) -> None:
        self.tok_sum *= NEW_REQUEST_WEIGHT  # acceptance depends on the prompt: the past is a weak prior
        self.n *= NEW_REQUEST_WEIGHT
        for rec in self.by_situation.values():
            rec[0] *= NEW_REQUEST_WEIGHT
            rec[1] *= NEW_REQUEST_WEIGHT


class AutoDrafter(Drafter):
    """Chooses among `arms` (name -> drafter) per step from measured tokens/s; `ar` is implicit."""

    name = "auto"

    def __init__(self, arms: dict[str, Drafter], margin: float = 0.05, reprobe_every: int = 24,
                 memory: float = 0.95,
                 clock: Callable[[], float] = time.perf_counter):
        if not arms:
            raise InvalidArgumentError("auto needs at least one drafter to choose from")
        if "ar" in arms:
            raise InvalidArgumentError("'ar' is always an arm of auto; do not pass it")
        self.arms = [_Arm(n, d) for n, d in arms.items()] + [_Arm("ar", None)]
        self.margin, self.reprobe_every, self.clock = margin, reprobe_every, clock
        self.memory = memory
        self.needs_hidden = any(d.needs_hidden for d in arms.values())
        self.needs_node_argmax = any(d.needs_node_argmax for d in arms.values())
        self.step = 0
        self.choices: Counter = Counter()  # steps drafted by each arm (over the drafter's life)
        self._chosen: Optional[_Arm] = None
        self._t0 = 0.0
        self._asked_device = False  # whether an arm asked this step queued work on the device

    @property
    def on_device(self) -> bool:
        """Whether this step's proposal queued device work (a model arm was asked), so the engine waits
        for it only then: with a draft model among the arms, a step drafted by `copy` keeps the loop's
        one host sync."""
        return self._asked_device

    @property
    def max_nodes(self) -> int:
        return max(a.drafter.max_nodes for a in self.arms if a.drafter is not None)

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        for a in self.arms:
            a.new_request()
            if a.drafter is not None:
                a.drafter.start(prompt_ids, sampling, generator, prompt_hidden)

    def finish(self):
        for a in self.arms:
            if a.drafter is not None:
                a.drafter.finish()

    def _order(self) -> list[_Arm]:
        """Arms to ask, in order, this step; asking stops at the first non-empty tree or at `ar`."""
        ar = self.arms[-1]
        ar_rate = 0.0 if ar.seconds is None else 1.0 / ar.seconds
        rates = {a.name: a.rate for a in self.arms[:-1]}
        best = max([r for r in rates.values() if r != float("inf")] + [ar_rate])
        # probing the others only spends time; an arm measured once is asked again (one-time work)
        can_pay = [a for a in self.arms[:-1] if a.measured < 2 or a.ceiling > best]
        if self.reprobe_every and self.step % self.reprobe_every == 0:
            measured = [a for a in can_pay + [ar] if a.probed_at >= 0]  # unmeasured arms are asked anyway
            # each arm's own interval: reprobe_every steps, times how much dearer than the cheapest its
            # step is (a draft model's 8 ms step is not re-tried as often as a 2 ms lookup step)
            cheapest = min((a.seconds for a in measured if a.seconds), default=None)
            overdue = [(self.step - a.probed_at) / (self.reprobe_every * max(1.0, a.seconds / cheapest))
                       if cheapest and a.seconds else float("inf") for a in measured]
            due = [(o, a) for o, a in zip(overdue, measured) if o >= 1.0]
            first = [max(due, key=lambda oa: oa[0])[1]] if due else []
        else:
            # too little evidence yet, over its life or in its current situation: ask first
            first = [a for a in can_pay if a.measured < THIN or a.seen[a.situation] < THIN]
            if ar.seconds is None:
                first.append(ar)
        ranked = sorted((a for a in self.arms[:-1] if rates[a.name] > ar_rate * (1 + self.margin)),
                        key=lambda a: rates[a.name], reverse=True)
        return first + [a for a in ranked if a not in first]

    def propose(self, tokens: list[int]) -> DraftTree:
        self._t0 = self.clock()
        self.step += 1
        ar = self.arms[-1]
        for a in self.arms[:-1]:
            a.situation = a.drafter.situation(tokens)
        self._asked_device = False
        for a in self._order():
            if a is ar:
                break
            self._asked_device |= a.drafter.on_device
            tree = a.drafter.propose(tokens)
            if len(tree):
                self._chosen = a
                return tree
        self._chosen = ar
        return DraftTree.empty()

    def observe(self, accepted, n_draft_accepted, hidden=None, node_argmax=None):
        arm = self._chosen
        if arm is None:
            return
        arm.update(len(accepted), self.clock() - self._t0, self.step, self.memory)
        self.choices[arm.name] += 1
        for a in self.arms:
            d = a.drafter
            if d is None:
                continue
            if a is arm:
                if d.needs_node_argmax:
                    d.observe(accepted, n_draft_accepted, hidden, node_argmax=node_argmax)
                else:
                    d.observe(accepted, n_draft_accepted, hidden)
            elif d.needs_hidden:  # feature drafters must see every accepted token's features
                d.observe(accepted, 0, hidden)
        self._chosen = None

    def summary(self) -> dict:
        """Per arm: steps drafted, average tokens per step and seconds per step, rate (tokens/s)."""
        return {a.name: {"steps": self.choices[a.name], "tokens_per_step": a.tokens, "seconds_per_step": a.seconds,
                         "tokens_per_s": round(a.rate, 3)} for a in self.arms}
