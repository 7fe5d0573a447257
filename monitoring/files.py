"""Writes the monitoring files shipped in the repository (Prometheus alert rules, Grafana
dashboards) from their sources: ``python -m appliance.monitoring.files``. Tests compare them."""

from __future__ import annotations

from pathlib import Path

from appliance.monitoring.alerts import rules_yaml
from appliance.monitoring.dashboards import DASHBOARDS, dashboard_json

ROOT = Path(__file__).parent


def shipped_files() -> dict[Path, str]:
    files = {ROOT / "prometheus" / "appliance-rules.yaml": rules_yaml()}
    for level in DASHBOARDS:
        files[ROOT / "grafana" / f"appliance-{level}.json"] = dashboard_json(level)
    return files


if __name__ == "__main__":
    for path, text in shipped_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
