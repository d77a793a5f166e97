"""`semiar train-drafter`: self-distilled data from the target, then training of a learned drafter
(`falcon`: CSGD; `eagle`: the same distillation with one token per pass; `medusa`, `hydra`: head
losses, train/heads.py), with progress, resumable checkpoints, CPU/GPU, bf16 on GPU, and several
GPUs through PyTorch's own launcher (`torchrun --standalone --nproc-per-node N -m semiar.cli train-drafter ...`: each rank
answers its share of the prompts and trains on it, gradients are averaged by DDP).

Files in the output directory:
- ``config.json`` + ``model.safetensors``: the drafter (what `--drafter DIR` loads);
- ``data.pt`` (``data-rankN.pt`` with several ranks): the self-distilled sequences and features,
  reused when the run is repeated with the same data settings; `data=PATH` (`--data`) puts it
  elsewhere, so drafters of every method can train on one cache (the method is not part of its key);
- ``checkpoint.pt``: weights, optimizer and step, written every `save_every` steps; a run with the
  same settings resumes from it.

Example:
    >>> from semiar.train.trainer import TrainConfig, train_drafter        # doctest: +SKIP
    >>> train_drafter(TrainConfig(target="smollm2-135m-instruct", out="runs/falcon-smol"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import InvalidArgumentError, SemiarError

TRAINABLE = ("falcon", "eagle", "medusa", "hydra")
#: (k, num_layers) when not given: falcon's block size and layers, eagle's one token per pass and
#: one layer, medusa/hydra's number of heads and residual blocks per head
DEFAULTS = {"falcon": (2, 2), "eagle": (1, 1), "medusa": (4, 1), "hydra": (4, 1)}


@dataclass
class TrainConfig:
    target: str
    out: str
    method: str = "falcon"
    prompts: str = "builtin"  # builtin, a JSONL file, or both joined with '+'
    n_prompts: Optional[int] = None
    max_new_tokens: int = 256
    gen_temperature: float = 0.0
    gen_batch: int = 16
    samples: int = 1  # answers per prompt: 1 greedy + (samples - 1) sampled at gen_temperature
    chat: bool = True
    k: Optional[int] = None  # falcon: tokens per pass; medusa/hydra: heads; eagle: 1
    num_layers: Optional[int] = None
    data: Optional[str] = None  # data cache path (default OUT/data.pt), shareable across methods
    epochs: float = 2.0
    lr: float = 3e-4
    batch_tokens: int = 4096
    max_len: int = 1024
    warmup: float = 0.05
    noise: float = 0.1
    glance: bool = True
    val_fraction: float = 0.05
    save_every: int = 200
    seed: int = 0
    device: str = "cpu"
    dtype: Optional[str] = None
    max_steps: Optional[int] = None  # stop early (tests, quick looks)
    # conversations teacher-forced through the target (train/online.py): sharegpt, sharegpt:PATH, or a
    # messages JSONL; prompts="none" trains on them alone
    text: Optional[str] = None
    n_text: Optional[int] = None
    online: bool = False  # token-only data, target features recomputed in each step (on with `text`)
    draft_vocab: int = 0  # falcon/eagle: draft from the N most frequent response tokens (0 = all)
    intermediate_size: Optional[int] = None  # falcon/eagle: a narrower MLP than the target's
    time_budget: Optional[float] = None  # seconds of training: the schedule shrinks to fit
    max_prompt_len: Optional[int] = None  # self-distillation: longer prompts are left out (big batches stay small)
    store: str = "bf16"  # weights on disk: bf16 (the target's dtype) or int8 (per-row scales)
    norms: bool = False  # falcon/eagle: input and output RMSNorms (FalconConfig.norms)
    reg_weight: float = 1.0  # falcon/eagle: weight of the feature regression in the loss
    token_weight: float = 0.1  # falcon/eagle: weight of the token-distribution terms (KL + CE)
    ttt: float = 0.0  # falcon/eagle: share of blocks fed the drafter's own predictions (training-time test)
    init: Optional[str] = None  # a drafter directory to start from (same method, target and shape): train on

    def validate(self) -> None:
        if self.method not in TRAINABLE:
            raise InvalidArgumentError(f"unknown drafter method {self.method!r}; trainable: {', '.join(TRAINABLE)}")
        if self.method == "eagle" and self.k not in (None, 1):
            raise InvalidArgumentError("eagle drafts one token per pass (k = 1); use --method falcon for k > 1")
        if self.method != "falcon" and not self.glance:
            raise InvalidArgumentError("--no-glance is a falcon (CSGD) option")
        dk, dl = DEFAULTS[self.method]
        self.k = dk if self.k is None else self.k
        self.num_layers = dl if self.num_layers is None else self.num_layers
        checks = [(self.k >= 1, "k must be >= 1"), (self.num_layers >= 1, "num-layers must be >= 1"),
                  (self.epochs > 0, "epochs must be > 0"), (self.lr > 0, "lr must be > 0"),
                  (self.batch_tokens > 0, "batch-tokens must be > 0"), (self.max_len > self.k + 1, "max-len too small"),
                  (self.max_new_tokens > 0, "max-new-tokens must be > 0"), (self.gen_batch > 0, "gen-batch must be > 0"),
                  (0 <= self.val_fraction < 1, "val-fraction must be in [0, 1)"), (0 <= self.noise < 1, "noise in [0, 1)"),
                  (self.gen_temperature >= 0, "gen-temperature must be >= 0"),
                  (self.samples >= 1, "samples must be >= 1"),
                  (self.draft_vocab >= 0, "draft-vocab must be >= 0"),
                  (self.intermediate_size is None or self.intermediate_size > 0, "intermediate-size must be > 0"),
                  (self.time_budget is None or self.time_budget > 0, "time-budget must be > 0"),
                  (self.store in ("bf16", "int8"), "store must be bf16 or int8"),
                  (self.reg_weight >= 0 and self.token_weight >= 0 and self.reg_weight + self.token_weight > 0,
                   "reg-weight and token-weight must be >= 0, not both 0"),
                  (0 <= self.ttt <= 1, "ttt must be in [0, 1]"),
                  (self.prompts != "none" or bool(self.text), "--prompts none needs --text"),
                  # before the data is made (minutes); its method, target and shape are checked once the net is built
                  (self.init is None or Path(self.init, "config.json").is_file(),
                   f"--init {self.init} is not a drafter directory (no config.json)")]
        for ok, msg in checks:
            if not ok:
                raise InvalidArgumentError(msg)
        if self.text:
            self.online = True
        if self.method not in ("falcon", "eagle") and (self.online or self.draft_vocab or self.intermediate_size
                                                      or self.store != "bf16" or self.norms or self.ttt
                                                      or (self.reg_weight, self.token_weight) != (1.0, 0.1)):
            raise InvalidArgumentError("--text/--online/--draft-vocab/--intermediate-size/--store/--norms/--ttt/"
                                       "--reg-weight/--token-weight are falcon and eagle options")

    def data_key(self) -> dict:
        """Settings that decide the self-distilled data (a cache with other settings is rebuilt)."""
        return {"target": self.target, "prompts": self.prompts, "n_prompts": self.n_prompts,
                "max_new_tokens": self.max_new_tokens, "gen_temperature": self.gen_temperature,
                "chat": self.chat, "seed": self.seed, "max_len": self.max_len, "samples": self.samples,
                "text": self.text, "n_text": self.n_text, "online": self.online, "max_prompt_len": self.max_prompt_len}

    def run_key(self) -> dict:
        """Settings a checkpoint must share to be resumed."""
        d = asdict(self)
        for f in ("out", "device", "save_every", "max_steps", "gen_batch", "data", "time_budget", "store"):
            d.pop(f)
        return d


def _dist() -> tuple[int, int]:
    """(rank, world) under torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def _batches(lengths: list[int], order: list[int], batch_tokens: int) -> list[list[int]]:
    """Group sequences (in the given order) so that batch size * longest length <= batch_tokens."""
    out, cur, longest = [], [], 0
    for i in order:
        L = lengths[i]
        if cur and max(longest, L) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, L)
    if cur:
        out.append(cur)
    return out


def steps_in_budget(step: int, spent: float, per_step: float, budget: float, planned: int) -> int:
    """The step a time-budgeted run should end at, from the seconds spent and the mean pace since
    warm-up: at most the planned steps, at least the current one (the budget is spent). Re-estimated
    as the run goes, both ways: a run whose first measured steps were slow (long batches, allocator
    warm-up) ended at 278 of 420 budgeted seconds when the estimate could only shrink."""
    if per_step <= 0:
        return planned
    return min(planned, max(step, step + int((budget - spent) / per_step)))


def _lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_drafter(cfg: TrainConfig, progress: bool = True) -> dict:
    """Generate (or reuse) the self-distilled data, train, write the drafter; returns a summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..models.loading import load_model, parse_dtype
    from .data import DistillData, generate_distill_data
    from .prompts import training_prompts

    cfg.validate()
    rank, world = _dist()
    main = rank == 0
    console = Console(stderr=True, quiet=not main)
    device = cfg.device
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SemiarError("--device cuda asked for, but this machine has no CUDA GPU; use --device cpu")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    t_start = time.perf_counter()

    dtype = parse_dtype(cfg.dtype, device)  # None/auto: the dense default (training reads dense weights)
    if not isinstance(dtype, torch.dtype):
        raise SemiarError("train-drafter needs the target's dense weights: use --dtype fp32 or bf16, not q4")
    target = load_model(cfg.target, device=device, dtype=dtype, pack=False)
    for p in target.decoder.parameters():
        p.requires_grad_(False)

    # 1. data: the target answers the prompts (each rank its share), features on the way
    data_path = Path(cfg.data) if cfg.data else out / "data.pt"
    if world > 1:
        data_path = data_path.with_name(f"{data_path.stem}-rank{rank}{data_path.suffix}")
    data_path.parent.mkdir(parents=True, exist_ok=True)
    data = None
    if data_path.exists():
        data = DistillData.load(data_path)
        if data.meta.get("key") != cfg.data_key():
            console.print(f"[yellow]{data_path} was made with other settings: regenerating[/]")
            data = None
    t_data = time.perf_counter()
    data_stats = {}
    if data is None:
        parts = []
        if cfg.prompts != "none":
            prompts = training_prompts(cfg.prompts, cfg.n_prompts, seed=cfg.seed)[rank::world]
            t_gen = time.perf_counter()
            part = generate_distill_data(target, prompts, cfg.max_new_tokens, cfg.gen_temperature, cfg.gen_batch,
                                         cfg.chat, seed=cfg.seed + rank,
                                         max_len=min(cfg.max_len, (cfg.max_prompt_len or cfg.max_len) + cfg.max_new_tokens),
                                         progress=progress and main, samples=cfg.samples, features=not cfg.online)
            gen_s = time.perf_counter() - t_gen
            answered = int(part.response.sum())
            data_stats.update(generated_tokens=answered, generation_seconds=round(gen_s, 1),
                              generated_tokens_per_s=round(answered / max(gen_s, 1e-9)))
            parts.append(part)  # token-only when online
        if cfg.text:
            from .online import encode_conversations, load_text_source

            t_text = time.perf_counter()
            convs = load_text_source(cfg.text, cfg.n_text)[rank::world]
            part = DistillData.from_sequences(encode_conversations(target.tokenizer, convs, cfg.max_len))
            data_stats.update(conversations=part.n_sequences, conversation_tokens=part.n_tokens,
                              encode_seconds=round(time.perf_counter() - t_text, 1))
            parts.append(part)
        data = parts[0] if len(parts) == 1 else DistillData.join(parts, {})
        data.meta.update(key=cfg.data_key(), target=target.name, stats=data_stats)
        data.save(data_path)
    data_stats = data.meta.get("stats", data_stats)
    data_seconds = time.perf_counter() - t_data
    bad = _nonfinite_sequences(data)
    if bad:
        console.print(f"[yellow]{len(bad)} sequences have non-finite target features and are left out[/]")
    n_val = int(round(data.n_sequences * cfg.val_fraction)) if data.n_sequences > 1 else 0
    shuffled = [i for i in range(data.n_sequences) if i not in bad]
    random.Random(cfg.seed + 7).shuffle(shuffled)  # data is stored by prompt length: split at random
    val_ids, train_ids = sorted(shuffled[:n_val]), sorted(shuffled[n_val:])
    console.print(f"data: {data.n_sequences} sequences, {data.n_tokens} tokens "
                  f"({int(data.response.sum())} generated by the target), {len(val_ids)} held out")

    # 2. the drafter (and its vocabulary: the most frequent tokens the target answers with)
    net, step_fn, evaluate_fn, save_fn = _method(cfg, target)
    vocab_info = {}
    if cfg.draft_vocab:
        vocab_ids, vocab_info = choose_draft_vocab(data, target.config.vocab_size, cfg.draft_vocab, world)
        net.vocab_ids.copy_(vocab_ids)
        console.print(f"draft vocabulary: {cfg.draft_vocab} tokens cover {vocab_info['coverage']:.4f} of the answer tokens")
    if cfg.init:
        warm_start(net, cfg.init, cfg.method, target)
        console.print(f"starting from the drafter in {cfg.init}" + (" (its draft vocabulary)" if cfg.draft_vocab else ""))
    net = net.to(device=device, dtype=torch.float32)
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    embed = target.decoder.embed_tokens
    lm_w = target.decoder.lm_head.weight
    # the loss's LM head: the drafter's vocabulary rows only (the target's distribution renormalised over them)
    head_w = lm_w.index_select(0, net.vocab_ids) if cfg.draft_vocab else lm_w
    # bf16 autocast on GPUs, and on a CPU whose target runs in bf16 (its features and the shared
    # embedding and LM head are bf16 then); the drafter's own weights stay fp32 for the optimizer
    autocast = torch.bfloat16 if device.startswith("cuda") or target.dtype == torch.bfloat16 else None
    feat_dtype = target.dtype

    def seq(i: int):  # one training sequence: ids, features, response mask
        ids, hid, resp = data.sequence(i)
        return ids[:cfg.max_len], None if hid is None else hid[:cfg.max_len], resp[:cfg.max_len]

    lengths = [min(cfg.max_len, data.offsets[i + 1] - data.offsets[i]) for i in range(data.n_sequences)]
    rng = random.Random(cfg.seed)
    epochs_int = math.ceil(cfg.epochs)
    plan: list[list[int]] = []
    for e in range(epochs_int):
        order = list(train_ids)
        rng.shuffle(order)
        bs = _batches(lengths, order, cfg.batch_tokens)
        if e == epochs_int - 1 and cfg.epochs < epochs_int:
            bs = bs[:max(1, int(len(bs) * (cfg.epochs - e)))]
        plan += bs
    total = len(plan)
    if world > 1:  # every rank must take the same number of optimizer steps
        t = torch.tensor([total], device=device if device.startswith("cuda") else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        total = int(t)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = max(1, int(cfg.warmup * total))
    planned = total  # a time budget fits the schedule to it, never past this plan

    # 3. resume
    ckpt_path = out / "checkpoint.pt"
    step = 0
    if ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise SemiarError(f"{ckpt_path} is unreadable ({e}); delete it to start over") from None
        if ck.get("run_key") == cfg.run_key() and ck.get("world") == world:
            net.load_state_dict(ck["net"])
            opt.load_state_dict(ck["opt"])
            step = int(ck["step"])
            console.print(f"resuming from {ckpt_path} at step {step}/{total}")
        else:
            console.print(f"[yellow]{ckpt_path} belongs to other settings: starting over[/]")

    def save_ckpt(s: int) -> None:
        if main:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"run_key": cfg.run_key(), "world": world, "step": s, "net": net.state_dict(),
                        "opt": opt.state_dict()}, tmp)
            tmp.replace(ckpt_path)

    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + step)
    skipped = 0
    log_every = max(1, total // 10) if not (progress and main and console.is_terminal) else 0
    t_train = time.perf_counter()
    step0 = step
    last = {}
    net.train()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=not (progress and main),
                  console=console) as bar:
        task = bar.add_task(f"training {cfg.method}", total=total, completed=step, info="")
        while step < total:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, warmup, cfg.lr)
            opt.zero_grad(set_to_none=True)
            parts, n_glanced = step_fn(model, [seq(i) for i in plan[step]], embed, head_w, step / total, gen,
                                       device, feat_dtype, autocast)  # forward and backward
            # a bf16 overflow must not poison the weights: skip the step, count it, go on
            gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            if torch.isfinite(parts.loss.detach()) and torch.isfinite(gnorm):
                opt.step()
            else:
                skipped += 1
            step += 1
            last = {"loss": float(parts.loss.detach()), "reg": parts.reg, "kl": parts.soft, "acc": parts.acc}
            bar.update(task, advance=1, info=f"loss {last['loss']:.3f} acc {parts.acc:.3f} glanced {n_glanced}")
            if log_every and step % log_every == 0:
                console.log(f"step {step}/{total} loss {last['loss']:.4f} reg {parts.reg:.4f} kl {parts.soft:.4f} "
                            f"acc {parts.acc:.3f} skipped {skipped}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_ckpt(step)
            if step - step0 == 10:
                t_pace = time.perf_counter()  # the first steps pay compilation and allocation: pace from here
            # fit the schedule into the budget, from the measured pace (under DDP every 10 steps: the ranks
            # agree on it through an all-reduce, which is a device sync)
            if cfg.time_budget and step - step0 >= 20 and (world == 1 or step % 10 == 0):
                now = time.perf_counter()
                fit = steps_in_budget(step, now - t_train, (now - t_pace) / (step - step0 - 10), cfg.time_budget, planned)
                if world > 1:  # every rank must stop at the same step (the slowest rank's pace decides)
                    t = torch.tensor([fit], device=device if device.startswith("cuda") else "cpu")
                    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
                    fit = int(t)
                if fit != total:
                    total = fit
                    warmup = min(warmup, max(1, total // 20))
                    bar.update(task, total=total)
    train_seconds = time.perf_counter() - t_train
    save_ckpt(step)

    # 4. held-out accuracy: how often each block offset's draft token is the target's (no glancing)
    net.eval()
    val = evaluate_fn(net, [seq(i) for i in val_ids], embed, lm_w, device, feat_dtype, autocast) if val_ids else {}
    trained_tokens = sum(lengths[i] for b in plan[:step] for i in b)
    summary = {"method": cfg.method, "target": target.name, "steps": step, "sequences": data.n_sequences,
               "tokens": data.n_tokens, "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - t_start, 1), "world_size": world, "device": device,
               "params": sum(p.numel() for p in net.parameters()), "final": last, "val": val,
               "skipped_steps": skipped, "data": data_stats, "draft_vocab": vocab_info,
               "trained_tokens": trained_tokens,
               "train_tokens_per_s": round(trained_tokens / max(train_seconds, 1e-9)),
               "settings": asdict(cfg)}
    if main:
        save_fn(out, net.to(target.dtype), target, training=summary, store=cfg.store)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        acc = val.get("acc_by_offset", val.get("acc_by_head"))
        console.print(f"drafter written to {out} ({summary['params'] / 1e6:.1f}M parameters, "
                      f"{train_seconds:.0f}s training); held-out top-1 by {'head' if 'acc_by_head' in val else 'block offset'}: {acc}")
    if world > 1:
        torch.distributed.barrier()
    return summary


def _method(cfg: TrainConfig, target):
    """(network, step, evaluate, save) for the method: one trainer, four drafters.
    step(model, seqs, embed, lm_w, progress, gen, device, feat_dtype, autocast) runs forward and
    backward and returns (LossParts, glanced positions)."""
    if cfg.method in ("falcon", "eagle"):
        from functools import partial

        from ..drafters.eagle import eagle_config
        from ..drafters.falcon import FalconConfig, FalconNet, save_falcon
        from .csgd import csgd_step, make_batch

        fcfg = FalconConfig.for_target(target.config, k=1 if cfg.method == "eagle" else cfg.k,
                                       num_layers=cfg.num_layers, draft_vocab=cfg.draft_vocab,
                                       intermediate_size=cfg.intermediate_size, norms=cfg.norms)

        def make(seqs, device, feat_dtype, autocast):
            if cfg.online:
                from .online import online_batch

                return online_batch(target, seqs, fcfg.k, device, autocast)
            return make_batch(seqs, fcfg.k, device, feat_dtype)

        def step(model, seqs, embed, lm_w, progress, gen, device, feat_dtype, autocast):
            batch = make(seqs, device, feat_dtype, autocast)
            parts, n_glanced = csgd_step(model, batch, embed, lm_w, progress, gen, noise=cfg.noise,
                                         glance=cfg.glance, autocast=autocast, reg_weight=cfg.reg_weight,
                                         token_weight=cfg.token_weight, ttt=cfg.ttt)
            parts.loss.backward()
            return parts, n_glanced

        def evaluate_f(net, seqs, embed, lm_w, device, feat_dtype, autocast=None):
            return evaluate(net, seqs, embed, lm_w, device, feat_dtype, autocast, batch_tokens=cfg.batch_tokens,
                            make=make)

        net = FalconNet(fcfg)
        if fcfg.norms:  # the output norm starts as the target's final norm: features in the LM head's scale
            with torch.no_grad():
                net.norm.weight.copy_(target.decoder.norm.weight.float())
        return net, step, evaluate_f, partial(save_falcon, method=cfg.method)

    from ..drafters.hydra import HydraNet
    from ..drafters.medusa import HeadsConfig, MedusaNet, save_heads
    from .heads import evaluate_heads, heads_step, make_head_batch

    hcfg = HeadsConfig(vocab_size=target.config.vocab_size, hidden_size=target.config.hidden_size, heads=cfg.k,
                       num_layers=cfg.num_layers)
    net = (MedusaNet if cfg.method == "medusa" else HydraNet)(hcfg)

    def step(model, seqs, embed, lm_w, progress, gen, device, feat_dtype, autocast):
        return heads_step(model, make_head_batch(seqs, hcfg.heads, device, feat_dtype), embed, lm_w, autocast), 0

    def evaluate_h(net, seqs, embed, lm_w, device, feat_dtype, autocast=None):
        groups = _batches([len(s[0]) for s in seqs], list(range(len(seqs))), cfg.batch_tokens)
        return evaluate_heads(net, seqs, embed, lm_w, device, feat_dtype, autocast, groups)

    def save_h(out, net, target, training=None, store="bf16"):
        return save_heads(out, net, target, training=training)

    return net, step, evaluate_h, save_h


def warm_start(net, path: str, method: str, target) -> None:
    """Load the weights of the drafter directory `path` into `net`: a drafter for the same target,
    of the same method and shape (its draft vocabulary too), so that training goes on from it."""
    from ..drafters.checkpoint import check_identity, read_drafter_dir

    meta, sd = read_drafter_dir(path, method)
    check_identity(meta, target, path)
    ours = asdict(net.config)
    differ = sorted(k for k in set(ours) | set(meta["config"]) if ours.get(k) != meta["config"].get(k))
    if differ:
        shown = ", ".join(f"{k} {meta['config'].get(k)!r} there, {ours.get(k)!r} here" for k in differ[:4])
        raise InvalidArgumentError(f"--init {path} has another shape ({shown}); train with its settings or start fresh")
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise SemiarError(f"--init {path}: its weights do not match its config ({str(e).splitlines()[0]})") from None


def choose_draft_vocab(data, vocab_size: int, n: int, world: int = 1) -> tuple[torch.Tensor, dict]:
    """The `n` most frequent response tokens of the data (summed over ranks), sorted, and how much
    of the answers each size would cover (the measurement behind choosing n)."""
    counts = torch.bincount(data.ids[data.response], minlength=vocab_size).double()
    if world > 1:
        c = counts.to("cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(c)
        counts = c.cpu()
    order = counts.argsort(descending=True)
    total = max(float(counts.sum()), 1.0)
    cum = counts[order].cumsum(0)
    sizes = sorted({s for s in (4096, 8192, 16384, 32768, 65536, n) if s <= vocab_size})
    coverage = {str(s): round(float(cum[s - 1]) / total, 5) for s in sizes}
    return order[:n].sort().values, {"size": n, "coverage": coverage[str(n)], "coverage_by_size": coverage}


def _nonfinite_sequences(data) -> set:
    bad = set()
    if data.hidden is None:
        return bad
    finite = torch.isfinite(data.hidden).all(-1)
    if bool(finite.all()):
        return bad
    for s in range(data.n_sequences):
        a, b = data.offsets[s], data.offsets[s + 1]
        if not bool(finite[a:b].all()):
            bad.add(s)
    return bad


@torch.no_grad()
def evaluate(net, seqs, embed, lm_w, device, feat_dtype, autocast=None, batch_tokens: int = 8192,
             make=None) -> dict:
    """Top-1 agreement between the drafter's tokens and the target's (over the target's whole
    vocabulary: a token outside a reduced draft vocabulary counts as a miss), per offset inside a
    block (offset i predicts i+1 tokens past the block's last input), with blocks aligned to 0."""
    from .csgd import argmax_tokens, autocast_ctx, make_batch

    k = net.config.k
    vocab = getattr(net, "vocab_ids", None) if net.config.draft_vocab else None
    head_w = lm_w if vocab is None else lm_w.index_select(0, vocab.to(lm_w.device))
    hits = [0] * k
    counts = [0] * k
    order = list(range(len(seqs)))
    for group in _batches([len(s[0]) for s in seqs], order, batch_tokens):
        chunk = [seqs[i] for i in group]
        b = make(chunk, device, feat_dtype, autocast) if make else make_batch(chunk, k, device, feat_dtype)
        T = b.mask.shape[1]
        pos = torch.arange(T, device=device).unsqueeze(0).expand(len(group), T)
        with autocast_ctx(torch.device(device).type, autocast):
            pred = net(b.feats, embed(b.next_ids), pos, net.relaxed_mask(T, device=device))
        guess = argmax_tokens(pred, head_w)
        if vocab is not None:
            guess = vocab.to(guess.device)[guess]
        truth = argmax_tokens(b.target_feats, lm_w)
        ok = (guess == truth) & b.mask
        off = torch.arange(T, device=device) % k
        for i in range(k):
            sel = b.mask[:, off == i]
            hits[i] += int(ok[:, off == i].sum())
            counts[i] += int(sel.sum())
    acc = [round(h / c, 4) if c else None for h, c in zip(hits, counts)]
    total = sum(counts)
    return {"acc_by_offset": acc, "acc": round(sum(hits) / total, 4) if total else None, "positions": total}
