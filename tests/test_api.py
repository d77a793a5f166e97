"""The Python API: `Session` (a target and drafter loaded once) and the one-call front doors."""

import pytest

import semiar
from semiar.errors import InvalidArgumentError
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return semiar.load_model(str(tiny_model_dir(tmp_path_factory.mktemp("api") / "m")))


def test_a_session_reuses_its_drafter_and_equals_one_call_generate(target):
    s = semiar.Session(target, method="pld")
    prompts = ["abc abc abc", "hello hello", "abc abc abc"]
    got = [s.generate(p, max_new_tokens=16).token_ids for p in prompts]
    assert got == [semiar.generate(p, target, max_new_tokens=16).token_ids for p in prompts]
    assert s.generate("hi", chat=True, max_new_tokens=8).method == "pld"


def test_messages_go_through_the_chat_template(target):
    s = semiar.Session(target)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert s.encode(msgs) == target.encode("hi", chat=True, system="be brief")
    assert s.generate(msgs, max_new_tokens=8).token_ids == semiar.generate(
        "hi", target, chat=True, system="be brief", max_new_tokens=8).token_ids
    with pytest.raises(InvalidArgumentError, match="system message"):
        s.encode(msgs, system="again")


def test_options_are_checked_before_a_model_loads():
    with pytest.raises(InvalidArgumentError, match="unknown method"):
        semiar.Session.check_options(method="warp")
    with pytest.raises(InvalidArgumentError, match="top-p"):
        semiar.stream("hi", "no-such-model-is-loaded", top_p=0)
