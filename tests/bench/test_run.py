"""A tiny `semiar bench` end to end: files, fields, the identity check, and its failure mode."""

import json

import pytest

from semiar.bench.run import BenchConfig, run_bench
from semiar.errors import InvalidArgumentError, SemiarError
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_model_dir(root / "target"), tiny_model_dir(root / "draft", seed=1)


def prompts_file(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "copy: abc abc abc"}\n{"prompt": "hello world", "system": "be brief"}\n')
    return p


def config(tmp_path, dirs, **kw):
    base = dict(target=str(dirs[0]), draft_model=str(dirs[1]), methods=["ar", "draft", "pld", "ngram", "hf-ar", "hf-pld"],
                tasks=["custom"], prompts_file=str(prompts_file(tmp_path)), n_prompts=2, max_new_tokens=12,
                out=str(tmp_path / "out"), repeats=2)
    base.update(kw)
    return BenchConfig(**base)


def test_bench_end_to_end(tmp_path, model_dirs):
    res = run_bench(config(tmp_path, model_dirs), progress=False)
    out = tmp_path / "out"
    for f in ("results.json", "report.md", "speedup.png", "acceptance.png"):
        assert (out / f).exists(), f
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cores"] and data["machine"]["torch_threads"]
    for m in ("ar", "draft", "pld", "ngram", "hf-ar", "hf-pld"):
        runs = data["runs"][m]
        assert len(runs) == 2
        for r in runs:
            for key in ("new_tokens", "seconds", "tokens_per_s", "tau", "target_forwards", "accept_by_depth",
                        "token_ids", "task", "prompt_id", "seconds_all"):
                assert key in r
            assert len(r["seconds_all"]) == 2
    assert data["identity"]["checked"] and data["identity"]["mismatches"] == []
    assert "speedup vs ar" in (out / "report.md").read_text()
    assert res["summary"]["all"]["ar"]["speedup"] == 1.0


def test_bench_same_text_times_every_method_on_ars_text(tmp_path, model_dirs):
    res = run_bench(config(tmp_path, model_dirs, methods=["pld", "ngram", "hf-ar"], same_text=True, repeats=1),
                    progress=False)
    runs = res["runs"]
    for m in ("pld", "ngram"):
        for r, a in zip(runs[m], runs["ar"]):
            assert r["token_ids"] == a["token_ids"] and r["departures"] == []
    assert "departures" not in runs["hf-ar"][0]  # peers run as they are
    assert res["identity"]["mismatches"] == [] and res["settings"]["same_text"]
    assert "Same text" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(InvalidArgumentError, match="greedy"):
        BenchConfig(same_text=True, temperature=0.7).validate()


def test_bench_records_which_arm_auto_drafted_each_step(tmp_path, model_dirs):
    res = run_bench(config(tmp_path, model_dirs, methods=["auto"], repeats=1), progress=False)
    for r in res["runs"]["auto"]:
        # per run, not over auto's life (a step that ends on EOS is not observed, so not counted)
        assert r["target_forwards"] - 1 <= sum(r["arm_steps"].values()) <= r["target_forwards"]
        assert set(r["arm_steps"]) <= {"copy", "pld", "ngram", "lookahead", "draft", "ar"}
    assert "arm_steps" not in res["runs"]["ar"][0]
    assert "`auto`'s steps by the arm that drafted them" in (tmp_path / "out" / "report.md").read_text()


def test_bench_flags_a_lossy_method(tmp_path, model_dirs, monkeypatch):
    """Make pld lossy (replace its first emitted token): the identity check must catch it."""
    import semiar.bench.run as run_mod

    real_run = run_mod.Runner.run

    def lossy(self, method, ids, max_new, seed, forced=None):
        rec = real_run(self, method, ids, max_new, seed, forced)
        if method == "pld":
            rec["token_ids"] = [(rec["token_ids"][0] + 1) % 100] + rec["token_ids"][1:]
        return rec

    monkeypatch.setattr(run_mod.Runner, "run", lossy)
    res = run_bench(config(tmp_path, model_dirs, methods=["ar", "pld"], repeats=1), progress=False)
    mm = res["identity"]["mismatches"]
    assert mm and all(x["method"] == "pld" for x in mm)
    assert all(x["near_tie"] is False and x["logit_gap"] > 0 for x in mm)  # a real bug, not rounding
    assert "mismatch" in (tmp_path / "out" / "report.md").read_text()


def test_bench_cli_exit_codes(tmp_path, model_dirs, capsys):
    from semiar.cli import main

    def cli(args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args)
        return e.value.code, capsys.readouterr().err

    base = ["bench", "--target", str(model_dirs[0]), "--tasks", "custom", "--prompts", str(prompts_file(tmp_path)),
            "-n", "6", "--out", str(tmp_path / "o")]
    assert cli(base + ["--methods", "ar,pld"])[0] == 0
    code, err = cli(base + ["--methods", "ar,warp"])
    assert code == 2 and "unknown method" in err
    code, err = cli(base[:3] + ["--tasks", "poetry"])
    assert code == 2 and "unknown task" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    code, err = cli(base[:5] + ["--prompts", str(bad)])
    assert code == 2 and "line 2" in err
    ro = tmp_path / "ro"
    ro.write_text("a file, not a directory")
    code, err = cli(base[:-2] + ["--out", str(ro / "sub")])
    assert code == 2 and "not writable" in err


def test_bench_says_which_prompts_stopped_at_the_context(tmp_path, model_dirs, capsys):
    from semiar.cli import main

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "long", "prompt": "ab" * 250}) + '\n{"id": "short", "prompt": "ab"}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["bench", "--target", str(model_dirs[0]), "--tasks", "custom", "--prompts", str(long), "--no-chat",
              "--methods", "ar,pld", "-n", "40", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    assert "notice: 1 prompt(s) stopped at the context limit" in err and "custom/long" in err
    runs = json.loads((tmp_path / "o" / "results.json").read_text())["runs"]
    assert [r["stop_reason"] for r in runs["pld"]][0] == "context" and runs["ar"][1]["stop_reason"] != "context"


def test_bench_config_validation():
    with pytest.raises(InvalidArgumentError):
        BenchConfig(methods=["ar", "ar"]).validate()
    with pytest.raises(SemiarError):
        BenchConfig(repeats=0).validate()


def test_bench_interrupt_keeps_partial_results(tmp_path, model_dirs, monkeypatch):
    import semiar.bench.run as run_mod

    real_run = run_mod.Runner.run
    calls = {"n": 0}

    def flaky(self, method, ids, max_new, seed, forced=None):
        calls["n"] += 1
        if calls["n"] > 2 + 2:  # warm-up (2 methods) + first prompt, then Ctrl-C
            raise KeyboardInterrupt
        return real_run(self, method, ids, max_new, seed, forced)

    monkeypatch.setattr(run_mod.Runner, "run", flaky)
    res = run_bench(config(tmp_path, model_dirs, methods=["ar", "pld"], repeats=1), progress=False)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["interrupted"] and len(data["runs"]["ar"]) == 1 and res["interrupted"]
    assert "Interrupted" in (tmp_path / "out" / "report.md").read_text()
    assert not (tmp_path / "out" / "results.partial.json").exists()  # written per prompt, gone at the end


def test_a_run_killed_outright_leaves_the_finished_prompts(tmp_path, model_dirs, monkeypatch):
    import semiar.bench.run as run_mod

    real_run = run_mod.Runner.run
    calls = {"n": 0}

    def killed(self, method, ids, max_new, seed, forced=None):  # SIGKILL has no handler: nothing after it runs
        calls["n"] += 1
        if calls["n"] > 2 + 2:
            raise SystemExit(137)
        return real_run(self, method, ids, max_new, seed, forced)

    monkeypatch.setattr(run_mod.Runner, "run", killed)
    with pytest.raises(SystemExit):
        run_bench(config(tmp_path, model_dirs, methods=["ar", "pld"], repeats=1), progress=False)
    assert not (tmp_path / "out" / "results.json").exists()
    data = json.loads((tmp_path / "out" / "results.partial.json").read_text())
    assert len(data["runs"]["ar"]) == len(data["runs"]["pld"]) == 1


def test_bench_leaves_out_a_method_that_fails(tmp_path, model_dirs, monkeypatch):
    """A method that raises on the second prompt is reported and dropped; the others' numbers stay."""
    import semiar.bench.run as run_mod

    real_run = run_mod.Runner.run
    seen = {"pld": 0}

    def broken(self, method, ids, max_new, seed, forced=None):
        if method == "pld":
            seen["pld"] += 1
            if seen["pld"] > 2:  # warm-up and first prompt pass
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_run(self, method, ids, max_new, seed, forced)

    monkeypatch.setattr(run_mod.Runner, "run", broken)
    res = run_bench(config(tmp_path, model_dirs, methods=["ar", "pld", "ngram"], repeats=1), progress=False)
    assert "pld" not in res["runs"] and "pld" not in res["summary"]["all"]
    assert len(res["runs"]["ngram"]) == 2 and "illegal memory access" in res["failed"]["pld"]
    assert "pld failed" in (tmp_path / "out" / "report.md").read_text()


def test_tree_per_method():
    from semiar.bench.run import tree_per_method

    assert tree_per_method(None, ["ar", "pld"]) == {}
    assert tree_per_method("chain:8", ["ar", "pld", "draft", "hf-ar"]) == {"pld": "chain:8", "draft": "chain:8"}
    assert tree_per_method("falcon=dynamic:8,6,48;pld=chain:8", ["ar", "pld", "falcon"]) == {
        "falcon": "dynamic:8,6,48", "pld": "chain:8"}
    with pytest.raises(SemiarError, match="METHOD=SPEC"):
        tree_per_method("nope=chain:4", ["ar"])


def test_method_variants_run_one_method_twice_with_their_own_trees(tmp_path, model_dirs):
    """`pld@short` is pld under its own label and tree, checked against ar like pld."""
    res = run_bench(config(tmp_path, model_dirs, methods=["ar", "pld", "pld@short"], tree="pld@short=chain:1",
                           repeats=1, same_text=True), progress=False)
    assert res["identity"]["mismatches"] == []
    short, full = res["runs"]["pld@short"], res["runs"]["pld"]
    assert max(max(len(r["accept_by_depth"]) for r in short), 1) == 1 and "pld@short" in res["summary"]["all"]
    assert [r["token_ids"] for r in short] == [r["token_ids"] for r in res["runs"]["ar"]]
    assert full  # the plain method keeps its own default tree
    from semiar.bench.run import tree_per_method, drafter_per_method

    assert tree_per_method("pld=chain:4", ["pld", "pld@a"]) == {"pld": "chain:4", "pld@a": "chain:4"}
    assert drafter_per_method("falcon=A,falcon@old=B", ["falcon", "falcon@old"]) == {"falcon": "A", "falcon@old": "B"}
    for bad in (["ar", "ar@x"], ["ar", "hf-ar@x"], ["ar", "pld@"], ["ar", "pld@a b"]):
        with pytest.raises(InvalidArgumentError, match="variant|unknown"):
            BenchConfig(methods=bad).validate()


def test_hf_peer_shares_our_dense_weights_and_matches_its_own_load(tmp_path, monkeypatch):
    # the dense weights kept beside the packed ones: left to timing, a loaded machine can pick a packed
    # one-row kernel and keep no dense weight to share (fastest_one_row_kernel)
    monkeypatch.setenv("SEMIAR_ONE_ROW", "dense")
    import torch
    from transformers import AutoModelForCausalLM

    from semiar.bench.peers import hf_model_for
    from semiar.models.loading import load_model
    from tiny import tiny_model_dir

    for family, pack in (("qwen2", True), ("llama", False)):
        d = tiny_model_dir(tmp_path / family, family=family)
        ours = load_model(str(d), pack=pack, progress=False)
        shared = hf_model_for(ours, torch.float32)
        qkv = ours.decoder.layers[0].self_attn.qkv_proj.weight
        assert shared.model.layers[0].self_attn.q_proj.weight.data_ptr() == qkv.data_ptr()  # a view, no copy
        own = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        ids = torch.tensor([[1, 5, 9, 3, 7]])
        with torch.no_grad():
            assert torch.allclose(shared(ids).logits, own(ids).logits, atol=1e-5)
            a = shared.generate(ids, max_new_tokens=8, do_sample=False)
            b = own.generate(ids, max_new_tokens=8, do_sample=False)
        assert a.tolist() == b.tolist()


FAKE_LLAMA_SERVER = r'''#!{python}
"""A stand-in for llama.cpp's llama-server: /health, /completion with prompt ids; logs what it got."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
log = os.environ["FAKE_LLAMA_LOG"]
with open(log, "a") as f:
    f.write(json.dumps({{"argv": args}}) + "\n")


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send({{"status": "ok"}})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(log, "a") as f:
            f.write(json.dumps({{"request": req}}) + "\n")
        toks = [(req["prompt"][-1] + i) % 50 + 3 for i in range(req["n_predict"])]
        self._send({{"content": "", "tokens": toks, "timings": {{"prompt_ms": 2.0, "predicted_ms": 4.0 * len(toks)}}}})


HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), H).serve_forever()
'''


def test_bench_llamacpp_peer_runs_llama_server_on_the_same_gguf(tmp_path, monkeypatch):
    import os
    import sys

    from tiny import tiny_gguf

    tiny_gguf(tmp_path / "m.gguf", tokenizer=True)
    bindir = tmp_path / "llama.cpp" / "build" / "bin"
    bindir.mkdir(parents=True)
    server = bindir / "llama-server"
    server.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable))
    server.chmod(0o755)
    log = tmp_path / "server.log"
    monkeypatch.setenv("FAKE_LLAMA_LOG", str(log))
    cfg = BenchConfig(target=str(tmp_path / "m.gguf"), methods=["ar", "llamacpp"], tasks=["custom"],
                      prompts_file=str(prompts_file(tmp_path)), n_prompts=2, max_new_tokens=6, threads=1,
                      out=str(tmp_path / "out"), repeats=1, llamacpp_bin=str(tmp_path / "llama.cpp" / "build"))
    res = run_bench(cfg, progress=False)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    argv = lines[0]["argv"]
    assert argv[argv.index("-m") + 1] == str(tmp_path / "m.gguf") and argv[argv.index("-t") + 1] == "1"
    requests = [x["request"] for x in lines[1:]]
    assert len(requests) == 3 and all(r["n_predict"] == 6 for r in requests)  # warm-up + 2 prompts
    timed = requests[-2:]  # after the warm-up: the two prompts, as ids with the chat template applied
    assert [len(r["prompt"]) for r in timed] == [p["prompt_tokens"] for p in res["prompts"]]
    assert all(r["temperature"] == 0.0 and r["top_k"] == 1 and not r["cache_prompt"] for r in timed)
    runs = res["runs"]["llamacpp"]
    assert [r["new_tokens"] for r in runs] == [6, 6]
    assert runs[0]["seconds"] == pytest.approx((2.0 + 4.0 * 6) / 1e3)  # the server's own timings
    assert runs[0]["prefill_seconds"] == pytest.approx(2.0 / 1e3)
    # decode-only: the tokens over the server's generation time (llama-bench's tg figure)
    assert res["summary"]["all"]["llamacpp"]["decode_tokens_per_s"] == pytest.approx(12 / (2 * 4.0 * 6 / 1e3))
    assert res["summary"]["all"]["ar"]["decode_tokens_per_s"] > 0
    assert res["identity"]["ar_equals_llamacpp"].endswith("/2")  # informational, not a mismatch
    assert res["machine"]["peers"]["llamacpp"].startswith("llama-server ")
    assert res["machine"]["weights"] == "q4"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "peer llamacpp: llama-server" in report and "decode tokens/s" in report
    assert "llamacpp" in res["summary"]["all"]


def test_llamacpp_bin_without_a_server_is_a_clear_error(tmp_path):
    from semiar.bench.peers import find_llama_server

    with pytest.raises(InvalidArgumentError, match="no executable llama-server"):
        find_llama_server(str(tmp_path))
