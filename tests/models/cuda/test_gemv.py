"""The one-row Triton kernel (models.cuda.gemv). The kernel tests take `kernel_device` (conftest): CUDA
tensors on a GPU, else CPU tensors under Triton's interpreter; without Triton (CI) only the fallbacks are
checked."""
import pytest
import torch
import torch.nn.functional as F

from semiar.engine import Engine
from semiar.models.cuda import gemv
from semiar.models.cuda.graphs import GraphedDecoder

from tiny import tiny_target

needs_triton = pytest.mark.skipif(not gemv.triton_available(), reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,bias", [(37, 100, True), (64, 1030, False)])
def test_gemv_equals_linear(dtype, N, K, bias, kernel_device):
    torch.manual_seed(0)
    w = torch.randn(N, K).to(kernel_device, dtype)
    b = torch.randn(N).to(kernel_device, dtype) if bias else None
    x = torch.randn(1, 1, K).to(kernel_device, dtype)
    y = gemv.gemv(x, w, b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.shape == (1, 1, N) and y.dtype == dtype
    # fp32 accumulation: off by the output's rounding only
    tol = 1e-4 if dtype == torch.float32 else ref.abs().max().item() / 64
    assert (y.float() - ref).abs().max() < tol
    with pytest.raises(ValueError, match="one row"):
        gemv.gemv(torch.randn(2, K).to(kernel_device, dtype), w, b)


@needs_triton
def test_row_linear_sends_only_one_row_to_the_kernel(monkeypatch, kernel_device):
    lin = torch.nn.Linear(50, 20).to(kernel_device)
    r = gemv.RowLinear(lin)
    calls = []
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 3, 50, device=kernel_device)
    with torch.no_grad():
        assert torch.equal(r(x), lin(x)) and not calls
        assert (r(x[:, :1]) - lin(x[:, :1])).abs().max() < 1e-5 and calls
    assert r.unwrap() is lin and set(dict(r.named_parameters())) == {"weight", "bias"}


@needs_triton
def test_installed_kernel_keeps_weights_and_greedy_output(kernel_device):
    m, _ = tiny_target("qwen2", device=kernel_device)
    prompt = [3, 9, 4, 1, 7, 2, 3, 9]
    ref = Engine(m).generate(prompt, max_new_tokens=12).run().token_ids
    keys = set(m.decoder.state_dict())
    report = gemv.install(m.decoder, force=True)
    assert report and all(r["used"] for r in report.values())
    assert isinstance(m.decoder.lm_head, gemv.RowLinear)
    assert m.decoder.lm_head.weight is m.decoder.embed_tokens.weight  # still tied
    assert set(m.decoder.state_dict()) == keys
    assert Engine(m).generate(prompt, max_new_tokens=12).run().token_ids == ref
    # through the static forward that CUDA graphs capture (compiled by Dynamo, opaque kernel call)
    m.runner = GraphedDecoder(m.decoder, capacity=64, sizes=(1, 4, 8), capture=False, row_kernel=True)
    assert isinstance(m.decoder.layers[0].mlp.down_proj, gemv.RowLinear)
    assert Engine(m).generate(prompt, max_new_tokens=12).run().token_ids == ref
    gemv.uninstall(m.decoder)
    assert type(m.decoder.lm_head) is torch.nn.Linear and m.decoder.gpu_row_kernel == {}


def test_off_the_gpu_nothing_is_installed_unless_forced(monkeypatch):
    m, _ = tiny_target("qwen2")
    assert gemv.install(m.decoder) == {}
    assert type(m.decoder.layers[0].self_attn.qkv_proj) is torch.nn.Linear
    monkeypatch.setenv("SEMIAR_GEMV", "0")
    assert gemv.install(m.decoder, force=None) == {}
    GraphedDecoder(m.decoder, capacity=64, sizes=(1, 4), capture=False)  # the CPU default: cuBLAS path
    assert type(m.decoder.lm_head) is torch.nn.Linear


def test_a_kernel_that_fails_leaves_cublas(monkeypatch):
    m, _ = tiny_target("qwen2")
    monkeypatch.setattr(gemv, "triton_available", lambda: True)

    def broken(*a, **k):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(gemv, "gemv", broken)
    with pytest.warns(UserWarning, match="one-row Triton kernel failed"):
        assert gemv.install(m.decoder, force=True) == {}
    assert type(m.decoder.lm_head) is torch.nn.Linear
