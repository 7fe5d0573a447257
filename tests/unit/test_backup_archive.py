"""The backup file format: a round trip, and every kind of damage refused with a clear error."""

from __future__ import annotations

import io
import os

import pytest
from appliance.security.keys import KeyEncryptionKey

from appliance.backup.archive import (
    CHUNK_BYTES,
    ArchiveReader,
    ArchiveWriter,
    BackupDamaged,
    BackupError,
    KeySource,
    read_header,
)

KEK = KeySource(kek=KeyEncryptionKey(b"k" * 32))
CONTENTS = {"parts": ["keys"], "with_models": False}


def sealed(data: bytes, source: KeySource = KEK, writes: int = 7) -> bytes:
    out = io.BytesIO()
    writer = ArchiveWriter(out, source, CONTENTS)
    step = max(1, len(data) // writes)
    for start in range(0, len(data), step):
        writer.write(data[start : start + step])
    writer.close()
    return out.getvalue()


def opened(blob: bytes, source: KeySource = KEK) -> bytes:
    reader = ArchiveReader(io.BytesIO(blob), source)
    data = reader.read(12345) + reader.read()
    reader.finish()
    return data


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES - 5])
def test_round_trip_at_chunk_edges(size):
    data = os.urandom(size)
    assert opened(sealed(data)) == data


def test_the_header_is_plain_and_holds_no_key():
    blob = sealed(b"secret text")
    header, _ = read_header(io.BytesIO(blob))
    assert header["format"] == 1 and header["contents"] == CONTENTS
    assert header["key"]["kind"] == "kek" and "wrapped" in header["key"]
    assert b"secret text" not in blob and b"k" * 32 not in blob


def test_a_passphrase_round_trip_and_a_wrong_passphrase():
    blob = sealed(b"data" * 1000, KeySource(passphrase="correct horse"))
    assert opened(blob, KeySource(passphrase="correct horse")) == b"data" * 1000
    with pytest.raises(BackupError, match="wrong passphrase"):
        opened(blob, KeySource(passphrase="wrong horse"))
    with pytest.raises(BackupError, match="--passphrase-file"):
        opened(blob, KEK)


def test_a_wrong_key_is_named():
    with pytest.raises(BackupError, match="wrong key-encryption key"):
        opened(sealed(b"x"), KeySource(kek=KeyEncryptionKey(b"j" * 32)))


def test_every_flipped_byte_is_caught():
    data = os.urandom(CHUNK_BYTES + 100)
    blob = sealed(data)
    # Every byte of the header and of the frames' lengths, and spots inside the ciphertext.
    header_end = blob.index(b"}", len(b"APPLIANCE-BACKUP\n")) + 1
    spots = [*range(header_end + 8), header_end + 100, len(blob) // 2, len(blob) - 1]
    for spot in spots:
        damaged = bytearray(blob)
        damaged[spot] ^= 0x01
        with pytest.raises(BackupError):
            opened(bytes(damaged))


@pytest.mark.parametrize("cut", [1, 16, CHUNK_BYTES // 2, CHUNK_BYTES + 20])
def test_a_cut_file_is_caught(cut):
    blob = sealed(os.urandom(2 * CHUNK_BYTES + 10))
    with pytest.raises(BackupDamaged, match=r"cut short|authentication"):
        opened(blob[:-cut])


def test_a_file_cut_at_a_chunk_boundary_is_caught():
    blob = sealed(os.urandom(2 * CHUNK_BYTES + 10))
    last_frame = 4 + 10 + 16
    with pytest.raises(BackupDamaged, match="cut short"):
        opened(blob[:-last_frame])


def test_chunks_swapped_or_bytes_appended_are_caught():
    blob = sealed(os.urandom(3 * CHUNK_BYTES))
    frame = 4 + CHUNK_BYTES + 16
    body_start = len(blob) - 3 * frame  # three full chunks, the last one marked final
    first, second = (blob[body_start + i * frame : body_start + (i + 1) * frame] for i in (0, 1))
    swapped = blob[:body_start] + second + first + blob[body_start + 2 * frame :]
    with pytest.raises(BackupDamaged, match="chunk 0"):
        opened(swapped)
    with pytest.raises(BackupDamaged, match="after its last chunk"):
        opened(blob + b"\0")


def test_not_a_backup():
    with pytest.raises(BackupDamaged, match="not an appliance backup"):
        opened(b"PK\x03\x04 a zip file")
