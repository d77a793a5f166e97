"""`semiar serve` through the real clients (openai, httpx) against a server on 127.0.0.1 in the test."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import semiar
from semiar.models import load_model
from semiar.server import BackgroundServer, Server
from tiny import tiny_model_dir

PROMPTS = ["hello world", "the cat sat", "def f(x):", "1 2 3 4", "abc abc abc", "Once upon",
           "import os", "for i in", "yes no yes", "red green", "x = y + z", "print(1)", "aaaa", "zz top",
           "qwerty", "lorem ipsum"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return load_model(str(tiny_model_dir(tmp_path_factory.mktemp("serve") / "m")))


@pytest.fixture(scope="module")
def server(target):
    srv = Server(target, method="ar", served_name="tiny")
    with BackgroundServer(srv) as url:
        yield srv, url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=30)


def solo(target, prompt, n, chat=True, method="ar"):
    return semiar.generate(prompt, target, method=method, chat=chat, max_new_tokens=n)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = httpx.get(server[1] + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_greedy_equals_generate_and_usage(target, client):
    ref = solo(target, "hello world", 24)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello world"}],
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[ref.stop_reason]
    assert r.usage.model_extra["stop_reason"] == ref.stop_reason
    extra = r.usage.model_extra
    assert extra["target_forwards"] == ref.stats.target_forwards and extra["tau"] == pytest.approx(1.0)
    # a per-request method: same text, speculative figures in usage
    r2 = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello world"}],
                                        max_tokens=24, temperature=0, extra_body={"method": "pld"})
    assert r2.choices[0].message.content == ref.text and r2.usage.model_extra["method"] == "pld"


def test_completions_stream_joins_to_non_stream(target, client):
    ref = solo(target, "abc abc abc", 40, chat=False)
    r = client.completions.create(model="tiny", prompt="abc abc abc", max_tokens=40, temperature=0)
    assert r.choices[0].text == ref.text
    chunks = list(client.completions.create(model="tiny", prompt="abc abc abc", max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and not chunks[-1].choices


def test_chat_stream_joins_and_stop(target, client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    if len(text) > 6:  # a stop string cuts the text where it starts
        stop = text[3:6]
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30, temperature=0, stop=[stop])
        assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_a_full_context_is_length_with_the_reason_in_usage(client):
    """OpenAI has no finish reason for a full context: it is "length", and usage.stop_reason says
    "context" (also when max_tokens is left out: the answer runs to the context's end)."""
    ids = [(7 * i) % 50 + 1 for i in range(504)]  # context 512: 8 positions left
    for kw in ({"max_tokens": 40}, {}):
        r = client.completions.create(model="tiny", prompt=ids, temperature=0, **kw)
        assert r.choices[0].finish_reason == "length" and r.usage.model_extra["stop_reason"] == "context"
        assert r.usage.completion_tokens == 8
    r = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason == "length" and r.usage.model_extra["stop_reason"] == "length"


def test_sampling_with_seed_repeats(client):
    kw = dict(model="tiny", prompt="Once upon", max_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_16_concurrent_streams_each_equal_solo(target, client):
    refs = {p: solo(target, p, 20).text for p in PROMPTS}

    def one(p):
        s = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=20,
                                           temperature=0, stream=True, extra_body={"method": "pld" if len(p) % 2 else "ar"})
        return p, "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    with ThreadPoolExecutor(16) as pool:
        got = dict(pool.map(one, PROMPTS))
    assert got == refs


def _metric(url, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _wait(cond, seconds=20):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_disconnect_cancels_and_frees_the_model(server, client):
    srv, url = server
    before = _metric(url, "semiar_requests_total", outcome="cancelled")
    body = {"model": "tiny", "prompt": "x", "max_tokens": 500, "temperature": 0, "stream": True, "top_k": 1}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # it is generating; now go away
    _wait(lambda: _metric(url, "semiar_requests_total", outcome="cancelled") == before + 1)
    _wait(lambda: _metric(url, "semiar_running") == 0)
    r = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4


def test_full_queue_is_503_with_retry_after(target):
    from semiar.methods import make_drafter

    srv = Server(target, method="pld", max_queue=1, warm_up=False)
    slow = srv.worker._drafters["pld"] = make_drafter("pld", target)
    propose = slow.propose
    slow.propose = lambda tokens: (time.sleep(0.2), propose(tokens))[1]  # a generation that lasts seconds
    body = {"model": srv.name, "prompt": "x", "max_tokens": 500, "temperature": 0}
    with BackgroundServer(srv) as url, httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as running:
            next(running.iter_lines())
            waiter = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2},
                                                                timeout=30))
            waiter.start()
            _wait(lambda: http.get(url + "/health").json()["queue_depth"] == 1)
            r = http.post(url + "/v1/completions", json=body)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        waiter.join(timeout=30)
        assert http.post(url + "/v1/completions", json={**body, "max_tokens": 2}).status_code == 200


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("path,body,status,needle", [
    ("chat/completions", b"{not json", 400, "not valid JSON"),
    ("chat/completions", b"[1, 2]", 400, "JSON object"),
    ("chat/completions", {**CHAT, "model": "gpt-9"}, 404, "does not exist"),
    ("chat/completions", {**CHAT, "n": 2}, 400, "n = 1"),
    ("chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("chat/completions", {**CHAT, "top_p": 0}, 400, "top_p"),
    ("chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat/completions", {**CHAT, "method": "magic"}, 400, "unknown method"),
    ("chat/completions", {**CHAT, "method": "draft"}, 400, "draft-model"),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, 400, "role"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 600}]}, 400, "context"),
    ("chat/completions", {**CHAT, "frequency_penalty": 0.5}, 400, "not supported"),
    ("completions", {"model": "tiny", "prompt": "x" * 600}, 400, "context"),
    ("completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "token ids"),
    ("completions", {"model": "tiny"}, 400, "prompt"),
])
def test_bad_requests_are_openai_errors(server, path, body, status, needle):
    url = server[1] + "/v1/" + path
    r = httpx.post(url, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) \
        else httpx.post(url, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "Traceback" not in r.text and err["type"]


def test_bad_requests_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3)
    assert httpx.get(str(client.base_url) + "nowhere").json()["error"]["message"]


def test_failure_inside_generation_is_an_error_and_the_server_keeps_serving(server, client, target):
    srv, url = server
    from semiar.methods import make_drafter

    broken = make_drafter("pld", target)
    broken.propose = lambda tokens: 1 / 0
    srv.worker._drafters["lookahead"], saved = broken, srv.worker._drafters.get("lookahead")
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4,
                                                      "method": "lookahead"})
        assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]["message"]
        with pytest.raises(openai.APIError, match="ZeroDivisionError"):
            list(client.completions.create(model="tiny", prompt="hi", max_tokens=4, stream=True,
                                           extra_body={"method": "lookahead"}))
    finally:
        srv.worker._drafters.pop("lookahead")
        if saved is not None:
            srv.worker._drafters["lookahead"] = saved
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0).usage.completion_tokens


def test_metrics_parse(server, client):
    url = server[1]
    client.completions.create(model="tiny", prompt="abc abc abc", max_tokens=12, temperature=0,
                              extra_body={"method": "pld"})
    assert _metric(url, "semiar_requests_total", endpoint="completions", outcome="ok") >= 1
    assert _metric(url, "semiar_generated_tokens_total", method="pld") >= 1
    assert _metric(url, "semiar_target_forwards_total", method="pld") >= 1
    assert _metric(url, "semiar_tau_count", method="pld") >= 1
    assert _metric(url, "semiar_draft_attempted_total", method="pld", depth="1") >= 1
    assert _metric(url, "semiar_time_to_first_token_seconds_count") >= 1
    assert _metric(url, "semiar_tokens_per_second_count") >= 1
    assert _metric(url, "semiar_queue_depth") == 0


def test_cli_serve_bad_model_is_one_line(capsys):
    from semiar.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "no-such-model"])
    assert e.value.code == 2 and "unknown model" in capsys.readouterr().err


@pytest.mark.real
def test_smollm2_server_equals_generate(real_home):
    from semiar.models import registry

    registry.pull("smollm2-135m-instruct", progress=False)
    smol = load_model("smollm2-135m-instruct")
    q = "Write a Python function that adds two numbers."
    ref = semiar.generate(q, smol, chat=True, max_new_tokens=32)
    with BackgroundServer(Server(smol, method="pld")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        s = c.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": q}],
                                      max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(s)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-1].usage.model_extra["method"] == "pld"
