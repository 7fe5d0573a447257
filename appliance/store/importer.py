"""Imports a Hugging Face safetensors checkpoint into the store: aligned layout, chunked AES-GCM,
an authenticated index, then a bit-for-bit check against the source before the model appears."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from appliance.security.aesgcm import AesGcm, address_of
from appliance.security.keys import KeyEncryptionKey, new_data_key, wrap_data_key
from appliance.security.policy import SignedPolicy
from appliance.store.format import (
    ALIGN,
    DATA_FILE,
    DEFAULT_CHUNK_BYTES,
    HEADER_FILE,
    TAGS_FILE,
    StoreFormatError,
    StoreHeader,
    StoreIndex,
    TensorEntry,
    align_up,
    chunk_aad,
    chunk_nonce,
    index_aad,
    index_nonce,
    key_context,
    plain_index_digest,
)
from appliance.store.model import StoredModel, StoreIntegrityError
from appliance.store.safetensors_files import (
    MappedFiles,
    SourceTensor,
    checkpoint_files,
    read_header,
)

# Small files vLLM and transformers need beside the weights; larger ones are refused.
MAX_AUX_FILE_BYTES = 64 << 20
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def _aux_files(src: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix in SKIPPED_SUFFIXES:
            continue
        if p.name.endswith(".safetensors.index.json"):
            continue
        if p.stat().st_size > MAX_AUX_FILE_BYTES:
            raise StoreFormatError(f"{p.name} is larger than {MAX_AUX_FILE_BYTES >> 20} MiB")
        files[p.name] = p.read_bytes()
    return files


def _plan(
    sources: list[SourceTensor], maps: MappedFiles
) -> tuple[list[tuple[TensorEntry, SourceTensor]], dict[str, str], int]:
    """Offsets for each distinct tensor; byte-identical tensors of the same dtype and shape
    (tied weights) are stored once and recorded as aliases."""
    groups: dict[tuple, list[SourceTensor]] = {}
    for t in sources:
        groups.setdefault((t.dtype, t.shape, t.nbytes), []).append(t)
    digest: dict[str, str] = {}
    for group in groups.values():
        if len(group) > 1:
            for t in group:
                digest[t.name] = hashlib.sha256(maps.view(t)).hexdigest()
    aliases: dict[str, str] = {}
    first_by_content: dict[tuple, str] = {}
    placed: list[tuple[TensorEntry, SourceTensor]] = []
    offset = 0
    for t in sources:
        if t.name in digest:
            key = (t.dtype, t.shape, digest[t.name])
            if key in first_by_content:
                aliases[t.name] = first_by_content[key]
                continue
            first_by_content[key] = t.name
        offset = align_up(offset)
        placed.append((TensorEntry(t.name, t.dtype, t.shape, offset, t.nbytes), t))
        offset += t.nbytes
    return placed, aliases, align_up(max(offset, ALIGN))


def _fill(
    buf: memoryview, lo: int, placed: list[tuple[TensorEntry, SourceTensor]], maps: MappedFiles
) -> None:
    """The plaintext of tensors.bin between lo and lo + len(buf) (padding is zero)."""
    hi = lo + len(buf)
    ctypes.memset(address_of(buf), 0, len(buf))
    for entry, src in placed:  # few thousand entries: a scan per chunk is cheap
        start, end = entry.offset, entry.offset + entry.nbytes
        if end <= lo or start >= hi:
            continue
        a, b = max(start, lo), min(end, hi)
        buf[a - lo : b - lo] = maps.view(src)[a - start : b - start]


def import_checkpoint(
    src: Path,
    store_root: Path,
    model_id: str,
    *,
    kek: KeyEncryptionKey | None,
    policy: SignedPolicy | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    replace: bool = False,
) -> Path:
    """Convert (and encrypt, when `kek` is given) the checkpoint in `src`; returns the model's
    directory. Nothing appears in the store unless the result matched the source bit for bit."""
    src, store_root = Path(src), Path(store_root)
    if not src.is_dir():
        raise StoreFormatError(f"{src} is not a directory")
    if chunk_bytes <= 0 or chunk_bytes % ALIGN:
        raise StoreFormatError(f"chunk size must be a positive multiple of {ALIGN}")
    if kek is not None and policy is None:
        raise StoreFormatError("an encrypted model needs a signed load policy")
    target = store_root / model_id
    if target.exists() and not replace:
        raise StoreFormatError(f"model {model_id} is already in the store ({target})")
    sources: list[SourceTensor] = []
    metadata: dict[str, str] = {}
    seen: set[str] = set()
    for path in checkpoint_files(src):
        tensors, meta = read_header(path)
        for t in tensors:
            if t.name in seen:
                raise StoreFormatError(f"tensor {t.name} appears in more than one shard")
            seen.add(t.name)
        sources.extend(tensors)
        metadata.update(meta)
    maps = MappedFiles()
    store_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".import-{model_id}-", dir=store_root))
    try:
        placed, aliases, data_bytes = _plan(sources, maps)
        index = StoreIndex([e for e, _ in placed], aliases, metadata, _aux_files(src))
        n_chunks = -(-data_bytes // chunk_bytes)
        data_key = new_data_key() if kek is not None else None
        cipher = AesGcm(data_key) if data_key is not None else None
        header = StoreHeader(
            model_id=model_id,
            encrypted=cipher is not None,
            chunk_bytes=chunk_bytes,
            data_bytes=data_bytes,
            n_chunks=n_chunks,
            index={},
            policy=dict(policy) if policy is not None else None,
        )
        _write_data(work, header, placed, maps, cipher, progress)
        raw_index = index.to_bytes()
        if cipher is not None:
            assert kek is not None and data_key is not None
            header.key_wrap = wrap_data_key(kek, data_key, key_context(model_id))
            ciphertext, tag = cipher.encrypt(index_nonce(), raw_index, index_aad(header))
            header.index = {
                "nonce": index_nonce().hex(),
                "ciphertext": ciphertext.hex(),
                "tag": tag.hex(),
            }
        else:
            header.index = {
                "plaintext": raw_index.hex(),
                "sha256": plain_index_digest(header, raw_index),
            }
        (work / HEADER_FILE).write_text(header.to_json())
        _verify(work, kek, placed, maps, progress)
        _fsync_dir(work)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
        _fsync_dir(store_root)
        return target
    finally:
        maps.close()
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _write_data(
    work: Path,
    header: StoreHeader,
    placed: list[tuple[TensorEntry, SourceTensor]],
    maps: MappedFiles,
    cipher: AesGcm | None,
    progress: bool,
) -> None:
    buf = bytearray(header.chunk_bytes)
    view = memoryview(buf)
    addr = address_of(buf)
    tags = bytearray()
    bar = _bar(header.data_bytes, f"import {header.model_id}", progress)
    with (work / DATA_FILE).open("wb") as out:
        for i in range(header.n_chunks):
            lo = i * header.chunk_bytes
            n = min(header.chunk_bytes, header.data_bytes - lo)
            _fill(view[:n], lo, placed, maps)
            if cipher is not None:
                tags += cipher.encrypt_into(
                    chunk_nonce(i), addr, n, addr, chunk_aad(header.model_id, i, header.n_chunks)
                )
            out.write(view[:n])
            bar.update(n)
        out.flush()
        os.fsync(out.fileno())
    bar.close()
    if cipher is not None:
        (work / TAGS_FILE).write_bytes(bytes(tags))
    ctypes.memset(addr, 0, len(buf))


def _verify(
    work: Path,
    kek: KeyEncryptionKey | None,
    placed: list[tuple[TensorEntry, SourceTensor]],
    maps: MappedFiles,
    progress: bool,
) -> None:
    """Read the new model back through the store's own reader and compare every tensor with its
    source, byte for byte."""
    model = StoredModel.open(work, kek=kek, access=None)
    stored = {e.name: e for e in model.index.tensors}
    if set(stored) != {e.name for e, _ in placed}:
        raise StoreIntegrityError("the written index does not list the source's tensors")
    bar = _bar(model.data_bytes, "verify", progress)
    fd = os.open(model.data_path, os.O_RDONLY)
    try:
        cached: tuple[int, bytes] = (-1, b"")
        chunk = model.header.chunk_bytes

        def plain(i: int) -> bytes:
            nonlocal cached
            if cached[0] != i:
                cached = (i, model.read_chunk(fd, i))
                bar.update(len(cached[1]))
            return cached[1]

        for entry, src in placed:
            e = stored[entry.name]
            want = maps.view(src)
            pos = 0
            while pos < e.nbytes:
                i, within = divmod(e.offset + pos, chunk)
                piece = plain(i)[within : within + e.nbytes - pos]
                if piece != want[pos : pos + len(piece)]:
                    raise StoreIntegrityError(
                        f"verification failed: tensor {e.name} differs from the source"
                    )
                pos += len(piece)
    finally:
        os.close(fd)
        bar.close()


def _bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
