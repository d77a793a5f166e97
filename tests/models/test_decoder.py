import pytest
import torch

from semiar.models.decoder import Decoder, DecoderConfig
from tiny import tiny_hf_model


def native_from_hf(hf_model):
    cfg = DecoderConfig.from_hf(hf_model.config.to_dict())
    model = Decoder(cfg)
    model.load_hf_state_dict({k: v.clone() for k, v in hf_model.state_dict().items()})
    return model.eval()


@pytest.mark.parametrize("family,tie", [("qwen2", True), ("llama", False)])
def test_logits_match_transformers(family, tie):
    hf = tiny_hf_model(family, tie=tie)
    model = native_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    cache = model.new_cache(64)
    out = model(ids, cache).logits
    assert (out - ref).abs().max().item() <= 1e-4
    # the same positions decoded one token at a time through the cache
    cache = model.new_cache(64)
    model(ids[:, :10], cache)
    steps = [model(ids[:, i:i + 1], cache).logits[:, 0] for i in range(10, 20)]
    assert (torch.stack(steps, 1) - ref[:, 10:]).abs().max().item() <= 1e-4


def test_tree_block_matches_separate_paths():
    """A token tree verified in one forward gives each node the logits of its own path."""
    model = native_from_hf(tiny_hf_model("qwen2"))
    prefix = torch.tensor([[5, 6, 7, 8]])
    # root r (index 0) with children a (1), b (2); a has child c (3)
    tokens = torch.tensor([[9, 10, 11, 12]])
    parents = [-1, 0, 0, 1]
    depth = [0, 1, 1, 2]
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i in range(4):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    cache = model.new_cache(32)
    model(prefix, cache)
    pos = torch.tensor([[4 + d for d in depth]])
    tree_logits = model(tokens, cache, positions=pos, tree_mask=mask).logits
    for node, path in {1: [9, 10], 2: [9, 11], 3: [9, 10, 12]}.items():
        c = model.new_cache(32)
        ref = model(torch.cat([prefix, torch.tensor([path])], 1), c).logits[:, -1]
        assert (tree_logits[:, node] - ref).abs().max().item() <= 1e-4


def test_cache_keep_compacts_accepted_path():
    model = native_from_hf(tiny_hf_model("llama"))
    prefix = torch.tensor([[3, 4, 5]])
    cache = model.new_cache(32)
    model(prefix, cache)
    tokens = torch.tensor([[20, 21, 22, 23]])
    parents = [-1, 0, 0, 2]
    mask = torch.eye(4, dtype=torch.bool)
    for i, p in enumerate(parents):
        while p >= 0:
            mask[i, p] = True
            p = parents[p]
    model(tokens, cache, positions=torch.tensor([[3, 4, 4, 5]]), tree_mask=mask)
    cache.keep(3, [0, 2, 3])  # path root -> 22 -> 23
    ref = model.new_cache(32)
    model(torch.tensor([[3, 4, 5, 20, 22, 23]]), ref)
    assert cache.length == ref.length == 6
    assert torch.allclose(cache.k[:, :, :, :6], ref.k[:, :, :, :6], atol=1e-5)
    assert torch.allclose(cache.v[:, :, :, :6], ref.v[:, :, :, :6], atol=1e-5)


def test_packed_cpu_linears_match_dense():
    from semiar.models.decoder import cpu_packing_available

    if not cpu_packing_available():
        pytest.skip("oneDNN weight packing not available on this CPU/torch")
    hf = tiny_hf_model("qwen2")
    dense, packed, packed1, packed_only, packed8 = (native_from_hf(hf) for _ in range(5))
    assert packed.pack_for_cpu(small="dense") and packed_only.pack_for_cpu(dense_rows=0)
    assert packed1.pack_for_cpu(small="packed1") and packed1.one_row_kernel == "packed1"
    assert packed8.pack_for_cpu(small="packed8") and packed8.one_row_kernel == "packed8"
    assert packed_only.layers[0].mlp.down_proj.weight is None
    assert packed8.layers[0].mlp.down_proj.weight is None and packed8.layers[0].mlp.down_proj.small is None
    assert native_from_hf(hf).pack_for_cpu()  # timed choice
    for ids in (torch.tensor([[4, 8, 15, 16, 23, 42]]), torch.tensor([[7]]), torch.tensor([[7, 9]])):
        a = dense(ids, dense.new_cache(16)).logits
        for m in (packed, packed1, packed_only, packed8):  # 1-2 rows take the small-row path, more rows the packed one
            assert (a - m(ids, m.new_cache(16)).logits).abs().max().item() < 1e-4


def test_cache_ensure_grows_and_keeps_the_valid_part():
    from semiar.models.decoder import KVCache

    c = KVCache(2, 1, 4, 8, torch.float32, "cpu")
    c.k[:, :, :, :5] = 1.0
    c.length = 5
    assert c.ensure(8) is c
    g = c.ensure(20, slack=4)
    assert g.capacity == 24 and g.length == 5 and torch.equal(g.k[:, :, :, :5], c.k[:, :, :, :5])


def test_host_stage_copies_and_is_reused():
    from semiar.models.decoder import HostStage

    stage = HostStage(8, torch.long, "cpu")
    assert stage.event is None  # pinned, with an event, on CUDA only
    out = torch.zeros(5, dtype=torch.long)
    host = stage.ready()
    host[:5] = torch.arange(5)
    assert torch.equal(stage.copy_to(out), torch.arange(5))
    stage.ready()[:3] = 7
    stage.copy_to(out, 3)
    assert out.tolist() == [7, 7, 7, 3, 4]
