"""The installer's internal CA step: made where the gateway runs, a certificate for every node
it sets up (the local cluster's, or the head and the workers named), kept on a second run."""

from __future__ import annotations

import stat

from appliance.installer.apply import _node_certificates
from appliance.installer.report import Report
from appliance.security.node_tls import internal_ca

from appliance.config import ApplianceSettings
from tests.unit.test_installer_files import _plan


def test_single_host_gets_ca_and_local_node_certificates(tmp_path, capsys):
    settings = ApplianceSettings(state_dir=tmp_path, cluster={"nodes": 2})
    report = Report()
    _node_certificates(_plan("cpu-only"), settings, report)
    ca = internal_ca(settings)
    assert report.changed == ["internal CA", "node certificates"]
    assert "issued for n1, n2" in capsys.readouterr().out
    for key in (ca.key, ca.node_key("n1"), ca.node_key("n2")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = Report()
    _node_certificates(_plan("cpu-only"), settings, again)
    assert again.changed == [] and again.unchanged == ["internal CA", "node certificates"]


def test_head_issues_for_its_workers_and_a_worker_uses_them(tmp_path, capsys):
    settings = ApplianceSettings(state_dir=tmp_path / "shared")
    _node_certificates(_plan("two-node-head"), settings, Report())
    ca = internal_ca(settings)
    assert ca.node_cert("gpu01").exists() and ca.node_cert("gpu02").exists()
    # A worker on the shared state directory: its certificate is there; it makes no CA.
    worker = Report()
    _node_certificates(_plan("two-node-worker"), settings, worker)
    assert worker.unchanged == ["node certificates"]
    # A worker whose state holds no CA says so (its servers cannot serve TLS yet).
    alone = Report()
    _node_certificates(_plan("two-node-worker"), ApplianceSettings(state_dir=tmp_path / "w"), alone)
    assert "run the installer" in capsys.readouterr().out
