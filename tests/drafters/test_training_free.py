"""Lookahead, copy and auto: their own mechanics (lossless identity and the sampled distribution
are in tests/test_lossless.py and tests/test_sampling_distribution.py)."""

import itertools

import pytest

from semiar.drafters.auto import AutoDrafter
from semiar.drafters.base import Drafter
from semiar.drafters.copy import CopyDrafter
from semiar.drafters.lookahead import LookaheadDrafter, NgramPool
from semiar.drafters.lookup import PromptLookupDrafter
from semiar.engine import Engine
from semiar.errors import InvalidArgumentError
from semiar.methods import make_drafter
from semiar.tree import DraftTree
from tiny import tiny_target


# --- lookahead ----------------------------------------------------------------------------------

def test_lookahead_window_is_the_2d_mask_as_a_tree():
    d = LookaheadDrafter(window=3, ngram=3, candidates=0, pool_from_context=False)
    d.start([10, 11, 12, 13], None)
    d.levels = [[1, 2, 3], [4, 5, 6]]  # two levels of three columns
    t = d.propose([10, 11, 12, 13])
    assert t.tokens == [1, 2, 3, 4, 5, 6]
    # level 0 is a chain below the root; level 1 column i hangs below level 0 column i
    assert t.parents == [-1, 0, 1, 0, 1, 2]
    assert t.depths == [1, 2, 3, 2, 3, 4]
    mask = t.attention_mask().int().tolist()
    assert mask[5] == [1, 1, 1, 0, 0, 1, 0]  # w1[1] sees root, w0[0], w0[1] and itself


def test_lookahead_jacobi_step_slides_the_window_and_fills_the_pool():
    d = LookaheadDrafter(window=2, ngram=3, candidates=2, pool_from_context=False)
    d.start([7, 8], None)
    d.levels = [[1, 2]]
    t = d.propose([7, 8])
    # warm-up: the target's argmax at level 0 becomes level 1
    d.observe([9], 0, node_argmax=[9, 21, 22])
    assert d.levels == [[1, 2], [21, 22]]
    t = d.propose([7, 8, 9])
    argmax = [0] * (len(t) + 1)
    for col, node in enumerate(d.window_nodes[-1]):
        argmax[node + 1] = 31 + col
    d.observe([5], 0, node_argmax=argmax)
    assert d.levels == [[21, 22], [31, 32]]
    assert d.jacobi_pool.candidates(1) == [(21, 31)] and d.jacobi_pool.candidates(2) == [(22, 32)]
    # the pool's n-gram for the root is verified as a chain below it
    t = d.propose([7, 8, 9, 5, 1])
    assert [21, 31] in [t.path_tokens(p)[:2] for p in t.paths()]


def test_lookahead_keeps_its_window_when_the_engine_cut_the_tree():
    d = LookaheadDrafter(window=3, ngram=3, candidates=0, pool_from_context=False)
    d.start([1, 2, 3], None)
    before = [list(x) for x in d.levels]
    d.propose([1, 2, 3])
    d.observe([4], 0, node_argmax=[4, 5])  # fewer rows than the tree: it was pruned
    assert d.levels == before


def test_ngram_pool_keeps_the_newest_per_key():
    pool = NgramPool(3, per_key=2)
    pool.add_sequence([1, 2, 3, 1, 4, 5, 1, 6, 7])
    assert pool.candidates(1) == [(6, 7), (4, 5)]


def test_lookahead_speeds_up_a_repetitive_continuation():
    target, _ = tiny_target("qwen2")
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    gen = Engine(target, LookaheadDrafter(window=3, ngram=3, candidates=3)).generate(prompt, max_new_tokens=40).run()
    assert gen.stats.tau > 1.0


@pytest.mark.parametrize("spec", ["lookahead:0,3,3", "lookahead:3,1,3", "lookahead:3,3,-1", "3,3", "chain:4"])
def test_lookahead_bad_spec(spec):
    target, _ = tiny_target("qwen2")
    with pytest.raises(InvalidArgumentError):
        make_drafter("lookahead", target, tree=spec)


# --- copy ----------------------------------------------------------------------------------------

def simulate(drafter, source, answer, prefix):
    """Greedy verification against a known answer, without a model: returns the number of steps."""
    drafter.start(source, None)
    ctx, steps = list(source) + prefix, 0
    emitted = list(prefix)
    while len(emitted) < len(answer):
        tree = drafter.propose(ctx)
        path = next(iter(tree.paths()), [])
        acc = 0
        for node in path:
            if len(emitted) + acc < len(answer) and tree.tokens[node] == answer[len(emitted) + acc]:
                acc += 1
            else:
                break
        new = answer[len(emitted):len(emitted) + acc + 1]
        emitted += new
        ctx += new
        drafter.observe(new, acc)
        steps += 1
    return steps


def test_copy_follows_an_edited_input_in_few_steps():
    code = list(range(100, 300))  # the quoted code, 200 distinct tokens
    source = [1, 2, 3] + code + [4, 5]
    answer = code[:50] + [7, 8] + code[50:120] + code[125:] + [9]  # an insertion, a deletion, an extra line
    copy_steps = simulate(CopyDrafter(k=32), source, answer, prefix=[])
    pld_steps = simulate(PromptLookupDrafter(k=10), source, answer, prefix=[])
    assert copy_steps < len(answer) / 8
    assert copy_steps < pld_steps


def replay_tree(drafter, source, answer):
    """Steps to emit `answer` after `source` under greedy verification of whole trees."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from replay_drafts import replay

    return replay(drafter, source, answer)["steps"]


def test_copy_alternates_catch_what_the_pointer_misses():
    # an edit that inserts the same annotation after every argument: the pointer re-aligns after
    # each one, the alternates propose the annotation the output already wrote
    code = list(range(100, 300))
    source = [1, 2, 3] + code + [4, 5]
    answer = []
    for i in range(0, 200, 20):
        answer += code[i:i + 20] + [7, 8, 9]
    chain = replay_tree(CopyDrafter(k=32), source, answer)
    tree = replay_tree(CopyDrafter(k=32, alternates=4, alt_len=6, budget=48), source, answer)
    assert tree < chain


def test_copy_tree_is_lossless_and_fits_its_budget():
    target, _ = tiny_target("qwen2")
    prompt = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 12, 13, 5, 6]
    ref = Engine(target).generate(prompt, max_new_tokens=30).run().token_ids
    d = make_drafter("copy", target, tree="dynamic:4,3,12")
    assert (d.alternates, d.alt_len, d.budget) == (3, 4, 12)
    sizes = []
    propose = d.propose
    d.propose = lambda toks: sizes.append(len(t := propose(toks))) or t
    assert Engine(target, d).generate(prompt, max_new_tokens=30).run().token_ids == ref
    assert max(sizes) <= 12 and max(sizes) > 1


def test_copy_default_is_a_tree_on_cuda_and_a_chain_on_the_cpu():
    target, _ = tiny_target("qwen2")
    cpu, gpu = make_drafter("copy", target), make_drafter("copy", target, device="cuda")
    assert cpu.alternates == 0 and cpu.k_max == 32
    assert (gpu.alt_len, gpu.alternates, gpu.budget) == (8, 8, 48)
    assert make_drafter("copy", target, device="cuda", k=8).alternates == 0  # -k: a chain of 8
    assert make_drafter("copy", target, tree="dynamic:4,4,32").alternates == 4
    with pytest.raises(InvalidArgumentError):
        make_drafter("copy", target, tree="static:[[0]]")


def test_context_index_lists_earlier_occurrences_longest_match_first():
    from semiar.drafters.lookup import NgramIndex

    idx = NgramIndex(1, 2)
    toks = [1, 2, 3, 9, 2, 3, 4, 3]
    idx.sync(toks[:5])
    idx.sync(toks)  # grows incrementally
    # last token 3: after "4 3" nothing earlier; after "3": ends 3 and 6 (latest first)
    assert list(idx.latest_ends()) == [6, 3]
    idx.sync([5, 5])  # another context: rebuilt
    assert list(idx.latest_ends()) == [1]


def test_copy_drafts_nothing_without_an_anchor():
    d = CopyDrafter()
    d.start([1, 2, 3, 4], None)
    assert len(d.propose([1, 2, 3, 4, 50, 60])) == 0


# --- auto ----------------------------------------------------------------------------------------

class Oracle(Drafter):
    """Drafts the true continuation (right) or tokens the target never emits here (wrong)."""

    def __init__(self, truth, n0, k=4, right=True, clock=None, cost=0.0):
        self.truth, self.n0, self.k, self.right, self.clock, self.cost = truth, n0, k, right, clock, cost

    @property
    def max_nodes(self):
        return self.k

    def propose(self, tokens):
        if self.clock is not None:
            self.clock.t += self.cost  # an expensive drafter
        pos = len(tokens) - self.n0
        chain = self.truth[pos:pos + self.k]
        return DraftTree.chain(chain if self.right else [(t + 1) % 96 for t in chain])


class FakeClock:
    """Each reading advances time a little: every step costs the same unless a drafter adds to it."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.5
        return self.t


def auto_run(arms_fn, n=60):
    target, _ = tiny_target("qwen2")
    prompt = [5, 17, 33, 8, 60]
    ref = Engine(target).generate(prompt, max_new_tokens=n).run().token_ids
    clock = FakeClock()
    auto = AutoDrafter(arms_fn(ref + [0] * 8, len(prompt), clock), clock=clock)
    gen = Engine(target, auto).generate(prompt, max_new_tokens=n).run()
    assert gen.token_ids == ref
    return auto, gen


def test_auto_picks_the_drafter_that_is_always_right():
    auto, gen = auto_run(lambda truth, n0, clock: {"wrong": Oracle(truth, n0, right=False),
                                                    "right": Oracle(truth, n0, right=True)})
    steps = sum(auto.choices.values())
    assert auto.choices["right"] >= steps - 5  # three probes of `wrong`, one of `ar`, a re-probe
    assert gen.stats.tau > 3.5  # 5 tokens per step on the right arm, 1 on the probes


def test_auto_falls_back_to_ar_when_the_drafter_is_always_wrong():
    auto, gen = auto_run(lambda truth, n0, clock: {"wrong": Oracle(truth, n0, right=False)})
    steps = sum(auto.choices.values())
    assert auto.choices["ar"] >= 0.85 * steps
    assert auto.choices["wrong"] <= 6  # a few probes (optimism while unmeasured) and rare re-probes


def test_auto_weighs_cost_against_acceptance():
    # both always right; `slow` drafts 4 tokens but its drafting costs 10 steps' time, `fast` drafts 2
    auto, _ = auto_run(lambda truth, n0, clock: {"slow": Oracle(truth, n0, k=4, clock=clock, cost=10.0),
                                                  "fast": Oracle(truth, n0, k=2)})
    assert auto.choices["fast"] > 3 * auto.choices["slow"]


def test_auto_does_not_probe_an_arm_that_cannot_pay():
    # `slow` is always right but even all 4 of its tokens at its cost lose to `fast`'s measured rate:
    # once its cost is known (two steps: a first one may pay one-time work), it is not asked again
    # (no more thin-evidence probes, no re-probes)
    auto, _ = auto_run(lambda truth, n0, clock: {"fast": Oracle(truth, n0, k=6),
                                                  "slow": Oracle(truth, n0, k=4, clock=clock, cost=20.0)}, n=120)
    assert auto.choices["slow"] == 2
    assert auto.choices["fast"] >= sum(auto.choices.values()) - 4


class SlowOnce(Oracle):
    """Right, cheap, except its proposals numbered in `slow_at` (from 0), which cost `extra` more:
    one-time work on a first step (a buffer allocated, a graph replayed first), a pause."""

    def __init__(self, *a, slow_at=(0,), extra=0.0, **k):
        super().__init__(*a, **k)
        self.slow_at, self.extra, self.asked = set(slow_at), extra, 0

    def propose(self, tokens):
        if self.asked in self.slow_at:
            self.clock.t += self.extra
        self.asked += 1
        return super().propose(tokens)


@pytest.mark.parametrize("slow_at", [(0,), (0, 5), (4,)], ids=["first-step", "first-and-later", "later"])
def test_auto_one_slow_step_does_not_rule_out_the_best_arm(slow_at):
    # `best` drafts 6 right tokens a step, `ok` 2; one of `best`'s steps (its first, or a later one) costs
    # 40 steps' time. With the cost a running average, that one step made `best` look dearer than `ok`
    # for good: not asked, its estimate never came back (the GPU bench: `copy` drafted one step per prompt)
    auto, gen = auto_run(lambda truth, n0, clock: {
        "ok": Oracle(truth, n0, k=2),
        "best": SlowOnce(truth, n0, k=6, clock=clock, extra=20.0, slow_at=slow_at)}, n=120)
    steps = sum(auto.choices.values())
    assert auto.choices["best"] >= steps - 6
    assert gen.stats.tau > 5.0


class Situational(Oracle):
    """Right in alternate stretches of 8 tokens (situation 1), wrong in the others (situation 0)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.log = []

    def situation(self, tokens):
        return int((len(tokens) - self.n0) // 8 % 2 == 0)

    def propose(self, tokens):
        self.right = bool(self.situation(tokens))
        self.log.append(self.right)
        return super().propose(tokens)


def test_auto_keeps_an_arms_record_per_situation():
    # one record would average the right and the wrong stretches; per situation, the arm drafts in
    # the right ones and `ar` takes the wrong ones
    arms = {}
    auto, gen = auto_run(lambda truth, n0, clock: arms.setdefault("sit", {"sit": Situational(truth, n0, k=3)}),
                         n=120)
    log = arms["sit"]["sit"].log
    assert sum(log) >= 0.8 * len(log)  # asked mostly where it is right
    assert auto.choices["ar"] >= 15  # the wrong stretches (after the first probes) went to `ar`


def test_auto_reprobes_a_dear_arm_less_often():
    target, _ = tiny_target("qwen2")
    auto = AutoDrafter({"cheap": Oracle([], 0), "dear": Oracle([], 0)}, reprobe_every=24)
    cheap, dear, ar = auto.arms
    for arm, seconds, probed in ((cheap, 1.0, 5), (dear, 8.0, 0), (ar, 1.0, 10)):
        arm.seconds, arm.probed_at, arm.measured, arm.n, arm.tok_sum = seconds, probed, 5, 1.0, 0.5
        arm.best_case = 100.0  # both could still pay
    auto.step = 48
    # the longest since its last step is `dear`, but at 8x the cost its interval is 8x as long
    assert auto._order()[0] is cheap
    auto.step = 24 * 8  # 8 intervals later, the others just probed: now `dear` is due
    cheap.probed_at, ar.probed_at = 180, 185
    assert auto._order()[0] is dear


def test_auto_arms_follow_the_given_drafters():
    target, _ = tiny_target("qwen2")
    auto = make_drafter("auto", target)
    assert [a.name for a in auto.arms] == ["copy", "pld", "ngram", "lookahead", "ar"]
    auto = make_drafter("auto", target, draft_model=tiny_target("qwen2", seed=1)[0])
    assert "draft" in [a.name for a in auto.arms]
    with pytest.raises(InvalidArgumentError):
        make_drafter("auto", target, tree="chain:4")


def test_engine_gives_node_argmax_only_to_drafters_that_ask():
    class Spy(Drafter):
        needs_node_argmax = True

        def __init__(self):
            self.seen = []

        @property
        def max_nodes(self):
            return 3

        def propose(self, tokens):
            return DraftTree([tokens[-1], 3, 4], [-1, 0, -1])

        def observe(self, accepted, n_draft_accepted, hidden=None, node_argmax=None):
            self.seen.append((list(accepted), node_argmax))

    target, _ = tiny_target("qwen2")
    spy = Spy()
    gen = Engine(target, spy).generate([5, 6, 7], max_new_tokens=12).run()
    assert spy.seen
    assert len(spy.seen[0][1]) == 4  # root + 3 nodes (later trees may be cut at the token budget)
    for accepted, argmax in spy.seen:
        assert argmax[0] == accepted[0]  # greedy: the root's argmax is the first emitted token
    assert gen.token_ids == Engine(target).generate([5, 6, 7], max_new_tokens=12).run().token_ids


class LateCopier(Oracle):
    """Like `copy` on a prompt whose answer starts with new text: wrong, in situation 0, for the first
    `switch` output tokens, then in situation 1 (copying) right with a long chain, except its first
    proposal there (the pointer not yet aligned)."""

    def __init__(self, *a, switch=24, **k):
        super().__init__(*a, **k)
        self.switch, self.asked_copying = switch, 0

    def situation(self, tokens):
        return int(len(tokens) - self.n0 >= self.switch)

    def propose(self, tokens):
        copying = self.situation(tokens)
        self.right = bool(copying) and self.asked_copying > 0
        self.asked_copying += copying
        return super().propose(tokens)


def test_auto_gives_an_arm_three_chances_in_a_new_situation():
    # `late` spent its three first probes wrong (not copying yet), then its first step in the copying
    # situation was unlucky: judged on that, it looked worse than `ok` (2 right tokens a step) and was
    # not asked again. Now it has three steps in the new situation before its record there counts.
    auto, gen = auto_run(lambda truth, n0, clock: {"ok": Oracle(truth, n0, k=2),
                                                    "late": LateCopier(truth, n0, k=8)}, n=120)
    assert auto.choices["late"] >= 10  # (120 - 24) tokens at up to 9 per step, after 3 + 3 probes
    assert gen.stats.tau > 4.0
