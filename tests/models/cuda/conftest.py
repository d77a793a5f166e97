"""Where the GPU room's kernel tests run their tensors: on CUDA when a GPU is here (the compiled
Triton kernels), else on the CPU under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no GPU; tests that need Triton skip where it is missing)."""
import os

import pytest
import torch

#: one device per run: Triton's interpreter is a process-wide switch, read when the kernels are built
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.fixture(params=[KERNEL_DEVICE])
def kernel_device(request) -> torch.device:
    """The device the kernel tests build their tensors and tiny models on (the test id names it)."""
    return torch.device(request.param)
