import os
import sys
from pathlib import Path

import pytest

# without a GPU, Triton kernels (models.cuda.gemv) run under Triton's interpreter; read at import
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(min(2, os.cpu_count() or 1))

from semiar.models.registry import semiar_home  # noqa: E402

#: the model cache the suite was started with ($SEMIAR_HOME, default ~/.cache/semiar): real-model
#: tests read their models from it (and pull them into it once); every other test gets an empty
#: temporary $SEMIAR_HOME of its own
REAL_HOME = semiar_home()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test writes to the user's model cache unless it asks for the real one (`real_home`)."""
    if "SEMIAR_REAL_HOME" not in os.environ:
        monkeypatch.setenv("SEMIAR_HOME", str(tmp_path / "semiar-home"))


@pytest.fixture
def real_home(monkeypatch) -> Path:
    """$SEMIAR_HOME for this test is the suite's model cache (REAL_HOME), where real models are."""
    monkeypatch.setenv("SEMIAR_HOME", str(REAL_HOME))
    return REAL_HOME


#: where the GPU room's kernel tests (tests/models/cuda) run their tensors: on CUDA when a GPU is here
#: (the compiled Triton kernels), else on the CPU under Triton's interpreter (set above when there is no
#: GPU; tests that need Triton skip where it is missing). One device per run: the interpreter is a
#: process-wide switch, read when the kernels are built. It lives here, not in a conftest of its own:
#: a second conftest.py would shadow this one for `import conftest` (tests/test_home.py).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(params=[KERNEL_DEVICE])
def kernel_device(request) -> torch.device:
    """The device the kernel tests build their tensors and tiny models on (the test id names it)."""
    return torch.device(request.param)
