"""The audit log: every kind of tampering (edit, delete, insert, swap, cut the tail, forge
without the key) is found and named by line."""

from __future__ import annotations

import json
import os
import stat

import pytest
from appliance.security.audit import AuditError, AuditLog


@pytest.fixture
def log(tmp_path) -> AuditLog:
    log = AuditLog(tmp_path / "audit")
    for i in range(5):
        log.append(f"user{i}", "sign_in", "password", client="127.0.0.1")
    return log


def lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def rewrite(log: AuditLog, new: list[str]) -> None:
    log.path.write_text("\n".join(new) + "\n")


def test_intact_log_verifies_and_secrets_are_private(log):
    result = log.verify()
    assert result.ok and result.entries == 5
    assert stat.S_IMODE(log.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert [e["seq"] for e in log.entries()] == [1, 2, 3, 4, 5]


def test_an_edited_entry_is_found(log):
    text = lines(log)
    entry = json.loads(text[2])
    entry["actor"] = "mallory"
    text[2] = json.dumps(entry)
    rewrite(log, text)
    result = log.verify()
    assert not result.ok and result.line == 3 and "altered" in result.problem


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (lambda t: t[:1] + t[2:], 2),  # a line removed
        (lambda t: [t[0], t[2], t[1], *t[3:]], 2),  # two lines swapped
        (lambda t: [t[0], t[0], *t[1:]], 2),  # a line repeated
        (lambda t: t[:4], 4),  # the last line cut off
    ],
)
def test_removed_reordered_or_cut_entries_are_found(log, change, line):
    rewrite(log, change(lines(log)))
    result = log.verify()
    assert not result.ok and result.line == line, result


def test_a_chain_forged_without_the_key_does_not_verify(log, tmp_path):
    forger = AuditLog(tmp_path / "forger")
    forger.append("mallory", "key_create", "abcd")
    text = [*lines(log), lines(forger)[0].replace('"seq": 1', '"seq": 6')]
    rewrite(log, text)
    result = log.verify()
    assert not result.ok and result.line == 6


def test_appends_continue_the_chain(log):
    log.append("root", "policy_change", "tiny-chat", policy={"users": ["alice"]})
    assert log.verify().ok and log.verify().entries == 6


def test_sealed_details_stay_out_of_the_chain_but_are_covered_by_it(tmp_path):
    sealed = tmp_path / "data" / "audit"  # as in the data volume
    log = AuditLog(tmp_path / "audit", sealed)
    log.append("alice", "sign_in", "password")
    prompt = [{"role": "user", "content": "where the spare key is"}]
    entry = log.append("alice", "prompt", "tiny", endpoint="chat", sealed={"prompt": prompt})
    assert "spare key" not in log.path.read_text()
    assert "spare key" in (sealed / "details.jsonl").read_text()
    assert set(entry["detail"]) == {"endpoint", "sealed"}
    assert log.verify().ok
    assert log.entries()[1]["detail"]["prompt"] == prompt

    # An altered sealed detail breaks the entry that holds its digest.
    path = sealed / "details.jsonl"
    path.write_text(path.read_text().replace("spare key", "other key"))
    result = log.verify()
    assert not result.ok and result.line == 2 and "altered or removed" in result.problem

    path.unlink()
    result = log.verify()
    assert not result.ok and result.line == 2 and "altered or removed" in result.problem

    # Unreachable (the volume closed: its mount point empty), the command says why.
    sealed.rmdir()
    with pytest.raises(AuditError, match=r"2 entries is intact.*sealed; `appliance data open`"):
        log.verify()
    with pytest.raises(AuditError, match="`appliance data open`"):
        log.entries()


def test_without_a_sealed_folder_the_details_are_entries_like_the_others(tmp_path):
    log = AuditLog(tmp_path / "audit")
    entry = log.append("alice", "prompt", "tiny", sealed={"prompt": "hello"})
    assert entry["detail"] == {"prompt": "hello"}
    assert log.verify().ok


def test_root_appending_keeps_the_files_of_the_folders_account(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root appends to another account's log")
    folder = tmp_path / "audit"
    folder.mkdir()
    os.chown(folder, 65534, 65534)  # as the services' account holds it
    log = AuditLog(folder)
    log.append("cli:root", "backup", "/srv/b")
    log.append("cli:root", "user_add", "bob")
    assert {p.stat().st_uid for p in (log.path, log.head_path, log.key_path)} == {65534}
    assert log.verify().ok
