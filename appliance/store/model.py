"""Opens a stored model: unwraps its data key, checks its signed policy, authenticates its index,
and reads (and decrypts) chunks of its tensor file."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.security.aesgcm import AesGcm, AuthenticationFailed, address_of
from appliance.security.keys import KeyEncryptionKey, WrongKey, rewrap_data_key, unwrap_data_key
from appliance.security.policy import PolicyRefused, SignedPolicy, check_policy
from appliance.store.format import (
    DATA_FILE,
    HEADER_FILE,
    TAG_BYTES,
    TAGS_FILE,
    StoreHeader,
    StoreIndex,
    chunk_aad,
    chunk_nonce,
    index_aad,
    index_nonce,
    key_context,
    plain_index_digest,
)


class StoreIntegrityError(ApplianceError):
    """A stored model's bytes failed authentication or are cut short."""


@dataclass
class AccessRequest:
    """Who wants to load a model, and where: checked against the model's signed policy."""

    user: str
    host: str
    trusted_signers: list[str]
    roles: list[str] = field(default_factory=list)
    now: dt.datetime | None = None


class StoredModel:
    """An opened stored model; `read_chunk_into` gives authenticated plaintext."""

    def __init__(self, path: Path, header: StoreHeader, index: StoreIndex, cipher: AesGcm | None):
        self.path = path
        self.header = header
        self.index = index
        self.cipher = cipher
        self.tags = (path / TAGS_FILE).read_bytes() if cipher is not None else b""
        self.model_id = header.model_id
        # Precomputed so the per-chunk work in loader threads is only I/O and decryption.
        self.chunk_aads = [
            chunk_aad(self.model_id, i, header.n_chunks) for i in range(header.n_chunks)
        ]

    @property
    def data_path(self) -> Path:
        return self.path / DATA_FILE

    @property
    def data_bytes(self) -> int:
        return self.header.data_bytes

    @property
    def encrypted(self) -> bool:
        return self.cipher is not None

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        kek: KeyEncryptionKey | None,
        access: AccessRequest | None,
        expected_id: str | None = None,
    ) -> StoredModel:
        """Open and authenticate; `access=None` skips the policy (import and admin tools only)."""
        path = Path(path)
        header = StoreHeader.read(path)
        if expected_id is not None and header.model_id != expected_id:
            raise StoreIntegrityError(
                f"{path} holds model {header.model_id!r}, not {expected_id!r}"
            )
        if header.encrypted:
            if access is not None:
                if header.policy is None:
                    raise PolicyRefused(
                        "signature", f"refused: model {header.model_id} carries no signed policy"
                    )
                check_policy(
                    header.policy,
                    trusted_signers=access.trusted_signers,
                    model_id=header.model_id,
                    user=access.user,
                    roles=access.roles,
                    host=access.host,
                    now=access.now,
                )
            if kek is None:
                raise StoreIntegrityError(
                    f"model {header.model_id} is encrypted: a key-encryption key is needed"
                )
            if header.key_wrap is None:
                raise StoreIntegrityError(f"model {header.model_id} has no wrapped data key")
            try:
                data_key = unwrap_data_key(kek, header.key_wrap, key_context(header.model_id))
            except WrongKey as exc:
                raise WrongKey(f"model {header.model_id}: {exc}") from None
            cipher = AesGcm(data_key)
            try:
                raw_index = cipher.decrypt(
                    bytes.fromhex(header.index["nonce"]),
                    bytes.fromhex(header.index["ciphertext"]),
                    index_aad(header),
                    bytes.fromhex(header.index["tag"]),
                )
            except (AuthenticationFailed, KeyError, ValueError):
                raise StoreIntegrityError(
                    f"the index of model {header.model_id} failed authentication: its header "
                    "or index was altered"
                ) from None
            if header.index.get("nonce") != index_nonce().hex():
                raise StoreIntegrityError(f"model {header.model_id}: unexpected index nonce")
        else:
            cipher = None
            raw_index = bytes.fromhex(header.index.get("plaintext", ""))
            if plain_index_digest(header, raw_index) != header.index.get("sha256"):
                raise StoreIntegrityError(
                    f"the index of model {header.model_id} does not match its digest"
                )
        model = cls(path, header, StoreIndex.from_bytes(raw_index), cipher)
        model._check_sizes()
        return model

    def _check_sizes(self) -> None:
        size = self.data_path.stat().st_size
        if size != self.data_bytes:
            raise StoreIntegrityError(
                f"{self.data_path} has {size} bytes, the index says {self.data_bytes}: "
                "truncated or extended"
            )
        if self.cipher is not None and len(self.tags) != self.header.n_chunks * TAG_BYTES:
            raise StoreIntegrityError(f"{self.path / TAGS_FILE} is truncated or extended")

    def chunk_span(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk i in tensors.bin."""
        start = i * self.header.chunk_bytes
        return start, min(self.header.chunk_bytes, self.data_bytes - start)

    def decrypt_chunk(self, i: int, addr: int, n: int) -> None:
        """Decrypt chunk i (n bytes at `addr`) in place; nothing to do when not encrypted."""
        if self.cipher is None:
            return
        try:
            self.cipher.decrypt_into(
                chunk_nonce(i), addr, n, addr, self.chunk_aads[i], self.tags[i * 16 : i * 16 + 16]
            )
        except AuthenticationFailed:
            raise StoreIntegrityError(
                f"chunk {i} of {self.model_id}/{DATA_FILE} failed authentication: it was "
                "altered, swapped or truncated"
            ) from None

    def read_chunk(self, fd: int, i: int) -> bytes:
        """Chunk i's plaintext (small reads: import verification and tools)."""
        offset, n = self.chunk_span(i)
        buf = bytearray(n)
        read_exact(fd, memoryview(buf), offset)
        self.decrypt_chunk(i, address_of(buf), n)
        return bytes(buf)


def read_exact(fd: int, view: memoryview, offset: int) -> None:
    """pread until `view` is full (the GIL is released while the kernel copies)."""
    done = 0
    total = len(view)
    while done < total:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise StoreIntegrityError(f"unexpected end of file at offset {offset + done}")
        done += got


def write_header(model_dir: Path, header: StoreHeader) -> None:
    """Replace header.json atomically (a crash leaves the old or the new one, never half)."""
    tmp = model_dir / (HEADER_FILE + ".tmp")
    with tmp.open("w") as f:
        f.write(header.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, model_dir / HEADER_FILE)


def rotate_key(model_dir: Path, old: KeyEncryptionKey, new: KeyEncryptionKey) -> None:
    """Rewrap the model's data key under a new key-encryption key; weights stay as they are."""
    header = StoreHeader.read(model_dir)
    if not header.encrypted or header.key_wrap is None:
        return
    header.key_wrap = rewrap_data_key(old, new, header.key_wrap, key_context(header.model_id))
    header.kdf = None
    write_header(model_dir, header)


def set_policy(model_dir: Path, policy: SignedPolicy) -> None:
    """Attach a (new) signed load policy to a stored model."""
    header = StoreHeader.read(model_dir)
    if policy["policy"].get("model_id") != header.model_id:
        raise PolicyRefused(
            "model",
            f"the policy is for model {policy['policy'].get('model_id')}, not {header.model_id}",
        )
    header.policy = dict(policy)
    write_header(model_dir, header)
