"""The suite and $SEMIAR_HOME: real models come from the model cache the suite was started with
($SEMIAR_HOME, default ~/.cache/semiar; conftest.REAL_HOME, the `real_home` fixture); anything
else a test writes goes to a temporary directory."""

import os
import subprocess
import sys
from pathlib import Path

import conftest

TESTS = Path(__file__).parent


def test_no_test_names_the_model_cache_itself():
    needles = ("/.cache/semiar", '".cache"', "Path.home()", 'setenv("SEMIAR_HOME"', "SEMIAR_TEST_HOME")
    for f in sorted(TESTS.rglob("*.py")):
        if f.name in ("conftest.py", "test_home.py"):
            continue
        text = f.read_text()
        hits = [n for n in needles if n in text]
        assert not hits, f"{f.relative_to(TESTS)} names {hits}: use the real_home fixture (conftest.py)"


def test_a_test_writes_to_its_own_temporary_home(tmp_path):
    if "SEMIAR_REAL_HOME" not in os.environ:
        assert Path(os.environ["SEMIAR_HOME"]) == tmp_path / "semiar-home"
        assert Path(os.environ["SEMIAR_HOME"]) != conftest.REAL_HOME


def test_real_home_is_the_suites_semiar_home(real_home):
    assert real_home == conftest.REAL_HOME and os.environ["SEMIAR_HOME"] == str(real_home)


def test_real_home_follows_semiar_home_at_start(tmp_path):
    """conftest reads $SEMIAR_HOME when the suite starts (here: a fresh interpreter), else ~/.cache/semiar."""
    code = "import conftest; print(conftest.REAL_HOME)"
    env = {k: v for k, v in os.environ.items() if k != "SEMIAR_HOME"}
    run = dict(cwd=TESTS, capture_output=True, text=True, check=True)
    mine = subprocess.run([sys.executable, "-c", code], env={**env, "SEMIAR_HOME": str(tmp_path / "mine")}, **run)
    assert mine.stdout.strip() == str(tmp_path / "mine")
    default = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)}, **run)
    assert default.stdout.strip() == str(tmp_path / ".cache" / "semiar")
