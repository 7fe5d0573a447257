"""The built tiny chat model: complete files, offline loading, chat template, real words."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from appliance.model_builders import corpus, tiny
from appliance.model_builders.tiny import REQUIRED_FILES, build_tiny_model, tiny_model_exists

pytestmark = pytest.mark.slow

# (prompt, a word a sensible answer contains); all from the corpus domain.
FACT_PROMPTS = [
    ("What color is the sky?", "blue"),
    ("What is the capital of France?", "paris"),
    ("What does a cow say?", "moo"),
    ("How many legs does a spider have?", "eight"),
    ("What does a doctor do?", "sick"),
    ("What is the opposite of hot?", "cold"),
]
OTHER_PROMPTS = ["Hello!", "Who are you?", "Why is the sky blue?", "Tell me about Japan."]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    return tok, model.eval()


def _answer(tok, model, prompt: str, max_new_tokens: int = 60) -> tuple[str, bool]:
    """Greedy reply to one user message, and whether it ended with <|im_end|>."""
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stopped = tok.convert_tokens_to_ids(corpus.IM_END) in new
    return tok.decode(new, skip_special_tokens=True).strip(), stopped


def _word_problems(answers: list[str]) -> list[str]:
    """Why these answers look like noise rather than language; empty when they look fine."""
    problems = []
    words = [w for a in answers for w in corpus.words_of(a)]
    known = sum(w in corpus.vocabulary() for w in words)
    if len(words) < 20:
        problems.append(f"only {len(words)} words in all")
    elif known / len(words) < 0.7:
        problems.append(f"only {known}/{len(words)} generated words are corpus words")
    for a in answers:
        counts = Counter(corpus.words_of(a))
        # One word over and over (what an untrained model does) is not an answer.
        if sum(counts.values()) >= 4 and counts.most_common(1)[0][1] > 0.5 * sum(counts.values()):
            problems.append(f"degenerate repetition: {a[:80]!r}")
    return problems


def test_all_files_present(tiny_model_dir: Path):
    assert tiny_model_exists(tiny_model_dir)
    for name in REQUIRED_FILES:
        assert (tiny_model_dir / name).stat().st_size > 0
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] >= 512
    info = json.loads((tiny_model_dir / tiny.BUILD_INFO_FILE).read_text())
    assert info["steps"] >= tiny.MIN_STEPS
    # The default budget is 170 s for the whole build, a little slack for the save itself; only a
    # machine too slow to train the floor of steps in it goes over, and then stops at the floor.
    assert info["build_seconds"] < 175 or info["steps"] == tiny.MIN_STEPS


def test_loads_offline_with_chatml_special_tokens(loaded, tiny_model_dir: Path):
    tok, model = loaded
    im_end = tok.convert_tokens_to_ids(corpus.IM_END)
    assert tok.eos_token == corpus.IM_END and tok.eos_token_id == im_end
    assert tok.pad_token == corpus.END_OF_TEXT
    assert tok.convert_tokens_to_ids(corpus.IM_START) != tok.unk_token_id
    assert model.generation_config.eos_token_id in (im_end, [im_end])
    assert model.config.vocab_size >= len(tok)
    saved = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == corpus.CHAT_TEMPLATE
    assert json.loads((tiny_model_dir / "special_tokens_map.json").read_text())["eos_token"] == (
        corpus.IM_END
    )


def test_chat_template_renders_chatml(loaded):
    tok, _ = loaded
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi! What would you like to know?"},
        {"role": "user", "content": "What color is the sky?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == corpus.render_chatml(messages, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(corpus.IM_START)
    assert ids.count(tok.convert_tokens_to_ids(corpus.IM_END)) == 4
    assert tok.decode(ids) == text  # byte-level BPE round-trips exactly


def test_greedy_answers_are_real_words_and_stop(loaded):
    tok, model = loaded
    replies = [_answer(tok, model, p) for p, _ in FACT_PROMPTS] + [
        _answer(tok, model, p) for p in OTHER_PROMPTS
    ]
    answers = [a for a, _ in replies]
    assert not _word_problems(answers), answers
    # Replies end with <|im_end|> on their own, well before the token limit.
    assert sum(stopped for _, stopped in replies) >= 0.8 * len(replies), replies
    # Coherent-ish: most factual questions get an answer that names the fact.
    hits = [k in corpus.words_of(a) for (_, k), a in zip(FACT_PROMPTS, answers, strict=False)]
    assert sum(hits) >= len(FACT_PROMPTS) / 2, list(zip(FACT_PROMPTS, answers, strict=False))


def test_word_check_rejects_an_untrained_model(loaded):
    """The check above is real: the same architecture with random weights fails it."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    tok, model = loaded
    for seed in (0, 3):
        torch.manual_seed(seed)
        noise = LlamaForCausalLM(model.config).eval()
        answers = [_answer(tok, noise, p, max_new_tokens=30)[0] for p, _ in FACT_PROMPTS]
        assert _word_problems(answers), answers


def test_partial_directory_is_not_a_model(tiny_model_dir: Path, tmp_path: Path):
    partial = tmp_path / "tiny-chat"
    shutil.copytree(tiny_model_dir, partial)
    (partial / "model.safetensors").write_bytes(b"")  # a killed copy or write
    assert not tiny_model_exists(partial)
    (partial / "model.safetensors").unlink()
    assert not tiny_model_exists(partial)
    assert not tiny_model_exists(tmp_path / "missing")


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_interrupted_build_leaves_old_model_and_no_temp_dir(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "tiny-chat"
    shutil.copytree(tiny_model_dir, out)
    before = (out / "model.safetensors").read_bytes()
    # What a SIGKILLed build leaves: a half-written temp dir named after its (dead) process.
    stale = tmp_path / f".tiny-chat.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert not tiny_model_exists(stale)

    def interrupted_save(model, tokenizer, directory: Path) -> None:
        (directory / "config.json").write_text("{")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the weights

    monkeypatch.setattr(tiny, "_save_model", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_model(out, time_budget_s=0, min_steps=0)  # no training: straight to saving
    assert tiny_model_exists(out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-chat"]


def test_interrupted_first_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "models" / "tiny-chat"

    def interrupted_save(model, tokenizer, directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_save_model", interrupted_save)
    with pytest.raises(RuntimeError):
        build_tiny_model(out, time_budget_s=0, min_steps=0)
    assert not tiny_model_exists(out)
    assert list(out.parent.iterdir()) == []
