"""Training jobs' progress as metrics: each job writes `progress.json` in its folder under
<state_dir>/training/ (step, loss, learning rate, tokens/s); this reads them all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

LABELS = ["job_id", "model", "user", "run"]
FIELDS = {
    "appliance_training_step": ("Optimizer steps done.", "step"),
    "appliance_training_total_steps": ("Optimizer steps planned.", "total_steps"),
    "appliance_training_loss": ("Training loss at the latest step.", "loss"),
    "appliance_training_learning_rate": ("Learning rate at the latest step.", "learning_rate"),
    "appliance_training_tokens_per_second": ("Training throughput.", "tokens_per_s"),
}


def eta_seconds(progress: dict[str, Any]) -> float | None:
    """Time left at the pace so far (None before the first step)."""
    step, total = progress.get("step") or 0, progress.get("total_steps") or 0
    elapsed = (progress.get("updated_at") or 0) - (progress.get("started_at") or 0)
    if step <= 0 or elapsed <= 0 or total < step:
        return None
    return (total - step) * elapsed / step


def read_progress(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(root.glob("*/progress.json")):
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being rewritten right now: the next reading gets it
        if isinstance(progress, dict):
            out.append({**progress, "run": path.parent.name})
    return out


def training_families(root: Path) -> list[Metric]:
    progress = read_progress(root)
    families = []
    for name, (doc, key) in FIELDS.items():
        family = GaugeMetricFamily(name, doc, labels=LABELS)
        for p in progress:
            if isinstance(p.get(key), int | float):
                family.add_metric(_labels(p), float(p[key]))
        families.append(family)
    eta = GaugeMetricFamily("appliance_training_eta_seconds", "Estimated time left.", labels=LABELS)
    state = GaugeMetricFamily(
        "appliance_training_info", "Each run's state (value 1).", labels=[*LABELS, "state"]
    )
    for p in progress:
        left = eta_seconds(p)
        if left is not None:
            eta.add_metric(_labels(p), left)
        state.add_metric([*_labels(p), str(p.get("state", ""))], 1)
    return [*families, eta, state]


def _labels(p: dict[str, Any]) -> list[str]:
    return [str(p.get("job_id", "")), str(p.get("model", "")), str(p.get("user", "")), p["run"]]
