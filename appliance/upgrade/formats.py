"""The migrations of each stored format. From the unversioned state (0) to schema 1, every format
stays as release 0.1.0 wrote it, so each is a check that the format reads with this code's own
reader: a state that would fail at run time fails here, before the record says 1. Schema 2 adds
the knowledge bases' keyword indexes; schema 3 gives each knowledge base a directory of its own,
and builds the keyword indexes schema 2 lacks. Each is read-only or idempotent, so a re-run
after a crash is safe."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

from appliance.atomic_files import read_json_object
from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import load_catalog
from appliance.rag.registry import Registry
from appliance.security.api_keys import ApiKeyStore
from appliance.security.audit import AuditLog
from appliance.security.users import UserStore
from appliance.store.format import HEADER_FILE, StoreHeader
from appliance.store.keyring import data_at_rest_kek
from appliance.training.files import files_dir
from appliance.training.jobs import TrainingJob


class MigrationError(ApplianceError):
    """A stored format does not read as the migration expects; nothing is recorded."""


def check_accounts(settings: ApplianceSettings) -> None:
    """keys/users.json: every account record loads."""
    if settings.users_file.exists():
        _reads(settings.users_file, lambda: UserStore(settings.users_file).records())


def check_api_keys(settings: ApplianceSettings) -> None:
    """keys/api-keys.json: every API key and sign-in session record loads."""
    if settings.api_keys_file.exists():
        _reads(settings.api_keys_file, lambda: ApiKeyStore(settings.api_keys_file).records())


def check_audit(settings: ApplianceSettings) -> None:
    """audit/: the hash chain verifies end to end."""
    log = AuditLog(settings.audit_dir)
    if not log.path.exists():
        return
    result = log.verify()
    if not result.ok:
        raise MigrationError(f"the audit log {log.path} does not verify: {result.problem}")


def migrate_kb_registry(settings: ApplianceSettings) -> None:
    """rag/registry.sqlite3: opening it applies the registry's own in-place changes (tables
    added if missing, names namespaced as `owner/name`), each in one transaction."""
    path = settings.rag_dir / "registry.sqlite3"
    if path.exists():
        _reads(path, lambda: Registry(path).knowledge_bases())


def move_to_kb_directories(settings: ApplianceSettings) -> None:
    """rag/: each knowledge base moves into a directory of its own, rag/kbs/<collection>/ (an
    encrypted volume of its own with security.data_at_rest.enabled): its vectors from the shared
    rag/chroma/ and its keyword index from rag/keywords/, both deleted once every knowledge
    base is moved. A knowledge base without a keyword index (schema 1) then gets it, built from
    its chunks. With rag.chroma_url the vectors stay on that server and only the keyword indexes
    move: the gateway's store builds missing ones when it opens."""
    if not (settings.rag_dir / "registry.sqlite3").exists():
        return
    # Imported here: Chroma takes seconds to load, and only a state with knowledge bases needs it.
    from appliance.rag.kb_dirs import knowledge_base_dirs
    from appliance.rag.layout_move import move_to_kb_dirs
    from appliance.rag.store import KnowledgeBaseStore

    dirs = knowledge_base_dirs(settings, data_at_rest_kek(settings))
    embedded = settings.rag.chroma_url is None
    try:
        move_to_kb_dirs(settings.rag_dir, dirs, embedded=embedded)
        if embedded:  # opening builds what is missing
            KnowledgeBaseStore(settings.rag_dir, settings.rag, dirs=dirs).close()
    finally:
        dirs.close_all()


def check_chroma(settings: ApplianceSettings) -> None:
    """rag/chroma/: every knowledge base the registry lists has its collection in Chroma."""
    registry_path = settings.rag_dir / "registry.sqlite3"
    chroma_path = settings.rag_dir / "chroma"
    # With rag.chroma_url the collections live on that server, upgraded with it.
    if settings.rag.chroma_url is not None or not registry_path.exists():
        return
    # Imported here: Chroma takes seconds to load, and only a state with knowledge bases needs it.
    import chromadb
    from chromadb.config import Settings

    with chromadb.PersistentClient(
        path=chroma_path, settings=Settings(anonymized_telemetry=False)
    ) as client:
        for kb in Registry(registry_path).knowledge_bases():
            try:
                client.get_collection(kb.collection).count()
            except Exception as exc:  # Chroma raises its own types (NotFoundError, ...)
                raise MigrationError(
                    f"knowledge base {kb.id}: its Chroma collection {kb.collection} does not "
                    f"read: {exc}"
                ) from None


def check_conversations(settings: ApplianceSettings) -> None:
    """conversations/<user>/<id>.json: every saved conversation is a JSON object."""
    for path in sorted(settings.conversations_dir.glob("*/*.json")):
        data = _reads(path, lambda p=path: json.loads(p.read_text()))
        if not isinstance(data, dict):
            raise MigrationError(f"{path} does not hold a conversation object")


def check_training(settings: ApplianceSettings) -> None:
    """training/: every job record loads as a TrainingJob, every dataset's metadata reads."""
    for path in sorted(settings.training_dir.glob("ft-*/job.json")):
        _reads(path, lambda p=path: TrainingJob.model_validate(json.loads(p.read_text())))
    for path in sorted(files_dir(settings).glob("file-*.json")):
        if read_json_object(path) is None:
            raise MigrationError(f"{path} does not hold a dataset's metadata")


def check_store(settings: ApplianceSettings) -> None:
    """store/<model>/header.json: every model's header (with its wrapped data key) reads."""
    if not settings.store_root.is_dir():
        return
    for model_dir in sorted(settings.store_root.iterdir()):
        if model_dir.name.startswith(".") or not (model_dir / HEADER_FILE).exists():
            continue  # an import in progress, or not a model
        _reads(model_dir / HEADER_FILE, lambda d=model_dir: StoreHeader.read(d))


def check_usage(settings: ApplianceSettings) -> None:
    """usage/usage.sqlite3: the quota counters' database passes SQLite's quick check."""
    path = settings.layout.usage_db
    if not path.exists():
        return
    with closing(sqlite3.connect(path, timeout=30)) as db:
        (result,) = db.execute("PRAGMA quick_check").fetchone()
    if result != "ok":
        raise MigrationError(f"the usage database {path} is damaged: {result}")


def check_config(settings: ApplianceSettings) -> None:
    """--config and catalog.yaml: the configuration (validated when loaded) and the user catalog
    load."""
    if settings.user_catalog_file.exists():
        _reads(settings.user_catalog_file, lambda: load_catalog(settings))


def _reads(path, read):
    try:
        return read()
    except MigrationError:
        raise
    except Exception as exc:  # whatever the format's reader raises: reported, with the file
        raise MigrationError(f"{path} does not read as this version expects: {exc}") from None
