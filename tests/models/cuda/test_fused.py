"""The fused one-token layer and block kernels (models.cuda.fused). The kernel tests take `kernel_device`
(conftest): CUDA tensors on a GPU, else CPU tensors under Triton's interpreter; without Triton (CI) only the
fallbacks are checked."""
import pytest
import torch
import torch.nn.functional as F

from semiar.engine import Engine
from semiar.models.cuda import fused, gemv, graphs
from semiar.models.cuda.graphs import GraphedDecoder
from semiar.models.decoder import Attention, DecoderConfig, RMSNorm, rope_cos_sin, rope_inv_freq

from tiny import tiny_target

needs_triton = pytest.mark.skipif(not gemv.triton_available(), reason="Triton is not installed")


def _close(y, ref, dtype):
    # bf16: a few units in the last place of the largest value (Triton's interpreter truncates
    # fp32 -> bf16 conversions where the GPU rounds them, so the CPU runs need the margin)
    tol = 1e-4 if dtype == torch.float32 else ref.abs().max().item() / 32
    return (y.float() - ref.float()).abs().max().item() < tol


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm,swiglu,residual,bias", [(True, False, False, True), (False, False, True, False),
                                                       (True, True, False, False), (False, False, False, False)])
def test_row_product_equals_the_unfused_layer_work(dtype, norm, swiglu, residual, bias, kernel_device):
    torch.manual_seed(0)
    N, K = 37, 70
    w = (torch.randn(2 * N if swiglu else N, K) / 8).to(kernel_device, dtype)
    b = torch.randn(w.shape[0]).to(kernel_device, dtype) if bias else None
    x = torch.randn(1, 1, K).to(kernel_device, dtype)
    r = torch.randn(1, 1, N).to(kernel_device, dtype) if residual else None
    nrm = RMSNorm(K, 1e-6).to(kernel_device, dtype)
    with torch.no_grad():
        nrm.weight.copy_(torch.rand(K) + 0.5)
        h = nrm(x) if norm else x
        ref = F.linear(h, w, b)
        if swiglu:
            g, u = ref.split(N, dim=-1)
            ref = F.silu(g) * u
        if residual:
            ref = ref + r
    y = fused.row_product(x, w, b, norm_weight=nrm.weight if norm else None, eps=1e-6, swiglu=swiglu, residual=r)
    assert y.shape == (1, 1, N) and y.dtype == dtype
    assert _close(y, ref, dtype)


@needs_triton
def test_row_products_weights_loaded_ahead_give_the_same_bits(monkeypatch, kernel_device):
    torch.manual_seed(1)
    bf16 = dict(device=kernel_device, dtype=torch.bfloat16)
    w, x = torch.randn(74, 70).to(**bf16), torch.randn(1, 1, 70).to(**bf16)
    nw = torch.rand(70).to(**bf16) + 0.5
    outs = []
    for ahead in (True, False):
        monkeypatch.setattr(fused, "PREFETCH", ahead)
        outs.append(fused.row_product(x, w, norm_weight=nw, swiglu=True))
    assert torch.equal(outs[0], outs[1])  # the same chunks summed in the same order


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 5, 16, 37])
@pytest.mark.parametrize("split", [16, 64])
def test_decode_attention_equals_the_attention_layer(dtype, start, split, monkeypatch, kernel_device):
    monkeypatch.setattr(fused, "ATTENTION_SPLIT", split)  # 16: three splits merged
    torch.manual_seed(1)
    cfg = DecoderConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=16, attention_bias=True, rope_theta=10000.0)
    att = Attention(cfg).to(kernel_device, dtype).eval()
    cap = 48
    kc = torch.randn(1, 2, cap, 16).to(kernel_device, dtype)
    vc = torch.randn(1, 2, cap, 16).to(kernel_device, dtype)
    x = torch.randn(1, 1, 64).to(kernel_device, dtype)
    cos, sin = (t.to(kernel_device) for t in rope_cos_sin(rope_inv_freq(cfg), torch.tensor([[start]]), dtype))
    k_ref, v_ref = kc.clone(), vc.clone()
    with torch.no_grad():
        qkv = att.qkv_proj(x)
        # the reference without its output projection: the attention output itself
        o_proj, att.o_proj = att.o_proj, torch.nn.Identity()
        ref = att(x, cos, sin, k_ref, v_ref, start, None)
        att.o_proj = o_proj
    out = fused.decode_attention(qkv, cos, sin, kc, vc, torch.tensor([start], device=kernel_device), 4, 2, window=48)
    assert out.shape == ref.shape and _close(out, ref, dtype)
    # the new key and value are written at slot `start`, nothing else moves
    assert _close(kc[:, :, start], k_ref[:, :, start], dtype) and torch.equal(vc[:, :, start], v_ref[:, :, start])
    assert torch.equal(kc[:, :, :start], k_ref[:, :, :start]) and torch.equal(kc[:, :, start + 1:], k_ref[:, :, start + 1:])


@needs_triton
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_fused_step_keeps_logits_and_greedy_output(family, kernel_device):
    m, _ = tiny_target(family, device=kernel_device)
    prompt = [3, 9, 4, 1, 7, 2, 3, 9]
    ref = Engine(m).generate(prompt, max_new_tokens=12).run().token_ids
    dec = m.decoder
    # one token after a prompt, through the static forward, with and without the fused layer
    g = GraphedDecoder(dec, capacity=64, sizes=(1, 4, 8), capture=False, fused_step=False)
    cache = g.new_cache(40)
    g(torch.tensor([prompt]), cache)
    plain = g(torch.tensor([[5]]), cache).logits
    k_plain = cache.k[:, :, :, :cache.length].clone()
    g = GraphedDecoder(dec, capacity=64, sizes=(1, 4, 8), capture=False, fused_step=True)
    assert dec.row_layer is fused.row_layer
    cache = g.new_cache(40)
    g(torch.tensor([prompt]), cache)
    out = g(torch.tensor([[5]]), cache).logits
    assert (out - plain).abs().max() < 1e-4
    assert (cache.k[:, :, :, :cache.length] - k_plain).abs().max() < 1e-5
    m.runner = g
    assert Engine(m).generate(prompt, max_new_tokens=12).run().token_ids == ref


def test_off_the_gpu_it_is_off_unless_forced(monkeypatch):
    m, _ = tiny_target("qwen2")
    assert fused.install(m.decoder) is False and m.decoder.row_layer is None
    monkeypatch.setenv("SEMIAR_FUSED", "0")
    assert fused.install(m.decoder, force=None) is False
    monkeypatch.setenv("SEMIAR_FUSED", "yes")
    with pytest.warns(UserWarning, match="SEMIAR_FUSED"):
        fused.install(m.decoder)
    # block attention: with the fused step on CUDA only, unless forced (here: the CPU)
    monkeypatch.setattr(fused, "supported", lambda dec: None)
    monkeypatch.delenv("SEMIAR_FUSED")
    assert fused.install_block_attention(m.decoder) is False
    monkeypatch.setenv("SEMIAR_BLOCK_ATTENTION", "on")
    with pytest.warns(UserWarning, match="SEMIAR_BLOCK_ATTENTION='on' is not 0 or 1; using the default"):
        assert fused.install_block_attention(m.decoder) is False
    monkeypatch.setenv("SEMIAR_BLOCK_ATTENTION", "1")
    assert fused.install_block_attention(m.decoder) is True
    assert all(layer.self_attn.block_kernel is not None for layer in m.decoder.layers)
    monkeypatch.setenv("SEMIAR_BLOCK_ATTENTION", "0")
    assert fused.install_block_attention(m.decoder, on=None) is False


def test_unsupported_shapes_are_refused_with_a_reason(monkeypatch):
    monkeypatch.setattr(fused, "triton_available", lambda: True)
    m, _ = tiny_target("qwen2")
    m.decoder.config.head_dim = 24
    assert "power of two" in fused.supported(m.decoder)
    with pytest.warns(UserWarning, match="cannot serve"):
        assert fused.install(m.decoder, force=True) is False
    with pytest.raises(ValueError, match="power-of-two"):
        fused.decode_attention(torch.zeros(1, 1, 24 * 8), None, None, None, None, None, 4, 2)
    with pytest.raises(ValueError, match="one row"):
        fused.row_product(torch.zeros(2, 8), torch.zeros(4, 8))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("start", [0, 21])
def test_block_attention_equals_masked_attention(dtype, start, monkeypatch, kernel_device):
    monkeypatch.setattr(fused, "ATTENTION_SPLIT", 16)  # several splits, one of them partly the block
    torch.manual_seed(2)
    H, KVH, D, S, W = 4, 2, 16, 5, 48
    q = torch.randn(1, H, S, D).to(kernel_device, dtype)
    kc = torch.randn(1, KVH, W, D).to(kernel_device, dtype)
    vc = torch.randn(1, KVH, W, D).to(kernel_device, dtype)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool)
    mask = torch.zeros(S, W, dtype=torch.bool)
    mask[:, :start] = True
    mask[:, start:start + S] = tree
    mask, slots = mask.to(kernel_device), torch.arange(start, start + S, device=kernel_device)
    out = fused.block_attention(q, kc, vc, mask, slots)
    g = H // KVH
    keys, values = kc.repeat_interleave(g, 1).float(), vc.repeat_interleave(g, 1).float()
    scores = (q.float() @ keys.transpose(-1, -2)) / D ** 0.5
    ref = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ values
    assert out.shape == (1, H, S, D) and _close(out, ref, dtype)
    # the layout the o product reads, written by the merge itself: the same values
    tokens = fused.block_attention(q, kc, vc, mask, slots, token_major=True)
    assert tokens.shape == (1, S, H * D) and torch.equal(tokens, out.transpose(1, 2).reshape(1, S, H * D))


def _tree_logits(dec, prompt, **graphed):
    """Logits of one 4-token tree after `prompt` through GraphedDecoder(dec, capture=False, **graphed),
    and that decoder (its static cache free again)."""
    g = GraphedDecoder(dec, capture=False, **graphed)
    cache = g.new_cache(len(prompt) + 40)
    g(torch.tensor([prompt]), cache)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    return g(torch.tensor([[5, 6, 7, 8]]), cache, tree_mask=tree).logits, g


@needs_triton
def test_block_attention_keeps_verification_and_greedy_output(monkeypatch, kernel_device):
    from semiar.methods import make_drafter

    m, _ = tiny_target("qwen2", device=kernel_device)
    prompt = [3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3]
    ref = Engine(m).generate(prompt, max_new_tokens=16).run().token_ids
    dec = m.decoder
    outs = []
    for on in (False, True):
        logits, g = _tree_logits(dec, prompt, capacity=64, sizes=(1, 4, 8), block_attention=on)
        assert all((layer.self_attn.block_kernel is not None) == on for layer in dec.layers)
        outs.append(logits)
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    m.runner = g
    assert Engine(m, make_drafter("pld", m)).generate(prompt, max_new_tokens=16).run().token_ids == ref
    # traced by Dynamo as the compiled layer runs it (one opaque call); "eager": no code generation
    monkeypatch.setattr(graphs, "COMPILE_BACKEND", "eager")
    m.runner = GraphedDecoder(dec, capacity=64, sizes=(1, 4, 8), capture=False, compile=True, block_attention=True)
    assert m.runner.compiled
    assert Engine(m, make_drafter("pld", m)).generate(prompt, max_new_tokens=16).run().token_ids == ref
    fused.install_block_attention(dec, on=False)
    assert all(layer.self_attn.block_kernel is None for layer in dec.layers)


def test_kernels_that_fail_with_pdl_run_without_then_leave_the_plain_layers(monkeypatch):
    # what install does on CUDA before turning the step on (here with the launches stubbed)
    monkeypatch.setattr(fused, "PDL", None)
    monkeypatch.setattr(fused, "_pdl_on", lambda device: fused.PDL is not False)
    for name in ("decode_attention", "block_attention", "block_swiglu"):
        monkeypatch.setattr(fused, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def needs_plain_launch(*a, **k):
        if fused.PDL is not False:
            raise RuntimeError("launch_pdl is not supported")

    monkeypatch.setattr(fused, "row_product", needs_plain_launch)
    with pytest.warns(UserWarning, match="programmatic dependent launch"):
        assert fused._works_on(torch.device("cpu"))
    assert fused.PDL is False

    def broken(*a, **k):
        raise RuntimeError("no kernels here")

    monkeypatch.setattr(fused, "row_product", broken)
    with pytest.warns(UserWarning, match="using the plain layers"):
        assert not fused._works_on(torch.device("cpu"))


@needs_triton
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_block_attention_serves_the_engines_trees(family, monkeypatch, kernel_device):
    from semiar.methods import make_drafter

    monkeypatch.setattr(fused, "ATTENTION_SPLIT", 16)  # the prefix and the tree over several splits
    m, _ = tiny_target(family, device=kernel_device)
    prompt = [3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3]
    ref = Engine(m).generate(prompt, max_new_tokens=16).run().token_ids
    # the engine's own trees (up to 64 tokens) under the fused step, counted to be sure they ran
    m.runner = GraphedDecoder(m.decoder, capacity=192, sizes=(1, 8, 16, 32, 64), capture=False, fused_step=True,
                              block_attention=True)
    sizes = []
    monkeypatch.setattr(fused, "block_attention", lambda q, *a, f=fused.block_attention, **k: sizes.append(q.shape[2])
                        or f(q, *a, **k))
    for method in ("pld", "copy", "lookahead"):
        assert Engine(m, make_drafter(method, m)).generate(prompt, max_new_tokens=16).run().token_ids == ref, method
    assert len(set(sizes)) >= 2, sizes


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 16, 23])
def test_block_swiglu_equals_the_norm_and_swiglu(dtype, T, kernel_device):
    torch.manual_seed(2)
    N, K = 40, 70  # neither a multiple of the kernel's tiles
    w = (torch.randn(2 * N, K) / 8).to(kernel_device, dtype)
    h = torch.randn(1, T, K).to(kernel_device, dtype)
    nrm = RMSNorm(K, 1e-6).to(kernel_device, dtype)
    with torch.no_grad():
        nrm.weight.copy_(torch.rand(K) + 0.5)
        g, u = F.linear(nrm(h), w).split(N, dim=-1)
        ref = F.silu(g) * u
    act = fused.block_swiglu(*fused.norm_fold(h, nrm.weight, 1e-6), w)
    assert act.shape == (1, T, N) and act.dtype == dtype
    assert _close(act, ref, dtype)
    if T == 1:  # one row: rounded as the one-token step's fused product rounds it
        one = fused.row_product(h, w, norm_weight=nrm.weight, eps=1e-6, swiglu=True)
        assert _close(act, one, dtype) and (dtype == torch.bfloat16 or (act - one).abs().max() < 1e-5)


def test_block_swiglu_refuses_shapes_it_cannot_take():
    x = torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match="their \\[1, T\\] scales"):
        fused.block_swiglu(x, torch.zeros(1, 2), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="their \\[1, T\\] scales"):
        fused.block_swiglu(torch.zeros(1, 65, 8), torch.zeros(1, 65), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="does not fit"):
        fused.block_swiglu(x, torch.zeros(1, 3), torch.zeros(7, 8))


@needs_triton
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_block_mlp_keeps_logits_and_serves_the_engines_trees(family, monkeypatch, kernel_device):
    from semiar.methods import make_drafter

    m, _ = tiny_target(family, device=kernel_device)
    prompt = [3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3, 9, 4, 1, 7, 2, 3]
    ref = Engine(m).generate(prompt, max_new_tokens=16).run().token_ids
    dec = m.decoder
    outs = []
    for on in (False, True):
        logits, g = _tree_logits(dec, prompt, capacity=192, sizes=(1, 4, 8, 16, 32, 64), block_attention=on,
                                 block_mlp=on)
        assert all((layer.mlp.block_kernel is not None) == on for layer in dec.layers)
        outs.append(logits)
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    m.runner = g
    rows = []
    monkeypatch.setattr(fused, "block_swiglu", lambda x, *a, f=fused.block_swiglu: rows.append(x.shape[1])
                        or f(x, *a))
    for method in ("pld", "copy", "lookahead"):
        assert Engine(m, make_drafter(method, m)).generate(prompt, max_new_tokens=16).run().token_ids == ref, method
    assert len(set(rows)) >= 2, rows
    # traced by Dynamo as the compiled layer runs it (one opaque call); "eager": no code generation
    monkeypatch.setattr(graphs, "COMPILE_BACKEND", "eager")
    m.runner = GraphedDecoder(dec, capacity=192, sizes=(1, 4, 8), capture=False, compile=True, block_attention=True,
                              block_mlp=True)
    assert m.runner.compiled
    assert Engine(m, make_drafter("pld", m)).generate(prompt, max_new_tokens=16).run().token_ids == ref
    fused.install_block_mlp(dec, on=False)
    assert all(layer.mlp.block_kernel is None for layer in dec.layers)


def test_block_mlp_is_off_on_the_cpu_unless_asked(monkeypatch):
    m, _ = tiny_target("qwen2")
    monkeypatch.delenv("SEMIAR_BLOCK_MLP", raising=False)
    assert not fused.install_block_mlp(m.decoder)
    monkeypatch.setenv("SEMIAR_BLOCK_MLP", "1")
    assert fused.install_block_mlp(m.decoder) == gemv.triton_available()
    monkeypatch.setenv("SEMIAR_BLOCK_MLP", "maybe")
    with pytest.warns(UserWarning):
        assert not fused.install_block_mlp(m.decoder)
    fused.install_block_mlp(m.decoder, on=False)
