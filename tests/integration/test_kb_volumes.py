"""Knowledge bases in encrypted volumes of their own (real gocryptfs, real Chroma): their text is
ciphertext on disk, for root without the key and for another account alike; deleting one leaves
nothing on the machine that opens a copy of its ciphertext, and the others stay readable; a
volume outlives a store restart (and a crashed gateway's mount is reused); a hostile name stays
inside `kbs/`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from appliance.rag.access import Principal
from appliance.rag.errors import KnowledgeBaseError, KnowledgeBaseNotFound
from appliance.rag.kb_dirs import (
    EncryptedKnowledgeBaseDirs,
    key_context,
    knowledge_base_dirs,
    rewrap_keys,
)
from appliance.rag.registry import Registry
from appliance.rag.store import KnowledgeBaseStore
from appliance.security.data_volume import (
    PolicyTerms,
    close_volume,
    init_volume,
    open_volume,
    seal_plaintext,
    service_account,
)
from appliance.security.gocryptfs import EncryptedVolume, WrongVolumeKey, is_mounted
from appliance.security.keys import (
    KeyEncryptionKey,
    WrongKey,
    generate_key_file,
    unwrap_data_key,
)

from appliance.backup.archive import KeySource
from appliance.backup.restore import read_backup, restore_backup
from appliance.backup.snapshot import write_backup
from appliance.config import load_settings
from appliance.layout import make_private
from appliance.state_version import SCHEMA_VERSION, read_record
from appliance.store.keyring import data_at_rest_kek, init_keys
from appliance.upgrade import runner
from tests.integration.test_private_state import public_tmp  # noqa: F401
from tests.local_accounts import as_outsider
from tests.unit.rag_corpus import ALICE, SMALL_CHUNKS, HashEmbedder, document

SENTENCE = "The heron counts seventeen silver keys at dawn behind the boathouse."
WORDS = (b"heron", b"seventeen", b"boathouse")


class Stack:
    """A store over encrypted knowledge-base directories, reopened at will; every volume it
    leaves mounted is unmounted at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rag, self.volumes, self.mounts = tmp / "rag", tmp / "kb-volumes", tmp / "kb-mounts"
        keys = tmp / "keys"
        keys.mkdir(mode=0o700)
        self.kek = generate_key_file(keys / "kek.key")
        self.store: KnowledgeBaseStore | None = None

    def dirs(self) -> EncryptedKnowledgeBaseDirs:
        return EncryptedKnowledgeBaseDirs(self.rag, self.volumes, self.mounts, self.kek)

    def open(self) -> KnowledgeBaseStore:
        self.close()
        self.store = KnowledgeBaseStore(self.rag, SMALL_CHUNKS, HashEmbedder(), self.dirs())
        return self.store

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def cleanup(self) -> None:
        self.close()
        for mount_dir in self.mounts.iterdir() if self.mounts.is_dir() else []:
            EncryptedVolume(self.volumes / mount_dir.name, mount_dir).unmount()


@pytest.fixture
def stack(tmp_path):
    made = Stack(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def _holds_text(top: Path) -> list[str]:
    """Files under `top` (not through mounts) that hold any of the planted words."""
    found = []
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not is_mounted(Path(root, d))]
        for name in files:
            data = Path(root, name).read_bytes()
            if any(word in data.lower() for word in WORDS):
                found.append(str(Path(root, name)))
    return found


def _plant(store: KnowledgeBaseStore, name: str) -> str:
    kb = store.create(ALICE, name)
    store.add_documents(ALICE, name, [document("notes.txt", [SENTENCE] * 3)])
    return kb.collection


def test_text_is_only_ciphertext_on_disk(stack):
    store = stack.open()
    collection = _plant(store, "secrets")
    assert any(SENTENCE in c.text for c in store.chunks(ALICE, "secrets"))
    mount = stack.mounts / collection
    assert is_mounted(mount)  # opened lazily, by the store's first touch
    # Root without the key: the ciphertext and the rest of the rag folder hold no word of it.
    assert (stack.volumes / collection / "gocryptfs.conf").exists()
    assert _holds_text(stack.tmp) == []
    stack.close()
    assert not is_mounted(mount) and not any(mount.iterdir())
    assert _holds_text(stack.tmp) == []


def test_another_account_reads_nothing_while_mounted(outsider, public_tmp):  # noqa: F811 (fixtures)
    stack = Stack(public_tmp)
    try:
        store = stack.open()
        collection = _plant(store, "secrets")
        for path in (public_tmp, stack.rag, stack.volumes, stack.mounts):
            path.chmod(0o755)  # as if every folder on the way let others pass
        mount = stack.mounts / collection
        assert is_mounted(mount)
        read = as_outsider("grep", "-rl", "heron", str(public_tmp))
        assert read.returncode != 0 and "heron" not in read.stdout and read.stdout == ""
        listed = as_outsider("ls", str(mount))
        assert listed.returncode != 0  # FUSE lets no other account in, whatever the modes
    finally:
        stack.cleanup()


def test_a_deleted_knowledge_base_is_unrecoverable_and_the_others_stay(stack):
    store = stack.open()
    doomed = _plant(store, "doomed")
    kept = _plant(store, "kept")
    dirs = store.dirs
    assert isinstance(dirs, EncryptedKnowledgeBaseDirs)
    # What a disk image taken before the deletion holds: the ciphertext and the wrapped key.
    image = stack.tmp / "image"
    shutil.copytree(stack.volumes / doomed, image / "cipher")
    shutil.copy2(dirs.key_file(doomed), image / "wrapped.key")
    wrapped_bytes = dirs.key_file(doomed).read_bytes()
    key_fd = os.open(dirs.key_file(doomed), os.O_RDONLY)  # keeps its inode readable after

    store.delete(ALICE, "doomed")
    try:  # overwritten before it was unlinked: its blocks no longer hold the wrapped key
        assert os.pread(key_fd, len(wrapped_bytes), 0) not in (wrapped_bytes, b"")
    finally:
        os.close(key_fd)
    assert not dirs.key_file(doomed).exists() and not (stack.volumes / doomed).exists()
    assert not (stack.rag / "kbs" / doomed).exists() and not (stack.mounts / doomed).exists()
    assert any(SENTENCE in c.text for c in store.chunks(ALICE, "kept"))
    with pytest.raises(KnowledgeBaseNotFound):
        store.get(ALICE, "doomed")

    # Nothing left on the machine opens the copy: not the key-encryption key itself, not the
    # other knowledge bases' keys.
    copy = EncryptedVolume(image / "cipher", stack.tmp / "forensic")
    left = [stack.kek.key]
    for path in stack.volumes.glob("*.key"):
        wrapped = json.loads(path.read_bytes())
        left.append(unwrap_data_key(stack.kek, wrapped, key_context(path.stem)))
    assert len(left) == 2 and kept in [p.stem for p in stack.volumes.glob("*.key")]
    for key in left:
        with pytest.raises(WrongVolumeKey):
            copy.mount(key)
    assert not copy.mounted()

    # The limit (docs/security.md): an old copy of the wrapped key (a journal, a flash block)
    # opens the copy with the key-encryption key until that key is rotated away.
    old_key = unwrap_data_key(
        stack.kek, json.loads((image / "wrapped.key").read_bytes()), key_context(doomed)
    )
    copy.mount(old_key)
    try:
        assert copy.mounted()
    finally:
        copy.unmount()
    # Rotated: the remaining keys are wrapped by a new key-encryption key and the old one is
    # destroyed; the old wrap then opens nothing, and the kept knowledge base still opens.
    stack.close()
    rotated = KeyEncryptionKey(os.urandom(32))
    assert rewrap_keys(stack.volumes, stack.kek, rotated) == 1
    stack.kek = rotated
    with pytest.raises(WrongKey):
        unwrap_data_key(rotated, json.loads((image / "wrapped.key").read_bytes()), b"")
    store = stack.open()
    assert any(SENTENCE in c.text for c in store.chunks(ALICE, "kept"))


def test_a_volume_survives_a_restart_and_a_crashed_gateways_mount(stack):
    store = stack.open()
    collection = _plant(store, "kept")
    stack.close()
    mount = stack.mounts / collection
    assert not is_mounted(mount)
    store = stack.open()
    assert any(SENTENCE in c.text for c in store.chunks(ALICE, "kept"))
    stack.close()
    # A gateway killed with the volume mounted leaves the mount, and no lock (flock dies with
    # its holder): the next store reuses that mount.
    crashed = stack.dirs()
    crashed.open(collection, create=False)
    os.close(crashed._held.pop(collection))
    assert is_mounted(mount)
    store = stack.open()
    assert any(SENTENCE in c.text for c in store.chunks(ALICE, "kept"))
    mounts = Path("/proc/self/mountinfo").read_text().count(f" {mount} ")
    assert mounts == 1


def test_a_hostile_collection_name_stays_inside_kbs(stack):
    dirs = stack.dirs()
    for name in ("../../etc", "..", ".", "a/../../b", "/abs", "", "x" * 600, "kb\x00evil"):
        with pytest.raises(KnowledgeBaseError):
            dirs.open(name, create=True)
        with pytest.raises(KnowledgeBaseError):
            dirs.destroy(name)
    assert not (stack.tmp / "etc").exists() and not (stack.rag / "b").exists()
    store = stack.open()
    with pytest.raises(KnowledgeBaseError, match="invalid knowledge base name"):
        store.create(ALICE, "../../escape")
    assert sorted(p.name for p in stack.tmp.iterdir()) == ["keys", "rag"]


def test_a_backup_reads_closed_volumes_and_a_restore_makes_new_ones(tmp_path):
    settings = load_settings(
        state_dir=str(tmp_path / "state"), security={"data_at_rest": {"enabled": True}}
    )
    settings.layout.keys.mkdir(parents=True, mode=0o700)
    kek = generate_key_file(settings.kek_file)
    # The knowledge bases' volumes inside the state's data volume, as an installed appliance
    # keeps them (docs/security.md).
    init_keys(settings)
    init_volume(settings, PolicyTerms(service_account(settings), []))
    open_volume(settings)
    store = KnowledgeBaseStore(
        settings.rag_dir, SMALL_CHUNKS, HashEmbedder(), knowledge_base_dirs(settings, kek)
    )
    restored = load_settings(
        state_dir=str(tmp_path / "restored"), security={"data_at_rest": {"enabled": True}}
    )
    try:
        collection = _plant(store, "secrets")
        store.close()  # the backup mounts what it copies, and unmounts it after
        backup = tmp_path / "state.backup"
        write_backup(settings, backup, KeySource(kek=kek))
        assert not is_mounted(settings.layout.kb_mounts / collection)
        _, manifest = read_backup(backup, KeySource(kek=kek))
        names = {entry.name for entry in manifest.files}
        assert f"rag/kbs/{collection}/keywords.sqlite3" in names
        assert f"rag/kbs/{collection}/chroma/chroma.sqlite3" in names

        restore_backup(restored, backup, KeySource(kek=kek))
        volumes = restored.layout.kb_volumes
        assert (volumes / collection / "gocryptfs.conf").exists()
        assert (volumes / f"{collection}.key").read_bytes() != (
            settings.layout.kb_volumes / f"{collection}.key"
        ).read_bytes()
        assert not is_mounted(restored.layout.kb_mounts / collection)
        assert not (restored.rag_dir / "kbs" / collection).exists()  # moved into its volume
        assert _holds_text(restored.state_dir) == []  # nothing left in the clear
        open_volume(restored)
        again = KnowledgeBaseStore(
            restored.rag_dir, SMALL_CHUNKS, HashEmbedder(), knowledge_base_dirs(restored, kek)
        )
        try:
            assert any(SENTENCE in c.text for c in again.chunks(ALICE, "secrets"))
        finally:
            again.close()
    finally:
        store.close()
        for state in (settings, restored):
            close_volume(state)  # the knowledge bases' volumes inside it first


def test_the_upgrade_moves_knowledge_bases_into_volumes(tmp_path):
    state = tmp_path / "state"
    shutil.copytree(Path(__file__).parents[1] / "fixtures" / "state-v0", state)
    make_private(state)
    settings = load_settings(
        state_dir=str(state),
        catalog={"include_presets": False},
        security={"data_at_rest": {"enabled": True}},
    )
    # Sealed into the state's data volume first (`appliance data seal`), then migrated in it.
    init_keys(settings)
    seal_plaintext(settings, PolicyTerms(service_account(settings), []))
    open_volume(settings)
    (kb,) = Registry(settings.rag_dir / "registry.sqlite3").knowledge_bases()
    mount = settings.layout.kb_mounts / kb.collection
    try:
        runner.migrate(settings)
        assert read_record(state).version == SCHEMA_VERSION
        assert (settings.layout.kb_volumes / kb.collection / "gocryptfs.conf").exists()
        assert not is_mounted(mount) and not any(mount.iterdir())
        # The rag folder and the volumes (the rest of the state is the state volume's to hide).
        for top in (settings.rag_dir, settings.layout.kb_volumes):
            for root, _, files in os.walk(top):
                for name in files:
                    assert b"gasket" not in Path(root, name).read_bytes(), name
        dirs = knowledge_base_dirs(settings, data_at_rest_kek(settings))
        store = KnowledgeBaseStore(settings.rag_dir, settings.rag, dirs=dirs)
        try:
            found = store.keyword_search(Principal("alice"), kb.id, "spare gasket", 1)
            assert "cabinet B7" in found[0][0].text
        finally:
            store.close()
    finally:
        close_volume(settings)  # the knowledge base's volume inside it first


def test_a_volume_in_use_elsewhere_is_shared_and_stays_mounted(stack):
    store = stack.open()
    collection = _plant(store, "kept")
    mount = stack.mounts / collection
    backup = stack.dirs()  # another process's view, as `appliance backup` has
    started = time.monotonic()
    assert backup.open(collection, create=False) == mount
    assert time.monotonic() - started < 5  # shares the mount: no wait for the gateway's lock
    backup.close(collection)
    assert is_mounted(mount)  # the store still uses it
    assert any(SENTENCE in c.text for c in store.chunks(ALICE, "kept"))
    stack.close()
    assert not is_mounted(mount)


def test_a_mount_whose_daemon_died_is_mounted_again(stack):
    store = stack.open()
    collection = _plant(store, "kept")
    stack.close()
    crashed = stack.dirs()
    crashed.open(collection, create=False)
    os.close(crashed._held.pop(collection))
    daemons = subprocess.run(
        ["pgrep", "-f", f"gocryptfs .*{stack.volumes / collection} "],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    assert len(daemons) == 1, daemons
    os.kill(int(daemons[0]), signal.SIGKILL)
    mount = stack.mounts / collection
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.stat(mount)
        except OSError:
            break
        time.sleep(0.05)
    store = stack.open()
    assert any(SENTENCE in c.text for c in store.chunks(ALICE, "kept"))


def test_kept_keyword_connections_let_volumes_unmount_at_delete_and_close(stack):
    store = stack.open()
    doomed, kept = _plant(store, "doomed"), _plant(store, "kept")
    errors: list[BaseException] = []

    def query(name: str) -> None:
        try:
            for _ in range(20):
                assert store.keyword_search(ALICE, name, "heron boathouse", 5)
        except BaseException as exc:
            errors.append(exc)

    # Queries of both from threads, while documents go into one: each thread its connection.
    threads = [threading.Thread(target=query, args=(name,)) for name in ("doomed", "kept") * 2]
    for thread in threads:
        thread.start()
    for n in range(5):
        store.add_documents(ALICE, "kept", [document(f"more-{n}.txt", [f"{SENTENCE} {n}"])])
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(thread.is_alive() for thread in threads)
    doomed_mount, kept_mount = (stack.mounts / c for c in (doomed, kept))
    assert _open_files(doomed_mount) and _open_files(kept_mount)  # kept between queries

    store.delete(ALICE, "doomed")  # its connections closed first: the unmount is not busy
    assert not is_mounted(doomed_mount) and not (stack.volumes / doomed).exists()
    assert _open_files(doomed_mount) == []
    stack.close()
    assert not is_mounted(kept_mount) and _open_files(kept_mount) == []
    store = stack.open()
    found = store.keyword_search(ALICE, "kept", "heron boathouse", 20)
    assert {chunk.filename for chunk, _ in found} == {"notes.txt"} | {
        f"more-{n}.txt" for n in range(5)
    }


def _open_files(under: Path) -> list[str]:
    """The files under `under` that this process has open."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed meanwhile
            if os.readlink(fd).startswith(f"{under}/"):
                found.append(os.readlink(fd))
    return found
