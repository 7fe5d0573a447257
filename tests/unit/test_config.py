"""The typed configuration: sources, precedence, and errors that name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli.main import main
from appliance.config import ConfigError, load_settings
from appliance.config.reference import render_reference

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid(monkeypatch):
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    s = load_settings()
    assert s.gateway.port == 8000
    assert s.cluster.mode == "local"
    assert s.slurm_conf == s.state_dir / "slurm" / "slurm.conf"


def test_yaml_then_env_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway:\n  port: 9001\n  idle_timeout_s: 30\ncluster:\n  nodes: 2\n")
    monkeypatch.setenv("APPLIANCE_GATEWAY__PORT", "9002")
    s = load_settings(cfg)
    assert s.gateway.port == 9002  # environment beats the file
    assert s.gateway.idle_timeout_s == 30
    assert s.cluster.nodes == 2


def test_config_file_from_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(cfg))
    assert load_settings().state_dir == tmp_path / "state"


def test_errors_name_field_reason_and_env(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway:\n  port: 70000\n  prot: 1\ncluster:\n  nodes: two\n")
    monkeypatch.setenv("APPLIANCE_GATEWAY__IDLE_TIMEOUT_S", "-1")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert "gateway.port: Input should be less than or equal to 65535 (got 70000)" in text
    assert "cluster.nodes:" in text and "'two'" in text
    assert "gateway.prot: unknown setting" in text
    assert "gateway.idle_timeout_s" in text and "APPLIANCE_GATEWAY__IDLE_TIMEOUT_S" in text


def test_malformed_yaml_names_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway:\n  port: [1,\n")
    with pytest.raises(ConfigError, match=r"c.yaml line \d+"):
        load_settings(cfg)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_cli_reports_bad_config_without_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway:\n  port: -5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "--config", str(cfg), "config", "check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "gateway.port" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_config_check_ok(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway:\n  port: 8123\n")
    assert main(["--config", str(cfg), "config", "check"]) == 0
    assert "configuration is valid" in capsys.readouterr().out


def test_reference_doc_is_current():
    """docs/configuration.md is generated; regenerate with `appliance config docs`."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == render_reference(), "run: appliance config docs > docs/configuration.md"


def test_every_field_is_documented():
    from appliance.config.settings import ApplianceSettings

    for name, info in ApplianceSettings.model_fields.items():
        assert info.description, name
        section = info.annotation
        for sub, subinfo in getattr(section, "model_fields", {}).items():
            assert subinfo.description, f"{name}.{sub}"
