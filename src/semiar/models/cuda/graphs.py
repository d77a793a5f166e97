"""CUDA-graph replay of the decoder for fixed block sizes over one static KV cache.

At batch size 1 a 1.5B model's decode step is a few hundred small kernels: launched one by one
from Python the GPU waits on the CPU (an eager step of qwen2.5-coder-1.5b took ~22 ms on an H200,
where reading the weights takes 0.64 ms). `GraphedDecoder` captures `Decoder.forward_static` once
per block size S (1 for a decode step, up to 64 for token trees) and attention window W with every
shape fixed: the cache has a fixed capacity, the block attends over the cache's first W slots (the
smallest captured window that holds the cache) under a mask built on the GPU from the cache
length, and a block of T < S tokens is padded to S. A step is then a few small host-to-device
copies and one graph replay; a prompt longer than the largest size is several replays.
Optionally the forward is compiled first (`compile=True`, torch.compile/Inductor, `compile_static`),
which fuses the elementwise work (norms, rotary, mask and softmax, SiLU, residuals): on the H200
3.65 -> 1.91 ms per step. One-row products go through a Triton kernel where it beats cuBLAS for
the weight's shape (`models.cuda.gemv`): 1.87 -> 1.64 ms.

A draft model's greedy chain is one more kind of graph (`greedy_chain`): k - 1 one-token forwards,
each fed the argmax of the one before on the device, and one host copy of the tokens at the end.

It has the decoder's call signature, so the engine and the drafters use it without knowing:
anything it cannot replay (another cache, a full prefix mask, a batch, a request past the static
capacity) runs the eager decoder on the same cache.

`new_cache` hands out the one static cache while no other live cache holds it (a second request in
flight on the same model, or a draft model that is the target itself, gets an ordinary cache).

Example (needs a CUDA device):
    >>> from semiar.models.cuda import GraphedDecoder                       # doctest: +SKIP
    >>> g = GraphedDecoder(model.decoder, capacity=2048, sizes=(1, 16, 64))  # doctest: +SKIP
    >>> cache = g.new_cache(512); out = g(ids, cache)                       # doctest: +SKIP
"""

from __future__ import annotations

import functools
import time
import warnings
import weakref
from typing import Optional, Sequence

import torch

from ..decoder import Decoder, DecoderOutput, HostStage, KVCache, call_layer, static_epilogue, static_prologue
from . import fused, gemv
from .capture import Captured, Direct

#: block sizes captured by default: trees (up to 64 tokens) and prompt chunks; 128 and 256 serve
#: prefill only (H200, 1.5B: a 64-token replay 2.13 ms, 128 2.36 ms, 256 3.16 ms, so a 157-token
#: prompt is one 3.2 ms replay where three 64-token chunks took 6.4 ms)
DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


#: torch.compile backend for `compile=True` (tests use "eager": Dynamo's tracing without codegen)
COMPILE_BACKEND = "inductor"


def compile_static(decoder: Decoder) -> None:
    """Compile the pieces of `Decoder.forward_static` with torch.compile (Inductor), which fuses the
    elementwise work around the matrix products (norms in fp32, rotary, the mask and softmax, SiLU,
    residuals) into a few kernels per layer.

    One layer is compiled, not the whole model: the code serves every layer of the same shapes,
    since a layer's weights are inputs and not constants, so compiling costs one layer's time (the
    whole model took ~40 s per block size). Shapes are left to Dynamo's automatic dynamic shapes:
    the 1-token step is compiled for its exact shape, the first larger block recompiles with the
    block length symbolic, and that code then serves every other block size."""
    decoder.static_fns = tuple(compiled(f) for f in (static_prologue, call_layer, static_epilogue))


def compiled(fn):
    """`fn` under torch.compile as the static paths use it (whole graph, `COMPILE_BACKEND`,
    automatic dynamic shapes; room for the recompiles of several models and block sizes)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    return torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)


def build_with_compile_fallback(build, compile: bool, what: str) -> bool:
    """Run `build(compile)`; if compiling made it fail, warn and run `build(False)` (graphs of the
    uncompiled forward). Returns whether the result is compiled."""
    try:
        build(compile)
        return compile
    except Exception as e:  # noqa: BLE001 - whatever the compiler raised, the graphs can do without it
        if not compile:
            raise
        warnings.warn(f"torch.compile failed for {what} ({type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0][:200]}); replaying CUDA graphs of the uncompiled "
                      "forward instead", stacklevel=3)
    build(False)
    return False


class GraphedDecoder:
    """A `Decoder` whose fixed-size forwards replay CUDA graphs (see the module doc). Its inputs may
    be on the host or the device; host inputs are staged in fewer transfers (`models.decoder.input_device`)."""

    accepts_host_inputs = True

    def __init__(self, decoder: Decoder, capacity: int = 2048, sizes: Optional[Sequence[int]] = None,
                 compile: bool = False, capture: Optional[bool] = None,
                 windows: Optional[Sequence[int]] = None, row_kernel: Optional[bool] = None,
                 fused_step: Optional[bool] = None, block_attention: Optional[bool] = None,
                 block_mlp: Optional[bool] = None):
        """sizes: the block sizes captured (a block of T tokens replays the smallest size >= T;
        default: DEFAULT_SIZES up to half the capacity);
        windows: the attention widths captured for each size (default: 256, 512, ... up to the
        capacity), so a step attends over the smallest window that holds the cache, not over the
        whole capacity; capture: record CUDA graphs (default: when the decoder is on CUDA);
        without, the same fixed-shape forwards run directly, which is how the CPU tests check
        the logic; row_kernel: one-row products through the Triton kernel (`models.cuda.gemv`; default:
        on CUDA where the fused step is off, for the weight shapes where it beats cuBLAS; False: cuBLAS
        only; True: every shape, with or without the fused step); fused_step: one-token
        steps as five fused Triton kernels per layer (`models.cuda.fused`; default: on CUDA); block_attention:
        the compiled layer's blocks of 2-64 tokens attend through one Triton kernel over the filled slots
        (`fused.block_attention`; default: where the fused one-token step is on); block_mlp: those blocks'
        MLP gate/up product and SwiGLU as one Triton kernel (`fused.block_swiglu`; default: where the
        fused one-token step is on)."""
        capture = decoder.device.type == "cuda" if capture is None else capture
        if capture and decoder.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.decoder = decoder
        self.config = decoder.config
        if sizes is None:
            sizes = [s for s in DEFAULT_SIZES if 2 * s <= capacity]
        self.sizes = sorted(set(int(s) for s in sizes))
        if not self.sizes or self.sizes[0] < 1 or self.sizes[-1] >= capacity:
            raise ValueError(f"block sizes must be positive and below the capacity {capacity}, got {list(sizes)}")
        #: the most padding slots a block can take (a block of T tokens replays the smallest size >= T;
        #: prompts longer than the largest size run in chunks of it, only the last one padded)
        self.slack = max(b - a - 1 for a, b in zip([0] + self.sizes, self.sizes))
        self.capacity = capacity
        self.cache = decoder.new_cache(capacity)
        self.capture_seconds = 0.0
        self._warned = False
        self._lease = None  # weakref to the KVCache that holds the static storage now
        dev = decoder.device
        if windows is None:
            windows = [w for w in (256, 512, 1024) if w < capacity]
        self.windows = sorted(set(int(w) for w in windows if 0 < w < capacity)) + [capacity]
        t0 = time.perf_counter()
        # before compiling: the compiled layer calls the kernels as opaque ops (CUDA only, unless forced);
        # the one-row kernel only where the fused step, which does those products itself, is off
        if fused.install(decoder, force=fused_step) and row_kernel is not True:
            gemv.uninstall(decoder)
        else:
            gemv.install(decoder, force=row_kernel)
        fused.install_block_attention(decoder, on=block_attention)
        fused.install_block_mlp(decoder, on=block_mlp)

        def build(comp: bool) -> None:
            if comp:
                compile_static(decoder)
            else:
                decoder.static_fns = None
            self._capture(capture, warm=comp)

        self.compiled = build_with_compile_fallback(build, compile, "the model")
        if capture:
            torch.cuda.synchronize(dev)
        self.capture_seconds = time.perf_counter() - t0
        self.cache.length = 0
        self._capturing = capture
        self._chains: dict[tuple[int, int], Captured | Direct] = {}  # (steps, window) -> greedy chain
        self._chain_inputs: Optional[list[torch.Tensor]] = None
        self._chain_pool = None

    def _capture(self, capture: bool, warm: bool) -> None:
        """Record (or, without capture, prepare) a graph per block size and attention window;
        warm: run the uncaptured ones once too (compilation happens then, as in a capture)."""
        dev = self.decoder.device
        # per size: input buffers (ids, positions, start, block mask) shared by its windows' graphs;
        # ids, positions and start are views of one buffer, so inputs from the host are one copy
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self._packed: dict[int, torch.Tensor] = {}
        # per size: reusable host buffers for ids/positions/start and the block mask (pinned on CUDA)
        self._host: dict[int, tuple[HostStage, HostStage]] = {}
        self.graphs: dict[tuple[int, int], Captured | Direct] = {}
        for S in self.sizes:
            packed = self._packed[S] = torch.zeros(2 * S + 1, dtype=torch.long, device=dev)
            self._host[S] = (HostStage(2 * S + 1, torch.long, dev), HostStage(S * S, torch.bool, dev))
            self.inputs[S] = [packed[:S].view(1, S),  # input ids
                              packed[S:2 * S].view(1, S),  # positions
                              packed[2 * S],  # start
                              torch.ones(S, S, dtype=torch.bool, device=dev).tril()]  # block mask
            for W in self.windows:
                if W < S:
                    continue
                fn = functools.partial(self.decoder.forward_static, window=W)
                args = self.inputs[S] + [self.cache.k, self.cache.v]
                self.graphs[S, W] = Captured(fn, args) if capture else Direct(fn, args, warm=warm)

    def _chain_fn(self, n: int, window: int, logits, start, mask, k_cache, v_cache):
        """The greedy chain as one fixed-shape function: the argmax of `logits` (and its probability),
        then n one-token forwards, each fed the argmax of the one before, at slots start, start + 1,
        ... Returns [2, n + 1] fp32: the tokens (exact in fp32 below 2^24), then their probabilities."""
        conf, tok = logits.softmax(-1).max(-1)
        toks, confs, slot = [tok], [conf], start
        for _ in range(n):
            out, _h = self.decoder.forward_static(tok.view(1, 1), slot.view(1, 1), slot, mask, k_cache, v_cache,
                                                  window=window)
            conf, tok = out[0, -1].softmax(-1).max(-1)
            toks.append(tok)
            confs.append(conf)
            slot = slot + 1
        return torch.stack([torch.stack(toks).float(), torch.stack(confs)])

    def _chain(self, n: int, window: int):
        """The captured (or, without capture, prepared) chain of n steps attending over `window` slots.
        A capture runs the chain (its warm-up), writing K/V at the slots the start buffer names: the
        caller points it past the live request's cache first."""
        key = (n, window)
        if key not in self._chains:
            fn = functools.partial(self._chain_fn, n, window)
            args = self._chain_buffers() + [self.cache.k, self.cache.v]
            self._chains[key] = (Captured(fn, args, pool=self._chain_pool) if self._capturing
                                 else Direct(fn, args))
        return self._chains[key]

    def _chain_buffers(self) -> list[torch.Tensor]:
        """The chains' inputs: next-token logits [vocab] fp32, the start slot (0-d), a 1x1 block mask."""
        if self._chain_inputs is None:
            dev = self.decoder.device
            self._chain_inputs = [torch.zeros(self.config.vocab_size, dtype=torch.float32, device=dev),
                                  torch.zeros((), dtype=torch.long, device=dev),
                                  torch.ones(1, 1, dtype=torch.bool, device=dev)]
            if self._capturing:
                self._chain_pool = torch.cuda.graph_pool_handle()  # chains replay one at a time
        return self._chain_inputs

    def prepare_chains(self, k_max: int) -> None:
        """Capture the greedy chains `greedy_chain` can ask for up to k_max tokens (1 to k_max - 1
        steps) in every window now, rather than in the middle of a timed request. Captures write
        K/V past a live request's cache only; a window with no room for that is captured later, when
        first asked for."""
        live = self._lease() if self._lease is not None else None
        used = live.length if live is not None else 0
        for n in range(1, k_max):
            for w in self.windows:
                if (n, w) not in self._chains and used + n <= w:
                    self._chain_buffers()[1].fill_(used)
                    self._chain(n, w)

    def greedy_chain(self, logits: torch.Tensor, cache: KVCache, k: int) -> Optional[tuple[list[int], list[float]]]:
        """The next k greedy tokens after `logits` (the next-token logits [vocab], on the device) and
        the probability the model gave each, drafted as one replay: the k - 1 one-token forwards feed
        each argmax back on the device, and the tokens come to the host in one copy at the end (a
        step-by-step loop waits for the device at every token). The cache grows by k - 1 (every token
        but the last is fed). None when this cannot be replayed (a cache other than the static one, or
        past its capacity): the caller then steps itself."""
        n, start = k - 1, cache.length
        if n < 1 or cache.k is not self.cache.k or start + n > self.capacity:
            return None
        window = next(w for w in self.windows if w >= start + n)
        logits_in, start_in, _ = self._chain_buffers()
        logits_in.copy_(logits.reshape(-1), non_blocking=True)
        start_in.fill_(start)  # before a first capture too: its warm-up writes where the replay will
        out = self._chain(n, window).replay().tolist()  # the one wait on the device
        cache.length = start + n
        return [int(t) for t in out[0]], out[1]

    # the decoder's attributes (device, dtype, embed_tokens, lm_head, ...) as the decoder's
    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        """A cache on the static storage (emptied) when the request fits and no live cache holds
        it, else an ordinary cache (eager forwards)."""
        fits = capacity <= self.capacity - self.slack and batch == 1
        if fits and (self._lease is None or self._lease() is None):
            c = KVCache.over(self.cache.k, self.cache.v)
            self._lease = weakref.ref(c)
            return c
        if not fits and not self._warned:
            warnings.warn(f"request needs a KV cache of {capacity} > the CUDA-graph capacity "
                          f"{self.capacity - self.slack}; running eagerly (slower)", stacklevel=2)
            self._warned = True
        return self.decoder.new_cache(capacity, batch)

    def _size_for(self, T: int) -> Optional[int]:
        return next((S for S in self.sizes if S >= T), None)

    def __call__(self, input_ids: torch.Tensor, cache: KVCache, positions: Optional[torch.Tensor] = None,
                 tree_mask: Optional[torch.Tensor] = None, logits_at=None, return_hidden: bool = False,
                 attn_mask: Optional[torch.Tensor] = None) -> DecoderOutput:
        B, T = input_ids.shape
        start = cache.length
        S = self._size_for(T)
        if (S is None and cache.k is self.cache.k and B == 1 and attn_mask is None and tree_mask is None
                and start + T + self.slack <= self.capacity):
            return self._chunked(input_ids, cache, positions, logits_at, return_hidden)
        if (cache.k is not self.cache.k or S is None or B != 1 or attn_mask is not None
                or start + S > self.capacity or (tree_mask is not None and tree_mask.shape[1] != T)):
            dev = self.decoder.device
            to = lambda t: None if t is None else t.to(dev)  # noqa: E731 - inputs may come from the host
            return self.decoder(to(input_ids), cache, to(positions), to(tree_mask), logits_at, return_hidden,
                                to(attn_mask))
        W = next(w for w in self.windows if w >= start + S)  # start + S <= capacity: one exists
        g = self.graphs[S, W]
        if all(t is None or t.device.type == "cpu" for t in (input_ids, positions, tree_mask)):
            self._stage_from_host(S, T, start, input_ids, positions, tree_mask)
        else:
            self._stage_on_device(S, T, start, input_ids, positions, tree_mask)
        logits, hidden = g.replay()
        cache.length = start + T
        # copies: the graph's outputs are overwritten by its next replay
        logits = logits[:, :T] if logits_at is None else logits[:, :T][:, logits_at]
        return DecoderOutput(logits=logits.clone(), hidden=hidden[:, :T].clone() if return_hidden else None)

    def _stage_from_host(self, S, T, start, input_ids, positions, tree_mask) -> None:
        """Inputs built on the host (the engine's own): ids, positions and start packed into one
        host buffer and copied in one transfer, the tree mask in a second (blocks of 2+ only), where
        filling the device buffers piece by piece took five to ten device calls per step. The
        buffers are pinned on CUDA, so the copies queue without stopping the host (`HostStage`)."""
        ids_stage, mask_stage = self._host[S]
        host = ids_stage.ready()
        host[:T] = input_ids[0]
        host[T:S] = 0  # padding rows: token 0 at the first new position, seeing only themselves
        host[S:S + T] = torch.arange(start, start + T) if positions is None else positions[0]
        host[S + T:] = start  # the padding's positions, then start itself
        ids_stage.copy_to(self._packed[S])
        if S > 1:
            mask = mask_stage.ready().view(S, S)
            mask.zero_()
            mask.fill_diagonal_(True)
            mask[:T, :T] = torch.ones(T, T, dtype=torch.bool).tril() if tree_mask is None else tree_mask
            mask_stage.copy_to(self.inputs[S][3])

    def _stage_on_device(self, S, T, start, input_ids, positions, tree_mask) -> None:
        """Inputs already on the device: copied into the graph's buffers there."""
        ids_buf, pos_buf, start_buf, mask_buf = self.inputs[S]
        ids_buf[:, :T].copy_(input_ids, non_blocking=True)
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).unsqueeze(0)
        pos_buf[:, :T].copy_(positions, non_blocking=True)
        start_buf.fill_(start)
        if S > 1:
            if tree_mask is None:
                tree_mask = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask_buf.zero_()
            mask_buf.diagonal().fill_(True)  # padding rows see themselves: finite values
            mask_buf[:T, :T].copy_(tree_mask, non_blocking=True)
            if T < S:
                ids_buf[:, T:].zero_()
                pos_buf[:, T:].fill_(start)

    def _chunked(self, input_ids, cache, positions, logits_at, return_hidden) -> DecoderOutput:
        """A causal block longer than the largest graph (a prompt) as consecutive replays of the
        largest size. On the H200 an eager forward of the 1.5B over 32-64 tokens took ~19 ms
        (launch-bound, so about what a whole prompt costs), a compiled 64-token replay 2.25 ms.
        Logits are kept only for the rows asked for."""
        T, step = input_ids.shape[1], self.sizes[-1]
        rows = None if logits_at is None else torch.arange(T)[logits_at].reshape(-1)
        wanted = None if rows is None else sorted(set(rows.tolist()))
        logits, hidden = [], []
        for a in range(0, T, step):
            b = min(a + step, T)
            if wanted is None:
                at = None
            else:
                at = torch.tensor([r - a for r in wanted if a <= r < b], dtype=torch.long, device=input_ids.device)
            out = self(input_ids[:, a:b], cache, None if positions is None else positions[:, a:b],
                       logits_at=at, return_hidden=return_hidden)
            logits.append(out.logits)
            if return_hidden:
                hidden.append(out.hidden)
        out_logits = torch.cat(logits, dim=1)
        if wanted is not None:  # back to the order (and repeats) that logits_at asked for
            index = {r: i for i, r in enumerate(wanted)}
            order = torch.tensor([index[r] for r in rows.tolist()], dtype=torch.long, device=out_logits.device)
            out_logits = out_logits[:, order]
        return DecoderOutput(logits=out_logits, hidden=torch.cat(hidden, dim=1) if return_hidden else None)
