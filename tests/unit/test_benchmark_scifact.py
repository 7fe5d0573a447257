"""The SciFact loader and measures of benchmarks/rag_quality.py, on a tiny archive in the
release's own format (two abstracts, three claims), made here."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import subprocess
import zipfile
from pathlib import Path

import pytest

from benchmarks import scifact

# Abstracts as the CSV holds them: numpy's text form of an array of sentences, a sentence with
# a single quote in double quotes.
CORPUS = [
    {
        "doc_id": "4983",
        "title": "Microstructural development of newborn white matter.",
        "abstract": "['Alterations of the architecture affect development.'\n"
        " \"The infants' anisotropy was lower (n = 17).\"\n 'Ends here.']",
        "structured": "False",
    },
    {
        "doc_id": "5836",
        "title": "Induction of myelodysplasia.",
        "abstract": "['Only one sentence.']",
        "structured": "False",
    },
]
# One row per evidence set: claim 1 twice; claim 7 has no judgement and is left out, as in BEIR.
CLAIMS = [
    ("1", "White matter develops early.", "4983", "SUPPORT", "[1]", "[4983]"),
    ("1", "White matter develops early.", "4983", "SUPPORT", "[2]", "[4983]"),
    ("3", "Myelodysplasia is induced.", "", "", "[]", "[5836 4983]"),
    ("7", "A claim without citations.", "", "", "[]", "[]"),
]


def _csv(header: list[str], rows: list) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "scifact.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "corpus_train.csv",
            _csv(list(CORPUS[0]), [list(row.values()) for row in CORPUS]),
        )
        header = ["id", "claim", "evidence_doc_id", "evidence_label", "evidence_sentences"]
        z.writestr("claims_validation.csv", _csv([*header, "cited_doc_ids"], CLAIMS))
    return path


def test_the_archive_loads_into_abstracts_and_judged_queries(archive: Path):
    public = scifact.load(archive)
    first, second = public.corpus
    assert first.doc_id == "4983"
    assert first.sentences == (
        "Alterations of the architecture affect development.",
        "The infants' anisotropy was lower (n = 17).",
        "Ends here.",
    )
    assert first.text.startswith("Microstructural development of newborn white matter.\n\n")
    assert second.sentences == ("Only one sentence.",)
    assert [(q.query_id, q.relevant) for q in public.queries] == [
        ("1", frozenset({"4983"})),
        ("3", frozenset({"5836", "4983"})),
    ]
    assert public.source["commit"] is None
    assert public.source["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_the_archive_is_read_out_of_a_bare_git_directory(archive: Path, tmp_path: Path):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "scifact.zip").write_bytes(archive.read_bytes())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "data"], check=True)
    bare = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    head = subprocess.run(
        ["git", "--git-dir", str(bare), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    public = scifact.load(bare)
    assert public.source["commit"] == head  # not the pinned commit, which it lacks: HEAD
    assert len(public.corpus) == 2


def test_a_missing_set_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"fetch github:sumithra-p-v/claimverifier"):
        scifact.load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="neither a zip file nor a git directory"):
        scifact.load(tmp_path)


@pytest.mark.parametrize(
    "field",
    [
        "['Cut short.' ... 'The end.']",  # numpy's summary of a long array
        "Not an array.",
    ],
)
def test_anything_but_a_whole_array_of_sentences_is_refused(field: str):
    with pytest.raises(ValueError):
        scifact.parse_sentences(field)


def test_measures_follow_beir_definitions():
    relevant = frozenset({"a", "b"})
    ranking = scifact.distinct(["x", "a", "a", "y", "z", "w", "v", "u", "t", "s", "b"])
    assert ranking[:2] == ["x", "a"]  # a document counts once, at its best chunk
    assert scifact.recall_at(ranking, relevant, 5) == 0.5
    assert scifact.recall_at(ranking, relevant, 10) == 1.0
    ideal = 1 + 1 / math.log2(3)
    assert scifact.ndcg_at(ranking, relevant, 10) == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(11)) / ideal
    )
    assert scifact.ndcg_at(["a", "b"], relevant, 10) == 1.0
    queries = [
        scifact.Query("1", "q", relevant),
        scifact.Query("2", "q", frozenset({"c"})),
    ]
    assert scifact.measures([ranking, ["c"]], queries) == {
        "recall_at_5": 0.75,
        "recall_at_10": 1.0,
        "ndcg_at_10": round(((1 / math.log2(3) + 1 / math.log2(11)) / ideal + 1) / 2, 3),
    }
