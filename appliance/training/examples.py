"""Turns checked examples into token ids with the base model's tokenizer: the prompt (chat
messages through the model's chat template) is context, only the answer is learnt."""

from __future__ import annotations

from typing import Any

IGNORE = -100  # label of tokens that are context, not learnt


def prompt_and_answer(tokenizer: Any, example: dict) -> tuple[str, str]:
    """The text the model sees and the text it must produce, for one example (a dict as in
    train.jsonl)."""
    eos = tokenizer.eos_token or ""
    if "messages" in example:
        messages = example["messages"]
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=False
        )
        return prompt, messages[-1]["content"] + eos
    return example["prompt"], example["completion"] + eos


def encode(tokenizer: Any, example: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; labels are IGNORE over the prompt."""
    prompt, answer = prompt_and_answer(tokenizer, example)
    # The chat template writes its own special tokens; plain prompts get the tokenizer's.
    special = "messages" not in example
    p = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return p + a, [IGNORE] * len(p) + a


def token_count(tokenizer: Any, example: dict) -> int:
    return len(encode(tokenizer, example)[0])
