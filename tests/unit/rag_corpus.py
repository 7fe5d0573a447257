"""Test users, a small corpus of documents on distinct topics, and an embedder without a model."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from appliance.rag.access import Principal
from appliance.rag.document import ParsedDocument, Section
from appliance.rag.embeddings import Embedder
from appliance.rag.sniff import DocType

from appliance.config.rag import RagSettings

ALICE = Principal("alice")
BOB = Principal("bob")
CAROL = Principal("carol", groups=frozenset({"engineering"}))
ADMIN = Principal("root", admin=True)

# Small chunks, so short test documents still make several of them.
SMALL_CHUNKS = RagSettings(chunk_chars=200, chunk_overlap_chars=20)

PUMPS = [
    "The centrifugal pump needs its bearings greased every 500 operating hours.",
    "Check the mechanical seal for leaks weekly and replace it when it drips.",
]
BAKING = [
    "Sourdough bread rises slowly: let the dough ferment overnight in a cool kitchen.",
    "Bake the loaf at 230 degrees with steam for the first twenty minutes.",
]
ASTRONOMY = [
    "Jupiter is the largest planet of the solar system and has dozens of moons.",
    "Saturn's rings are made of ice and rock and are only tens of metres thick.",
]
# A parts list, one part a page, and a note that names the wanted part in passing: to an
# embedding every part number looks alike; only exact words single out XK-4471.
PARTS = [
    f"Spare part {code} is a stainless steel {item}, sold in packs of {n}."
    for n, (code, item) in enumerate(
        [
            ("XK4417", "hex bolt"),
            ("XK4741", "washer"),
            ("XK7441", "lock nut"),
            ("KX4471", "hose clamp"),
            ("XK4147", "cotter pin"),
            ("XK1447", "spring washer"),
        ],
        start=10,
    )
]
VALVE_NOTE = (
    "During the spring overhaul the maintenance crew also swapped the old gasket on the cooling "
    "circuit for the XK-4471 replacement, then refilled the system and bled the air out."
)

# Two versions of one file: the first makes one chunk, the second six (three batches of two).
MANUAL_V1 = ["The old manual says: torque the flange bolts to 40 newton metres."]
MANUAL_V2 = [
    f"New manual step {i}: follow procedure {i} before the shift starts." for i in range(12)
]


def document(filename: str, paragraphs: list[str], **where: object) -> ParsedDocument:
    """A parsed text document of one section per paragraph; `where` sets page, sheet, heading."""
    sections = [Section(text, **where) for text in paragraphs]  # type: ignore[arg-type]
    return ParsedDocument(filename=filename, doc_type=DocType.TEXT, sections=sections)


def corpus() -> list[ParsedDocument]:
    return [
        document("pumps.pdf", PUMPS, page=3),
        document("baking.md", BAKING, heading_path=("Bread",)),
        document("astronomy.xlsx", ASTRONOMY, sheet="Planets"),
        ParsedDocument(
            filename="parts.pdf",
            doc_type=DocType.PDF,
            sections=[Section(part, page=page) for page, part in enumerate(PARTS, start=1)],
        ),
        document("overhaul.txt", [VALVE_NOTE]),
    ]


class HashEmbedder(Embedder):
    """Bag-of-words vectors from word hashes, without a model: for tests where meaning does not
    matter, and for subprocesses that must start fast."""

    dimension = 32

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__(batch_size=batch_size)
        self.name = "hashed-words"

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dimension), np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                digest = hashlib.sha256(word.encode()).digest()
                vectors[row, digest[0] % self.dimension] += 1.0
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
