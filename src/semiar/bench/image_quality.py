"""Quality of generated digits: a small MNIST classifier trained on the same 5,000 real digits as
the image model (scripts/train_image.py), its accuracy on samples of a requested class, and a
Fréchet distance between its penultimate features on the samples and on the real digits (the
shipped mean and covariance of those features: no data set is needed at run time). The FID recipe
with this classifier in place of Inception; on 16-64 samples it is biased upwards, so compare
methods at the same sample count.

Example:
    >>> import torch
    >>> from semiar.bench.image_quality import load_judge
    >>> judge = load_judge()
    >>> q = judge.score(torch.zeros(4, 1, 28, 28), cls=3)
    >>> sorted(q)
    ['accuracy', 'fd', 'fd_class']
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

JUDGE_DIR = Path(__file__).resolve().parent.parent / "data" / "image" / "mnist-judge"


class DigitClassifier(nn.Module):
    """Two conv layers and two linear ones; `features` is the 64-d layer before the logits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def features(self, x):
        """x [B, 1, 28, 28] in [0, 1] -> [B, 64]."""
        x = F.max_pool2d(F.relu(self.conv1(x * 2 - 1)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^1/2), the square root through the
    eigenvalues of sqrt(cov1) cov2 sqrt(cov1) (symmetric, so no complex parts)."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, cov1, cov2))
    w, v = np.linalg.eigh(cov1)
    s1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    cross = np.linalg.eigvalsh(s1 @ cov2 @ s1).clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(cross).sum())


class Judge:
    """The classifier with the real digits' feature statistics (all digits, and per class)."""

    def __init__(self, net: DigitClassifier, stats: dict):
        self.net = net.eval()
        self.stats = stats

    @torch.no_grad()
    def score(self, images: torch.Tensor, cls: Optional[int] = None) -> dict:
        """images [n, 1, 28, 28] in [0, 1]. accuracy: the share classified as `cls`; fd: Fréchet
        distance to all real digits; fd_class: to the real digits of `cls`."""
        feats = self.net.features(images.float()).double().numpy()
        pred = self.net.fc2(torch.from_numpy(feats).float()).argmax(-1)
        mu = feats.mean(0)
        cov = np.cov(feats, rowvar=False) if len(feats) > 1 else np.zeros((feats.shape[1],) * 2)
        out = {"fd": frechet_distance(mu, cov, self.stats["mu"], self.stats["cov"])}
        if cls is not None:
            out["accuracy"] = float((pred == cls).float().mean())
            out["fd_class"] = frechet_distance(mu, cov, self.stats["mu_c"][cls], self.stats["cov_c"][cls])
        return out


def feature_stats(net: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Mean and covariance of the features of real digits, all and per class (what ships)."""
    with torch.no_grad():
        f = torch.cat([net.features(b) for b in images.split(500)]).double()

    def mc(x):
        return x.mean(0), torch.from_numpy(np.cov(x.numpy(), rowvar=False))

    mu, cov = mc(f)
    per = [mc(f[labels == c]) for c in range(10)]
    return {"mu": mu, "cov": cov, "mu_c": torch.stack([p[0] for p in per]), "cov_c": torch.stack([p[1] for p in per])}


def load_judge(path: Path = JUDGE_DIR) -> Judge:
    from safetensors.torch import load_file

    net = DigitClassifier()
    net.load_state_dict(load_file(str(path / "classifier.safetensors")))
    stats = {k: v.double().numpy() for k, v in load_file(str(path / "stats.safetensors")).items()}
    return Judge(net, stats)
