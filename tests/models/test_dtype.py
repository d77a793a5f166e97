"""The default dtype: bf16 on CUDA and on CPUs that multiply bf16 natively, else fp32."""
import pytest
import torch

from semiar.errors import SemiarError
from semiar.models import loading
from semiar.models.loading import default_dtype, load_model, parse_dtype

from tiny import tiny_model_dir


def test_cpu_default_follows_native_bf16(monkeypatch):
    monkeypatch.delenv("SEMIAR_CPU_DTYPE", raising=False)
    monkeypatch.setattr(loading, "cpu_packing_available", lambda: True)
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.bfloat16
    monkeypatch.setenv("SEMIAR_CPU_DTYPE", "bf16")
    assert parse_dtype(None, "cpu") == parse_dtype("auto", "cpu") == torch.bfloat16
    assert parse_dtype("fp32", "cpu") == torch.float32  # an explicit dtype wins
    monkeypatch.setenv("SEMIAR_CPU_DTYPE", "fp8")
    with pytest.raises(SemiarError, match="unknown dtype"):
        default_dtype("cpu")


def test_a_bf16_model_on_the_cpu_runs_and_is_lossless(tmp_path, monkeypatch):
    from semiar.engine import Engine
    from semiar.methods import make_drafter

    monkeypatch.setenv("SEMIAR_CPU_DTYPE", "bf16")
    m = load_model(str(tiny_model_dir(tmp_path / "tiny")))
    assert m.dtype == torch.bfloat16
    ids = m.encode("make a list of three fruits", chat=True)
    ref = Engine(m).generate(ids, max_new_tokens=24).run().token_ids
    got = Engine(m, make_drafter("pld", m)).generate(ids, max_new_tokens=24).run().token_ids
    assert got == ref
