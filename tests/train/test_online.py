"""Token-only data: ShareGPT's torn JSON read record by record, conversations with assistant masks,
the device-side batch equal to the stored-feature batch, a reduced draft vocabulary, int8 storage,
and an end-to-end online training run whose drafter is lossless."""

import io
import json

import pytest
import torch

from semiar.train.csgd import make_batch
from semiar.train.data import DistillData
from semiar.train.online import device_batch, encode_conversations, load_messages_file, pad_sequences
from semiar.train.sharegpt import iter_conversations, to_messages
from semiar.train.trainer import TrainConfig, choose_draft_vocab, train_drafter
from semiar.errors import InvalidArgumentError
from tiny import char_tokenizer, tiny_model_dir, tiny_target


def sharegpt_text(n=5, torn=True):
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"question {i} {{}}[]\"x"},
                                             {"from": "gpt", "value": f"answer {i}" * 200}]} for i in range(n)]
    recs.insert(1, {"id": "bad", "conversations": [{"from": "gpt", "value": "only the bot"}]})
    text = json.dumps(recs, indent=2)
    return text[:len(text) - 40] if torn else text  # cut inside the last record


def test_sharegpt_reader_keeps_every_complete_record_of_a_torn_file(monkeypatch):
    import semiar.train.sharegpt as sg

    monkeypatch.setattr(sg, "_CHUNK", 64)  # records straddle many reads
    convs = list(iter_conversations(io.StringIO(sharegpt_text(5, torn=True))))
    assert [c[0]["content"].split()[1] for c in convs] == ["0", "1", "2", "3"]  # the torn 5th is dropped
    assert len(list(iter_conversations(io.StringIO(sharegpt_text(5, torn=False))))) == 5
    assert all(c[0]["role"] == "user" and c[1]["role"] == "assistant" for c in convs)


def test_to_messages_starts_at_a_human_turn_and_stops_at_a_broken_alternation():
    rec = {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q1"},
                             {"from": "gpt", "value": "a1"}, {"from": "gpt", "value": "a1b"}, {"from": "human", "value": "q2"}]}
    assert [m["content"] for m in to_messages(rec)] == ["q1", "a1"]


def test_bench_prompts_never_reach_training_data(tmp_path):
    from semiar.bench.tasks import load_task
    from semiar.train.online import load_text_source
    from semiar.train.prompts import training_prompts

    leaked = load_task("chat")[0].prompt
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": leaked}) + "\n" + json.dumps({"prompt": "a fresh one"}) + "\n")
    assert [p.prompt for p in training_prompts(str(f))] == ["a fresh one"]
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"messages": [{"role": "user", "content": leaked}, {"role": "assistant", "content": "x"}]})
                 + "\n" + json.dumps({"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "y"}]}) + "\n")
    assert [c[0]["content"] for c in load_text_source(str(m))] == ["new"]
    sg = tmp_path / "sg.json"
    sg.write_text(json.dumps([{"id": "0", "conversations": [{"from": "human", "value": leaked}, {"from": "gpt", "value": "z"}]},
                              {"id": "1", "conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "w"}]}]))
    assert [c[0]["content"] for c in load_text_source(f"sharegpt:{sg}")] == ["ok"]
    assert [p.prompt for p in training_prompts(f"sharegpt:{sg}")] == ["ok"]


def test_messages_file_errors(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(InvalidArgumentError, match="m.jsonl:1"):
        load_messages_file(str(f))


def test_conversations_mark_exactly_the_assistant_tokens_and_their_end():
    tok = char_tokenizer()
    msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"},
            {"role": "user", "content": "e"}, {"role": "assistant", "content": "fg"}]
    [(ids, resp)] = encode_conversations(tok, [msgs], max_len=1000)
    marked = "".join(tok.convert_ids_to_tokens(i) for i, r in zip(ids, resp) if r)
    assert marked == "cd<|end|>fg<|end|>"
    [(ids2, _)] = encode_conversations(tok, [msgs], max_len=10)
    assert ids2 == ids[:10]


def test_device_batch_equals_the_stored_feature_batch():
    target, _ = tiny_target()
    torch.manual_seed(0)
    seqs = []
    for L in (9, 14, 6):
        ids = torch.randint(0, 96, (L,))
        resp = torch.zeros(L, dtype=torch.bool)
        resp[3:] = True
        seqs.append((ids, target.decoder.hidden_states(ids[None])[0], resp))
    for k in (1, 2, 3):
        ref = make_batch(seqs, k, "cpu", torch.float32)
        ids, resp, lengths = pad_sequences(seqs, "cpu")
        got = device_batch(ids, target.decoder.hidden_states(ids), resp, lengths, k)
        for name in ("next_ids", "glance_ids", "mask", "glance_ok"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), (k, name)
        m = ref.mask.unsqueeze(-1)
        torch.testing.assert_close(got.target_feats * m, ref.target_feats * m, rtol=1e-4, atol=1e-5)
        pair = (torch.arange(ids.shape[1] - 1) < (lengths - 1).unsqueeze(1)).unsqueeze(-1)
        torch.testing.assert_close(got.feats * pair, ref.feats * pair, rtol=1e-4, atol=1e-5)


def test_draft_vocab_is_the_most_frequent_answer_tokens():
    ids = [[5, 5, 5, 7, 7, 9, 3], [5, 7, 1]]
    resp = [[False, True, True, True, True, True, True], [True, True, True]]
    data = DistillData.from_sequences(list(zip(ids, resp)))
    vocab, info = choose_draft_vocab(data, 12, 2)
    assert vocab.tolist() == [5, 7] and info["coverage"] == pytest.approx(6 / 9, abs=1e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny")


def test_online_training_on_conversations_gives_a_lossless_int8_drafter(model_dir, tmp_path):
    import semiar
    from semiar.drafters.falcon import load_falcon

    conv = tmp_path / "c.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"list {i}"},
                          {"role": "assistant", "content": "abc " * (3 + i % 4)}]} for i in range(12)]
    conv.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "d"
    s = train_drafter(TrainConfig(target=str(model_dir), out=str(out), n_prompts=4, max_new_tokens=12, gen_batch=4,
                                  text=str(conv), draft_vocab=40, intermediate_size=48, store="int8", epochs=2,
                                  batch_tokens=400, max_len=200, lr=1e-3, max_steps=4), progress=False)
    assert s["data"]["conversations"] == 12 and s["data"]["generated_tokens"] > 0
    assert s["draft_vocab"]["size"] == 40 and 0 < s["draft_vocab"]["coverage"] <= 1
    data = DistillData.load(out / "data.pt")
    assert data.hidden is None  # token-only
    target = semiar.load_model(str(model_dir))
    net = load_falcon(out, target)
    assert net.config.draft_vocab == 40 and net.config.intermediate_size == 48
    kw = dict(model=str(model_dir), chat=True, max_new_tokens=30)
    ref = semiar.generate("list 3", **kw)
    got = semiar.generate("list 3", method="falcon", drafter=str(out), **kw)
    assert got.token_ids == ref.token_ids


def test_own_predictions_feed_a_block_the_features_predicted_for_it():
    from semiar.train.csgd import Batch, own_predictions

    B, T, H, k = 2, 7, 3, 2
    feats = torch.zeros(B, T, H)
    guess = torch.arange(B * T, dtype=torch.float32).view(B, T, 1).expand(B, T, H).clone()
    mask = torch.ones(B, T, dtype=torch.bool)
    batch = Batch(feats, torch.zeros(B, T, dtype=torch.long), feats, torch.zeros(B, T, dtype=torch.long), mask, mask)
    gen = torch.Generator().manual_seed(0)
    none, n0 = own_predictions(batch, guess, k, 1, 0.0, gen)
    assert n0 == 0 and torch.equal(none.feats, feats)
    every, n = own_predictions(batch, guess, k, 1, 1.0, gen)
    # every position t >= k takes output t - k (which predicts h_t); the first k keep theirs
    assert torch.equal(every.feats[:, :k], feats[:, :k])
    assert torch.equal(every.feats[:, k:], guess[:, :T - k]) and n == B * (T - k)


def test_training_with_norms_token_loss_and_training_time_test_stays_lossless(model_dir, tmp_path):
    import semiar
    from semiar.drafters.falcon import load_falcon

    out = tmp_path / "d"
    s = train_drafter(TrainConfig(target=str(model_dir), out=str(out), n_prompts=4, max_new_tokens=12, gen_batch=4,
                                  online=True, norms=True, reg_weight=0.1, token_weight=1.0, ttt=0.5, epochs=2,
                                  batch_tokens=400, max_len=200, lr=1e-3, max_steps=3), progress=False)
    assert s["steps"] == 3 and s["settings"]["ttt"] == 0.5
    target = semiar.load_model(str(model_dir))
    assert load_falcon(out, target).config.norms
    kw = dict(model=str(model_dir), chat=True, max_new_tokens=30)
    assert semiar.generate("list 3", method="falcon", drafter=str(out), **kw).token_ids == \
        semiar.generate("list 3", **kw).token_ids
    with pytest.raises(InvalidArgumentError, match="ttt"):
        TrainConfig(target="x", out="y", ttt=1.5).validate()
    with pytest.raises(InvalidArgumentError, match="not both 0"):
        TrainConfig(target="x", out="y", reg_weight=0, token_weight=0).validate()


def test_online_options_are_falcon_and_eagle_only():
    with pytest.raises(InvalidArgumentError, match="falcon and eagle"):
        TrainConfig(target="x", out="y", method="medusa", draft_vocab=10).validate()
    with pytest.raises(InvalidArgumentError, match="needs --text"):
        TrainConfig(target="x", out="y", prompts="none").validate()
