"""Falcon: a semi-autoregressive drafter on the target's own features, with a block decoding tree.

Paper: Gao et al., "Falcon: Faster and Parallel Inference of Large Language Models through Enhanced
Semi-Autoregressive Drafting and Custom-Designed Decoding Tree" (AAAI 2025). What semiar builds:

- **Inputs.** Drafter position t sees the pair (h_t, x_{t+1}): the target's final-layer feature
  (after the final norm, the LM head's input) and the embedding of the token that followed.
  `fc` fuses [emb; h] (2H) down to H, then `num_layers` (2) Llama-style decoder layers; the first
  has no input norm and there is no final norm, as in EAGLE/Falcon.
- **k tokens per forward.** Output t regresses h_{t+k}, so the LM head on it gives x_{t+k+1}.
  The last k outputs over the context are the next k tokens, drafted in one pass; their outputs
  are also the predicted features the next pass takes as its block of k inputs.
- **Relaxed causal mask.** Inside a block of k positions attention is bidirectional, between blocks
  causal, so the k positions of a block plan their k tokens together.
- **The decoding tree.** One forward over the context gives k distributions; the best k-token
  continuations (products of top tokens, scored by the product of probabilities) become the first
  block of branches. Each further forward feeds the `top_k` best blocks as inputs, all at once under
  a tree mask (a block sees its own k rows, its ancestor blocks and the context), and adds k more
  levels below each. The `budget` best nodes go to the target, which verifies them in one pass.
  Shapes: ``dynamic:DEPTH,TOPK,BUDGET`` (DEPTH in tokens; DEPTH/k drafter forwards).

Choices where the paper leaves room (see docs/methods.md): a linear fusion instead of the paper's
two LSTM layers (parallel over positions and trivially cached; the released code's LSTM path does
not run as written); block boundaries aligned to the end of the context at inference; a dynamic
block tree instead of a hand-made static one; the root is one token (the engine's), not k.

The target's embedding and LM head are shared and frozen: they are never stored in the checkpoint.

Example:
    >>> from semiar.drafters.falcon import FalconConfig, FalconNet
    >>> net = FalconNet(FalconConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4,
    ...                              num_kv_heads=2, k=2))
    >>> import torch
    >>> out = net(torch.zeros(1, 6, 32), torch.zeros(1, 6, 32), torch.arange(6)[None], net.relaxed_mask(6))
    >>> out.shape
    torch.Size([1, 6, 32])
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import InvalidArgumentError, ModelFileError
from ..models.decoder import DecoderConfig, HostStage, KVCache, Layer, RMSNorm, rope_cos_sin, rope_inv_freq
from ..models.cuda.capture import Captured, Direct
from ..tree import DraftTree, TreeSpec, best_nodes
from .base import Drafter
from .checkpoint import check_identity, config_from_dict, read_drafter_dir, write_drafter_dir

METHOD = "falcon"


@dataclass
class FalconConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    k: int = 2  # tokens per drafter forward (the block size)
    num_layers: int = 2
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    #: rows of the target's LM head the drafter drafts from (the most frequent tokens of the
    #: training text; 0 = the whole vocabulary). A token outside them is never drafted, which
    #: cannot change the output: every drafted token is verified by the target.
    draft_vocab: int = 0
    #: RMSNorms on the two inputs (token embedding, target feature) before the fusion and on the
    #: output (as EAGLE-3 does): the embedding and the feature differ in scale by two orders of
    #: magnitude, and the LM head expects a final-norm feature. Off in drafters saved before it.
    norms: bool = False

    @classmethod
    def for_target(cls, target_cfg: DecoderConfig, k: int = 2, num_layers: int = 2, draft_vocab: int = 0,
                   intermediate_size: Optional[int] = None, norms: bool = False) -> "FalconConfig":
        """A drafter shaped like one of the target's layers (so it can start from them);
        `intermediate_size` narrows its MLP (a smaller drafter on disk and per pass)."""
        return cls(vocab_size=target_cfg.vocab_size, hidden_size=target_cfg.hidden_size,
                   intermediate_size=intermediate_size or target_cfg.intermediate_size, num_heads=target_cfg.num_heads,
                   num_kv_heads=target_cfg.num_kv_heads, k=k, num_layers=num_layers, head_dim=target_cfg.head_dim,
                   rms_norm_eps=target_cfg.rms_norm_eps, rope_theta=target_cfg.rope_theta,
                   rope_scaling=target_cfg.rope_scaling, attention_bias=target_cfg.attention_bias,
                   draft_vocab=draft_vocab, norms=norms)

    @classmethod
    def from_dict(cls, d: dict) -> "FalconConfig":
        return config_from_dict(cls, d, "falcon")

    def decoder_config(self) -> DecoderConfig:
        return DecoderConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                             intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                             num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                             rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                             rope_scaling=self.rope_scaling, attention_bias=self.attention_bias)


class FalconNet(nn.Module):
    """The trainable part: fusion + decoder layers. Embedding and LM head come from the target."""

    def __init__(self, cfg: FalconConfig):
        super().__init__()
        if cfg.k < 1:
            raise InvalidArgumentError(f"falcon block size k must be >= 1, got {cfg.k}")
        self.config = cfg
        dcfg = cfg.decoder_config()
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)
        self.layers = nn.ModuleList(Layer(dcfg) for _ in range(cfg.num_layers))
        self.layers[0].input_layernorm = nn.Identity()  # fc output goes straight in (EAGLE/Falcon)
        if cfg.norms:
            self.emb_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.feat_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # training starts it from the target's
        self.inv_freq = rope_inv_freq(dcfg)
        self._dcfg = dcfg
        if not 0 <= cfg.draft_vocab <= cfg.vocab_size:
            raise InvalidArgumentError(f"draft vocabulary {cfg.draft_vocab} must be in [0, {cfg.vocab_size}]")
        if cfg.draft_vocab:
            # target ids of the drafter's vocabulary (set by training; saved with the weights)
            self.register_buffer("vocab_ids", torch.arange(cfg.draft_vocab), persistent=True)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def device(self):
        return self.fc.weight.device

    @property
    def dtype(self):
        return self.fc.weight.dtype

    def new_cache(self, capacity: int) -> KVCache:
        c = self._dcfg
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity, self.dtype, self.device)

    def relaxed_mask(self, T: int, offset: int = 0, device=None) -> torch.Tensor:
        """[T, T] bool: block-bidirectional, causal between blocks. Blocks of k start at -offset
        (offset in [0, k)), so training sees every alignment of block boundaries."""
        k = self.config.k
        block = (torch.arange(T, device=device) + offset) // k
        return block.unsqueeze(1) >= block.unsqueeze(0)

    def forward(self, feats: torch.Tensor, tok_emb: torch.Tensor, positions: torch.Tensor,
                mask: Optional[torch.Tensor], cache: Optional[KVCache] = None) -> torch.Tensor:
        """feats, tok_emb: [B, T, H]; positions: [B, T]; mask: [T, T] (no cache) or [T, cache + T].
        Returns the predicted features [B, T, H] (output t ~ h_{t+k})."""
        x = self._fuse(feats, tok_emb)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        start = cache.length if cache is not None else 0
        for i, layer in enumerate(self.layers):
            kc = cache.k[i] if cache is not None else None
            vc = cache.v[i] if cache is not None else None
            x = layer(x, cos, sin, kc, vc, start, mask)
        if cache is not None:
            cache.length = start + x.shape[1]
        return self.norm(x) if self.config.norms else x

    def _fuse(self, feats: torch.Tensor, tok_emb: torch.Tensor) -> torch.Tensor:
        feats = feats.to(tok_emb.dtype)
        if self.config.norms:
            tok_emb, feats = self.emb_norm(tok_emb), self.feat_norm(feats)
        return self.fc(torch.cat([tok_emb, feats], -1))

    @torch.no_grad()
    def forward_static(self, feats, tok_emb, positions, slots, mask, k_cache, v_cache):
        """Fixed-shape forward for CUDA-graph capture: S rows written to cache slots `slots` [S],
        attending over the whole capacity under `mask` [S, capacity]. feats, tok_emb: [1, S, H]."""
        x = self._fuse(feats, tok_emb)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, k_cache[i], v_cache[i], slots, mask)
        return self.norm(x) if self.config.norms else x


class DraftHead(nn.Module):
    """The target's LM head over the drafter's vocabulary: the rows `vocab_ids` of its weight,
    copied once (never trained, never saved), or the target's head itself for a full vocabulary.
    Its outputs are columns; `to_target` maps a column to the target's token id.

    Example:
        >>> head = DraftHead(nn.Linear(4, 10, bias=False), torch.tensor([7, 2]))
        >>> head(torch.zeros(3, 4)).shape, head.to_target(torch.tensor([1, 0])).tolist()
        (torch.Size([3, 2]), [2, 7])
    """

    def __init__(self, lm_head: nn.Module, vocab_ids: Optional[torch.Tensor] = None):
        super().__init__()
        self.full = lm_head if vocab_ids is None else None
        self.ids = None
        if vocab_ids is not None:
            w = getattr(lm_head, "weight", None)
            if w is None:  # a CPU-packed head without its dense copy: recover the rows through it
                eye = torch.eye(lm_head.in_features)
                w = lm_head(eye).T
            self.ids = vocab_ids.to(w.device)
            self.weight = w.detach().index_select(0, self.ids).contiguous()

    @property
    def columns(self) -> int:
        return self.full.out_features if self.ids is None else len(self.ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.full(x) if self.ids is None else torch.nn.functional.linear(x, self.weight.to(x.dtype))

    def to_target(self, cols: torch.Tensor) -> torch.Tensor:
        """Columns -> target token ids (same shape, same device)."""
        if self.ids is None:
            return cols
        return self.ids[cols.to(self.ids.device)].to(cols.device)


def draft_head(net: "FalconNet", lm_head: nn.Module) -> DraftHead:
    """The head a drafter drafts with: the target's rows of the net's vocabulary."""
    return DraftHead(lm_head, getattr(net, "vocab_ids", None) if net.config.draft_vocab else None)


def _static_pass(net, embed, lm_head, feats, ids, positions, slots, mask, k_cache, v_cache):
    """One fixed-shape drafter pass: the network, the target's LM head, the softmax. A free
    function so that torch.compile traces it once for every drafter (see FalconGraphs)."""
    x = net.forward_static(feats, embed(ids), positions, slots, mask, k_cache, v_cache)
    return x, lm_head(x).float().softmax(-1)


class FalconGraphs:
    """The drafter's forwards (network + the target's LM head + softmax) as CUDA graphs over one
    static drafter cache, one graph per row count; `capture=False` runs the same fixed-shape code
    directly (CPU tests). Masks are full [rows, capacity] masks: tree passes attend to ancestor
    blocks scattered through the cache, which a length alone cannot express. `compile=True`
    compiles the pass with torch.compile first (fused norms, rotary, softmax), falling back to the
    uncompiled pass, with a warning, if the compiler fails."""

    def __init__(self, net: FalconNet, embed, lm_head, capacity: int = 2048,
                 sizes=(2, 4, 8, 16, 32, 64), capture: Optional[bool] = None, compile: bool = False):
        from ..models.cuda.graphs import build_with_compile_fallback, compiled

        dev = net.device
        capture = dev.type == "cuda" if capture is None else capture
        self.capacity, self.sizes = capacity, sorted(sizes)
        self.cache = net.new_cache(capacity)
        if net.inv_freq.device != dev:
            net.inv_freq = net.inv_freq.to(dev)

        def build(comp: bool) -> None:
            self._capture(net, embed, lm_head, capture, compiled(_static_pass) if comp else _static_pass, warm=comp)

        self.compiled = build_with_compile_fallback(build, compile, "the drafter")
        self.cache.length = 0
        k, H = net.config.k, net.config.hidden_size
        self._chain_inputs = [torch.zeros(k, H, dtype=net.dtype, device=dev),
                              torch.zeros(k, lm_head.columns, dtype=torch.float32, device=dev),
                              torch.zeros((), dtype=torch.long, device=dev)]
        self._chains: dict = {}

    def _capture(self, net, embed, lm_head, capture: bool, step, warm: bool) -> None:
        dev, H = net.device, net.config.hidden_size

        def run(feats, ids, positions, slots, mask):
            return step(net, embed, lm_head, feats, ids, positions, slots, mask, self.cache.k, self.cache.v)

        # what the chains replay: the same pass, on the same cache, captured or run directly
        self._net, self._embed, self._lm_head, self._step, self._capture_on = net, embed, lm_head, step, capture

        self.graphs = {}
        # per size: reusable host buffers for the [S, capacity] mask and the slots (pinned on CUDA)
        self._host = {S: (HostStage(S * self.capacity, torch.bool, dev), HostStage(S, torch.long, dev))
                      for S in self.sizes}
        for S in self.sizes:
            inputs = [torch.zeros(1, S, H, dtype=net.dtype, device=dev), torch.zeros(1, S, dtype=torch.long, device=dev),
                      torch.zeros(1, S, dtype=torch.long, device=dev), torch.arange(S, device=dev),
                      torch.eye(S, self.capacity, dtype=torch.bool, device=dev)]
            self.graphs[S] = Captured(run, inputs) if capture else Direct(run, inputs, warm=warm)

    def fits(self, cache: KVCache, rows: int) -> bool:
        return cache.k is self.cache.k and rows <= self.sizes[-1] and cache.length + self.sizes[-1] <= self.capacity

    def _replay(self, cache: KVCache, feats, ids, positions, mask):
        """Stage one pass's inputs and replay its graph; the outputs are the graph's own buffers
        (overwritten by the next replay), padded to the graph's row count."""
        R, start = len(ids), cache.length
        S = next(s for s in self.sizes if s >= R)
        f_buf, i_buf, p_buf, s_buf, m_buf = self.graphs[S].inputs
        mask_stage, slot_stage = self._host[S]  # host copies that do not wait for the device
        full = mask_stage.ready().view(S, self.capacity)
        full.zero_()
        full[:R, :start + R] = mask.cpu()
        full[torch.arange(R, S), torch.arange(start + R, start + S)] = True  # padding rows see themselves
        mask_stage.copy_to(m_buf)
        f_buf[0, :R].copy_(feats)
        i_buf[0, :R].copy_(ids)
        p_buf[0, :R].copy_(positions)
        torch.arange(start, start + S, out=slot_stage.ready())
        slot_stage.copy_to(s_buf)
        if R < S:
            f_buf[0, R:].zero_()
            i_buf[0, R:].zero_()
            p_buf[0, R:].fill_(max(start, 0))
        x, probs = self.graphs[S].replay()
        cache.length = start + R
        return x, probs

    def __call__(self, cache: KVCache, feats, ids, positions, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `rows` = len(ids) rows at cache.length. feats [rows, H]; ids, positions [rows];
        mask [rows, cache.length + rows] (host or device). Returns (features, probs) [rows, ...]."""
        R = len(ids)
        x, probs = self._replay(cache, feats, ids, positions, mask)
        return x[0, :R].clone(), probs[0, :R].clone()

    # -- greedy chains: the block after the context and `passes` more, in two replays and one wait

    def _chain_fn(self, passes: int, feats, probs, start, k_cache, v_cache):
        """The chain as one fixed-shape function: the argmax of each row of `probs` [k, vocab] (the
        context pass's last k rows) starts it; each further pass feeds the k predicted features
        [k, H] and their argmax tokens as one block at slots start, start + k, ... (positions equal
        slots: the context fills slots 0..start-1), attending to everything before it and
        bidirectionally within its block. Returns [2, (passes + 1) * k] fp32: tokens, then their
        probabilities."""
        conf, col = probs.max(-1)
        tok = self._lm_head.to_target(col)  # the drafter's columns -> target ids
        k = tok.shape[0]
        toks, confs = [tok], [conf]
        cols = torch.arange(self.capacity, device=tok.device)
        rows = torch.arange(k, device=tok.device)
        for j in range(passes):
            s = start + j * k
            slots = s + rows
            mask = (cols < s + k).unsqueeze(0).expand(k, self.capacity)
            x, p = self._step(self._net, self._embed, self._lm_head, feats.unsqueeze(0), tok.unsqueeze(0),
                              slots.unsqueeze(0), slots, mask, k_cache, v_cache)
            conf, col = p[0].max(-1)
            tok = self._lm_head.to_target(col)
            toks.append(tok)
            confs.append(conf)
            feats = x[0]
        return torch.stack([torch.cat(toks).float(), torch.cat(confs)])

    def _chain(self, passes: int):
        """The captured (or, without capture, prepared) chain of `passes` passes. Its warm-up runs the
        chain, writing K/V where the start buffer points: callers set it to the replay's own start."""
        if passes not in self._chains:
            fn = functools.partial(self._chain_fn, passes)
            args = self._chain_inputs + [self.cache.k, self.cache.v]
            self._chains[passes] = Captured(fn, args) if self._capture_on else Direct(fn, args)
        return self._chains[passes]

    def chain_fits(self, cache: KVCache, rows: int, passes: int) -> bool:
        k = self._chain_inputs[0].shape[0]
        return self.fits(cache, rows) and cache.length + rows + passes * k <= self.capacity

    def prepare_chain(self, passes: int) -> None:
        """Capture the chain of `passes` passes now (at the drafter's build, not in a timed request).
        Nothing is live in the drafter's cache then; the warm-up writes at slot 0 on."""
        self._chain_inputs[2].fill_(0)
        self._chain(passes)

    def chain(self, cache: KVCache, feats, ids, positions, mask, passes: int) -> tuple[list[int], list[float]]:
        """The context pass (as `__call__`), then `passes` more passes of its last k rows' greedy
        block, all on the device: (tokens, probabilities) of the (passes + 1) * k drafted tokens, in
        one copy to the host. The cache grows by the context rows only (the chain's rows are past
        its length)."""
        R = len(ids)
        x, probs = self._replay(cache, feats, ids, positions, mask)
        f_in, p_in, s_in = self._chain_inputs
        k = f_in.shape[0]
        f_in.copy_(x[0, R - k:R])
        p_in.copy_(probs[0, R - k:R])
        s_in.fill_(cache.length)
        out = self._chain(passes).replay().tolist()  # the one wait on the device
        return [int(t) for t in out[0]], out[1]


def load_falcon(path: str | Path, target, device=None, dtype=None, method: str = METHOD) -> FalconNet:
    """Load a drafter directory for `target`, refusing one trained for another model (or another
    method: `eagle` drafters are FalconNets with k = 1 and their own method name)."""
    meta, sd = read_drafter_dir(path, method)
    check_identity(meta, target, str(path))
    cfg = FalconConfig.from_dict(meta["config"])
    net = FalconNet(cfg)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}/model.safetensors does not match its config ({str(e).splitlines()[0]})") from None
    return net.to(device=device or target.device, dtype=dtype or target.dtype).eval()


def save_falcon(path: str | Path, net: FalconNet, target, training: Optional[dict] = None,
                method: str = METHOD, store: str = "bf16") -> Path:
    """Write the drafter; store="int8" keeps its matrices as int8 with one scale per row (a
    quarter of fp32 on disk; loading restores floats, and every drafted token is still verified)."""
    return write_drafter_dir(path, method, asdict(net.config), net.state_dict(), target, training, store=store)


def default_tree(k: int, device) -> TreeSpec:
    """The tree shape when --tree is not given, by device (measured, docs/benchmarks.md):
    on a CPU every drafter pass and every verified node costs real time, and one pass drafting a
    chain of k was fastest (SmolLM2-135M, 2 cores: 0.79x of `ar` vs 0.57x for `dynamic:6,4,16`);
    on a GPU verifying 2 to 16 nodes costs the same (1.9 ms on an H200 with qwen2.5-coder-1.5b,
    against 1.2 ms for one token), so one pass branches into the 8 likeliest tokens at each of
    its k positions and sends the 16 best nodes: in one same-text run it ran at 0.85x of `ar`
    (τ 2.03) against 0.69x (τ 1.64) for a chain of three passes and 0.78x for a chain of one."""
    if torch.device(device).type == "cpu":
        return TreeSpec("dynamic", depth=k, top_k=1, budget=k)
    return TreeSpec("dynamic", depth=k, top_k=8, budget=16)


class FalconDrafter(Drafter):
    """Drafts a block tree with a trained FalconNet (see the module docstring)."""

    name = METHOD
    needs_hidden = True

    def __init__(self, net: FalconNet, target, tree: Optional[TreeSpec] = None, min_score: float = 0.0,
                 graphs: Optional[bool] = None, compile: bool = False):
        self.net = net.eval()
        self.target = target
        self.k = net.config.k
        self.tree = tree or default_tree(self.k, net.device)
        if self.tree.kind != "dynamic":
            raise InvalidArgumentError(f"{self.name} builds a dynamic tree; use --tree dynamic:DEPTH,TOPK,BUDGET")
        if self.tree.depth < self.k:
            raise InvalidArgumentError(f"{self.name} tree depth must be >= k={self.k}")
        self.min_score = min_score
        self.embed = target.decoder.embed_tokens
        self.lm_head = draft_head(net, target.decoder.lm_head)  # columns of the drafter's vocabulary
        self.cache: Optional[KVCache] = None
        self.hidden: list[torch.Tensor] = []  # target features h_0.. of the context, in chunks
        self.n_hidden = 0
        self.fed = 0  # context pairs whose K/V in self.cache were computed from true features
        # on CUDA the drafter's passes replay CUDA graphs (graphs=False: eager), compiled first on request
        use = net.device.type == "cuda" if graphs is None else graphs
        self.graphs = FalconGraphs(net, self.embed, self.lm_head, capture=net.device.type == "cuda",
                                   compile=compile) if use else None
        # a one-wide tree on graphs drafts its whole chain on the device (FalconGraphs.chain)
        self._chained = self.graphs is not None and self.tree.top_k == 1
        if self._chained:
            self.graphs.prepare_chain(self.forwards - 1)

    @property
    def forwards(self) -> int:
        return -(-self.tree.depth // self.k)

    @property
    def max_nodes(self) -> int:
        return self.tree.budget

    def _tree_rows(self) -> int:
        return (self.forwards - 1) * self.tree.top_k * self.k

    def start(self, prompt_ids, sampling, generator=None, prompt_hidden=None):
        self.sampling = sampling
        self.hidden = [] if prompt_hidden is None else [prompt_hidden]
        self.n_hidden = 0 if prompt_hidden is None else prompt_hidden.shape[0]
        need = len(prompt_ids) + 1024 + self._tree_rows() + self.k + 8
        g = self.graphs
        if g is not None and need + g.sizes[-1] <= g.capacity:
            self.cache = g.cache
            self.cache.length = 0
        else:
            self.cache = self.net.new_cache(need)
        self.fed = 0

    def observe(self, accepted, n_draft_accepted, hidden=None):
        if hidden is not None:
            self.hidden.append(hidden)
            self.n_hidden += hidden.shape[0]

    def _features(self) -> torch.Tensor:
        if len(self.hidden) > 1:
            self.hidden = [torch.cat(self.hidden, 0)]
        return self.hidden[0]

    def _dists(self, out: torch.Tensor) -> torch.Tensor:
        """[rows, H] predicted features -> [rows, vocab] draft probabilities (fp32)."""
        return self.lm_head(out).float().softmax(-1)

    def _pass(self, feats, ids, positions, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """One drafter pass appending len(ids) rows: (features [rows, H], probs [rows, vocab]).
        mask: [rows, cache.length + rows] bool on the host."""
        if self.graphs is not None and self.graphs.fits(self.cache, len(ids)):
            return self.graphs(self.cache, feats, ids, positions, mask)
        dev = self.net.device
        out = self.net(feats.unsqueeze(0), self.embed(ids).unsqueeze(0), positions.unsqueeze(0),
                       mask.to(dev), self.cache)[0]
        return out, self._dists(out)

    @torch.no_grad()
    def propose(self, tokens: list[int]) -> DraftTree:
        k, spec = self.k, self.tree
        P = len(tokens) - 1  # context pairs (h_t, x_{t+1}), t = 0..P-1
        if P < k or self.n_hidden < P:
            return DraftTree.empty()
        dev = self.net.device
        feats = self._features()
        # the drafter cache keeps true-feature pairs up to P - k; the last k are fed as one block
        c = min(self.fed, P - k)
        self.cache.truncate(c)
        self.cache = self.cache.ensure(P + self._tree_rows() + 1)
        T = P - c
        mask = torch.ones(T, P, dtype=torch.bool)  # masks are built on the host, sent once
        mask[:, c:] = self.net.relaxed_mask(T, offset=(k - T % k) % k)
        ids = torch.tensor(tokens[c + 1:P + 1], device=dev)
        if self._chained and self.graphs.chain_fits(self.cache, T, self.forwards - 1):
            return self._propose_chain(feats[c:P], ids, torch.arange(c, P, device=dev), mask, P)
        out, probs = self._pass(feats[c:P], ids, torch.arange(c, P, device=dev), mask)
        out, probs = out[-k:], probs[-k:]  # [k, H], [k, vocab]
        self.fed = P
        base = self.cache.length  # == P: tree rows go after the context

        tokens_, parents, scores, depth = [], [], [], []
        feat_rows = [out]  # list of [k, H] chunks; node feature = feat_rows[chunk][i]
        feat_index: list[tuple[int, int]] = []

        def top(probs: torch.Tensor) -> tuple[list, list]:
            """top_k of every row in one kernel and one device-to-host copy per pass (a copy per
            block would wait on the GPU once per block)."""
            p, t = probs.topk(min(spec.top_k, probs.shape[-1]), dim=-1)
            return p.tolist(), self.lm_head.to_target(t).tolist()

        def add_block(parent: int, parent_score: float, top_p: list, top_t: list, chunk: int) -> list[tuple[float, int]]:
            """Cartesian top-k continuations of one block (its k rows of top_p/top_t), beam of top_k."""
            beams = [(parent_score, parent)]
            d0 = 0 if parent < 0 else depth[parent]
            for i in range(min(k, spec.depth - d0)):
                cand = [(s * p, node, t) for s, node in beams for p, t in zip(top_p[i], top_t[i])
                        if s * p > self.min_score]
                best = heapq.nlargest(spec.top_k, cand, key=lambda x: x[0])
                beams = []
                for s, node, t in best:
                    tokens_.append(t)
                    parents.append(node)
                    scores.append(s)
                    depth.append(d0 + i + 1)
                    feat_index.append((chunk, i))
                    beams.append((s, len(tokens_) - 1))
            return beams if len(beams) and depth[beams[0][1]] == d0 + k else []

        blocks = add_block(-1, 1.0, *top(probs), 0)  # (score, last node) of complete blocks
        block_rows: dict[int, list[int]] = {}  # last node of a fed block -> its rows in the cache
        for _ in range(self.forwards - 1):
            blocks = heapq.nlargest(spec.top_k, blocks, key=lambda x: x[0])
            if not blocks:
                break
            rows_feats, rows_ids, rows_pos, row_nodes = [], [], [], []
            for _, last in blocks:
                path = [last]
                while len(path) < k:
                    path.append(parents[path[-1]])
                path.reverse()  # the block's k nodes, top down
                row_nodes.append(path)
                for n in path:
                    ch, i = feat_index[n]
                    rows_feats.append(feat_rows[ch][i])
                    rows_ids.append(tokens_[n])
                    rows_pos.append(P - 1 + depth[n])  # a node at depth d is the pair (h_{P+d-1}, x_{P+d})
            R = len(rows_ids)
            start = self.cache.length
            mask = torch.zeros(R, start + R, dtype=torch.bool)
            mask[:, :base] = True
            for b, path in enumerate(row_nodes):
                r0 = start - base + b * k
                mask[b * k:(b + 1) * k, start + b * k:start + (b + 1) * k] = True
                anc = parents[path[0]]
                while anc >= 0:  # ancestor blocks: each fed block is keyed by its last node
                    if anc in block_rows:
                        mask[b * k:(b + 1) * k, [base + r for r in block_rows[anc]]] = True
                    anc = parents[anc]
                block_rows[path[-1]] = list(range(r0, r0 + k))
            out, probs = self._pass(torch.stack(rows_feats), torch.tensor(rows_ids, device=dev),
                                    torch.tensor(rows_pos, device=dev), mask)  # [R, H], [R, vocab]
            new_blocks = []
            top_p, top_t = top(probs)
            for b, (s, last) in enumerate(blocks):
                feat_rows.append(out[b * k:(b + 1) * k])
                new_blocks += add_block(last, s, top_p[b * k:(b + 1) * k], top_t[b * k:(b + 1) * k], len(feat_rows) - 1)
            blocks = new_blocks
        self.cache.truncate(base)

        return best_nodes(tokens_, parents, scores, spec.budget)

    def _propose_chain(self, feats, ids, positions, mask, P: int) -> DraftTree:
        """A one-wide tree (top_k 1) on graphs: the context pass and every further pass replayed
        back to back, each block's argmax fed to the next on the device, one wait at the end
        (`FalconGraphs.chain`). The same chain the tree code builds with top_k 1: cut to the depth,
        and where the running product of probabilities falls to min_score."""
        toks, confs = self.graphs.chain(self.cache, feats, ids, positions, mask, self.forwards - 1)
        self.fed = P  # the cache now ends at the context (the chain's rows lie past its length)
        tokens_, parents, scores, s = [], [], [], 1.0
        for i, (t, p) in enumerate(zip(toks[:self.tree.depth], confs)):
            s *= p
            if s <= self.min_score:
                break
            tokens_.append(t)
            parents.append(i - 1)
            scores.append(s)
        return best_nodes(tokens_, parents, scores, self.tree.budget)
