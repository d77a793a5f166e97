import json

import pytest

from semiar.cli import main
from tiny import tiny_model_dir


def run_cli(args, capsys):
    capsys.readouterr()  # drop what test setup printed
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_generate_json_from_model_dir(tmp_path, capsys):
    d = tiny_model_dir(tmp_path / "m")
    code, out, err = run_cli(["generate", "--model", str(d), "--prompt", "hello hello", "-n", "12", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    for key in ("text", "token_ids", "new_tokens", "seconds", "tokens_per_s", "method", "model", "tau",
                "target_forwards", "accept_by_depth"):
        assert key in res
    assert res["new_tokens"] == len(res["token_ids"]) <= 12
    code2, out2, _ = run_cli(["generate", "--model", str(d), "--prompt", "hello hello", "-n", "12", "--json",
                              "--method", "pld"], capsys)
    assert json.loads(out2)["token_ids"] == res["token_ids"]


def test_generate_chat_sampling_streams(tmp_path, capsys):
    d = tiny_model_dir(tmp_path / "m")
    code, out, err = run_cli(["generate", "--model", str(d), "--prompt", "Hi", "--chat", "-n", "8",
                              "--temperature", "0.7", "--seed", "1"], capsys)
    assert code == 0 and "tok/s" in err


@pytest.mark.parametrize("args,needle", [
    (["--model", "no-such-model"], "unknown model"),
    (["-n", "0"], "max-new-tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top-p"),
    (["--top-p", "0"], "top-p"),
    (["--method", "magic"], "unknown method"),
    (["--method", "pld", "-k", "0"], "k must be"),
    (["--method", "ngram", "--tree", "dynamic:3,x"], "malformed tree"),
    (["--method", "ngram", "--tree", "[[0],[0,0,0]]"], "tree"),
    (["--method", "draft"], "--draft-model"),
    (["--method", "lookahead", "--tree", "lookahead:0,3,3"], "W >= 1"),
    (["--method", "lookahead", "--tree", "lookahead:4,x,4"], "malformed lookahead"),
    (["--method", "lookahead", "--tree", "lookahead:60,9,60"], "limit is 256"),
    (["--method", "lookahead", "-k", "4"], "lookahead:W,N,G"),
    (["--method", "copy", "-k", "0"], "k must be"),
    (["--method", "pld", "--tree", "dynamic:3,2,4"], "chain"),
    (["--method", "copy", "--tree", "[[0],[1]]"], "dynamic:LEN,ALTS,BUDGET"),
    (["--method", "auto", "-k", "4"], "auto runs each method"),
    (["--threads", "0"], "--threads"),
    (["--system", "be brief"], "--system needs --chat"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    d = tiny_model_dir(tmp_path / "m")
    base = ["generate", "--prompt", "hi", "--model", str(d)]
    code, out, err = run_cli(base + args, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_prompt_longer_than_context(tmp_path, capsys):
    d = tiny_model_dir(tmp_path / "m")  # context 512
    code, _, err = run_cli(["generate", "--model", str(d), "--prompt", "x" * 600], capsys)
    assert code == 2 and "context" in err


def test_draft_model_tokenizer_mismatch(tmp_path, capsys):
    from transformers import AutoTokenizer

    d = tiny_model_dir(tmp_path / "t")
    other = tiny_model_dir(tmp_path / "d", seed=1)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    code, _, err = run_cli(["generate", "--model", str(d), "--prompt", "hi", "--method", "draft",
                            "--draft-model", str(other)], capsys)
    assert code == 2 and "tokenizer" in err


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_another_tokenizer_is_refused_before_any_weights_load(tmp_path, capsys, monkeypatch, command):
    from transformers import AutoTokenizer

    from semiar.models import loading

    d = tiny_model_dir(tmp_path / "t")
    other = tiny_model_dir(tmp_path / "d", seed=1)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    loaded = []
    real = loading._load_weights
    monkeypatch.setattr(loading, "_load_weights", lambda path: loaded.append(path) or real(path))
    args = (["generate", "--model", str(d), "--prompt", "hi", "--method", "draft"] if command == "generate" else
            ["bench", "--target", str(d), "--methods", "ar,draft", "--tasks", "chat", "--out", str(tmp_path / "o")])
    code, _, err = run_cli(args + ["--draft-model", str(other)], capsys)
    lines = err.strip().splitlines()  # bench says what it loads first
    assert code == 2 and lines[-1].startswith("error: draft model d does not share the tokenizer of target t")
    assert [x for x in lines if x.startswith("error:")] == lines[-1:] and "Traceback" not in err and loaded == []


def test_corrupt_weights(tmp_path, capsys):
    d = tiny_model_dir(tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run_cli(["generate", "--model", str(d), "--prompt", "hi"], capsys)
    assert code == 2 and "corrupt" in err


def test_methods_lists_training_free_methods(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    for m in ("lookahead", "copy", "auto"):
        assert m in out


@pytest.mark.parametrize("method", ["lookahead", "copy", "auto"])
def test_training_free_methods_equal_ar_from_the_cli(tmp_path, capsys, method):
    d = tiny_model_dir(tmp_path / "m")
    args = ["generate", "--model", str(d), "--prompt", "def f(x): return x + x", "-n", "16", "--json"]
    _, out, _ = run_cli(args, capsys)
    code, out2, err = run_cli(args + ["--method", method], capsys)
    assert code == 0, err
    assert json.loads(out2)["token_ids"] == json.loads(out)["token_ids"]


def test_version(capsys):
    from semiar import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"semiar {__version__}"


@pytest.mark.parametrize("as_json", [False, True])
def test_a_full_context_says_so(tmp_path, capsys, as_json):
    d = tiny_model_dir(tmp_path / "m")  # context 512; the tiny tokenizer is one token per character
    args = ["generate", "--model", str(d), "--prompt", "ab" * 250, "-n", "40"] + (["--json"] if as_json else [])
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    notice = [line for line in err.splitlines() if line.startswith("notice: stopped at the context limit")]
    assert len(notice) == 1 and "of the 40 tokens asked for" in notice[0]
    if as_json:
        assert json.loads(out)["stop_reason"] == "context"
    code, _, err = run_cli(["generate", "--model", str(d), "--prompt", "ab", "-n", "4"], capsys)
    assert code == 0 and "notice:" not in err


@pytest.mark.parametrize("columns", [None, "40"])
def test_piped_output_keeps_full_names_and_defaults(capsys, monkeypatch, columns):
    """Not a terminal (here: captured), tables and help are as wide as they need, whatever $COLUMNS."""
    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    code, out, _ = run_cli(["models", "list"], capsys)
    assert code == 0 and "qwen2.5-coder-1.5b-instruct" in out and "…" not in out
    code, out, _ = run_cli(["generate", "--help"], capsys)
    assert code == 0 and "[default: qwen2.5-coder-1.5b-instruct]" in out and "…" not in out
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "results.json, report.md, speedup.png, acceptance.png" in out


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_generate_prompts_file_one_result_per_line(tmp_path, capsys):
    import semiar

    d = tiny_model_dir(tmp_path / "m")
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "again"}]
    src = _jsonl(tmp_path / "in.jsonl", [{"prompt": "hello hello"}, "", {"id": "c", "messages": convo},
                                         {"id": 7, "prompt": "abc abc", "system": "be brief"}])
    outs = {}
    for method in ("ar", "pld", "ngram"):
        out = tmp_path / f"{method}.jsonl"
        code, _, err = run_cli(["generate", "--model", str(d), "--prompts", str(src), "--out", str(out), "--chat",
                                "-n", "10", "--method", method], capsys)
        assert code == 0, err
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert [(r["id"], r["line"]) for r in rows] == [("line-1", 1), ("c", 3), ("7", 4)]
        for r in rows:
            assert {"text", "token_ids", "new_tokens", "tau", "tokens_per_s", "stop_reason"} <= r.keys()
        outs[method] = [r["token_ids"] for r in rows]
        assert err.count(f"[{method}]") == 4  # one line per prompt, one summary
    assert outs["pld"] == outs["ar"] == outs["ngram"]
    target = semiar.load_model(str(d))
    assert outs["ar"][0] == semiar.generate("hello hello", target, chat=True, max_new_tokens=10).token_ids
    assert outs["ar"][1] == semiar.generate(convo, target, max_new_tokens=10).token_ids
    assert outs["ar"][2] == semiar.generate("abc abc", target, chat=True, system="be brief", max_new_tokens=10).token_ids
    code, out, _ = run_cli(["generate", "--model", str(d), "--prompts", str(src), "--chat", "-n", "10"], capsys)
    assert code == 0 and [json.loads(x)["token_ids"] for x in out.splitlines()] == outs["ar"]  # no --out: stdout


@pytest.mark.parametrize("rows,extra,needle", [
    ([{"prompt": "ok"}, "not json"], [], "line 2: not valid JSON"),
    ([{"prompt": "ok"}, {"text": "x"}], [], 'line 2: missing "prompt" (or "messages")'),
    ([{"messages": [{"role": "user"}]}], [], 'line 1: messages[0] must be an object'),
    ([{"messages": []}], [], 'line 1: "messages" must be a non-empty list'),
    ([{"prompt": "ok"}, {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}], [], "line 2: give either"),
    ([{"prompt": "ok"}, {"prompt": "ok", "system": "s"}], [], 'line 2: "system" needs --chat'),
    ([{"prompt": "ok"}, {"prompt": "x" * 600}], [], "line 2: prompt has 600 tokens"),
    ([{"prompt": "ok"}], ["--prompt", "hi"], "not both"),
    ([{"prompt": "ok"}], ["--json"], "drop --json"),
    ([{"prompt": "ok"}], ["-n", "0"], "max-new-tokens"),
])
def test_bad_prompts_file_is_one_line_naming_it(tmp_path, capsys, rows, extra, needle):
    d = tiny_model_dir(tmp_path / "m")
    src = _jsonl(tmp_path / "in.jsonl", rows)
    code, _, err = run_cli(["generate", "--model", str(d), "--prompts", str(src), "--out", str(tmp_path / "o.jsonl")]
                           + extra, capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_out_needs_prompts_and_a_writable_path(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--prompt", "hi", "--out", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and "--out is for --prompts" in err
    src = _jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}])
    for bad in (tmp_path, tmp_path / "no" / "o.jsonl"):
        code, _, err = run_cli(["generate", "--model", "no-such-model", "--prompts", str(src), "--out", str(bad)],
                               capsys)
        assert code == 2 and "cannot write" in err  # before the model (here: unknown) is looked up


def _chat(args, text):
    from typer.testing import CliRunner

    from semiar.cli import app

    r = CliRunner().invoke(app, ["chat"] + args, input=text)
    assert r.exit_code == 0, r.output
    return r.stdout, r.stderr


@pytest.mark.parametrize("method", ["ar", "pld", "lookahead"])
def test_chat_turns_stream_and_equal_generate(tmp_path, method):
    import semiar

    d = tiny_model_dir(tmp_path / "m")
    target = semiar.load_model(str(d))
    first = semiar.generate("hello there", target, chat=True, max_new_tokens=12).text
    second = semiar.generate([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "and more"}], target, max_new_tokens=12).text
    out, err = _chat(["--model", str(d), "--method", method, "-n", "12"],
                     "hello there\nand more\n/reset\n\nhello there\n/exit\nnot read\n")
    assert out == f"{first}\n{second}\n{first}\n"
    figures = [x for x in err.splitlines() if x.startswith(f"[{method}]")]
    assert len(figures) == 3 and all("tok/s" in x and "tau" in x and "stop:" in x for x in figures)


def test_chat_ends_at_end_of_input_and_survives_bad_turns(tmp_path):
    d = tiny_model_dir(tmp_path / "m")  # context 512
    out, err = _chat(["--model", str(d), "-n", "4", "--system", "be brief"], "/what\n" + "x" * 600 + "\nhi\n")
    assert "unknown command /what" in err and "error: prompt has" in err and "/reset starts over" in err
    assert len(out.splitlines()) == 1 and err.count("[ar]") == 1


def test_generate_image_writes_a_grid(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(["generate-image", "--model", "mnist-vq", "--method", "sjd", "--class", "3", "--n", "2",
                                 "--out", str(out), "--cfg", "1.5", "--top-k", "50", "--seed", "1", "--json"], capsys)
    assert code == 0, err
    res = json.loads(stdout)
    assert res["images"] == 2 and res["steps_per_image"] <= 49
    assert Image.open(out).size == (2 * 30 * 2, 1 * 30 * 2)  # 2 columns of 28 + 2 px border, scaled 2x


@pytest.mark.parametrize("args,needle", [
    (["--class", "10"], "class must be in 0..9"),
    (["--class", "1", "--method", "pld"], "not for images"),
    (["--class", "1", "--model", "no-such"], "unknown image model"),
    (["--class", "1", "--cfg", "0.5"], "cfg scale"),
    (["--class", "1", "--n", "0"], "n must be > 0"),
    (["--class", "1", "--method", "lantern", "--delta", "2"], "delta"),
    (["--class", "1", "--method", "gsd", "--group", "0"], "group size"),
    (["--class", "1", "--out", "grid.jpg"], ".png"),
])
def test_generate_image_bad_input_is_one_line(tmp_path, capsys, args, needle):
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "g.png")]
    code, _, err = run_cli(["generate-image"] + args, capsys)
    assert code == 2 and err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
