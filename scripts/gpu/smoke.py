"""CUDA smoke test for the training and Falcon paths on a tiny model (seconds): run first in a lease."""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny import tiny_model_dir  # noqa: E402

import semiar  # noqa: E402
from semiar.train.trainer import TrainConfig, train_drafter  # noqa: E402

assert torch.cuda.is_available()
tmp = Path(tempfile.mkdtemp())
d = tiny_model_dir(tmp / "tiny")
s = train_drafter(TrainConfig(target=str(d), out=str(tmp / "f"), n_prompts=16, max_new_tokens=24, gen_batch=8,
                              batch_tokens=600, max_len=240, max_steps=4, device="cuda"), progress=False)
print("trained", s["steps"], s["final"], s["val"])
kw = dict(model=str(d), chat=True, max_new_tokens=40, device="cuda")
ref = semiar.generate("make a list", **kw)
got = semiar.generate("make a list", method="falcon", drafter=str(tmp / "f"), **kw)
print("identity", got.token_ids == ref.token_ids, "tau", got.stats.tau)
got = semiar.generate("make a list", method="falcon", drafter=str(tmp / "f"), temperature=1.0, seed=1, **kw)
print("sampling ok", len(got.token_ids))
