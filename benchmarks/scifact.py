"""SciFact (BEIR's test split): a public retrieval set whose relevance judgements nobody here
wrote, and the measures reported on it (recall@k and nDCG@k over documents).

SciFact (Wadden et al., EMNLP 2020) pairs scientific claims with the abstracts that support or
refute them: 5183 abstracts, and 300 claims of its dev split with the abstracts each cites as
judged relevant (339 pairs). BEIR (Thakur et al., 2021) uses exactly these as its SciFact test set
(queries.jsonl and qrels/test.tsv); the copy read here was checked against BEIR's files: the same
300 texts and the same 339 pairs.

The data is not in this repository. It is read from `scifact.zip`, the allenai/scifact release as
CSV files (claims_validation.csv, corpus_train.csv), as committed in the public repository
sumithra-p-v/claimverifier (data/scifact.zip, 2.9 MB). Get it with the search tool's
`fetch github:sumithra-p-v/claimverifier`, which leaves a bare git directory at MIRROR below; the
benchmark reads the archive out of it (`git show`), or takes the zip file itself.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import math
import re
import statistics
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPOSITORY = "sumithra-p-v/claimverifier"
ARCHIVE_PATH = "data/scifact.zip"
# The commit the published figures were measured on, and the archive's digest at it.
COMMIT = "b42f1c3444b28884ddcfadffafbfe223646c6c37"
SHA256 = "a798a7046af0f6fa04476448459ce7cafeea5bd90d4d99c53a0e27dc5e1a4673"
MIRROR = Path("/work/.mirror/sumithra-p-v+claimverifier/repo")
HOW_TO_GET = (
    f"SciFact is not in this repository: `fetch github:{REPOSITORY}` (the search tool) puts it "
    f"at {MIRROR}; or pass --scifact with the path of that bare git directory or of its "
    f"{ARCHIVE_PATH}"
)

# numpy's text form of an array of strings, as the CSV holds each abstract: "['First.'\n 'Sec…']";
# each element is a Python string literal, in double quotes when it holds a single quote.
_LITERAL = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")


@dataclass(frozen=True)
class Abstract:
    doc_id: str
    title: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        """As a user would upload it: the title, a blank line, the abstract as one paragraph."""
        return f"{self.title}\n\n{' '.join(self.sentences)}\n"


@dataclass(frozen=True)
class Query:
    query_id: str
    text: str
    relevant: frozenset[str]
    """Document ids judged relevant (all with relevance 1 in SciFact)."""


@dataclass(frozen=True)
class PublicSet:
    corpus: list[Abstract]
    queries: list[Query]
    source: dict
    """Where it came from: repository, commit, path, sha256 of the archive."""


def read_archive(location: Path) -> tuple[bytes, str | None]:
    """The archive's bytes and the commit they came from (None for a plain file); `location` is
    the zip file or a bare git directory holding it (the pinned commit if it has it, else HEAD)."""
    if location.is_file():
        return location.read_bytes(), None
    if not (location / "HEAD").is_file():
        raise FileNotFoundError(f"{location}: neither a zip file nor a git directory. {HOW_TO_GET}")
    for ref in (COMMIT, "HEAD"):
        commit = _git(location, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        if commit:
            data = subprocess.run(
                ["git", "--git-dir", str(location), "show", f"{commit}:{ARCHIVE_PATH}"],
                capture_output=True,
                check=True,
            ).stdout
            return data, commit
    raise FileNotFoundError(f"{location}: no commit with {ARCHIVE_PATH}. {HOW_TO_GET}")


def _git(git_dir: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "--git-dir", str(git_dir), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def load(location: Path = MIRROR) -> PublicSet:
    """The corpus and the 300 test queries with their judgements."""
    if not location.exists():
        raise FileNotFoundError(f"{location} does not exist. {HOW_TO_GET}")
    data, commit = read_archive(location)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        corpus_csv = archive.read("corpus_train.csv").decode()
        claims_csv = archive.read("claims_validation.csv").decode()
    source = {
        "name": "BEIR SciFact, test split (SciFact dev claims, cited abstracts as judgements)",
        "repository": REPOSITORY,
        "commit": commit,
        "path": ARCHIVE_PATH,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return PublicSet(parse_corpus(corpus_csv), parse_claims(claims_csv), source)


def parse_corpus(text: str) -> list[Abstract]:
    """corpus_train.csv: doc_id, title, abstract (numpy's form of a list of sentences)."""
    return [
        Abstract(row["doc_id"], row["title"].strip(), parse_sentences(row["abstract"]))
        for row in csv.DictReader(io.StringIO(text))
    ]


def parse_sentences(field: str) -> tuple[str, ...]:
    """The sentences of numpy's text form of a string array; raises ValueError on anything else
    (a truncated array, a stray character), so a format change cannot pass unnoticed."""
    inner = field.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise ValueError(f"not an array of strings: {field[:60]!r}")
    inner = inner[1:-1]
    literals = list(_LITERAL.finditer(inner))
    leftover = _LITERAL.sub("", inner)
    if leftover.strip():
        raise ValueError(f"unexpected text between sentences: {leftover.strip()[:60]!r}")
    return tuple(ast.literal_eval(m.group()).strip() for m in literals)


def parse_claims(text: str) -> list[Query]:
    """claims_validation.csv: one row per (claim, evidence set); the judged-relevant documents
    of a claim are its cited_doc_ids (what BEIR's qrels hold), in file order of the claims."""
    claims: dict[str, tuple[str, set[str]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        _, relevant = claims.setdefault(row["id"], (row["claim"], set()))
        relevant.update(re.findall(r"\d+", row["cited_doc_ids"]))
    return [Query(qid, claim, frozenset(rel)) for qid, (claim, rel) in claims.items() if rel]


# Measures over a ranking of distinct document ids, best first (BEIR's definitions, binary
# relevance).


def recall_at(ranking: Sequence[str], relevant: frozenset[str], k: int) -> float:
    """Share of the relevant documents found in the first k."""
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def ndcg_at(ranking: Sequence[str], relevant: frozenset[str], k: int) -> float:
    """Discounted gain of the relevant documents in the first k, over the best possible."""
    dcg = sum(1 / math.log2(i + 2) for i, doc in enumerate(ranking[:k]) if doc in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal


def distinct(doc_ids: Sequence[str]) -> list[str]:
    """Documents in the order of their best chunk: a document counts once, where it first
    appears (its best chunk ranks it)."""
    return list(dict.fromkeys(doc_ids))


def measures(rankings: Sequence[Sequence[str]], queries: Sequence[Query]) -> dict[str, float]:
    """recall@5, recall@10 and nDCG@10, each the mean over the queries (rankings[i] answers
    queries[i]), to 3 decimals."""
    pairs = list(zip(rankings, queries, strict=True))

    def mean(values) -> float:
        return round(statistics.fmean(values), 3)

    return {
        "recall_at_5": mean(recall_at(r, q.relevant, 5) for r, q in pairs),
        "recall_at_10": mean(recall_at(r, q.relevant, 10) for r, q in pairs),
        "ndcg_at_10": mean(ndcg_at(r, q.relevant, 10) for r, q in pairs),
    }
