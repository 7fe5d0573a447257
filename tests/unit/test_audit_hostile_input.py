"""The audit log against hostile input: fields are bounded when written (cut with a marker,
the chain still verifies), and `appliance audit show` prints each entry on one line whatever a
client put into it."""

from __future__ import annotations

import pytest
from appliance.security.audit import (
    MAX_DETAIL_CHARS,
    MAX_DETAIL_ITEMS,
    MAX_FIELD_CHARS,
    AuditLog,
    bounded,
)

from appliance.cli.audit import shown
from appliance.cli.main import main
from appliance.config import load_settings


def test_a_huge_username_makes_a_small_entry_that_still_verifies(tmp_path):
    log = AuditLog(tmp_path / "audit")
    name = "x" * 200_000
    entry = log.append(name, "sign_in_refused", name, reason=name, names=[name] * 10_000)
    cut = 200_000 - MAX_FIELD_CHARS
    assert entry["actor"] == "x" * MAX_FIELD_CHARS + f"...[{cut} more characters]"
    assert entry["target"].startswith("x" * MAX_FIELD_CHARS) and len(entry["target"]) < 300
    assert len(entry["detail"]["reason"]) < MAX_DETAIL_CHARS + 40
    assert len(entry["detail"]["names"]) == MAX_DETAIL_ITEMS + 1
    assert entry["detail"]["names"][-1] == f"...[{10_000 - MAX_DETAIL_ITEMS} more items]"
    # 10,000 names of 200,000 characters would be 2 GB; the line is about 1 MB at most.
    assert log.path.stat().st_size < (MAX_DETAIL_ITEMS + 2) * (MAX_DETAIL_CHARS + 40)
    assert log.entries()[0] == entry
    assert log.verify().ok


def test_unicode_line_breaks_in_a_username_keep_the_chain_verifying(tmp_path):
    # Entries are written with ensure_ascii=False, so these are raw in the file; read back with
    # str.splitlines(), one refused sign-in with such a name made the whole log fail to verify.
    log = AuditLog(tmp_path / "audit")
    name = "eve\u2028\u2029\u0085"
    log.append(name, "sign_in_refused", "password", reason="wrong username or password")
    log.append("root", "user_add", "bob")
    assert "\u2028" in log.path.read_text()
    assert [e["actor"] for e in log.entries()] == [name, "root"]
    result = log.verify()
    assert result.ok and result.entries == 2


def test_bounds_at_the_limit():
    assert bounded("a" * MAX_DETAIL_CHARS) == "a" * MAX_DETAIL_CHARS
    assert bounded("a" * (MAX_DETAIL_CHARS + 1)).endswith("...[1 more characters]")
    assert bounded(list(range(MAX_DETAIL_ITEMS))) == list(range(MAX_DETAIL_ITEMS))
    big = {str(i): i for i in range(MAX_DETAIL_ITEMS + 5)}
    assert bounded(big)["..."] == "[5 more items]" and len(bounded(big)) == MAX_DETAIL_ITEMS + 1
    assert bounded({"n": 3, "ok": True, "none": None}) == {"n": 3, "ok": True, "none": None}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("alice", "alice"),
        ("10.0.0.1", "10.0.0.1"),
        ("", ""),
        ("a b", '"a b"'),
        ("x=1", '"x=1"'),
        ("bob\n     7 2026 root user_add", '"bob\\n     7 2026 root user_add"'),
        ("a\rb\x1b[2Jc\x00", '"a\\rb\\u001b[2Jc\\u0000"'),
        ("del\x7f nel\x85 ls\u2028 rlo\u202e", '"del\\x7f nel\\x85 ls\\u2028 rlo\\u202e"'),
        ("naïve", "naïve"),
        (["a.pdf", "b\n.pdf"], '["a.pdf", "b\\n.pdf"]'),
        (3, "3"),
    ],
)
def test_shown_fields_stay_on_one_line(value, text):
    assert shown(value) == text


def test_audit_show_prints_a_forged_line_as_one_escaped_line(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    log = AuditLog(load_settings(config).audit_dir)
    fake = "x\n     2 2026-01-01T00:00:00.000+00:00 root             user_add         mallory"
    log.append(fake, "sign_in_refused", "password", reason="wrong username or password")
    log.append("root", "key_create", "abcd", user="\u202emallory")
    assert main(["--config", str(config), "audit", "show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[2] == '"x\\n'  # the actor, quoted and escaped
    assert 'user="\\u202emallory"' in lines[1]
    assert all(c.isprintable() for line in lines for c in line)
