"""The Python API: one call to generate with any method; the CLI and the benchmark use it too.

Example:
    >>> import semiar                                                             # doctest: +SKIP
    >>> r = semiar.generate("Write a haiku about caches", model="smollm2-135m-instruct",
    ...                     method="pld", chat=True, max_new_tokens=48)          # doctest: +SKIP
    >>> r.text, r.stats.tau                                                       # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from .drafters.draft_model import check_tokenizers_first
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

    @classmethod
    def of(cls, gen: Generation) -> "Result":
        """The result of a finished generation."""
        return cls(text=gen.text, token_ids=gen.token_ids, stop_reason=gen.stop_reason, method=gen.method,
                   model=gen.model_name, stats=gen.stats)

    def to_dict(self) -> dict:
        d = {"text": self.text, "token_ids": self.token_ids, "new_tokens": self.stats.new_tokens,
             "seconds": round(self.stats.seconds, 4), "tokens_per_s": round(self.stats.tokens_per_s, 3),
             "method": self.method, "model": self.model, "stop_reason": self.stop_reason}
        s = self.stats.to_dict()
        d.update(tau=s["tau"], target_forwards=s["target_forwards"], accept_by_depth=s["accept_by_depth"],
                 time_split=s["time_split"], prompt_tokens=s["prompt_tokens"])
        return d


#: a prompt: text, or a conversation of {"role": ..., "content": ...} messages (chat template implied)
Prompt = Union[str, Sequence[dict]]


class Session:
    """A target and one method's drafter, loaded once, for many generations: a file of prompts, a
    chat, a notebook. `stream` and `generate` below are one-request sessions.

    A draft model's tokenizer is compared with the target's before any weights load.

    Example:
        >>> s = Session("smollm2-135m-instruct", method="pld")                          # doctest: +SKIP
        >>> s.generate("Write a haiku about caches", chat=True, max_new_tokens=48).text  # doctest: +SKIP
        >>> s.generate([{"role": "user", "content": "And one about trees"}]).stats.tau  # doctest: +SKIP
    """

    def __init__(self, model: str | LoadedModel = "qwen2.5-coder-1.5b-instruct", *, method: str = "ar",
                 draft_model: Optional[str | LoadedModel] = None, tree: Optional[str] = None,
                 k: Optional[int] = None, device: str = "cpu", dtype: Optional[str] = None, drafter=None,
                 cuda_graphs: Optional[bool] = None, compile: bool = False):
        check_method(method)
        if draft_model is not None and method in DRAFT_MODEL_METHODS:
            check_tokenizers_first(model, draft_model)  # seconds, where loading the target first took ~20
        self.method = method
        self.target = model if isinstance(model, LoadedModel) else load_model(
            model, device=device, dtype=dtype, cuda_graphs=cuda_graphs, compile=compile)
        self.drafter = make_drafter(method, self.target, draft_model=draft_model, tree=tree, k=k, device=device,
                                    dtype=dtype, drafter=drafter, cuda_graphs=cuda_graphs, compile=compile)
        self.engine = Engine(self.target, self.drafter)

    @staticmethod
    def check_options(method: str = "ar", max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, seed: Optional[int] = None, **_) -> None:
        """The checks that need no model, for callers to make before the model loads."""
        check_method(method)
        if max_new_tokens <= 0:
            raise InvalidArgumentError(f"max-new-tokens must be > 0, got {max_new_tokens}")
        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def encode(self, prompt: Prompt, chat: bool = False, system: Optional[str] = None) -> list[int]:
        """Prompt ids, checked against the context. A list of messages always goes through the chat
        template (a system message is then one of the messages)."""
        if isinstance(prompt, str):
            ids = self.target.encode(prompt, chat=chat, system=system)
        else:
            if system is not None:
                raise InvalidArgumentError("a conversation carries its system message as its first message")
            ids = self.target.encode_messages(list(prompt))
        self.target.check_prompt(len(ids))
        return ids

    def stream(self, prompt: Prompt, *, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: Optional[int] = None, stop: Sequence[str] = (), chat: bool = False,
               system: Optional[str] = None) -> Generation:
        """Start one generation; iterate the `Generation` for streaming chunks."""
        if max_new_tokens <= 0:
            raise InvalidArgumentError(f"max-new-tokens must be > 0, got {max_new_tokens}")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = self.encode(prompt, chat=chat, system=system)
        gen = self.engine.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop)
        gen.method, gen.model_name = self.method, self.target.name
        return gen

    def generate(self, prompt: Prompt, **kw) -> Result:
        """One whole generation; same keywords as `Session.stream`."""
        return Result.of(self.stream(prompt, **kw).run())


#: methods that use a draft model when one is given (auto makes it one of its arms)
DRAFT_MODEL_METHODS = ("draft", "auto")


def stream(prompt: Prompt, model: str | LoadedModel = "qwen2.5-coder-1.5b-instruct", *, method: str = "ar",
           draft_model: Optional[str | LoadedModel] = None, tree: Optional[str] = None, k: Optional[int] = None,
           max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           seed: Optional[int] = None, stop: Sequence[str] = (), chat: bool = False,
           system: Optional[str] = None, device: str = "cpu", dtype: Optional[str] = None,
           drafter=None, cuda_graphs: Optional[bool] = None, compile: bool = False) -> Generation:
    """Start a generation and return the `Generation` to iterate (streaming chunks).
    prompt: text, or a list of {"role", "content"} messages (the chat template applies);
    cuda_graphs: on CUDA, replay forwards as CUDA graphs (default on; models.cuda.graphs);
    compile: on CUDA, torch.compile the graphed forward first (about half the step time, ~25 s
    more start-up per model; worth it for long or many generations)."""
    Session.check_options(method, max_new_tokens, temperature, top_k, top_p, seed)  # before any model loads
    session = Session(model, method=method, draft_model=draft_model, tree=tree, k=k, device=device, dtype=dtype,
                      drafter=drafter, cuda_graphs=cuda_graphs, compile=compile)
    return session.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stop=stop, chat=chat, system=system)


def generate(prompt: Prompt, model: str | LoadedModel = "qwen2.5-coder-1.5b-instruct", **kw) -> Result:
    """Generate a completion; same keywords as `stream`. Returns text, ids and stats."""
    return Result.of(stream(prompt, model, **kw).run())


def iter_text(gen: Generation) -> Iterator[str]:
    for chunk in gen:
        if chunk.text:
            yield chunk.text


@dataclass
class ImageResult:
    """`generate_images`' answer: pixels [n, C, H, W] in [0, 1], the codes of each image, and one
    engine `Stats` per image."""

    images: object
    codes: list
    stats: list
    method: str
    model: str

    def summary(self) -> dict:
        tokens = sum(s.new_tokens for s in self.stats)
        forwards = sum(s.target_forwards for s in self.stats)
        drafted = sum(s.draft_tokens for s in self.stats)
        seconds = sum(s.seconds for s in self.stats)
        return {"method": self.method, "model": self.model, "images": len(self.stats), "seconds": round(seconds, 4),
                "steps_per_image": round(forwards / max(len(self.stats), 1), 3),
                "tau": round(tokens / forwards, 4) if forwards else 0.0,
                "acceptance": round((tokens - forwards) / drafted, 4) if drafted else None}


def generate_images(model="mnist-vq", cls: int = 0, n: int = 16, *, method: str = "sjd", cfg: float = 1.0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = 0,
                    k: Optional[int] = None, lantern_k: int = 8, delta: float = 0.2, group: int = 8,
                    device: str = "cpu") -> ImageResult:
    """Sample n images of class `cls` from an image-token model with `method` (ar, sjd, lantern,
    gsd), classifier-free guidance `cfg` (1 = none). Image i uses seed + i, so two methods see the
    same seeds. k: sjd's window; lantern_k, delta / group: the relaxed rules' settings.

    Example:
        >>> import semiar
        >>> r = semiar.generate_images("mnist-vq", cls=3, n=2, method="sjd", seed=0)
        >>> r.images.shape, len(r.codes[0])
        (torch.Size([2, 1, 28, 28]), 49)
    """
    import torch

    from .methods import IMAGE_METHODS
    from .models.image import LoadedImageModel, load_image_model

    if method not in IMAGE_METHODS:
        raise InvalidArgumentError(f"method {method!r} is not for images; choose from {', '.join(IMAGE_METHODS)}")
    if n <= 0:
        raise InvalidArgumentError(f"n must be > 0, got {n}")
    target = model if isinstance(model, LoadedImageModel) else load_image_model(model, device=device)
    if cfg != target.cfg_scale:
        target = target.guided(cfg)
    prompt = target.prompt(cls)
    drafter = make_drafter(method, target, k=k, lantern_k=lantern_k, delta=delta, group=group)
    engine = Engine(target, drafter)
    codes, stats = [], []
    for i in range(n):
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=None if seed is None else seed + i)
        gen = engine.generate(prompt, max_new_tokens=target.tokens_per_image, sampling=sampling).run()
        codes.append(gen.token_ids)
        stats.append(gen.stats)
    images = target.decode(torch.tensor(codes))
    return ImageResult(images, codes, stats, method, target.name)


def save_image_grid(images, path: str, columns: Optional[int] = None, scale: int = 2) -> None:
    """Write images [n, C, H, W] in [0, 1] as one PNG grid (PIL), each pixel `scale` x `scale`."""
    import math

    import numpy as np
    from PIL import Image

    n, c, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 2), cols * (w + 2), c), dtype=np.uint8)
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    try:
        img.save(path)
    except (OSError, ValueError) as e:
        from .errors import SemiarError

        raise SemiarError(f"cannot write {path}: {e}") from None
