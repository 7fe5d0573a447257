"""The keyword index of a knowledge base: SQLite FTS5 ranked by its bm25(), one file per base.

Rows carry the document version they belong to, like the chunks in Chroma: a version's rows are
written before the registry makes it current and deleted after it stops being current, so the
registry decides what counts here exactly as it does for vectors, and a crash leaves nothing
that queries can see half written (the store's garbage collection deletes the rest).
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import threading
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence, Set
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from appliance.rag.chunking import Chunk
from appliance.rag.sqlite_db import ConnectionPool

# Only the commonest English function words, left out of queries: they match almost every chunk
# (so a query with them reads most of the index) and add noise, while rarer words (even short
# ones such as "no" or "not") can matter. They stay in the index: FTS5's tokenizer cannot drop
# them without a C extension, and rows that keep them cost little.
_STOP_LIST = (
    "a an and are as at be by for from has have in is it its of on or that the this to was were "
    "will with"
)
STOP_WORDS = frozenset(_STOP_LIST.split())
_WORD = re.compile(r"\w+")
# Combining diacritical marks (U+0300 to U+036F): what unicode61's remove_diacritics drops.
_DIACRITICS = re.compile("[\u0300-\u036f]")
# More would only slow the query: a question is never this long, a pasted page may be.
MAX_QUERY_TERMS = 64
# Most chunks a query ranks with FTS5's bm25(), about: see _plan.
CANDIDATE_POSTINGS = 10_000
# Candidates scored again by every word of the query, when the rarest found them: see _plan.
RESCORED = 100
# Word counts remembered over all indexes (about 200 bytes each): see _WordCounts.
COUNTS_REMEMBERED = 100_000
COUNT_STALE = 0.1
# Versions per `IN (...)` list: SQLite allows 32766 parameters, a smaller list plans as well.
_VERSIONS_PER_SELECT = 500
# FTS5's bm25() constants.
_K1 = 1.2
_B = 0.75

# unicode61 splits on what is not a letter or digit, like \w+ (so "XK-4471" is xk, 4471, in the
# index and in queries alike); "_" is kept inside words as \w does, and diacritics are removed
# so "cafe" finds "café".
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    rowid INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL,
    version TEXT NOT NULL,
    document_id TEXT NOT NULL,
    filename TEXT NOT NULL,
    position INTEGER NOT NULL,
    page INTEGER,
    sheet TEXT,
    heading TEXT,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_version ON chunks (version);
CREATE VIRTUAL TABLE IF NOT EXISTS terms USING fts5 (
    text, content = 'chunks', content_rowid = 'rowid',
    tokenize = "unicode61 remove_diacritics 2 tokenchars '_'"
);
-- How many chunks hold each term, for leaving out of a query the terms of most chunks.
CREATE VIRTUAL TABLE IF NOT EXISTS vocabulary USING fts5vocab (terms, 'row');
-- The number of rows, kept by the triggers: count(*) would read the whole table.
CREATE TABLE IF NOT EXISTS size (rows INTEGER NOT NULL);
INSERT INTO size SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM size);
-- The index follows the rows: an external-content table is told of each change.
CREATE TRIGGER IF NOT EXISTS chunks_added AFTER INSERT ON chunks BEGIN
    INSERT INTO terms (rowid, text) VALUES (new.rowid, new.text);
    UPDATE size SET rows = rows + 1;
END;
CREATE TRIGGER IF NOT EXISTS chunks_removed AFTER DELETE ON chunks BEGIN
    INSERT INTO terms (terms, rowid, text) VALUES ('delete', old.rowid, old.text);
    UPDATE size SET rows = rows - 1;
END;
"""
_COLUMNS = "chunk_id, version, document_id, filename, position, page, sheet, heading, text"


def query_terms(text: str) -> list[str]:
    """The distinct words of a query, lowercased, without stop words, at most MAX_QUERY_TERMS."""
    words = (word for word in _WORD.findall(text.casefold()) if word not in STOP_WORDS)
    return list(dict.fromkeys(words))[:MAX_QUERY_TERMS]


def match_expression(terms: Sequence[str]) -> str:
    """An FTS5 query matching any of the terms, each quoted: nothing a user types is syntax."""
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)


class KeywordIndex:
    """The FTS5 index of one knowledge base's chunks, in its own SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connections = ConnectionPool(self._connect)

    def exists(self) -> bool:
        return self.path.exists()

    def create(self) -> None:
        """Make the file with its tables, empty, if it is not there yet."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with closing(self._connect(create=True)) as db:
            db.executescript(_SCHEMA)

    def add_many(self, rows: Iterable[tuple[str, str, Chunk]]) -> None:
        """Index (version, document id, chunk) rows, of any documents, in one transaction."""
        with self._transaction() as db:
            _insert(db, rows)

    def stored(
        self, kb_id: str, versions: Sequence[str], ids: Sequence[str] | None = None
    ) -> list[Chunk]:
        """The chunks of these versions as they were written, or only those of `ids` among
        them: the chunks' text is kept here (Chroma holds their vectors)."""
        if not versions or not self.exists():
            return []
        wanted = "" if ids is None else f" AND chunk_id IN ({', '.join('?' * len(ids))})"
        rows = []
        with self._connections.connection() as db:
            for start in range(0, len(versions), _VERSIONS_PER_SELECT):
                part = [*versions[start : start + _VERSIONS_PER_SELECT]]
                marks = ", ".join("?" * len(part))
                query = f"SELECT {_COLUMNS} FROM chunks WHERE version IN ({marks}){wanted}"
                rows += db.execute(query, part + ([] if ids is None else [*ids])).fetchall()
        return [_chunk(kb_id, row) for row in rows]

    def drop(self, versions: Sequence[str]) -> None:
        """Delete the rows of versions, in one transaction; the index forgets them through the
        trigger."""
        if not self.exists():
            return
        with self._transaction() as db:
            db.executemany("DELETE FROM chunks WHERE version = ?", [(v,) for v in versions])

    def delete(self) -> None:
        """Delete the file (with SQLite's side files): its knowledge base is gone."""
        self.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def search(
        self, kb_id: str, query: str, n: int, current: Callable[[set[str]], Set[str]]
    ) -> list[tuple[Chunk, float]]:
        """The `n` best chunks of current versions for the query words, with their BM25 score
        (higher is better), best first; only chunks with at least one of the words.

        `current` tells which of the versions it is given are current (the registry decides).
        """
        terms = query_terms(query)
        if not terms or n <= 0 or not self.exists():
            return []
        with self._connections.connection() as db:
            plan = _plan(db, self.path, terms)
            if plan is None:
                return []
            fetch = n if plan.complete else max(n, RESCORED)
            while True:
                # With each chunk its length in words, as FTS5 keeps it, for rescoring.
                rows = db.execute(
                    f"SELECT {_COLUMNS}, ranked.rank, terms_docsize.sz FROM (SELECT rowid, rank"
                    " FROM terms WHERE terms MATCH ? ORDER BY rank LIMIT ?) AS ranked"
                    " JOIN chunks ON chunks.rowid = ranked.rowid"
                    " LEFT JOIN terms_docsize ON terms_docsize.id = ranked.rowid"
                    " ORDER BY ranked.rank",
                    (plan.expression, fetch),
                ).fetchall()
                now = current({row[1] for row in rows})
                rows = [row for row in rows if row[1] in now]
                if plan.complete:
                    # bm25() is lower for better matches: negated, it sorts like vector scores.
                    found = [(_chunk(kb_id, row), -row[9]) for row in rows]
                else:
                    found = plan.rescored(db, [(_chunk(kb_id, row), row[10]) for row in rows])
                if len(found) >= n or len(rows) < fetch:
                    return found[:n]
                # Rows of versions being written or awaiting deletion took places: ask for more.
                fetch *= 4

    def rebuild(self, chunks: Iterable[tuple[str, Chunk]]) -> None:
        """Write the index from (version, stored chunk) pairs into a new file that then replaces
        this one in a rename: a crash leaves no index (built again) or a whole one."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        building = self.path.with_name(f"{self.path.name}.{os.getpid()}.building")
        building.unlink(missing_ok=True)
        try:
            with closing(sqlite3.connect(building, isolation_level=None)) as db:
                db.executescript(_SCHEMA)
                db.execute("BEGIN")
                _insert(db, ((version, chunk.document_id, chunk) for version, chunk in chunks))
                db.execute("COMMIT")
            os.replace(building, self.path)
            # Connections kept open read the file replaced: the next ones open this one.
            self.close()
        finally:
            building.unlink(missing_ok=True)

    def close(self) -> None:
        """Close its connections (opened again if used after): its directory can then be
        unmounted or deleted."""
        self._connections.close()

    def _transaction(self):
        return self._connections.transaction()

    def _connect(self, *, create: bool = False) -> sqlite3.Connection:
        # Kept open in the pool, as the registry's, each used by one thread at a time. WAL lets
        # queries read while a document is being indexed. Only `create` makes the file: a
        # missing index must stay missing until it is built from Chroma.
        mode = "rwc" if create else "rw"
        db = sqlite3.connect(
            f"{self.path.as_uri()}?mode={mode}",
            timeout=30,
            isolation_level=None,
            uri=True,
            check_same_thread=False,
        )
        db.execute("PRAGMA journal_mode = WAL")
        # FULL like the registry: rows of a version the registry made current survive power loss.
        db.execute("PRAGMA synchronous = FULL")
        return db


@dataclass(frozen=True)
class _Plan:
    """How a query is run: the FTS5 query of its candidates, and what ranks them."""

    expression: str
    """The rarest useful words, OR'ed: the chunks FTS5 finds and ranks by them."""
    complete: bool
    """Whether those are all the useful words; if not, the best candidates are rescored."""
    rows: int
    """Chunks in the index."""
    counts: dict[str, int]
    """Chunks holding each useful word (folded as the index folds it)."""

    def rescored(
        self, db: sqlite3.Connection, chunks: list[tuple[Chunk, bytes | None]]
    ) -> list[tuple[Chunk, float]]:
        """The chunks scored by FTS5's bm25() formula over every useful word, best first.

        FTS5's own bm25() would read every chunk holding any of the words to count them (in
        xQueryPhrase), however few chunks it ranks: at a million chunks, tens of milliseconds
        for the common words. The counts are known here, and the chunks' text is at hand.
        """
        average = _average_length(db)
        # The query's words where they are whole words, found by one regular expression.
        longest_first = sorted(self.counts, key=len, reverse=True)
        words = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, longest_first)) + r")(?!\w)")
        scored = []
        for chunk, size in chunks:
            text = _fold(chunk.text)
            found = Counter(words.findall(text))
            length = _varint(size, 0)[0] if size else len(_WORD.findall(text))
            norm = _K1 * (1 - _B + _B * length / average)
            score = 0.0
            for term, count in self.counts.items():
                if frequency := found.get(term, 0):
                    idf = max(math.log((self.rows - count + 0.5) / (count + 0.5)), 1e-6)
                    score += idf * frequency * (_K1 + 1) / (frequency + norm)
            scored.append((chunk, score))
        return sorted(scored, key=lambda pair: pair[1], reverse=True)


def _plan(db: sqlite3.Connection, path: Path, terms: list[str]) -> _Plan | None:
    """How to run the query of these words, or None when each is in more than half of many
    chunks.

    Ranking reads every chunk that has a query word (about 1.3 us each), so common words make a
    query slow; two bounds keep them out of the candidates:
    - a word of more than half the chunks is left out (unless all are, in a small index):
      bm25()'s idf, log((N - n + 0.5) / (n + 0.5)), is zero for it (FTS5 floors it at 1e-6),
      so no score that counts changes;
    - candidates must have one of the rarest words whose chunks together number at most
      CANDIDATE_POSTINGS (the rarest word at least); when that leaves useful words out, the
      RESCORED best candidates by the rarest words are scored again by all of them.
    """
    (rows,) = db.execute("SELECT rows FROM size").fetchone()
    counts = _COUNTS.get(db, path, rows, terms)
    useful = sorted((count, term) for term, count in counts.items() if count <= rows / 2)
    if not useful:
        # Scores all but zero then still put more occurrences in shorter chunks first: worth
        # it where that is cheap.
        if rows > CANDIDATE_POSTINGS:
            return None
        rarest = min((count, term) for term, count in counts.items())[1]
        return _Plan(match_expression([rarest]), True, rows, {})
    rare: list[str] = []
    total = 0
    for count, term in useful:
        if rare and total + count > CANDIDATE_POSTINGS:
            break
        rare.append(term)
        total += count
    complete = len(rare) == len(useful)
    return _Plan(match_expression(rare), complete, rows, {t: c for c, t in useful})


class _WordCounts:
    """How many chunks of an index hold each word, remembered (least recently used first out).

    Counting reads the word's whole posting list (about 30 ns a chunk: 15 ms for a word of half
    of a million chunks), and the common words of queries are few and asked again and again. A
    count is used while the index's size is within COUNT_STALE of the size it was counted at:
    it only picks which words find candidates, so a slightly old one costs time, not results.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, db: sqlite3.Connection, path: Path, rows: int, terms: list[str]) -> dict:
        """The count of each word in the index at `path`, of `rows` chunks, by word."""
        counts = {}
        for term in terms:
            folded = _fold(term)
            key = (str(path), folded)
            with self._lock:
                known = self._counts.get(key)
                if known is not None:
                    self._counts.move_to_end(key)
            if known is None or abs(rows - known[1]) > COUNT_STALE * known[1]:
                # Not in the vocabulary (the tokenizer splits it into several words): 0.
                row = db.execute("SELECT doc FROM vocabulary WHERE term = ?", (folded,)).fetchone()
                known = (row[0] if row else 0, rows)
                with self._lock:
                    self._counts[key] = known
                    while len(self._counts) > self.limit:
                        self._counts.popitem(last=False)
            counts[folded] = known[0]
        return counts


_COUNTS = _WordCounts(COUNTS_REMEMBERED)


def _fold(text: str) -> str:
    """Lowercase, without diacritics, as the index's tokenizer folds words."""
    text = text.casefold()
    if text.isascii():
        return text
    return _DIACRITICS.sub("", unicodedata.normalize("NFD", text))


def _average_length(db: sqlite3.Connection) -> float:
    """The mean number of words a chunk has, from FTS5's own totals (its "averages" record:
    the row count, then the token count, as SQLite varints)."""
    row = db.execute("SELECT block FROM terms_data WHERE id = 1").fetchone()
    if row is None:
        return 1.0
    chunks, at = _varint(row[0], 0)
    tokens, _ = _varint(row[0], at)
    return tokens / chunks if chunks and tokens else 1.0


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A SQLite varint at `at`: its value, and where the next begins."""
    value = 0
    for i in range(8):
        byte = data[at + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    return (value << 8) | data[at + 8], at + 9


def _insert(db: sqlite3.Connection, rows: Iterable[tuple[str, str, Chunk]]) -> None:
    """Insert (version, document id, chunk) rows."""
    db.executemany(
        f"INSERT INTO chunks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            (
                f"{version}-{chunk.index}",
                version,
                document_id,
                chunk.filename,
                chunk.index,
                chunk.page,
                chunk.sheet,
                chunk.heading,
                chunk.text,
            )
            for version, document_id, chunk in rows
        ),
    )


def _chunk(kb_id: str, row: tuple) -> Chunk:
    chunk_id, _version, document_id, filename, position, page, sheet, heading, text = row[:9]
    return Chunk(chunk_id, text, filename, position, page, sheet, heading, kb_id, document_id)
