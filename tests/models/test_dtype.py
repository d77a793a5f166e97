"""bf16 on the CPU (`--dtype bf16`): the model packs, decodes and drafts, and a drafter trains
against it (its features and the shared embedding are bf16: the trainer autocasts)."""
import torch

from semiar.engine import Engine
from semiar.methods import make_drafter
from semiar.models.loading import default_dtype, load_model
from semiar.train.trainer import TrainConfig, train_drafter

from tiny import tiny_model_dir


def test_defaults():
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda") == torch.bfloat16


def test_bf16_on_the_cpu_decodes_drafts_and_trains(tmp_path):
    d = tiny_model_dir(tmp_path / "tiny")
    m = load_model(str(d), dtype="bf16")
    assert m.dtype == torch.bfloat16
    ids = m.encode("make a list of three fruits", chat=True)
    got = Engine(m, make_drafter("pld", m)).generate(ids, max_new_tokens=24).run()
    assert len(got.token_ids) == 24 or got.stop_reason == "eos"
    s = train_drafter(TrainConfig(target=str(d), out=str(tmp_path / "f"), dtype="bf16", n_prompts=8,
                                  max_new_tokens=16, gen_batch=8, batch_tokens=400, max_len=200, max_steps=2),
                      progress=False)
    assert s["steps"] == 2


def test_q4_is_for_gguf_models_and_not_for_training(tmp_path):
    import pytest

    from semiar.errors import SemiarError

    d = tiny_model_dir(tmp_path / "tiny")
    assert load_model(str(d)).weights == "float32"  # no GGUF behind it: the dense default
    with pytest.raises(SemiarError, match="not a GGUF model"):
        load_model(str(d), dtype="q4")
    with pytest.raises(SemiarError, match="dense weights"):
        train_drafter(TrainConfig(target=str(d), out=str(tmp_path / "f"), dtype="q4"), progress=False)
