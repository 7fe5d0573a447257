"""The on-disk format of a stored model: one aligned tensor file, its chunk tags, and a header.

A stored model is a directory `<store>/<model_id>/`:
- `tensors.bin`: every tensor's bytes, each starting at a 4 KiB boundary (direct I/O and
  sequential streaming), the file padded to 4 KiB. Encrypted models encrypt it in fixed-size
  chunks with AES-256-GCM; a chunk's ciphertext sits where its plaintext would, so reads stay
  aligned whether or not the model is encrypted.
- `tags.bin`: the 16-byte GCM tag of each chunk, in order (absent when not encrypted).
- `header.json`: format, model id, chunk size, sizes, the wrapped data key, the signed load policy
  and the index (tensor names, dtypes, shapes, offsets, plus the small files vLLM needs such as
  config.json and the tokenizer), encrypted and authenticated with the data key.

Nonces are never reused: each model has its own random data key, and under that key a nonce is
the file number and the chunk number. Each chunk's associated data binds the model id, the file,
the chunk number and the chunk count, so a chunk swapped within or between models, a truncated
file or an altered byte fails authentication.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.names import STORE_HEADER_FILE as HEADER_FILE

FORMAT = "appliance-store/1"
ALIGN = 4096
DATA_FILE = "tensors.bin"
TAGS_FILE = "tags.bin"
TAG_BYTES = 16
DEFAULT_CHUNK_BYTES = 4 << 20
# Nonce prefixes: 4 bytes naming what is encrypted, 8 bytes of counter.
DATA_FILE_NO = 0
_INDEX_FILE_NO = 0xFFFFFFFF

# safetensors dtype names and their sizes in bytes.
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


class StoreFormatError(ApplianceError):
    """A checkpoint or a stored model's files are malformed (not an authentication failure)."""


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are in tensors.bin."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorEntry:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), int(d["offset"]), int(d["nbytes"]))


@dataclass
class StoreIndex:
    """What is in tensors.bin, plus the small files that describe the model."""

    tensors: list[TensorEntry]
    # Tied weights: a name whose bytes are another tensor's (stored once).
    aliases: dict[str, str] = field(default_factory=dict)
    # safetensors `__metadata__` of the source.
    metadata: dict[str, str] = field(default_factory=dict)
    # config.json, tokenizer files, chat template...: name -> content.
    files: dict[str, bytes] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "tensors": [t.to_dict() for t in self.tensors],
                "aliases": self.aliases,
                "metadata": self.metadata,
                "files": {k: base64.b64encode(v).decode() for k, v in self.files.items()},
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> StoreIndex:
        d = json.loads(raw)
        return cls(
            tensors=[TensorEntry.from_dict(t) for t in d["tensors"]],
            aliases=dict(d.get("aliases", {})),
            metadata=dict(d.get("metadata", {})),
            files={k: base64.b64decode(v) for k, v in d.get("files", {}).items()},
        )

    def names(self) -> list[str]:
        return [t.name for t in self.tensors] + list(self.aliases)


@dataclass
class StoreHeader:
    """header.json. `layout()` is the part the index encryption authenticates."""

    model_id: str
    encrypted: bool
    chunk_bytes: int
    data_bytes: int
    n_chunks: int
    index: dict[str, str]
    key_wrap: dict[str, str] | None = None
    kdf: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    format: str = FORMAT

    def layout(self) -> bytes:
        return json.dumps(
            {
                "format": self.format,
                "model_id": self.model_id,
                "encrypted": self.encrypted,
                "chunk_bytes": self.chunk_bytes,
                "data_bytes": self.data_bytes,
                "n_chunks": self.n_chunks,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, model_dir: Path) -> StoreHeader:
        path = model_dir / HEADER_FILE
        try:
            d = json.loads(path.read_text())
            header = cls(**d)
        except FileNotFoundError:
            raise StoreFormatError(f"{model_dir} is not a stored model (no {HEADER_FILE})") from (
                None
            )
        except (ValueError, TypeError) as exc:
            raise StoreFormatError(f"{path} is malformed: {exc}") from None
        if header.format != FORMAT:
            raise StoreFormatError(f"{path}: unknown format {header.format!r} (want {FORMAT})")
        expected_chunks = -(-header.data_bytes // header.chunk_bytes) if header.data_bytes else 0
        if (
            header.chunk_bytes <= 0
            or header.chunk_bytes % ALIGN
            or header.data_bytes % ALIGN
            or header.n_chunks != expected_chunks
        ):
            raise StoreFormatError(f"{path}: inconsistent sizes")
        return header


def chunk_nonce(index: int) -> bytes:
    return DATA_FILE_NO.to_bytes(4, "big") + index.to_bytes(8, "big")


def chunk_aad(model_id: str, index: int, n_chunks: int) -> bytes:
    return f"{FORMAT}|{model_id}|{DATA_FILE}|{index}|{n_chunks}".encode()


def index_nonce() -> bytes:
    # One index per data key: a re-import makes a new key, rotation never re-encrypts.
    return _INDEX_FILE_NO.to_bytes(4, "big") + (0).to_bytes(8, "big")


def index_aad(header: StoreHeader) -> bytes:
    return b"index|" + header.layout()


def key_context(model_id: str) -> bytes:
    """Associated data of the data key's wrap: a wrap cannot be moved to another model."""
    return f"{FORMAT}|data-key|{model_id}".encode()


def plain_index_digest(header: StoreHeader, raw_index: bytes) -> str:
    """Integrity (not secrecy) of an unencrypted model's index and layout."""
    return hashlib.sha256(index_aad(header) + raw_index).hexdigest()
