"""The installer's second stage, in the appliance's own environment: service account, files,
certificate, keys, administrator, models, services, self-test."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from appliance.installer.files import written_files
from appliance.installer.manifest import Manifest
from appliance.installer.plan import EMBEDDING_MODEL, ModelChoice, Plan
from appliance.installer.report import Report, fail
from appliance.installer.selftest import self_test
from appliance.security import data_volume
from appliance.security.api_keys import ApiKeyStore
from appliance.security.host import this_host_fingerprint
from appliance.security.internal_ca import InternalCaError, resolved_addresses
from appliance.security.keys import KeyEncryptionKey
from appliance.security.node_tls import internal_ca
from appliance.security.privileges import hand_over
from appliance.security.tls import make_self_signed
from appliance.security.users import UserStore

from appliance.atomic_files import write_if_changed
from appliance.backup.archive import KeySource
from appliance.config import load_settings
from appliance.errors import ApplianceError
from appliance.model_builders.tiny import build_tiny_model
from appliance.models.catalog import load_catalog
from appliance.names import local_node_names
from appliance.services import ServiceManager
from appliance.state_version import SCHEMA_VERSION, state_version, write_record
from appliance.store import keyring
from appliance.store.hub import resolve_source
from appliance.store.publish import publish_checkpoint
from appliance.upgrade.runner import pending_steps
from appliance.upgrade.service import upgrade


def configure(plan: Plan, report: Report) -> int:
    manifest = Manifest.load(plan.layout.manifest)
    manifest.service_mode = plan.service_mode
    credentials = None
    try:
        report.section("Service account and configuration")
        _service_user(plan, report, manifest)
        changed_files = _write_files(plan, report, manifest)
        manifest.save(plan.layout.manifest)
        settings = load_settings(plan.layout.config)
        # Before anything is written to the state: a fresh one gets this release's schema, an
        # older install is migrated (backup first), a newer one is refused. An older install's
        # user content is still unencrypted: migrated where it lies, then sealed.
        _state_schema(plan, data_volume.as_found(settings), report)
        if plan.profile.services:
            _tls(plan, report)
            _keys(settings, report)
            _data_volume(plan, settings, report)
            credentials = _admin(plan, settings, report)
        _node_certificates(plan, settings, report)
        _slurm_extras(plan, report, manifest)
        manifest.save(plan.layout.manifest)
        if plan.profile.services:
            report.section("Models")
            for choice in plan.models:
                _model(settings, choice, report)
        _hand_over(plan, settings)
        report.section("Services")

        services = ServiceManager(
            settings, plan.layout.config, plan.service_mode, gateway=plan.profile.services
        )
        # New code or configuration takes a restart to take effect.
        restart = changed_files or "Python environment" in report.changed
        started = services.start(restart=restart)
        report.step("services", started, services.describe())
        passed = True
        if plan.profile.services and plan.options.self_test:
            report.section("Self-test")
            chat = next((m.name for m in plan.models if m.name != EMBEDDING_MODEL), None)
            passed = self_test(settings, chat, report)
    except ApplianceError as exc:
        fail(str(exc))
    print()
    if plan.profile.services:
        print(f"Web app:     {settings.webapp_url}")
        print(f"OpenAI API:  {settings.gateway_url}/v1")
        print(f"Certificate: {plan.layout.tls_cert} (self-signed; give it to clients to verify)")
        if credentials:
            user, password, key = credentials
            print("\nAdministrator (shown this once; keep it safe):")
            print(f"  user      {user}\n  password  {password}\n  API key   {key}")
    print(f"Command:     {plan.layout.command} (status, models, users, uninstall ...)")
    print(report.summary())
    return 0 if passed else 1


def _service_user(plan: Plan, report: Report, manifest: Manifest) -> None:
    name = plan.options.service_user
    if not name or os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(name)
        report.step(f"service account {name}", False, "exists")
        return
    except KeyError:
        pass
    argv = [
        "useradd",
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        str(plan.layout.state / "home"),
        "--shell",
        "/usr/sbin/nologin",
        name,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        fail(f"cannot create the service account {name}: {done.stderr.strip()}")
    manifest.service_user, manifest.service_user_created = name, True
    report.step(f"service account {name}", True, "created (the services run as it)")


def _hand_over(plan: Plan, settings) -> None:
    """What this run wrote as root under the state directory becomes the service account's,
    and private to it (0700 folders, 0600 files), as the services keep it."""
    if plan.options.service_user and os.geteuid() == 0:
        hand_over(settings, pwd.getpwnam(plan.options.service_user))
    settings.layout.make_private(settings.rag_dir)


def _write_files(plan: Plan, report: Report, manifest: Manifest) -> bool:
    changed = []
    for path, _what, text in written_files(plan):
        if text is None:
            continue
        executable = text.startswith("#!")
        if write_if_changed(path, text, 0o755 if executable else 0o644):
            changed.append(path)
    manifest.add_files([p for p, _w, t in written_files(plan) if t is not None])
    names = ", ".join(str(p) for p in changed)
    report.step("configuration files", bool(changed), names or "as planned")
    return bool(changed)


def _state_schema(plan: Plan, settings, report: Report) -> None:
    """What `appliance upgrade` does, run over an older install: the installed services are
    stopped (the migration needs the stores closed), then the state is backed up and migrated
    with the KEK the earlier install made; `start` below brings the services back."""
    if not pending_steps(settings):
        version = state_version(settings.state_dir)
        if version is None:
            write_record(settings.state_dir, SCHEMA_VERSION)
        report.step("state schema", version is None, f"version {SCHEMA_VERSION}")
        return
    ServiceManager(settings, plan.layout.config, plan.service_mode).stop()
    kek = settings.kek_file
    result = upgrade(
        settings,
        settings.layout.backups,
        lambda: KeySource(kek=KeyEncryptionKey.from_key_file(kek)),
    )
    report.step(
        "state schema",
        True,
        f"upgraded from version {result.source} to {result.target}; backup {result.backup}",
    )


def _tls(plan: Plan, report: Report) -> None:
    cert, key = plan.layout.tls_cert, plan.layout.tls_key
    if cert.exists() and key.exists():
        report.step("TLS certificate", False, str(cert))
        return
    make_self_signed(cert, key)
    report.step("TLS certificate", True, f"self-signed, {cert}")


def _node_certificates(plan: Plan, settings, report: Report) -> None:
    """The internal CA (made where the gateway runs) and a certificate from it for every node
    this installation sets up: the local cluster's, or this host and the workers named."""
    if not settings.serving.tls:
        report.step("internal CA", False, "off (serving.tls: false)")
        return
    ca = internal_ca(settings)
    if plan.profile.services:
        made = ca.ensure()
        report.step("internal CA", made, str(ca.cert))
    if plan.profile.local_cluster:
        nodes = local_node_names(settings.cluster.nodes)
    else:
        nodes = [plan.hardware.hostname, *(w.name for w in plan.options.workers)]
    issued = []
    try:
        for node in nodes:
            if ca.issue(node, resolved_addresses(node)):
                issued.append(node)
    except InternalCaError as exc:
        # A worker whose state directory does not hold the head's CA: its servers cannot start
        # with TLS until the head's installer (or a copy of <state_dir>/keys/tls) gives it one.
        report.step("node certificates", False, f"missing: {exc}")
        return
    detail = f"issued for {', '.join(issued)}" if issued else f"present for {', '.join(nodes)}"
    report.step("node certificates", bool(issued), detail)


def _keys(settings, report: Report) -> None:
    lines = keyring.init_keys(settings)
    report.step("store keys", bool(lines), "; ".join(lines) or "present")


def _data_volume(plan: Plan, settings, report: Report) -> None:
    """The user data's encrypted volume, released to the service account on this host; an
    older install's unencrypted user content moved into it."""
    if not settings.security.data_at_rest.enabled:
        return
    account = plan.options.service_user or data_volume.service_account(settings)
    terms = data_volume.PolicyTerms(account, [this_host_fingerprint()])
    moved = data_volume.seal_plaintext(settings, terms)
    if moved:
        names = ", ".join(p.name for p in moved)
        report.step("data volume", True, f"{names} moved into it (encrypted at rest)")
    elif data_volume.volume(settings).exists():
        report.step("data volume", False, "present")
    else:
        data_volume.init_volume(settings, terms)
        report.step("data volume", True, f"made in {settings.layout.vault}, for {account}")


def _admin(plan: Plan, settings, report: Report) -> tuple[str, str, str] | None:
    name = plan.options.admin
    users = UserStore(settings.users_file)
    if users.get(name):
        report.step(f"administrator {name}", False, "exists (password and keys unchanged)")
        return None
    password = secrets.token_urlsafe(12)
    users.add(name, password, role="admin")
    key, _record = ApiKeyStore(settings.api_keys_file).create(name, role="admin")
    report.step(f"administrator {name}", True, "created; password and API key printed at the end")
    return name, password, key


def _slurm_extras(plan: Plan, report: Report, manifest: Manifest) -> None:
    """Multi-node only: the worker's copy of the head's munge key."""
    if plan.profile.name != "worker" or plan.options.munge_key is None:
        return
    target = plan.layout.munge_key
    new = plan.options.munge_key.read_bytes()
    if target.exists() and target.read_bytes() == new:
        report.step("munge key", False, "the head's")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(new)
    os.chmod(target, 0o400)
    with contextlib.suppress(LookupError, PermissionError):
        shutil.chown(target, "munge", "munge")
    manifest.add_files([target])
    report.step("munge key", True, "copied from --munge-key")


def _model(settings, choice: ModelChoice, report: Report) -> None:
    if choice.name == EMBEDDING_MODEL:
        report.step(choice.name, False, "served from its Python package")
        return
    catalog = load_catalog(settings)
    spec = catalog.get(choice.name)
    if spec.source == f"store:{choice.name}" and spec.model_dir(settings).is_dir():
        report.step(choice.name, False, "in the model store (encrypted)")
        return
    with tempfile.TemporaryDirectory(dir=settings.state_dir, prefix=".import-") as tmp:
        directory = _fetch(choice, Path(tmp), report)
        publish_checkpoint(
            settings,
            directory,
            choice.name,
            encrypt=True,
            policy=lambda: keyring.sign_policy(
                settings, choice.name, users=[], roles=[], hosts=[], not_after=None
            ),
            max_model_len=spec.max_model_len,
            resources=spec.resources,
            description=spec.description,
            replace=True,
            say=report.say,
        )
    report.step(choice.name, True, f"imported encrypted from {choice.origin}")


def _fetch(choice: ModelChoice, tmp: Path, report: Report) -> Path:
    kind, _, ref = choice.origin.partition(":")
    if kind == "dir":
        return Path(ref)
    if kind == "hub":
        report.say(f"downloading {ref} from the model hub ...")
        return resolve_source(ref)[0]

    report.say("building the tiny model (about 3 minutes on 2 cores) ...")
    build_tiny_model(tmp / choice.name, progress=report.say)
    return tmp / choice.name
