"""The state directory's schema record and the migration runner on tmp state directories:
fresh stamped, older and newer refused with what to do, each stored format covered by the first
step, a crash mid-step re-run cleanly, and `appliance upgrade` (backup first, --dry-run)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from appliance.installer import apply
from appliance.installer.report import Report
from appliance.security.api_keys import ApiKeyStore
from appliance.security.audit import AuditLog
from appliance.security.keys import generate_key_file
from appliance.security.users import UserStore

from appliance import state_version as sv
from appliance.cli.main import main
from appliance.config import ApplianceSettings, load_settings
from appliance.layout import make_private
from appliance.upgrade import runner
from appliance.upgrade.formats import MigrationError
from appliance.upgrade.service import upgrade
from appliance.upgrade.steps import STEPS, STORED_FORMATS, FormatMigration, Step
from appliance_dev.stack import free_port


@pytest.fixture
def host(tmp_path, capsys):
    """An unversioned state directory (as release 0.1.0 left it) with accounts, a key, an audit
    chain, a conversation and a fine-tuning job; and a runner for the CLI."""
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ngateway:\n  port: {free_port()}\n")
    settings = load_settings(config)
    settings.layout.keys.mkdir(parents=True, mode=0o700)
    generate_key_file(settings.kek_file)
    UserStore(settings.users_file).add("alice", "a long password 1")
    secret, _ = ApiKeyStore(settings.api_keys_file).create("alice")
    AuditLog(settings.audit_dir).append("cli:test", "key_create", "alice")
    (settings.conversations_dir / "u1").mkdir(parents=True)
    (settings.conversations_dir / "u1" / "c1.json").write_text('{"messages": []}')

    def run(*args: str):
        rc = main(["--config", str(config), *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    run.settings, run.secret, run.tmp = settings, secret, tmp_path
    return run


def test_a_fresh_state_directory_is_stamped_with_the_current_version(tmp_path):
    state = tmp_path / "state"
    assert sv.state_version(state) is None
    (state / "logs").mkdir(parents=True)  # written at every start: not data
    assert sv.state_version(state) is None
    sv.require_current(state)
    record = json.loads((state / "schema.json").read_text())
    assert record == {"version": sv.SCHEMA_VERSION, "written_by": sv.__version__}
    assert stat.S_IMODE((state / "schema.json").stat().st_mode) == 0o600
    sv.require_current(state)  # current: passes, unchanged


def test_data_without_a_record_is_the_unversioned_schema_and_refused(host):
    state = host.settings.state_dir
    assert sv.state_version(state) == sv.UNVERSIONED
    with pytest.raises(sv.StateVersionError, match="run `appliance upgrade`"):
        sv.require_current(state)
    assert not (state / "schema.json").exists()


def test_a_newer_state_is_refused_by_every_entry_point(host):
    state = host.settings.state_dir
    sv.write_record(state, sv.SCHEMA_VERSION + 1)
    with pytest.raises(sv.StateVersionError, match="newer"):
        sv.require_current(state)
    for args in (["audit", "verify"], ["gateway"], ["upgrade"], ["upgrade", "--dry-run"]):
        rc, _out, err = host(*args)
        assert rc != 0 and "newer than the version" in err, (args, err)
    with pytest.raises(sv.StateVersionError):
        runner.migrate(host.settings)
    assert sv.read_record(state).version == sv.SCHEMA_VERSION + 1


@pytest.mark.parametrize("command", ["gateway", "webapp", "up"])
def test_the_services_refuse_an_older_state(host, command):
    rc, _out, err = host(command)
    assert rc != 0 and "run `appliance upgrade`" in err


@pytest.mark.parametrize("text", ["{", '{"version": "1"}', '{"version": 0}', "[]"])
def test_a_damaged_record_is_an_error_not_a_guess(tmp_path, text):
    (tmp_path / "schema.json").write_text(text)
    with pytest.raises(sv.StateVersionError, match="schema"):
        sv.state_version(tmp_path)


def test_the_first_step_names_every_stored_format_and_steps_reach_the_current_version():
    assert [m.format for m in STEPS[0].migrations] == list(STORED_FORMATS)
    assert STEPS[0].source == sv.UNVERSIONED
    assert [s.source for s in STEPS] == list(range(sv.SCHEMA_VERSION))
    assert all(s.target == s.source + 1 for s in STEPS)
    for step in STEPS:
        for migration in step.migrations:
            assert migration.description, migration.format


def test_migrate_checks_every_format_then_records_the_version(host):
    settings = host.settings
    lines: list[str] = []
    done = runner.migrate(settings, progress=lines.append)
    assert [s.name for s in done] == ["record-schema-version", "keyword-index", "kb-directories"]
    assert sv.read_record(settings.state_dir).version == sv.SCHEMA_VERSION
    assert all(any(line.strip().startswith(f"{f}:") for line in lines) for f in STORED_FORMATS)
    assert runner.migrate(settings) == []  # again: nothing pending
    assert ApiKeyStore(settings.api_keys_file).authenticate(host.secret).user == "alice"


def test_a_format_that_does_not_read_stops_the_migration_unrecorded(host):
    settings = host.settings
    settings.users_file.write_text('{"users": [{"name": "not a record"}]}')
    with pytest.raises(MigrationError, match=r"users\.json"):
        runner.migrate(settings)
    assert sv.read_record(settings.state_dir) is None
    assert sv.state_version(settings.state_dir) == sv.UNVERSIONED


def test_a_broken_audit_chain_stops_the_migration(host):
    log = AuditLog(host.settings.audit_dir)
    entry = json.loads(log.path.read_text())
    entry["target"] = "mallory"
    log.path.write_text(json.dumps(entry) + "\n")
    with pytest.raises(MigrationError, match="audit"):
        runner.migrate(host.settings)
    assert sv.read_record(host.settings.state_dir) is None


def test_a_crash_mid_step_runs_the_whole_step_again(host):
    settings = host.settings
    calls: list[str] = []

    def first(_settings) -> None:
        """Always succeeds."""
        calls.append("first")

    def flaky(_settings) -> None:
        """Fails on its first run, as a crash would stop it."""
        calls.append("flaky")
        if calls.count("flaky") == 1:
            raise OSError("power cut")

    steps = (Step("test", 0, 1, (FormatMigration("a", first), FormatMigration("b", flaky))),)
    with pytest.raises(OSError, match="power cut"):
        runner.migrate(settings, steps)
    assert sv.read_record(settings.state_dir) is None  # the step did not finish: not recorded
    assert runner.pending_steps(settings, steps) == list(steps)
    assert [s.name for s in runner.migrate(settings, steps)] == ["test"]
    assert calls == ["first", "flaky", "first", "flaky"]
    assert sv.read_record(settings.state_dir).version == 1


def test_upgrade_refuses_while_the_stack_runs(host):
    pidfile = host.settings.state_dir / "gateway.pid"
    pidfile.write_text(str(os.getpid()))
    with pytest.raises(Exception, match="the stack is running"):
        upgrade(host.settings, host.tmp / "b", lambda: pytest.fail("no backup while running"))
    assert sv.read_record(host.settings.state_dir) is None
    assert not (host.tmp / "b").exists()


def test_appliance_upgrade_dry_run_then_backup_and_migrate(host):
    state = host.settings.state_dir
    rc, out, err = host("upgrade", "--dry-run")
    assert rc == 0, err
    assert "schema 0" in out and "step 0 -> 1: record-schema-version" in out
    assert all(f"  {name}" in out for name in STORED_FORMATS)
    assert sv.read_record(state) is None and not (state / "backups").exists()

    backups = host.tmp / "backups"
    rc, out, err = host("upgrade", "--backup-dir", str(backups))
    assert rc == 0, err
    (backup,) = backups.iterdir()
    assert f"backup taken first: {backup}" in out
    assert "upgraded" in out and sv.read_record(state).version == sv.SCHEMA_VERSION
    rc, out, err = host("backup", "verify", str(backup))
    assert rc == 0 and "backup intact" in out, err
    assert "schema" not in out  # the backup holds the state as it was: unversioned
    entries = AuditLog(host.settings.audit_dir).entries()
    assert entries[-1]["action"] == "upgrade" and entries[-1]["detail"]["from_version"] == 0
    assert AuditLog(host.settings.audit_dir).verify().ok

    rc, out, err = host("upgrade")
    assert rc == 0 and "nothing to migrate" in out, err
    assert list(backups.iterdir()) == [backup]  # no second backup when nothing changes


def test_upgrade_without_a_key_encryption_key_asks_for_a_passphrase(host):
    # The CPU demo never makes one (`appliance store init` does): the backup needs one or the other.
    host.settings.kek_file.unlink()
    backups = host.tmp / "backups"
    rc, out, err = host("upgrade", "--backup-dir", str(backups))
    assert rc == 2 and "--passphrase-file" in err, err
    assert "backup of the state" not in out and not backups.exists()
    assert sv.read_record(host.settings.state_dir) is None
    passphrase = host.tmp / "passphrase"
    passphrase.write_text("a passphrase for the upgrade\n")
    rc, out, err = host(
        "upgrade", "--backup-dir", str(backups), "--passphrase-file", str(passphrase)
    )
    assert rc == 0, err
    assert sv.read_record(host.settings.state_dir).version == sv.SCHEMA_VERSION


def test_upgrade_of_a_fresh_state_only_stamps_it(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\ngateway:\n  port: {free_port()}\n")
    assert main(["--config", str(config), "upgrade"]) == 0
    assert "nothing to migrate" in capsys.readouterr().out
    assert sv.read_record(tmp_path / "state").version == sv.SCHEMA_VERSION


def test_a_command_that_writes_into_a_fresh_state_stamps_it(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    assert main(["--config", str(config), "keys", "create", "alice"]) == 0
    assert sv.read_record(tmp_path / "state").version == sv.SCHEMA_VERSION


def test_a_restore_of_an_unversioned_backup_stays_unversioned(host, tmp_path):
    backup = tmp_path / "old.backup"
    rc, _out, err = host("backup", str(backup))
    assert rc == 0, err
    config = tmp_path / "restored.yaml"
    config.write_text(f"state_dir: {tmp_path / 'restored'}\n")
    key = str(host.settings.kek_file)
    assert main(["--config", str(config), "restore", str(backup), "--key-file", key]) == 0
    assert sv.state_version(tmp_path / "restored") == sv.UNVERSIONED


def _frozen_state(tmp_path) -> ApplianceSettings:
    """A copy of the state release 0.1.0 made (tests/fixtures/make_state_fixture.py)."""
    state = tmp_path / "state"
    shutil.copytree(Path(__file__).parents[1] / "fixtures" / "state-v0", state)
    make_private(state)
    return load_settings(state_dir=str(state), catalog={"include_presets": False})


def test_the_frozen_state_of_release_0_1_0_migrates(tmp_path):
    """Every format check, Chroma's included, passes on the fixture the integration test
    serves."""
    settings = _frozen_state(tmp_path)
    state = settings.state_dir
    assert sv.state_version(state) == sv.UNVERSIONED
    assert [s.name for s in runner.migrate(settings)] == [
        "record-schema-version",
        "keyword-index",
        "kb-directories",
    ]
    assert sv.read_record(state).version == sv.SCHEMA_VERSION
    # The knowledge base's own directory: its Chroma and its keyword index, nothing shared.
    (kb_dir,) = (state / "rag" / "kbs").iterdir()
    assert (kb_dir / "chroma" / "chroma.sqlite3").exists()
    assert (kb_dir / "keywords.sqlite3").exists()
    assert not (state / "rag" / "chroma").exists() and not (state / "rag" / "keywords").exists()
    assert runner.migrate(settings) == []  # re-run: nothing left


def test_the_installer_stamps_a_fresh_state_and_upgrades_an_older_one(host, tmp_path, monkeypatch):
    stopped: list[str] = []
    monkeypatch.setattr(apply.ServiceManager, "stop", lambda self: stopped.append(self.mode))
    plan = SimpleNamespace(layout=SimpleNamespace(config=tmp_path / "c.yaml"), service_mode="x")

    fresh = load_settings(state_dir=str(tmp_path / "fresh"))
    report = Report()
    apply._state_schema(plan, fresh, report)
    assert report.changed == ["state schema"] and not stopped
    assert sv.read_record(fresh.state_dir).version == sv.SCHEMA_VERSION
    again = Report()
    apply._state_schema(plan, fresh, again)  # a re-run changes nothing
    assert again.unchanged == ["state schema"]

    older = Report()
    apply._state_schema(plan, host.settings, older)
    assert older.changed == ["state schema"] and stopped == ["x"]
    assert sv.read_record(host.settings.state_dir).version == sv.SCHEMA_VERSION
    (backup,) = (host.settings.state_dir / "backups").iterdir()
    assert backup.name.startswith("pre-upgrade-v0-")


def test_a_knowledge_base_without_its_chroma_collection_stops_the_migration(tmp_path):
    settings = _frozen_state(tmp_path)
    shutil.rmtree(settings.rag_dir / "chroma")
    with pytest.raises(MigrationError, match="alice/plant"):
        runner.migrate(settings)
    assert sv.read_record(settings.state_dir) is None
