"""Checks a fine-tuning dataset before anything is queued, line by line, and splits off the
held-out evaluation examples. A dataset is JSONL: one example per line, either chat messages
(`{"messages": [{"role": ..., "content": ...}, ...]}`, ending with the assistant's answer that
is learnt) or `{"prompt": ..., "completion": ...}`; one format per file."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import ApplianceError
from appliance.lines import jsonl_lines

ROLES = frozenset({"system", "user", "assistant"})
# Report at most this many problems: a broken export fails on every line the same way.
MAX_PROBLEMS = 50


class DatasetError(ApplianceError):
    """The dataset has problems; `problems` holds them as "line N: what" strings."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        more = f" (showing {len(problems)} of {total})" if total and total > len(problems) else ""
        super().__init__(
            f"the dataset has {total or len(problems)} problem(s){more}:\n" + "\n".join(problems)
        )


@dataclass(frozen=True)
class Example:
    """One training example: the conversation so far, and the answer to learn."""

    line: int
    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    completion: str = ""

    def to_json(self) -> dict:
        if self.messages is not None:
            return {"line": self.line, "messages": list(self.messages)}
        return {"line": self.line, "prompt": self.prompt, "completion": self.completion}


@dataclass(frozen=True)
class Dataset:
    """Valid examples, split into training and held-out evaluation examples."""

    format: str  # "chat" or "completion"
    train: list[Example]
    eval: list[Example]


def _chat(obj: dict, line: int) -> Example:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        if "role" not in m:
            raise ValueError(f"message {i} has no role")
        if m["role"] not in ROLES:
            raise ValueError(
                f"message {i} has role {m['role']!r}; expected one of {', '.join(sorted(ROLES))}"
            )
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"message {i} ({m['role']}) has empty or missing content")
        if set(m) - {"role", "content", "name"}:
            raise ValueError(
                f"message {i} has unknown fields {sorted(set(m) - {'role', 'content', 'name'})}"
            )
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer to learn")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user message")
    clean = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return Example(line, messages=clean)


def _completion(obj: dict, line: int) -> Example:
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise ValueError(f'"{key}" is empty or not a string')
    return Example(line, prompt=obj["prompt"], completion=obj["completion"])


def parse_dataset(
    data: bytes,
    *,
    count_tokens: Callable[[Example], int] | None = None,
    max_tokens: int = 2048,
    eval_fraction: float = 0.1,
    min_examples: int = 4,
    seed: int = 0,
) -> Dataset:
    """Every line checked (JSON, format, roles, empty fields, length in tokens when
    `count_tokens` is given); DatasetError lists what is wrong with line numbers."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError([f"line {line}: not UTF-8 text"]) from None
    problems: list[str] = []
    examples: list[Example] = []
    fmt = None
    for n, raw in enumerate(jsonl_lines(text), 1):
        if not raw.strip():
            continue  # blank lines (a trailing newline, say) carry nothing
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            problems.append(f"line {n}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {n}: expected a JSON object")
            continue
        kind = "chat" if "messages" in obj else "completion" if "prompt" in obj else None
        if kind is None:
            problems.append(f'line {n}: neither "messages" nor "prompt"/"completion"')
            continue
        if fmt is None:
            fmt = kind
        elif kind != fmt:
            problems.append(f"line {n}: a {kind} example in a {fmt} dataset (one format per file)")
            continue
        try:
            example = _chat(obj, n) if kind == "chat" else _completion(obj, n)
        except (ValueError, TypeError) as exc:
            problems.append(f"line {n}: {exc}")
            continue
        if count_tokens is not None:
            tokens = count_tokens(example)
            if tokens > max_tokens:
                problems.append(f"line {n}: {tokens} tokens, more than the {max_tokens} allowed")
                continue
        examples.append(example)
    if not problems and len(examples) < min_examples:
        problems.append(
            f"{len(examples)} example(s); at least {min_examples} are needed "
            "(some are held out for evaluation)"
        )
    if problems:
        raise DatasetError(problems[:MAX_PROBLEMS], len(problems))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * eval_fraction))
    held = set(order[:n_eval])
    return Dataset(
        format=fmt or "chat",
        train=[e for i, e in enumerate(examples) if i not in held],
        eval=[e for i, e in enumerate(examples) if i in held],
    )
