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
