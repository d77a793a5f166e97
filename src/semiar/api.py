"""The Python API: one call to generate with any method; the CLI and the benchmark use it too.

Example:
    >>> import semiar                                                             # doctest: +SKIP
    >>> r = semiar.generate("Write a haiku about caches", model="smollm2-135m-instruct",
    ...                     method="pld", chat=True, max_new_tokens=48)          # doctest: +SKIP
    >>> r.text, r.stats.tau                                                       # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from .engine import Engine, Generation
from .errors import InvalidArgumentError
from .methods import check_method, make_drafter
from .models.loading import LoadedModel, load_model
from .sampling import SamplingParams


@dataclass
class Result:
    text: str
    token_ids: list[int]
    stop_reason: str
    method: str
    model: str
    stats: object

    def to_dict(self) -> dict:
        d = {"text": self.text, "token_ids": self.token_ids, "new_tokens": self.stats.new_tokens,
             "seconds": round(self.stats.seconds, 4), "tokens_per_s": round(self.stats.tokens_per_s, 3),
             "method": self.method, "model": self.model, "stop_reason": self.stop_reason}
        s = self.stats.to_dict()
        d.update(tau=s["tau"], target_forwards=s["target_forwards"], accept_by_depth=s["accept_by_depth"],
                 time_split=s["time_split"], prompt_tokens=s["prompt_tokens"])
        return d


def stream(prompt: str, model: str | LoadedModel = "qwen2.5-coder-1.5b-instruct", *, method: str = "ar",
           draft_model: Optional[str | LoadedModel] = None, tree: Optional[str] = None, k: Optional[int] = None,
           max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           seed: Optional[int] = None, stop: Sequence[str] = (), chat: bool = False,
           system: Optional[str] = None, device: str = "cpu", dtype: Optional[str] = None,
           drafter=None, cuda_graphs: Optional[bool] = None, compile: bool = False) -> Generation:
    """Start a generation and return the `Generation` to iterate (streaming chunks).
    cuda_graphs: on CUDA, replay forwards as CUDA graphs (default on; models.cuda.graphs);
    compile: on CUDA, torch.compile the graphed forward first (about half the step time, ~25 s
    more start-up per model; worth it for long or many generations)."""
    check_method(method)
    if max_new_tokens <= 0:
        raise InvalidArgumentError(f"max-new-tokens must be > 0, got {max_new_tokens}")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    target = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype,
                                                                     cuda_graphs=cuda_graphs, compile=compile)
    drafter = make_drafter(method, target, draft_model=draft_model, tree=tree, k=k, device=device, dtype=dtype,
                           drafter=drafter, cuda_graphs=cuda_graphs, compile=compile)
    ids = target.encode(prompt, chat=chat, system=system)
    target.check_prompt(len(ids))
    gen = Engine(target, drafter).generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop)
    gen.method, gen.model_name = method, target.name
    return gen


def generate(prompt: str, model: str | LoadedModel = "qwen2.5-coder-1.5b-instruct", **kw) -> Result:
    """Generate a completion; same keywords as `stream`. Returns text, ids and stats."""
    gen = stream(prompt, model, **kw).run()
    return Result(text=gen.text, token_ids=gen.token_ids, stop_reason=gen.stop_reason, method=gen.method,
                  model=gen.model_name, stats=gen.stats)


def iter_text(gen: Generation) -> Iterator[str]:
    for chunk in gen:
        if chunk.text:
            yield chunk.text
