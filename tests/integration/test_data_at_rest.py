"""User data encrypted at rest (security.data_at_rest), with real gocryptfs, Chroma and SQLite:
sentences planted through the real stores (a knowledge base's documents and chunks, a
conversation, a fine-tuning dataset, an upload, a scratch file; a chat prompt through the real
gateway with security.audit_prompts on) are found nowhere on disk, by another local account
while the volume is open, nor by root once it is closed; the services
refuse to start, saying why, under a policy that fails; plaintext from before is sealed in."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import openai
import pytest
import yaml
from appliance.security.data_volume import (
    PolicyTerms,
    close_volume,
    open_volume,
    resign,
    service_account,
    volume,
)
from appliance.security.gocryptfs import EncryptedVolume, is_mounted
from appliance.security.privileges import hand_over, in_account

from appliance.cli.data import open_for_service
from appliance.cli.main import main as cli
from appliance.config import load_settings
from appliance.state_version import SCHEMA_VERSION, write_record
from appliance.store.keyring import init_keys
from appliance_dev.stack import running_gateway, write_config
from tests.local_accounts import as_outsider, reachable, system_account
from tests.slurm_fixtures import stack_settings, tiny_catalog

# Joined at run time: neither this file nor its bytecode holds the sentence whole, so a checkout
# under /tmp is not a false find.
SECRET = " ".join(["the cellar key", "hangs behind", "the seventh heron painting"])
TIMEOUT_S = 300
SERVICE_ACCOUNT = "appliance-svc"

# Run in a process of its own, as a service would (so Chroma's files are closed when it ends):
# opens the volume as the gateway does, then writes through the real stores.
PLANT = textwrap.dedent(
    """
    import json, sys, tempfile
    from appliance.cli.data import open_for_service
    from appliance.config import load_settings
    from appliance.gateway.account import ConversationStore
    from appliance.rag.ingest import parse_many
    from appliance.rag.kb_dirs import knowledge_base_dirs
    from appliance.rag.store import KnowledgeBaseStore
    from appliance.store.keyring import data_at_rest_kek
    from appliance.security.api_keys import Principal
    from appliance.training.files import save_dataset

    secret = sys.argv[2]
    settings = load_settings(sys.argv[1])
    open_for_service(settings)
    who = Principal("alice", frozenset())
    if sys.argv[3] == "with-kb":
        # As the gateway keeps them: each knowledge base in a volume of its own, inside the
        # data one.
        dirs = knowledge_base_dirs(settings, data_at_rest_kek(settings))
        store = KnowledgeBaseStore(settings.rag_dir, settings.rag, None, dirs)
        kb = store.create(who, "plant")
        documents, errors = parse_many([(f"# Notes\\n\\n{secret}.\\n".encode(), "notes.md")])
        assert not errors, errors
        store.add_documents(who, kb.id, documents)
    conversation = {"title": "t", "messages": [{"role": "user", "content": secret}]}
    ConversationStore(settings.conversations_dir).put("alice", "c1", conversation)
    messages = [{"role": "user", "content": secret}, {"role": "assistant", "content": "ok"}]
    line = json.dumps({"messages": messages}) + "\\n"
    save_dataset(settings, "alice", "train.jsonl", line.encode() * 4)
    uploads = settings.webapp_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    (uploads / "upload.txt").write_text(secret)
    with tempfile.NamedTemporaryFile("w", delete=False, suffix=".parse") as scratch:
        scratch.write(secret)
    print(scratch.name)
    """
)


def _config(top: Path, name: str, **security: object) -> Path:
    config = top / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(top / name),
                "catalog": {"include_presets": False},
                "security": {"data_at_rest": {"enabled": True}, **security},
            }
        )
    )
    return config


@pytest.fixture
def top():
    """A folder for state directories; every data volume in it closed at the end."""
    path = Path(tempfile.mkdtemp(prefix="appliance-vault-", dir="/var/tmp"))
    os.chmod(path, 0o755)  # as /var/lib: another account may pass through to the state
    try:
        yield path
    finally:
        for config in path.glob("*.yaml"):
            # As `appliance down` does: the knowledge bases' volumes inside it first (a test
            # that failed midway leaves them mounted, and the data volume busy).
            close_volume(load_settings(config))
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state(top):
    """The configuration of a state directory with data_at_rest on and its keys."""
    config = _config(top, "state")
    settings = load_settings(config)
    init_keys(settings)
    write_record(settings.state_dir, SCHEMA_VERSION)  # as the installer leaves it
    return config


def _appliance(config: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "--config", str(config), *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


# Which files of the knowledge bases hold the secret, every knowledge base's volume open.
FIND_IN_KNOWLEDGE_BASES = textwrap.dedent(
    """
    import subprocess, sys
    from appliance.config import load_settings
    from appliance.rag.kb_dirs import all_open, knowledge_base_dirs
    from appliance.store.keyring import data_at_rest_kek

    settings = load_settings(sys.argv[1])
    dirs = knowledge_base_dirs(settings, data_at_rest_kek(settings))
    with all_open(dirs):
        places = [str(dirs.path(c)) for c in dirs.collections()]
        argv = ["grep", "-rlsF", sys.argv[2], str(settings.rag_dir), *places]
        print(subprocess.run(argv, capture_output=True, text=True).stdout)
    """
)


def _plant(config: Path, knowledge_base: bool = True) -> Path:
    """Plant SECRET through the real stores (PLANT); the scratch file it left."""
    planted = subprocess.run(
        [sys.executable, "-c", PLANT, str(config), SECRET, "with-kb" if knowledge_base else ""],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert planted.returncode == 0, planted.stderr[-3000:]
    return Path(planted.stdout.strip().splitlines()[-1])


def _grep(*places: Path, exclude: tuple[Path, ...] = ()) -> list[str]:
    """Files under `places` that hold SECRET in plain bytes (as root: everything readable)."""
    argv = ["grep", "-rlsF", "--devices=skip", SECRET, *map(str, places)]
    argv[1:1] = [f"--exclude-dir={path.name}" for path in exclude]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    return done.stdout.splitlines()


def test_planted_sentences_are_nowhere_on_disk(state, outsider):
    assert cli(["--config", str(state), "data", "init"]) == 0
    settings = load_settings(state)
    scratch = _plant(state)
    # The stores wrote where they always do: inside the mount, plaintext to their reader.
    assert scratch.is_relative_to(settings.layout.tmp)
    inside = _grep(settings.layout.data, settings.layout.kb_mounts)
    # A knowledge base's text is in its keyword index (Chroma holds only vectors).
    for where in ("keywords.sqlite3", "conversations", "training", "uploads", ".parse"):
        assert any(where in path for path in inside), (where, inside)

    # Open: another account finds it nowhere, neither in the state nor in /tmp.
    assert volume(settings).mounted()
    found = as_outsider("grep", "-rlsF", SECRET, str(settings.state_dir), "/tmp")
    assert found.stdout == "" and found.returncode != 0
    # Nor is it anywhere but in the mounts, which is all root could see of it on disk.
    mounts = (settings.layout.data, settings.layout.kb_mounts)
    assert _grep(settings.state_dir, exclude=mounts) == []
    assert _grep(Path("/tmp")) == []

    # Closed: root without the key finds ciphertext only.
    assert cli(["--config", str(state), "down", "--keep-cluster"]) == 0
    assert not volume(settings).mounted()
    assert not any(settings.layout.data.iterdir())
    assert not any(p for m in settings.layout.kb_mounts.iterdir() for p in m.iterdir())
    # Chroma's files, encrypted: in the knowledge base's own volume, the rest in the data one.
    ciphertext = [
        p for top in (settings.layout.vault, settings.layout.kb_volumes) for p in top.rglob("*")
    ]
    assert sum(p.stat().st_size for p in ciphertext if p.is_file()) > 100_000
    assert _grep(settings.state_dir, Path("/tmp")) == []


def _tamper(settings) -> None:
    path = settings.layout.data_volume_key
    record = json.loads(path.read_text())
    record["policy"]["policy"]["users"] = ["mallory"]
    path.write_text(json.dumps(record))


REFUSALS = {
    "other host": (["--host", "hf-" + "0" * 24], None, "rule 'host'"),
    "wrong account": (["--account", "mallory"], None, "rule 'user'"),
    "expired": (
        [],
        lambda s: resign(
            s,
            PolicyTerms(service_account(s), [], dt.datetime.now(dt.UTC) - dt.timedelta(days=1)),
        ),
        "rule 'expiry'",
    ),
    "bad signature": (["--any-host"], _tamper, "rule 'signature'"),
    "no key-encryption key": (["--any-host"], lambda s: s.kek_file.unlink(), "no key-encryption"),
    "plaintext beside it": (
        ["--any-host"],
        lambda s: (s.state_dir / "conversations").mkdir(),
        "appliance data seal",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_services_refuse_under_a_failing_policy(state, case):
    init_args, spoil, said = REFUSALS[case]
    assert cli(["--config", str(state), "data", "init", *init_args]) == 0
    settings = load_settings(state)
    if spoil is not None:
        spoil(settings)
    # `appliance up` says it before it starts anything.
    for service in (["gateway"], ["webapp"], ["up", "--no-tiny"]):
        done = _appliance(state, *service)
        assert done.returncode == 2, (service, done.stdout, done.stderr[-2000:])
        assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not volume(settings).mounted()


def test_plaintext_from_before_is_sealed_in(state):
    # Where an unencrypted state keeps them.
    top = load_settings(state).state_dir
    (top / "rag" / "chroma").mkdir(parents=True)
    (top / "rag" / "chroma" / "chroma.sqlite3").write_text(SECRET)
    (top / "conversations" / "alice").mkdir(parents=True)
    (top / "conversations" / "alice" / "c1.json").write_text(SECRET)
    assert _grep(top)

    done = _appliance(state, "data", "seal")
    assert done.returncode == 0, done.stderr
    assert "moved" in done.stdout
    settings = load_settings(state)
    assert not volume(settings).mounted()
    assert _grep(settings.state_dir) == []
    assert _appliance(state, "data", "open").returncode == 0
    assert (settings.rag_dir / "chroma" / "chroma.sqlite3").read_text() == SECRET
    assert (settings.conversations_dir / "alice" / "c1.json").read_text() == SECRET
    assert _appliance(state, "data", "close").returncode == 0


def test_status_says_whether_user_data_is_encrypted(state):
    off = _appliance(state, "data", "status")
    assert "no data volume yet" in off.stdout
    assert cli(["--config", str(state), "data", "init"]) == 0
    sealed = _appliance(state, "data", "status")
    assert "encrypted at rest" in sealed.stdout and "(sealed)" in sealed.stdout


def test_backup_holds_it_encrypted_and_a_restore_needs_the_key(state, top):
    assert cli(["--config", str(state), "data", "init"]) == 0
    _plant(state)
    assert _appliance(state, "data", "close").returncode == 0
    old = load_settings(state)

    # Sealed with the key-encryption key only; the volume opened for it and closed again.
    passphrase = top / "passphrase"
    passphrase.write_text("a passphrase")
    refused = _appliance(
        state, "backup", str(top / "p.backup"), "--passphrase-file", str(passphrase)
    )
    assert refused.returncode == 2 and "leave out --passphrase-file" in refused.stderr
    backup = top / "b.backup"
    made = _appliance(state, "backup", str(backup))
    assert made.returncode == 0, made.stderr
    assert not volume(old).mounted()
    assert _grep(backup, old.state_dir, Path("/tmp")) == []

    # Into a new state: without the key, nothing is restored.
    new = _config(top, "restored")
    without = _appliance(new, "restore", str(backup))
    assert without.returncode == 2 and "key-encryption key" in without.stderr, without.stderr
    assert not load_settings(new).state_dir.exists()

    # With it: a volume of its own, its policy for this host, the user content inside it.
    restored = _appliance(new, "restore", str(backup), "--key-file", str(old.kek_file))
    assert restored.returncode == 0, restored.stderr
    settings = load_settings(new)
    assert not volume(settings).mounted()
    assert _grep(settings.state_dir) == []
    assert _appliance(new, "data", "open").returncode == 0
    assert _grep(settings.conversations_dir) and _grep(settings.training_dir)
    found = subprocess.run(
        [sys.executable, "-c", FIND_IN_KNOWLEDGE_BASES, str(new), SECRET],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert "keywords.sqlite3" in found.stdout, found.stderr[-3000:]
    assert _appliance(new, "data", "close").returncode == 0


def test_closing_unmounts_the_knowledge_bases_volumes_first(state):
    assert cli(["--config", str(state), "data", "init"]) == 0
    settings = load_settings(state)
    assert open_volume(settings)
    # A knowledge base's own volume, where it is mounted (beside the data volume), and one
    # where an older version mounted it (inside the data volume, keeping it busy).
    volumes = settings.layout.kb_volumes
    inner = [
        EncryptedVolume(volumes / "kb1", settings.layout.kb_mounts / "kb1"),
        EncryptedVolume(volumes / "kb2", settings.rag_dir / "kbs" / "kb2"),
    ]
    try:
        for kb in inner:
            key = secrets.token_bytes(32)
            kb.create(key)
            kb.mount(key)
            (kb.mount_dir / "chunk.txt").write_text(SECRET)
        assert close_volume(settings)
        assert not any(kb.mounted() for kb in inner) and not volume(settings).mounted()
        assert _grep(settings.state_dir) == []
    finally:
        for kb in inner:
            kb.unmount()


@pytest.mark.slurm
@pytest.mark.vllm
@pytest.mark.slow
def test_a_recorded_prompt_is_sealed_in_the_volume(slurm_cluster, tiny_model_dir, top):
    security = {"data_at_rest": {"enabled": True}, "audit_prompts": True}
    settings = stack_settings(
        slurm_cluster, top / "stack", tiny_catalog(tiny_model_dir), security=security
    )
    config = write_config(settings, top / "stack.yaml")  # `top` closes its volume at the end
    init_keys(settings)
    write_record(settings.state_dir, SCHEMA_VERSION)
    assert cli(["--config", str(config), "data", "init"]) == 0
    with running_gateway(settings) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
        answer = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": SECRET}], max_tokens=8
        )
        assert answer.choices[0].message.content
    # Nowhere but in the data volume: not the audit chain, the instance's log, usage, the
    # endpoint files.
    assert _grep(settings.state_dir, exclude=(settings.layout.data,)) == []
    assert _grep(Path("/tmp")) == []
    # Recorded there; the chain outside it holds the prompt's salted digest.
    assert _grep(settings.layout.data) == [str(settings.layout.sealed_audit / "details.jsonl")]
    shown = _appliance(config, "audit", "show", "--json")
    assert shown.returncode == 0 and SECRET in shown.stdout, shown.stderr
    assert _appliance(config, "audit", "verify").returncode == 0

    assert close_volume(settings)
    assert _grep(settings.state_dir) == []
    sealed = _appliance(config, "audit", "verify")
    assert sealed.returncode == 2 and "appliance data open" in sealed.stderr, sealed.stderr
    assert "Traceback" not in sealed.stderr


def test_root_backs_up_a_volume_the_service_account_holds_open(top, outsider):
    account = system_account(SERVICE_ACCOUNT)
    config = _config(top, "held", service_user=account.pw_name)
    settings = load_settings(config)
    init_keys(settings)
    write_record(settings.state_dir, SCHEMA_VERSION)
    assert cli(["--config", str(config), "data", "init"]) == 0
    _plant(config)
    assert _appliance(config, "data", "close").returncode == 0
    # As a running appliance holds it: the state the account's, the volume mounted by it.
    hand_over(settings, account)
    in_account(account.pw_name, top, lambda: open_for_service(settings) or b"")
    assert volume(settings).mounted()
    with pytest.raises(PermissionError):
        (settings.layout.data / ".").stat()

    # Root backs it up: read by the account, written by root, sealed with the key.
    backup = top / "held.backup"
    made = _appliance(config, "backup", str(backup))
    assert made.returncode == 0, made.stderr
    assert "conversations" in made.stdout and "training" in made.stdout, made.stdout
    assert backup.stat().st_uid == 0
    assert volume(settings).mounted()  # still the services'
    # Root's audit entry for it leaves the log the services append to theirs.
    audit = [settings.audit_dir / name for name in ("audit.log", "audit.head", "audit.key")]
    assert {path.stat().st_uid for path in audit} == {account.pw_uid}
    assert _grep(backup, settings.state_dir, Path("/tmp")) == []

    # A restore needs the key; with it, the user content is there, in a volume of its own.
    new = _config(top, "restored-held")
    without = _appliance(new, "restore", str(backup), "--key-file", str(top / "no.key"))
    assert without.returncode == 2 and "key" in without.stderr, without.stderr
    restored = _appliance(new, "restore", str(backup), "--key-file", str(settings.kek_file))
    assert restored.returncode == 0, restored.stderr
    fresh = load_settings(new)
    assert _grep(fresh.state_dir) == []
    assert _appliance(new, "data", "open").returncode == 0
    assert _grep(fresh.conversations_dir) and _grep(fresh.training_dir)


def test_the_service_account_mounts_knowledge_bases_while_the_data_volume_is_open(top):
    """As the installed services run: the data volume and each knowledge base's volume mounted
    by the (non-root) service account; fusermount3 runs as root, which the data volume's mount
    refuses, so no knowledge base may be mounted inside it. `appliance down` (root) closes all."""
    if os.geteuid() != 0:
        pytest.skip("only root can act as the service account")
    account = system_account(SERVICE_ACCOUNT)
    config = _config(top, "service", service_user=SERVICE_ACCOUNT)
    settings = load_settings(config)
    init_keys(settings)
    write_record(settings.state_dir, SCHEMA_VERSION)
    assert cli(["--config", str(config), "data", "init"]) == 0
    hand_over(settings, account)

    def as_account(script: str) -> str:
        argv = ["env", f"HOME={settings.layout.service_home}", sys.executable, "-c", script]
        done = subprocess.run(
            ["runuser", "-u", SERVICE_ACCOUNT, "--", *argv, str(config), SECRET, "with-kb"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    with reachable(Path(os.__file__)):  # this Python may live under /root (pyenv)
        as_account(PLANT)
        mounts = [m for m in settings.layout.kb_mounts.iterdir() if is_mounted(m)]
        assert len(mounts) == 1
        with pytest.raises(PermissionError):  # the account's: its mount answers no one else
            os.listdir(mounts[0])
        hand_over(settings, account)  # as a service restarted meanwhile: past the open volumes
        assert volume(settings).mounted()
        # Read again by another of its processes, through the mount the first one left.
        assert "keywords.sqlite3" in as_account(FIND_IN_KNOWLEDGE_BASES)
    assert cli(["--config", str(config), "down", "--keep-cluster"]) == 0
    assert not is_mounted(mounts[0]) and not volume(settings).mounted()
    assert _grep(settings.state_dir) == []
