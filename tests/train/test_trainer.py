"""train-drafter end to end on a tiny model directory: files, resume, CLI, and use by the engine."""

import json
import os
import subprocess
import sys

import pytest

from semiar.train.trainer import TrainConfig, train_drafter
from semiar.errors import InvalidArgumentError
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


def cfg(model_dir, out, **kw):
    base = dict(target=str(model_dir), out=str(out), n_prompts=12, max_new_tokens=16, gen_batch=6, epochs=2,
                batch_tokens=400, max_len=240, lr=1e-3, save_every=3)
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_a_drafter_and_resumes(model_dir, tmp_path):
    out = tmp_path / "d"
    s = train_drafter(cfg(model_dir, out, max_steps=4), progress=False)
    assert s["steps"] == 4
    for f in ("config.json", "model.safetensors", "data.pt", "checkpoint.pt", "train_summary.json"):
        assert (out / f).is_file()
    meta = json.loads((out / "config.json").read_text())
    assert meta["method"] == "falcon" and meta["training"]["steps"] == 4
    # same settings, more steps: resumes from the checkpoint and reuses the data
    s2 = train_drafter(cfg(model_dir, out, max_steps=6), progress=False)
    assert s2["steps"] == 6 and s2["data_seconds"] < 1.0


def test_trained_drafter_is_lossless_through_the_api(model_dir, tmp_path):
    import semiar

    out = tmp_path / "d"
    train_drafter(cfg(model_dir, out, max_steps=5), progress=False)
    kw = dict(model=str(model_dir), chat=True, max_new_tokens=30)
    ref = semiar.generate("make a list", **kw)
    got = semiar.generate("make a list", method="falcon", drafter=str(out), **kw)
    assert got.token_ids == ref.token_ids


def test_bad_settings():
    with pytest.raises(InvalidArgumentError, match="unknown drafter method"):
        TrainConfig(target="x", out="y", method="medusa2").validate()
    with pytest.raises(InvalidArgumentError, match="epochs"):
        TrainConfig(target="x", out="y", epochs=0).validate()
    with pytest.raises(InvalidArgumentError, match="not a drafter directory"):
        TrainConfig(target="x", out="y", init="/nonexistent/drafter").validate()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "semiar.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_cli_train_then_generate(model_dir, tmp_path):
    out = tmp_path / "cli"
    r = run_cli("train-drafter", "--target", str(model_dir), "--out", str(out), "--n-prompts", "8", "-n", "12",
                "--max-steps", "3", "--batch-tokens", "512", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 3
    g = run_cli("generate", "--model", str(model_dir), "--prompt", "hi", "--chat", "-n", "10", "--method", "falcon",
                "--drafter", str(out), "--json", "--threads", "1")
    assert g.returncode == 0, g.stderr
    assert "tau" in json.loads(g.stdout)
    bad = run_cli("generate", "--model", str(model_dir), "--prompt", "hi", "--method", "falcon",
                  "--drafter", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    other = tiny_model_dir(tmp_path / "other", seed=3)
    wrong = run_cli("generate", "--model", str(other), "--prompt", "hi", "--method", "falcon", "--drafter", str(out))
    assert wrong.returncode == 2 and "trained for target" in wrong.stderr
    method = run_cli("generate", "--model", str(model_dir), "--prompt", "hi", "--method", "medusa", "--drafter", str(out))
    assert method.returncode == 2 and "'falcon' drafter" in method.stderr and "Traceback" not in method.stderr


def test_torchrun_two_processes(model_dir, tmp_path):
    """Data-parallel training through PyTorch's own launcher (gloo on CPU)."""
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "semiar.cli",
                        "train-drafter", "--target", str(model_dir), "--out", str(out), "--n-prompts", "8", "-n", "12",
                        "--max-steps", "3", "--batch-tokens", "512", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "data-rank0.pt").is_file() and (out / "data-rank1.pt").is_file()
    assert json.loads((out / "config.json").read_text())["training"]["world_size"] == 2


def test_torchrun_two_processes_online_recipe(model_dir, tmp_path):
    """The learned-drafter recipe under DDP (gloo on CPU): conversations split across ranks, the draft
    vocabulary counted over both, the time budget cut to one step count for both ranks; the drafter
    rank 0 writes is lossless."""
    import semiar

    conv = tmp_path / "c.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"list {i}"},
                          {"role": "assistant", "content": "abc " * (3 + i % 4)}]} for i in range(16)]
    conv.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ddp-online"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "semiar.cli",
                        "train-drafter", "--target", str(model_dir), "--out", str(out), "--prompts", "none",
                        "--text", str(conv), "--draft-vocab", "40", "--norms", "--reg-weight", "0.1", "--token-weight", "1",
                        "--store", "int8", "--epochs", "40", "--batch-tokens", "256", "--max-len", "200",
                        "--time-budget", "3", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["world_size"] == 2 and training["data"]["conversations"] == 8  # this rank's half
    kw = dict(model=str(model_dir), chat=True, max_new_tokens=24)
    assert semiar.generate("list 3", method="falcon", drafter=str(out), **kw).token_ids == \
        semiar.generate("list 3", **kw).token_ids


def test_every_method_trains_on_one_shared_data_cache_and_benches(model_dir, tmp_path):
    """medusa, hydra and eagle train on the data.pt falcon made (no regeneration), and one bench
    gives each learned method its own drafter; the lossy method is labelled and not identity-checked."""
    from semiar.bench.run import BenchConfig, run_bench

    data = tmp_path / "data.pt"
    dirs = {}
    for m in ("falcon", "medusa", "hydra", "eagle"):
        dirs[m] = tmp_path / m
        s = train_drafter(cfg(model_dir, dirs[m], method=m, data=str(data), max_steps=2), progress=False)
        assert s["steps"] == 2 and json.loads((dirs[m] / "config.json").read_text())["method"] == m
        if m != "falcon":
            assert s["data_seconds"] < 1.0 and not (dirs[m] / "data.pt").exists()
    assert len(json.loads((dirs["medusa"] / "config.json").read_text())["training"]["val"]["rank_acc"]) == 4
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "list three colours"}\n')
    res = run_bench(BenchConfig(target=str(model_dir), methods=["ar", "medusa", "hydra", "eagle", "falcon", "medusa-typical"],
                                drafter=",".join(f"{m}={d}" for m, d in dirs.items()), tasks=["custom"],
                                prompts_file=str(p), n_prompts=1, max_new_tokens=10, out=str(tmp_path / "bench")),
                    progress=False)
    assert not res["identity"]["mismatches"]
    assert res["summary"]["all"]["medusa-typical"]["lossy"] and "lossy" not in res["summary"]["all"]["medusa"]
    assert "identical_to_baseline" not in res["runs"]["medusa-typical"][0]
    assert res["runs"]["hydra"][0]["identical_to_baseline"]
    assert "**Lossy**" in (tmp_path / "bench" / "report.md").read_text()


def test_drafter_per_method():
    from semiar.bench.run import drafter_per_method

    ms = ["ar", "pld", "medusa", "medusa-typical", "falcon"]
    assert drafter_per_method("D", ms) == {"medusa": "D", "medusa-typical": "D", "falcon": "D"}
    assert drafter_per_method("medusa=A,falcon=B", ms) == {"medusa": "A", "falcon": "B", "medusa-typical": "A"}
    with pytest.raises(InvalidArgumentError, match="bad --drafter entry"):
        drafter_per_method("pld=A", ms)


def test_eagle_and_heads_settings():
    with pytest.raises(InvalidArgumentError, match="one token per pass"):
        TrainConfig(target="x", out="y", method="eagle", k=2).validate()
    c = TrainConfig(target="x", out="y", method="medusa")
    c.validate()
    assert (c.k, c.num_layers) == (4, 1)
    with pytest.raises(InvalidArgumentError, match="falcon"):
        TrainConfig(target="x", out="y", method="hydra", glance=False).validate()


def test_init_trains_on_from_an_existing_drafter(model_dir, tmp_path):
    """--init starts from a drafter's weights (not from scratch) and refuses one of another shape."""
    import torch
    from safetensors.torch import load_file

    first = tmp_path / "a"
    train_drafter(cfg(model_dir, first, max_steps=3), progress=False)
    # zero steps of training from it: the weights written are the ones it started from
    again = tmp_path / "b"
    train_drafter(cfg(model_dir, again, max_steps=1, lr=1e-12, init=str(first)), progress=False)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    fresh = tmp_path / "c"
    train_drafter(cfg(model_dir, fresh, max_steps=1, lr=1e-12), progress=False)
    c = load_file(str(fresh / "model.safetensors"))
    name = next(k for k in a if a[k].is_floating_point() and a[k].dim() == 2)
    assert (a[name] - b[name]).abs().max() < 1e-6 < 1e-4 < (a[name] - c[name]).abs().max()
    with pytest.raises(InvalidArgumentError, match="another shape"):
        train_drafter(cfg(model_dir, tmp_path / "d", max_steps=1, k=3, init=str(first)), progress=False)


def test_time_budget_estimate_follows_the_pace_both_ways():
    from semiar.train.trainer import steps_in_budget

    assert steps_in_budget(20, 20.0, 1.0, 100.0, 1000) == 100  # 80 s left at 1 s a step
    assert steps_in_budget(40, 30.0, 0.5, 100.0, 1000) == 180  # faster later: the end moves out again
    assert steps_in_budget(40, 30.0, 0.01, 100.0, 1000) == 1000  # never past the plan
    assert steps_in_budget(90, 101.0, 1.0, 100.0, 1000) == 90  # spent: stop here
