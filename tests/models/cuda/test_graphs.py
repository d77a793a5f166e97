"""The fixed-shape forward behind CUDA graphs (models.cuda.graphs), checked on the CPU without capture:
padding, the mask built from the cache length, trees, fallbacks, and the one-lease cache rule.
The capture itself needs CUDA: the last test records graphs where a GPU is (`kernel_device`, conftest)."""
import pytest
import torch

from semiar.engine import Engine
from semiar.models.cuda.graphs import GraphedDecoder
from semiar.sampling import SamplingParams
from semiar.tree import DraftTree

from tiny import tiny_target


def _pair():
    m, _ = tiny_target("qwen2")
    return m, GraphedDecoder(m.decoder, capacity=96, sizes=(1, 4, 8), capture=False)


def test_static_forward_equals_eager_for_padded_blocks_and_trees():
    m, g = _pair()
    dec = m.decoder
    prompt = torch.tensor([[3, 9, 4, 1, 7, 2]])
    ref, got = dec.new_cache(64), g.new_cache(64)
    dec(prompt, ref)
    g(prompt, got)
    tree = DraftTree([5, 6, 7, 8, 9], [-1, 0, 0, 1, -1])  # 6 tokens with the root: padded to 8
    ids = torch.tensor([[11] + tree.tokens])
    pos = tree.positions(ref.length, "cpu").unsqueeze(0)
    mask = tree.attention_mask("cpu")
    a = dec(ids, ref, positions=pos, tree_mask=mask, return_hidden=True)
    b = g(ids, got, positions=pos, tree_mask=mask, return_hidden=True)
    assert b.logits.shape == a.logits.shape and got.length == ref.length
    assert (a.logits - b.logits).abs().max() < 1e-4
    assert (a.hidden - b.hidden).abs().max() < 1e-4
    for c in (ref, got):
        c.keep(6, [0, 2, 4])
    one = torch.tensor([[13]])
    assert (dec(one, ref).logits - g(one, got).logits).abs().max() < 1e-4
    n = ref.length
    assert torch.allclose(ref.k[:, :, :, :n], got.k[:, :, :, :n], atol=1e-5)


def test_deferred_residual_adds_give_the_same_forward():
    # each layer's last residual add done by the next layer (the default) or by the layer itself
    m, g = _pair()
    prompt = torch.tensor([[3, 9, 4, 1, 7, 2, 5]])
    outs = []
    for defer in (True, False):
        m.decoder.defer_residual = defer
        cache = g.new_cache(64)
        outs.append(g(prompt, cache, return_hidden=True))
        del cache
    m.decoder.defer_residual = True
    assert torch.equal(outs[0].logits, outs[1].logits) and torch.equal(outs[0].hidden, outs[1].hidden)


def test_attention_windows_follow_the_cache_length():
    # windows of 16 and 32 slots under a 96-slot capacity: as the cache grows, steps move from
    # the 16-slot graph to the 32-slot one and then to the whole capacity, with eager's logits
    m, _ = tiny_target("qwen2")
    dec = m.decoder
    g = GraphedDecoder(dec, capacity=96, sizes=(1, 4, 8), capture=False, windows=(16, 32))
    assert g.windows == [16, 32, 96] and (8, 16) in g.graphs and (1, 96) in g.graphs
    ref, got = dec.new_cache(80), g.new_cache(80)
    used = []
    for step in range(14):
        ids = torch.tensor([[(step * 7 + j) % 90 + 3 for j in range(1 + step % 5)]])
        used.append(next(w for w in g.windows if w >= got.length + g._size_for(ids.shape[1])))
        a, b = dec(ids, ref), g(ids, got)
        assert (a.logits - b.logits).abs().max() < 1e-4
    assert set(used) == {16, 32, 96}


def test_a_long_prompt_is_prefilled_in_graph_sized_chunks():
    m, g = _pair()  # largest size 8
    dec = m.decoder
    prompt = torch.tensor([[(5 * i + 3) % 90 + 2 for i in range(21)]])
    for logits_at in (None, slice(-1, None), slice(0, 0), torch.tensor([20, 3, 3, 9])):
        ref, got = dec.new_cache(64), g.new_cache(64)
        a = dec(prompt, ref, logits_at=logits_at, return_hidden=True)
        b = g(prompt, got, logits_at=logits_at, return_hidden=True)
        assert got.length == ref.length == 21 and b.logits.shape == a.logits.shape
        assert torch.allclose(a.logits, b.logits, atol=1e-4) and torch.allclose(a.hidden, b.hidden, atol=1e-4)
        assert torch.allclose(ref.k[:, :, :, :21], got.k[:, :, :, :21], atol=1e-5)
    del got  # hand the static cache back
    calls = []
    real = g.decoder.forward
    g.decoder.forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    g(prompt, g.new_cache(64))
    assert not calls  # no eager forward: three replays of the 8-token graph


def test_default_sizes_prefill_a_prompt_in_one_replay_and_keep_the_padding_slack():
    from semiar.models.cuda.graphs import DEFAULT_SIZES

    m, _ = tiny_target("qwen2")
    g = GraphedDecoder(m.decoder, capacity=600, capture=False)
    assert g.sizes == list(DEFAULT_SIZES) and g.slack == 127  # a 129-token block replays the 256 graph
    assert g.new_cache(600 - 127).k is g.cache.k
    with pytest.warns(UserWarning, match="CUDA-graph capacity 473"):
        assert g.new_cache(600 - 126).k is not g.cache.k
    for bad in ((), (0, 4), (1, 600)):
        with pytest.raises(ValueError, match="block sizes must be positive"):
            GraphedDecoder(m.decoder, capacity=600, sizes=bad, capture=False)
    replays = []
    for key, graph in g.graphs.items():
        graph.replay = lambda f=graph.replay, key=key: replays.append(key[0]) or f()
    prompt = torch.tensor([[(5 * i + 3) % 90 + 2 for i in range(300)]])
    ref, got = m.decoder.new_cache(400), g.new_cache(400)
    a = m.decoder(prompt[:, :157], ref, logits_at=slice(-1, None))
    b = g(prompt[:, :157], got, logits_at=slice(-1, None))
    assert replays == [256] and torch.allclose(a.logits, b.logits, atol=1e-4)  # one replay, not three chunks
    del got
    replays.clear()
    ref, got = m.decoder.new_cache(400), g.new_cache(400)
    a = m.decoder(prompt, ref, logits_at=slice(-1, None))
    b = g(prompt, got, logits_at=slice(-1, None))
    assert replays == [256, 64] and torch.allclose(a.logits, b.logits, atol=1e-4)


def test_engine_on_static_decoder_matches_eager_greedy_and_sampled():
    m, g = _pair()
    prompt = [3, 9, 4, 1, 7, 2, 3, 9] * 3  # longer than the largest graph (8): a chunked prefill
    ref = Engine(m).generate(prompt, max_new_tokens=20).run().token_ids
    m.runner = g
    assert Engine(m).generate(prompt, max_new_tokens=20).run().token_ids == ref
    s = SamplingParams(temperature=1.0, seed=3)
    a = Engine(m).generate(prompt, max_new_tokens=12, sampling=s).run().token_ids
    m.runner = m.decoder
    assert Engine(m).generate(prompt, max_new_tokens=12, sampling=s).run().token_ids == a


def test_one_live_lease_and_fallbacks():
    m, g = _pair()
    a = g.new_cache(32)
    assert a.k is g.cache.k
    b = g.new_cache(32)  # a is alive: b must not share the static storage
    assert b.k is not g.cache.k
    del a
    assert g.new_cache(32).k is g.cache.k
    big = g.new_cache(200)  # over capacity: an ordinary cache, eager forwards
    assert big.capacity >= 200
    out = g(torch.tensor([[1] * 20]), big)  # larger than the largest size: eager
    assert out.logits.shape == (1, 20, m.config.vocab_size)


def test_compiled_layer_path_matches_and_compiles_once_per_size():
    import shutil

    import pytest

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    from torch._dynamo.utils import counters

    m, _ = tiny_target("qwen2")
    ref, _ = tiny_target("qwen2")
    g = GraphedDecoder(m.decoder, capacity=64, sizes=(1, 4), compile=True, capture=False)
    before = counters["stats"]["unique_graphs"]
    a_cache, b_cache = ref.decoder.new_cache(40), g.new_cache(40)
    for ids in ([[3, 9, 4, 1, 7, 2]], [[5]], [[1, 2, 3]], [[8]]):
        x = torch.tensor(ids)
        assert (ref.decoder(x, a_cache).logits - g(x, b_cache).logits).abs().max() < 1e-4
    # per block size (1 and 4; the prefill runs eagerly) three compiled pieces, prologue, layer
    # and epilogue: both layers share the layer's graph (one graph per layer would make 8)
    assert counters["stats"]["unique_graphs"] - before <= 6


def test_a_failing_compiler_falls_back_to_the_uncompiled_forward(monkeypatch):
    import pytest

    import semiar.models.cuda.graphs as graphs

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(graphs, "COMPILE_BACKEND", broken)
    m, _ = tiny_target("qwen2")
    with pytest.warns(UserWarning, match="torch.compile failed"):
        g = GraphedDecoder(m.decoder, capacity=64, sizes=(1, 4), compile=True, capture=False)
    assert not g.compiled and m.decoder.static_fns is None
    ref, got = m.decoder.new_cache(32), g.new_cache(32)
    for ids in ([[3, 9, 4]], [[5]]):
        x = torch.tensor(ids)
        assert (m.decoder(x, ref).logits - g(x, got).logits).abs().max() < 1e-4


def test_a_finished_request_hands_the_draft_models_static_cache_back():
    # two methods drafting with one graphed draft model (the bench's `draft` and `auto`'s draft arm):
    # the second must get the static cache too, or its draft model runs eagerly
    from semiar.drafters.draft_model import DraftModelDrafter

    target, _ = tiny_target("qwen2")
    draft, _ = tiny_target("qwen2")
    draft.runner = g = GraphedDecoder(draft.decoder, capacity=1024, sizes=(1, 4, 8), capture=False)
    prompt = [3, 9, 4, 1, 7, 2, 3, 9]
    first, second = DraftModelDrafter(draft, target), DraftModelDrafter(draft, target)
    ref = Engine(target).generate(prompt, max_new_tokens=16).run().token_ids
    gen = Engine(target, first).generate(prompt, max_new_tokens=16)
    next(iter(gen))
    assert first.cache.k is g.cache.k
    assert gen.run().token_ids == ref
    assert first.cache is None  # released at the end of its request
    gen = Engine(target, second).generate(prompt, max_new_tokens=16)
    next(iter(gen))
    assert second.cache.k is g.cache.k
    gen.run()
    assert gen.token_ids == ref


def test_host_inputs_fill_the_graph_buffers_as_device_inputs_do():
    from semiar.models.decoder import input_device

    m, _ = tiny_target("qwen2")
    g = GraphedDecoder(m.decoder, capacity=64, sizes=(1, 4, 8), capture=False)
    assert input_device(g) == torch.device("cpu") and input_device(m.decoder) == m.decoder.device
    tree = DraftTree([5, 6, 7], [-1, 0, 0])
    cases = [(1, torch.tensor([[4]]), None, None),
             (8, torch.tensor([[4, 5, 6, 7]]), tree.positions(9, "cpu").unsqueeze(0), tree.attention_mask("cpu")),
             (4, torch.tensor([[1, 2, 3]]), None, None)]
    for S, ids, pos, mask in cases:
        T = ids.shape[1]
        g._stage_on_device(S, T, 9, ids, pos, mask)
        by_device = [t.clone() for t in g.inputs[S]]
        for t in g.inputs[S]:
            t.fill_(7 if t.dtype == torch.long else True)  # anything stale must be overwritten
        g._stage_from_host(S, T, 9, ids, pos, mask)
        for a, b in zip(by_device, g.inputs[S]):
            assert torch.equal(a, b), (S, a, b)


def test_a_greedy_chain_in_one_replay_equals_stepping_token_by_token():
    m, _ = tiny_target("qwen2")
    g = GraphedDecoder(m.decoder, capacity=96, sizes=(1, 4, 8), windows=(16, 32), capture=False)
    prompt = torch.tensor([[3, 9, 4, 1, 7, 2, 5, 8, 6, 3, 2, 9]])  # 12 slots: chains cross the 16-slot window
    ref, got = m.decoder.new_cache(96), g.new_cache(64)
    logits = m.decoder(prompt, ref).logits[0, -1]
    g(prompt, got)
    toks, confs = g.greedy_chain(logits, got, 7)
    want, probs = [], []
    for i in range(7):
        p = logits.softmax(-1)
        want.append(int(p.argmax()))
        probs.append(float(p.max()))
        if i < 6:
            logits = m.decoder(torch.tensor([[want[-1]]]), ref).logits[0, -1]
    assert toks == want and len(confs) == 7
    assert max(abs(a - b) for a, b in zip(confs, probs)) < 1e-5
    assert got.length == ref.length == 12 + 6
    assert torch.allclose(ref.k[:, :, :, :18], got.k[:, :, :, :18], atol=1e-5)
    assert g.greedy_chain(logits, m.decoder.new_cache(64), 4) is None  # not the static cache: caller steps
    assert g.greedy_chain(logits, got, 1) is None  # one token needs no forward


def test_preparing_chains_leaves_a_live_requests_cache_alone():
    m, _ = tiny_target("qwen2")
    g = GraphedDecoder(m.decoder, capacity=96, sizes=(1, 4, 8), windows=(16, 32), capture=False)
    prompt = torch.tensor([[3, 9, 4, 1, 7, 2, 5, 8, 6, 3]])
    cache = g.new_cache(64)
    g(prompt, cache)
    before = (cache.k[:, :, :, :10].clone(), cache.v[:, :, :, :10].clone())
    g.prepare_chains(8)
    assert torch.equal(cache.k[:, :, :, :10], before[0]) and torch.equal(cache.v[:, :, :, :10], before[1])
    assert cache.length == 10
    assert (1, 16) in g._chains and (6, 16) in g._chains and (7, 16) not in g._chains  # 10 + 7 > 16: later


def test_the_draft_model_drafts_its_chain_in_one_replay_and_stays_lossless():
    from semiar.drafters.draft_model import DraftModelDrafter
    from semiar.tree import TreeSpec

    target, _ = tiny_target("qwen2")
    plain, _ = tiny_target("qwen2", seed=1)
    graphed, _ = tiny_target("qwen2", seed=1)
    graphed.runner = GraphedDecoder(graphed.decoder, capacity=1024, sizes=(1, 4, 8), capture=False)
    calls = []
    chain = graphed.runner.greedy_chain
    graphed.runner.greedy_chain = lambda *a: calls.append((a[2], chain(*a))) or calls[-1][1]
    prompt = [3, 9, 4, 1, 7, 2, 3, 9]
    ref = Engine(target).generate(prompt, max_new_tokens=40).run().token_ids
    spec = TreeSpec("chain", k=6)
    a = DraftModelDrafter(plain, target, tree=spec, min_confidence=0.0)
    b = DraftModelDrafter(graphed, target, tree=spec, min_confidence=0.0)
    ga = Engine(target, a).generate(prompt, max_new_tokens=40).run()
    gb = Engine(target, b).generate(prompt, max_new_tokens=40).run()
    assert ga.token_ids == gb.token_ids == ref
    assert any(k > 1 for k, _ in calls)
    assert all((got is None) == (k == 1) for k, got in calls)  # every chain of 2+ tokens was one replay
    assert gb.stats.target_forwards == ga.stats.target_forwards  # the same proposals
    # the confidence cut, made after the replay, cuts where the step-by-step loop stops
    a, b = (DraftModelDrafter(m, target, tree=spec, min_confidence=0.2) for m in (plain, graphed))
    ga = Engine(target, a).generate(prompt, max_new_tokens=40).run()
    gb = Engine(target, b).generate(prompt, max_new_tokens=40).run()
    assert ga.token_ids == gb.token_ids == ref and gb.stats.target_forwards == ga.stats.target_forwards


def test_graphs_with_the_default_kernels_keep_greedy_output(kernel_device):
    """With the defaults: on a GPU the forwards are recorded as CUDA graphs and replayed, through the
    kernels that are on there (fused one-token step, block attention and MLP, the row kernel where it
    wins); on the CPU the same fixed-shape forwards run uncaptured on the plain layers."""
    from semiar.methods import make_drafter
    from semiar.models.cuda.capture import Captured, Direct

    m, _ = tiny_target("qwen2", device=kernel_device)
    prompt = [3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3]
    ref = Engine(m).generate(prompt, max_new_tokens=16).run().token_ids
    m.runner = GraphedDecoder(m.decoder, capacity=128, sizes=(1, 4, 8, 16, 32))
    kind = Captured if kernel_device.type == "cuda" else Direct
    assert all(isinstance(g, kind) for g in m.runner.graphs.values())
    assert Engine(m).generate(prompt, max_new_tokens=16).run().token_ids == ref
    assert Engine(m, make_drafter("pld", m)).generate(prompt, max_new_tokens=16).run().token_ids == ref
