"""Offline training text for the tiny chat model: templated ChatML dialogues plus shipped prose."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

DATA_DIR = Path(__file__).with_name("data")

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Separates packed training documents and pads batches; chat turns end with IM_END instead.
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)

# Enough dialogues that a default training run (~1.5M tokens) rarely sees the same one twice.
DEFAULT_DIALOGUES = 40_000

# The exact layout of render_chatml, as the Jinja template Hugging Face and vLLM apply.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Message = dict[str, str]
Turn = tuple[str, str]

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are Tiny, a friendly assistant. Keep your answers short.",
    "You are a helpful assistant that answers in one or two sentences.",
    "You are a kind and patient assistant.",
)
# Said before a factual answer now and then, so the model tolerates them in either role.
ANSWER_PREFIXES = ("Sure. ", "Sure! ", "Good question. ", "Of course. ", "Let me think. ")
QUESTION_PREFIXES = ("Please tell me: ", "Quick question. ", "I wonder, ", "Hey, ")

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class Explanation:
    """One shipped explanation: its topic, ways to ask for it, and the answer."""

    topic: str
    questions: tuple[str, ...]
    answer: str


@cache
def load_facts() -> dict[str, Any]:
    """The fact tables (colors, countries, animals, ...) from data/facts.yaml."""
    return yaml.safe_load((DATA_DIR / "facts.yaml").read_text())


@cache
def load_smalltalk() -> dict[str, dict[str, list[str]]]:
    """Small-talk groups (user phrasings and assistant replies) from data/smalltalk.yaml."""
    return yaml.safe_load((DATA_DIR / "smalltalk.yaml").read_text())


@cache
def load_explanations() -> tuple[Explanation, ...]:
    """The question-and-answer blocks of data/explanations.txt."""
    entries: list[Explanation] = []
    topic, questions, answer = "", [], ""
    for line in [*(DATA_DIR / "explanations.txt").read_text().splitlines(), "## "]:
        if line.startswith("## "):
            if topic:
                entries.append(Explanation(topic, tuple(questions), answer))
            topic, questions, answer = line[3:].strip(), [], ""
        elif line.startswith("Q: "):
            questions.append(line[3:].strip())
        elif line.startswith("A: "):
            answer = line[3:].strip()
    return tuple(entries)


@cache
def load_stories() -> tuple[str, ...]:
    """The short plain-text stories of data/stories.txt, one paragraph each."""
    text = (DATA_DIR / "stories.txt").read_text()
    return tuple(p.strip() for p in text.split("\n\n") if p.strip())


def render_chatml(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """ChatML text for messages, identical to what CHAT_TEMPLATE renders."""
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return out + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _the(noun_phrase: str) -> str:
    """'a cow' -> 'the cow' (for 'Tell me about the cow.'); other phrases unchanged."""
    for article in ("a ", "an "):
        if noun_phrase.startswith(article):
            return "the " + noun_phrase[len(article) :]
    return noun_phrase


class _DialogueWriter:
    """Writes random question/answer turns from the fact tables; one instance per corpus."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.facts = load_facts()
        self.smalltalk = load_smalltalk()
        self.explanations = load_explanations()
        self.stories = load_stories()
        self.numbers: list[str] = self.facts["numbers"]
        # Relative frequencies; small talk and explanations carry most of the varied language.
        self.topics: list[tuple[Callable[[], Turn], float]] = [
            (self.small_talk, 14),
            (self.color, 10),
            (self.country, 14),
            (self.animal, 14),
            (self.opposite, 5),
            (self.tool, 8),
            (self.job, 7),
            (self.sequence, 6),
            (self.arithmetic, 5),
            (self.explanation, 14),
            (self.story, 3),
        ]

    def pick(self, options: Sequence[str]) -> str:
        return self.rng.choice(options)

    def turn(self) -> Turn:
        funcs, weights = zip(*self.topics, strict=True)
        user, answer = self.rng.choices(funcs, weights=weights)[0]()
        return self.vary_question(user), answer

    def vary_question(self, question: str) -> str:
        """Sometimes lower-case, unpunctuated or prefixed, as people really type."""
        r = self.rng.random()
        if r < 0.08:
            return question[:1].lower() + question[1:].rstrip("?.!")
        if r < 0.12:
            return self.pick(QUESTION_PREFIXES) + question[:1].lower() + question[1:]
        return question

    def fact(self, answer: str) -> str:
        """A factual answer, now and then with a conversational opener."""
        if self.rng.random() < 0.12:
            return self.pick(ANSWER_PREFIXES) + answer
        return answer

    def small_talk(self) -> Turn:
        group = self.smalltalk[self.pick(sorted(self.smalltalk))]
        return self.pick(group["user"]), self.pick(group["assistant"])

    def color(self) -> Turn:
        thing, color = self.pick(self.facts["colors"])
        kind = self.rng.random()
        if kind < 0.2:
            other = self.pick([c for _, c in self.facts["colors"] if c != color])
            q = f"Is {thing} {other}?"
            return q, self.fact(f"No, {thing} is not {other}. {_cap(thing)} is {color}.")
        if kind < 0.3:
            return f"Is {thing} {color}?", self.fact(f"Yes, {thing} is {color}.")
        q = self.pick(
            [
                "What color is {t}?",
                "What is the color of {t}?",
                "Which color is {t}?",
                "Can you tell me what color {t} is?",
                "Do you know the color of {t}?",
            ]
        ).format(t=thing)
        a = self.pick(["{T} is {c}.", "The color of {t} is {c}.", "{T} is usually {c}."])
        return q, self.fact(a.format(t=thing, T=_cap(thing), c=color))

    def country(self) -> Turn:
        name, capital, language, continent = self.pick(self.facts["countries"])
        kind = self.rng.randrange(6)
        if kind <= 1:
            q = self.pick(
                [
                    "What is the capital of {n}?",
                    "Which city is the capital of {n}?",
                    "Do you know the capital of {n}?",
                    "Tell me the capital of {n}.",
                    "What is the capital city of {n}?",
                ]
            ).format(n=name)
            a = self.pick(["The capital of {n} is {c}.", "{c} is the capital of {n}."])
            return q, self.fact(a.format(n=name, c=capital))
        if kind == 2:
            q = self.pick(["Where is {c}?", "Which country is {c} in?", "What is {c}?"])
            a = f"{capital} is in {name}. It is the capital of {name}."
            return q.format(c=capital), self.fact(a)
        if kind == 3:
            q = self.pick(
                [
                    "What language do people speak in {n}?",
                    "What do people speak in {n}?",
                    "Which language is spoken in {n}?",
                ]
            ).format(n=name)
            return q, self.fact(f"People in {name} speak {language}.")
        if kind == 4:
            if self.rng.random() < 0.3:
                others = {c for *_, c in self.facts["countries"]} - {continent}
                other = self.pick(sorted(others))
                return f"Is {name} in {other}?", self.fact(f"No, {name} is in {continent}.")
            q = self.pick(["Where is {n}?", "Which continent is {n} in?", "Where is {n} located?"])
            return q.format(n=name), self.fact(f"{name} is in {continent}.")
        q = self.pick(["Tell me about {n}.", "What do you know about {n}?", "What is {n}?"])
        a = (
            f"{name} is a country in {continent}. Its capital is {capital}, "
            f"and people there speak {language}."
        )
        return q.format(n=name), self.fact(a)

    def animal(self) -> Turn:
        name, sound, legs, home, food, what = self.pick(self.facts["animals"])
        a_name = _cap(name)
        kinds = ["home", "food", "what", "about"]
        if sound is not None:
            kinds += ["sound", "sound"]  # the favourite question about animals
        if legs is not None:
            kinds.append("legs")
        kind = self.pick(kinds)
        if kind == "sound":
            q = self.pick(
                [
                    "What sound does {a} make?",
                    "What does {a} say?",
                    "What noise does {a} make?",
                ]
            )
            return q.format(a=name), self.fact(f"{a_name} {sound}.")
        if kind == "legs":
            count = "no legs" if legs == 0 else f"{self.numbers[legs]} legs"
            return f"How many legs does {name} have?", self.fact(f"{a_name} has {count}.")
        if kind == "home":
            q = self.pick(["Where does {a} live?", "Where can I find {a}?"])
            return q.format(a=name), self.fact(f"{a_name} lives {home}.")
        if kind == "food":
            q = self.pick(["What does {a} eat?", "What food does {a} eat?"])
            return q.format(a=name), self.fact(f"{a_name} eats {food}.")
        if kind == "what":
            return f"What is {name}?", self.fact(f"{a_name} is {what}.")
        q = self.pick(["Tell me about {t}.", "What do you know about {t}?"]).format(t=_the(name))
        a = f"{a_name} is {what}. It lives {home} and eats {food}."
        if sound is not None:
            a += f" It {sound}."
        return q, self.fact(a)

    def opposite(self) -> Turn:
        word, other = self.pick(self.facts["opposites"])
        if self.rng.random() < 0.5:
            word, other = other, word
        q = self.pick(
            [
                "What is the opposite of {w}?",
                "What is the opposite of the word {w}?",
                "Give me the opposite of {w}.",
                "What word means the opposite of {w}?",
            ]
        ).format(w=word)
        return q, self.fact(f"The opposite of {word} is {other}.")

    def tool(self) -> Turn:
        thing, use = self.pick(self.facts["tools"])
        if self.rng.random() < 0.3:
            q = self.pick(["What do I use to {u}?", "What can I use to {u}?"]).format(u=use)
            return q, self.fact(f"You can use {thing} to {use}.")
        q = self.pick(
            [
                "What is {t} used for?",
                "What do people use {t} for?",
                "What is {t} for?",
                "Why do we need {t}?",
            ]
        ).format(t=thing)
        a = self.pick(["{T} is used to {u}.", "People use {t} to {u}.", "You use {t} to {u}."])
        return q, self.fact(a.format(t=thing, T=_cap(thing), u=use))

    def job(self) -> Turn:
        worker, does = self.pick(self.facts["jobs"])
        kind = self.rng.randrange(3)
        if kind == 0:
            return f"Who {does}?", self.fact(f"{_cap(worker)} {does}.")
        if kind == 1:
            return f"What is {worker}?", self.fact(f"{_cap(worker)} is a person who {does}.")
        q = self.pick(["What does {w} do?", "What is the job of {w}?"]).format(w=_the(worker))
        return q, self.fact(f"{_cap(worker)} {does}.")

    def sequence(self) -> Turn:
        kind = self.pick(["day", "month", "season", "number"])
        items = self.numbers[:11] if kind == "number" else self.facts["sequences"][kind]
        # Days, months and seasons wrap around; counting does not.
        i = self.rng.randrange(len(items) - (kind == "number"))
        item, after = items[i], items[(i + 1) % len(items)]
        if self.rng.random() < 0.5:
            q = self.pick(["What {k} comes after {x}?", "Which {k} is after {x}?"])
            return q.format(k=kind, x=item), self.fact(f"{_cap(after)} comes after {item}.")
        q = self.pick(["What {k} comes before {x}?", "Which {k} is before {x}?"])
        return q.format(k=kind, x=after), self.fact(f"{_cap(item)} comes before {after}.")

    def arithmetic(self) -> Turn:
        n = self.numbers
        kind = self.rng.randrange(3)
        if kind == 0:
            top = self.rng.randrange(3, 11)
            q = self.pick(["Count to {n}.", "Can you count to {n}?", "Count from one to {n}."])
            words = ", ".join(n[1 : top + 1])
            return q.format(n=n[top]), self.fact(f"{_cap(words)}.")
        a, b = self.rng.randrange(11), self.rng.randrange(11)
        if kind == 1:
            q = self.pick(["What is {a} plus {b}?", "How much is {a} plus {b}?"])
            return q.format(a=n[a], b=n[b]), self.fact(f"{_cap(n[a])} plus {n[b]} is {n[a + b]}.")
        a, b = max(a, b), min(a, b)
        q = self.pick(["What is {a} minus {b}?", "How much is {a} minus {b}?"])
        return q.format(a=n[a], b=n[b]), self.fact(f"{_cap(n[a])} minus {n[b]} is {n[a - b]}.")

    def explanation(self) -> Turn:
        entry = self.pick(self.explanations)
        if self.rng.random() < 0.2:
            q = self.pick(["Tell me about {t}.", "What do you know about {t}?"])
            return q.format(t=entry.topic), entry.answer
        return self.pick(entry.questions), entry.answer

    def story(self) -> Turn:
        q = self.pick(
            [
                "Tell me a story.",
                "Can you tell me a short story?",
                "Tell me a bedtime story.",
                "Please tell me a story.",
            ]
        )
        return q, self.pick(self.stories)

    def dialogue(self) -> list[Message]:
        """One conversation: an optional system prompt and one to three exchanges."""
        messages: list[Message] = []
        if self.rng.random() < 0.3:
            messages.append({"role": "system", "content": self.pick(SYSTEM_PROMPTS)})
        turns = self.rng.choices([1, 2, 3], weights=[65, 25, 10])[0]
        for i in range(turns):
            # Multi-turn chats often open with a greeting and close with thanks, as real ones do.
            if turns > 1 and i == 0 and self.rng.random() < 0.4:
                user, answer = self._group("greeting")
            elif turns > 1 and i == turns - 1 and self.rng.random() < 0.3:
                user, answer = self._group(self.pick(["thanks", "goodbye"]))
            else:
                user, answer = self.turn()
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _group(self, name: str) -> Turn:
        group = self.smalltalk[name]
        return self.pick(group["user"]), self.pick(group["assistant"])


def generate_dialogues(count: int, seed: int = 0) -> list[list[Message]]:
    """count random conversations (lists of role/content messages), the same for the same seed."""
    writer = _DialogueWriter(random.Random(seed))
    return [writer.dialogue() for _ in range(count)]


def plain_texts() -> list[str]:
    """The shipped prose (stories and explanation answers) as plain documents."""
    return [*load_stories(), *(e.answer for e in load_explanations())]


def build_corpus(seed: int = 0, dialogues: int = DEFAULT_DIALOGUES) -> list[str]:
    """Training documents: ChatML-rendered dialogues plus a little plain prose, shuffled."""
    docs = [render_chatml(d) for d in generate_dialogues(dialogues, seed)]
    # Prose is a small share (about 1%); three copies so it is not drowned out entirely.
    docs += plain_texts() * 3
    random.Random(seed + 1).shuffle(docs)
    return docs


def tokenizer_training_texts(docs: Iterable[str]) -> Iterable[str]:
    """The documents with ChatML markers removed, so BPE merges never span special tokens."""
    pattern = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    for doc in docs:
        yield pattern.sub("\n", doc)


def corpus_words(texts: Iterable[str]) -> set[str]:
    """Lower-cased words (letters and apostrophes) in texts, without special-token names."""
    words: set[str] = set()
    for text in tokenizer_training_texts(texts):
        words.update(_WORD_RE.findall(text.lower()))
    return words


def words_of(text: str) -> list[str]:
    """The lower-cased words of text, split the same way corpus_words does."""
    return _WORD_RE.findall(text.lower())


@cache
def vocabulary(seed: int = 0) -> frozenset[str]:
    """Every word the default corpus uses: what a trained tiny model's answers should consist of."""
    return frozenset(corpus_words(build_corpus(seed)))
