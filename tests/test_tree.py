import pytest
import torch

from semiar.engine import prune_depth
from semiar.errors import InvalidArgumentError
from semiar.tree import DraftTree, dynamic_tree, parse_choices, parse_tree_spec, tree_from_choices


def test_mask_positions_paths():
    # root -> 0 -> 1 ; root -> 2 -> 3 ; 2 -> 4
    t = DraftTree([10, 11, 12, 13, 14], [-1, 0, -1, 2, 2])
    assert t.depths == [1, 2, 1, 2, 2] and t.depth == 2
    assert t.positions(7).tolist() == [7, 8, 9, 8, 9, 9]
    assert t.paths() == [[0, 1], [2, 3], [2, 4]]
    m = t.attention_mask()
    assert m[:, 0].all()  # everything sees the root
    assert m[5].tolist() == [True, False, False, True, False, True]  # node 4: root, 2, itself
    assert not m[2, 3] and not m[4, 5]  # no sibling/cousin visibility


def test_invalid_trees():
    with pytest.raises(ValueError):
        DraftTree([1, 2], [-1, 1])  # a node before its parent
    with pytest.raises(ValueError):
        DraftTree([1], [-1, 0])


def test_chain_and_prune():
    t = DraftTree.chain([5, 6, 7, 8])
    assert t.parents == [-1, 0, 1, 2]
    p = prune_depth(DraftTree([1, 2, 3, 4], [-1, 0, -1, 1]), 1)
    assert p.tokens == [1, 3] and p.parents == [-1, -1]


def test_static_choices():
    choices = parse_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    assert choices[0] == (0,) and choices[-1] == (0, 0, 0)
    table = {(): [5, 6], (0,): [7, 8], (1,): [9], (0, 0): [11]}
    t = tree_from_choices(choices, lambda prefix, n: table.get(prefix, [])[:n] or None)
    assert t.tokens == [5, 6, 7, 8, 9, 11]
    assert t.parents == [-1, -1, 0, 0, 1, 2]
    with pytest.raises(InvalidArgumentError, match="no parent"):
        parse_choices([[0, 1]])


def test_dynamic_tree_is_valid_and_within_budget():
    g = torch.Generator().manual_seed(0)

    def expand(frontier, tokens, parents):
        return torch.softmax(torch.randn(len(frontier), 50, generator=g) * 3, -1)

    t = dynamic_tree(expand, depth=4, top_k=3, budget=10)
    assert len(t) <= 10 + 3  # ties may re-add ancestors
    for i, p in enumerate(t.parents):
        assert p < i
    assert t.depth <= 4


@pytest.mark.parametrize("spec,kind", [("chain:5", "chain"), ("dynamic:4,2,12", "dynamic"), ("[[0],[1],[0,0]]", "static")])
def test_parse_tree_spec(spec, kind):
    assert parse_tree_spec(spec).kind == kind


@pytest.mark.parametrize("spec", ["chain:0", "chain:x", "dynamic:1,2", "dynamic:0,1,1", "[[0],[0,0,0]]", "{}",
                                  "[]", "@/no/such/file.json", "dynamic:9,9,999"])
def test_bad_tree_specs(spec):
    with pytest.raises(InvalidArgumentError):
        parse_tree_spec(spec)


def test_tree_builder_merges_common_prefixes_within_its_budget():
    from semiar.tree import TreeBuilder

    b = TreeBuilder(budget=5)
    assert b.add([7, 8, 9]) and b.add([7, 8, 4])  # shares "7 8": one new node
    assert not b.add([7, 8])  # nothing new
    assert b.add([5, 6, 1])  # one node left in the budget: "5" only
    t = b.tree()
    assert t.tokens == [7, 8, 9, 4, 5] and t.parents == [-1, 0, 1, 1, -1] and b.full
    assert b.node(-1, 3) is None and b.node(0, 8) == 1
