"""Acceptance rules: greedy paths, and speculative sampling keeps the target's distribution."""

from collections import Counter

import pytest
import torch

from semiar.sampling import SamplingParams, target_probs
from semiar.tree import DraftTree
from semiar.verify import Verdict, verify_forced, verify_greedy, verify_sampling
from stats import chi_square_pvalue

V = 6


def test_greedy_longest_matching_path_and_bonus():
    # root children: node0 (tok 1), node1 (tok 2); node1 child node2 (tok 3); node2 child node3 (tok 0)
    tree = DraftTree([1, 2, 3, 0], [-1, -1, 1, 2])
    argmax = [2, 5, 3, 4, 1]  # per row: root, node0..node3
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), V).float()
    assert verify_greedy(tree, logits) == Verdict(path=[1, 2], tokens=[2, 3, 4])
    assert verify_greedy(DraftTree.empty(), logits[:1]) == Verdict([], [2])


def test_forced_follows_the_given_text_and_reports_where_the_argmax_differs():
    tree = DraftTree([1, 2, 3, 0], [-1, -1, 1, 2])
    argmax = [2, 5, 3, 4, 1]
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), V).float() * 2
    # the text the argmax would give: the same as greedy, nothing departs
    v = verify_forced(tree, logits, [2, 3, 4, 4])
    assert (v.path, v.tokens, v.departures) == ([1, 2], [2, 3, 4], [])
    # another text: it goes down node1 (tok 2) and node2 (tok 3), then emits 0 where the argmax is 4
    v = verify_forced(tree, logits, [2, 3, 0, 5])
    assert (v.path, v.tokens, v.departures) == ([1, 2, 3], [2, 3, 0, 5], [(2, 2.0), (3, 2.0)])
    # a text that ends inside the tree: nothing past it, no bonus token
    assert verify_forced(tree, logits, [2, 3]).tokens == [2, 3]
    assert verify_forced(DraftTree.empty(), logits[:1], [1]) == Verdict([], [1])
    with pytest.raises(ValueError, match="at least one"):
        verify_forced(tree, logits, [])


def _random_setting(seed, sampled_q):
    g = torch.Generator().manual_seed(seed)
    # root -> a, b (siblings); a -> c; b -> d, e
    parents = [-1, -1, 0, 1, 1]
    logits = torch.randn(6, V, generator=g) * 1.5
    q_root = torch.softmax(torch.randn(V, generator=g), -1)
    q_b = torch.softmax(torch.randn(V, generator=g), -1)
    if sampled_q:
        toks = [int(torch.multinomial(q_root, 1, generator=g)) for _ in range(2)]
        toks += [int(torch.randint(V, (1,), generator=g))]
        toks += [int(torch.multinomial(q_b, 1, generator=g)) for _ in range(2)]
        q = [q_root, q_root, None, q_b, q_b]
    else:
        toks, q = [0, 3, 1, 2, 4], None
    return DraftTree(toks, parents, q), logits


def _sample_many(tree_fn, logits, params, n, broken=False):
    gen = torch.Generator().manual_seed(1234)
    firsts, seconds = Counter(), {}
    for _ in range(n):
        tree = tree_fn()
        if broken:  # accept every draft: the classic bug the test must catch
            v = verify_greedy(tree, torch.nn.functional.one_hot(torch.tensor(
                [tree.tokens[tree.children()[0][0]]] * (len(tree) + 1)), V).float())
            v = Verdict([], [v.tokens[0]])
        else:
            v = verify_sampling(tree, logits, params, gen)
        firsts[v.tokens[0]] += 1
        if v.path:
            seconds.setdefault(v.tokens[0], Counter())[v.tokens[1]] += 1
    return firsts, seconds


@pytest.mark.parametrize("sampled_q", [False, True])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)])
def test_tree_sampling_keeps_target_distribution(sampled_q, params):
    g = torch.Generator().manual_seed(7)
    base, logits = _random_setting(3, sampled_q)

    def tree_fn():
        if not sampled_q:
            return base
        # re-draw the i.i.d. siblings each time, as a sampling drafter would
        q_root, q_b = base.q[0], base.q[3]
        a, b = (int(torch.multinomial(q_root, 1, generator=g)) for _ in range(2))
        d, e = (int(torch.multinomial(q_b, 1, generator=g)) for _ in range(2))
        return DraftTree([a, b, base.tokens[2], d, e], base.parents, base.q)

    n = 6000
    firsts, seconds = _sample_many(tree_fn, logits, params, n)
    p_root = target_probs(logits[0], params).tolist()
    _, _, pval = chi_square_pvalue([firsts[t] for t in range(V)], p_root)
    assert pval > 1e-3
    if not sampled_q:  # fixed tree: the token after an accepted node follows that node's row
        for node, row in ((0, 1), (1, 2)):
            tok = base.tokens[node]
            if tok in seconds and sum(seconds[tok].values()) > 300:
                p = target_probs(logits[row], params).tolist()
                _, _, pv = chi_square_pvalue([seconds[tok][t] for t in range(V)], p)
                assert pv > 1e-3


def test_chain_sampling_with_draft_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g)
    q = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    params = SamplingParams(temperature=1.0)

    def tree_fn():
        toks = [int(torch.multinomial(q, 1, generator=g)) for _ in range(3)]
        return DraftTree.chain(toks, [q, q, q])

    firsts, _ = _sample_many(tree_fn, logits, params, 6000)
    _, _, pval = chi_square_pvalue([firsts[t] for t in range(V)], target_probs(logits[0], params).tolist())
    assert pval > 1e-3


def test_broken_verifier_is_caught():
    base, logits = _random_setting(3, False)
    firsts, _ = _sample_many(lambda: base, logits, SamplingParams(temperature=1.0), 3000, broken=True)
    _, _, pval = chi_square_pvalue([firsts[t] for t in range(V)],
                                   target_probs(logits[0], SamplingParams(temperature=1.0)).tolist())
    assert pval < 1e-6
