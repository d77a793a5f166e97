"""Falcon drafter: relaxed mask, cache consistency, greedy identity, checkpoints and identity checks."""

import json

import pytest
import torch

from semiar.drafters.falcon import FalconConfig, FalconDrafter, FalconNet, load_falcon, save_falcon
from semiar.engine import Engine
from semiar.errors import DrafterMismatchError, InvalidArgumentError, ModelFileError, SemiarError
from semiar.methods import make_drafter
from semiar.tree import TreeSpec
from tiny import tiny_target


def make_net(target, k=2, std=0.08, seed=0, norms=False):
    torch.manual_seed(seed)
    net = FalconNet(FalconConfig.for_target(target.config, k=k, norms=norms))
    net.reset_parameters(std=std)
    return net.eval()


def test_relaxed_mask_is_block_bidirectional():
    target, _ = tiny_target()
    net = make_net(target, k=2)
    m = net.relaxed_mask(5).int().tolist()
    assert m == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    shifted = net.relaxed_mask(4, offset=1).int().tolist()  # blocks [0], [1, 2], [3]
    assert shifted == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert make_net(target, k=1).relaxed_mask(3).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


def test_cached_chunks_equal_one_pass():
    """Feeding a sequence block by block through the cache gives what one pass under the
    relaxed mask gives: inference sees what training saw."""
    target, _ = tiny_target()
    net = make_net(target, k=2)
    T, H = 8, target.config.hidden_size
    torch.manual_seed(1)
    feats, emb = torch.randn(1, T, H), torch.randn(1, T, H)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        full = net(feats, emb, pos, net.relaxed_mask(T))
        cache = net.new_cache(16)
        parts = []
        for a in range(0, T, 2):
            mask = torch.ones(2, a + 2, dtype=torch.bool)
            parts.append(net(feats[:, a:a + 2], emb[:, a:a + 2], pos[:, a:a + 2], mask, cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


PROMPTS = [[5, 17, 33, 8, 60], [1, 2, 3, 1, 2, 3, 1, 2], list(range(10, 40)), [7, 9]]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("k,tree", [(1, (3, 2, 6)), (2, (6, 3, 12)), (2, (5, 4, 30)), (3, (6, 2, 9))])
def test_greedy_identity(family, k, tree):
    target, _ = tiny_target(family)
    drafter = FalconDrafter(make_net(target, k=k, std=0.3), target, TreeSpec("dynamic", depth=tree[0],
                                                                             top_k=tree[1], budget=tree[2]))
    for prompt in PROMPTS:
        ref = Engine(target).generate(prompt, max_new_tokens=40).run().token_ids
        gen = Engine(target, drafter).generate(prompt, max_new_tokens=40).run()
        assert gen.token_ids == ref
        assert gen.stats.target_forwards <= len(ref)


@pytest.mark.parametrize("k,tree", [(2, (6, 3, 12)), (3, (6, 2, 9))])
def test_static_graph_path_drafts_the_same_trees(k, tree):
    """The fixed-shape path CUDA graphs replay (run directly here) proposes the trees the eager
    path proposes, and keeps greedy output identical."""
    target, _ = tiny_target()
    net = make_net(target, k=k, std=0.3)
    spec = TreeSpec("dynamic", depth=tree[0], top_k=tree[1], budget=tree[2])
    eager, static = FalconDrafter(net, target, spec, graphs=False), FalconDrafter(net, target, spec, graphs=True)
    assert static.graphs is not None and eager.graphs is None
    for prompt in PROMPTS[:3]:
        trees = {}
        for name, d in (("eager", eager), ("static", static)):
            gen = Engine(target, d).generate(prompt, max_new_tokens=30).run()
            trees[name] = (gen.token_ids, gen.stats.target_forwards, gen.stats.draft_tokens)
        assert trees["static"] == trees["eager"]
        assert static.cache.k is static.graphs.cache.k  # the static cache was used


@pytest.mark.parametrize("k,depth,min_score", [(2, 6, 0.0), (2, 7, 0.0), (3, 9, 0.02), (1, 4, 0.0), (2, 2, 0.0)])
def test_one_wide_trees_on_graphs_draft_their_chain_on_the_device(k, depth, min_score):
    """With top_k 1 the graphed drafter replays the whole chain (FalconGraphs.chain: argmax fed
    back on the device, one wait) and proposes exactly what the host-built tree proposes, with the
    depth and min_score cuts; greedy output stays identical."""
    target, _ = tiny_target()
    net = make_net(target, k=k, std=0.3)
    spec = TreeSpec("dynamic", depth=depth, top_k=1, budget=depth)
    eager = FalconDrafter(net, target, spec, min_score=min_score, graphs=False)
    static = FalconDrafter(net, target, spec, min_score=min_score, graphs=True)
    assert static._chained and not eager._chained
    assert list(static.graphs._chains) == [static.forwards - 1]  # captured at build
    calls = []
    chain = static.graphs.chain
    static.graphs.chain = lambda *a, **kw: calls.append(1) or chain(*a, **kw)
    for prompt in PROMPTS[:3]:
        proposals = {}
        for name, d in (("eager", eager), ("static", static)):
            seen = []
            propose = d.propose
            d.propose = lambda toks, propose=propose, seen=seen: seen.append(propose(toks)) or seen[-1]
            gen = Engine(target, d).generate(prompt, max_new_tokens=30).run()
            del d.propose
            proposals[name] = (gen.token_ids, [(t.tokens, t.parents) for t in seen])
        assert proposals["static"] == proposals["eager"]
    assert calls


@pytest.mark.parametrize("top_k", [3, 1])
def test_compiled_static_path_drafts_the_same_trees_or_falls_back(monkeypatch, top_k):
    import semiar.models.cuda.graphs as graphs

    target, _ = tiny_target()
    net = make_net(target, k=2, std=0.3)
    spec = TreeSpec("dynamic", depth=6, top_k=top_k, budget=12 if top_k > 1 else 6)
    monkeypatch.setattr(graphs, "COMPILE_BACKEND", "eager")  # Dynamo's tracing, no code generation
    eager = FalconDrafter(net, target, spec, graphs=False)
    comp = FalconDrafter(net, target, spec, graphs=True, compile=True)
    assert comp.graphs.compiled
    prompt = PROMPTS[0]
    ref = Engine(target, eager).generate(prompt, max_new_tokens=24).run()
    got = Engine(target, comp).generate(prompt, max_new_tokens=24).run()
    assert (got.token_ids, got.stats.target_forwards) == (ref.token_ids, ref.stats.target_forwards)

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(graphs, "COMPILE_BACKEND", broken)
    with pytest.warns(UserWarning, match="torch.compile failed for the drafter"):
        fallback = FalconDrafter(net, target, spec, graphs=True, compile=True)
    assert not fallback.graphs.compiled
    assert Engine(target, fallback).generate(prompt, max_new_tokens=24).run().token_ids == ref.token_ids


def test_a_drafter_that_learned_the_target_is_accepted():
    """Train briefly on the target's own greedy text: acceptance must rise well above chance."""
    from semiar.train.csgd import csgd_step, make_batch

    target, _ = tiny_target()
    dec = target.decoder
    seqs = []
    for s in range(6):
        prompt = [3 + s, 11, 40 + s]
        ids = prompt + Engine(target).generate(prompt, max_new_tokens=60).run().token_ids
        out = dec(torch.tensor([ids]), dec.new_cache(len(ids)), return_hidden=True)
        resp = torch.zeros(len(ids), dtype=torch.bool)
        resp[len(prompt):] = True
        seqs.append((torch.tensor(ids), out.hidden[0], resp))
    torch.manual_seed(0)
    net = FalconNet(FalconConfig.for_target(target.config, k=2))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    batch = make_batch(seqs, 2, "cpu", torch.float32)
    for step in range(150):
        parts, _ = csgd_step(net, batch, dec.embed_tokens, dec.lm_head.weight, step / 150, gen)
        opt.zero_grad()
        parts.loss.backward()
        opt.step()
    net.eval()
    prompt = [3, 11, 40]
    ref = Engine(target).generate(prompt, max_new_tokens=60).run()
    got = Engine(target, FalconDrafter(net, target)).generate(prompt, max_new_tokens=60).run()
    assert got.token_ids == ref.token_ids
    assert got.stats.tau > 2.0


def test_checkpoint_roundtrip_and_wrong_target(tmp_path):
    target, _ = tiny_target(seed=0)
    other, _ = tiny_target(seed=1)
    net = make_net(target)
    save_falcon(tmp_path / "d", net, target, training={"steps": 0})
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    assert meta["method"] == "falcon" and meta["target"]["hidden_size"] == target.config.hidden_size
    assert not any("embed" in k or "lm_head" in k for k in
                   __import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "d" / "model.safetensors"))
    loaded = load_falcon(tmp_path / "d", target)
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(DrafterMismatchError, match="trained for target"):
        load_falcon(tmp_path / "d", other)


def test_bad_drafter_dirs(tmp_path):
    target, _ = tiny_target()
    with pytest.raises(SemiarError, match="does not exist"):
        load_falcon(tmp_path / "missing", target)
    save_falcon(tmp_path / "d", make_net(target), target)
    w = tmp_path / "d" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_falcon(tmp_path / "d", target)
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_falcon(tmp_path / "d", target)
    save_falcon(tmp_path / "e", make_net(target), target)
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    cfg["method"] = "medusa"
    (tmp_path / "e" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SemiarError, match="'medusa' drafter"):
        load_falcon(tmp_path / "e", target)


def test_make_drafter_arguments(tmp_path):
    target, _ = tiny_target()
    with pytest.raises(InvalidArgumentError, match="--drafter"):
        make_drafter("falcon", target)
    net = make_net(target)
    with pytest.raises(InvalidArgumentError, match="dynamic"):
        make_drafter("falcon", target, drafter=net, tree="chain:4")
    with pytest.raises(InvalidArgumentError, match="fixed by training"):
        make_drafter("falcon", target, drafter=net, k=3)
    d = make_drafter("falcon", target, drafter=net, tree="dynamic:4,2,8")
    assert d.tree.budget == 8 and d.forwards == 2


def test_shipped_drafter_serves_its_target_when_no_drafter_is_given(tmp_path, monkeypatch):
    import semiar.drafters.checkpoint as ckpt

    target, _ = tiny_target()
    monkeypatch.setattr(ckpt, "SHIPPED", tmp_path)
    save_falcon(tmp_path / f"{target.name}-falcon", make_net(target), target)
    d = make_drafter("falcon", target)
    assert isinstance(d, FalconDrafter)
    assert "falcon" in [a.name for a in make_drafter("auto", target).arms]
    with pytest.raises(InvalidArgumentError, match="--drafter"):  # none shipped for eagle
        make_drafter("eagle", target)


def test_default_tree_follows_the_device():
    from semiar.drafters.falcon import default_tree

    assert default_tree(2, "cpu") == TreeSpec("dynamic", depth=2, top_k=1, budget=2)
    assert default_tree(2, "cuda") == TreeSpec("dynamic", depth=2, top_k=8, budget=16)
    target, _ = tiny_target()
    assert FalconDrafter(make_net(target), target).tree == default_tree(2, "cpu")


@pytest.mark.parametrize("graphs,tree", [(False, (6, 3, 12)), (True, (6, 3, 12)), (True, (6, 1, 6))])
def test_reduced_draft_vocabulary_drafts_target_ids_and_stays_lossless(graphs, tree):
    """A drafter over a subset of the vocabulary (EAGLE-3's reduced head) maps its columns back to
    target ids on every path (eager tree, graphed tree, the on-device chain) and never drafts a
    token outside its subset; greedy output equals ar's."""
    target, _ = tiny_target()
    torch.manual_seed(0)
    net = FalconNet(FalconConfig.for_target(target.config, k=2, draft_vocab=30))
    net.reset_parameters(std=0.3)
    vocab = torch.randperm(target.config.vocab_size)[:30].sort().values
    net.vocab_ids.copy_(vocab)
    drafter = FalconDrafter(net.eval(), target, TreeSpec("dynamic", depth=tree[0], top_k=tree[1], budget=tree[2]),
                            graphs=graphs)
    allowed = set(vocab.tolist())
    seen = []
    propose = drafter.propose
    drafter.propose = lambda toks: seen.append(propose(toks)) or seen[-1]
    for prompt in PROMPTS:
        ref = Engine(target).generate(prompt, max_new_tokens=30).run().token_ids
        assert Engine(target, drafter).generate(prompt, max_new_tokens=30).run().token_ids == ref
    drafted = {t for tree_ in seen for t in tree_.tokens}
    assert drafted and drafted <= allowed


@pytest.mark.parametrize("graphs", [False, True])
def test_drafter_with_input_and_output_norms_stays_lossless_and_round_trips(graphs, tmp_path):
    """EAGLE-3's norms (embedding, feature, output) on the eager and the fixed-shape paths: greedy
    output equals ar's, the cached passes equal one pass, and the norms survive a save."""
    target, _ = tiny_target()
    net = make_net(target, k=2, std=0.3, norms=True)
    with torch.no_grad():
        net.norm.weight.mul_(3.0)
    T, H = 6, target.config.hidden_size
    feats, emb, pos = torch.randn(1, T, H), torch.randn(1, T, H), torch.arange(T)[None]
    with torch.no_grad():
        full = net(feats, emb, pos, net.relaxed_mask(T))
        cache = net.new_cache(8)
        parts = [net(feats[:, a:a + 2], emb[:, a:a + 2], pos[:, a:a + 2], torch.ones(2, a + 2, dtype=torch.bool), cache)
                 for a in range(0, T, 2)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    drafter = FalconDrafter(net, target, TreeSpec("dynamic", depth=6, top_k=3, budget=12), graphs=graphs)
    for prompt in PROMPTS:
        ref = Engine(target).generate(prompt, max_new_tokens=30).run().token_ids
        assert Engine(target, drafter).generate(prompt, max_new_tokens=30).run().token_ids == ref
    save_falcon(tmp_path / "d", net, target)
    back = load_falcon(tmp_path / "d", target, dtype=torch.float32)
    assert back.config.norms
    torch.testing.assert_close(back.norm.weight, net.norm.weight.to(torch.bfloat16).float())


def test_int8_storage_round_trips_within_a_per_row_step(tmp_path):
    target, _ = tiny_target()
    net = make_net(target, k=2)
    save_falcon(tmp_path / "d", net, target, store="int8")
    back = load_falcon(tmp_path / "d", target)
    for (name, a), b in zip(net.state_dict().items(), back.state_dict().values()):
        step = a.abs().amax(-1, keepdim=True) / 127 if a.dim() == 2 else 0
        assert (a - b).abs().le(step / 2 + 1e-6).all(), name
