"""The shipped monitoring files and /metrics checked by Prometheus's own promtool (Debian's
`prometheus` package; `./bootstrap test` installs it), and the metric names that the shipped
Grafana dashboards and alert rules query, read out of their PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from appliance.monitoring.nvml import NvmlReader
from appliance.monitoring.nvml_replay import ReplayNvml
from appliance.monitoring.sources import GpuSource
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
NVML_CAPTURE = Path(__file__).parent / "unit" / "testdata" / "nvml" / "h200.json"
RULE_FILES = sorted((MONITORING / "prometheus").glob("*.yaml"))
DASHBOARDS = sorted((MONITORING / "grafana").glob("*.json"))

# promtool's findings on names and labels we keep verbatim from the exporters they come from, so
# that dashboards and alerts written for those exporters work on ours (docs/monitoring.md):
# (metric name, finding), both as regular expressions matched in full. Every other finding fails.
LINT_EXCEPTIONS = [
    # node_exporter's names for /proc/meminfo fields (node_memory_MemAvailable_bytes, ...).
    (r"node_memory_\w+", r"metric names should be written in 'snake_case' not 'camelCase'"),
    # The community Slurm exporters' gauges of capacity: slurm_cpus_total, slurm_gpus_total,
    # slurm_nodes_total, slurm_node_cpus_total, slurm_node_gpus_total.
    (r"slurm_(nodes|cpus|gpus|node_cpus|node_gpus)_total", r"non-counter metrics should not .*"),
    # vLLM's own names, re-exposed with the instance's labels added: the "vllm:" prefix, and a
    # histogram of the tokens of each engine step that vLLM calls vllm:iteration_tokens_total.
    (r"vllm:\w+", r"metric names should not contain ':'"),
    (r"vllm:iteration_tokens_total", r'non-counter metrics should not have "_total" suffix'),
    # dcgm-exporter's labels (UUID, modelName, Hostname), also on our appliance_gpu_* families
    # so that they join with the DCGM_FI_* series.
    (r"DCGM_FI_\w+|appliance_gpu_\w+", r"label names should be written in 'snake_case' .*"),
    # dcgm-exporter's name for the count of PCIe replays.
    (r"DCGM_FI_DEV_PCIE_REPLAY_COUNTER", r"metric name should not include type 'counter'"),
]


def promtool() -> str:
    """The promtool command; a skip (a failure under CI) where it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (./bootstrap test installs Debian's prometheus)")
    return path


def check_rules(*paths: Path) -> subprocess.CompletedProcess:
    """`promtool check rules` on `paths`; its output is in stdout and stderr."""
    argv = [promtool(), "check", "rules", *map(str, paths)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def lint_metrics(exposition: str) -> list[str]:
    """promtool's findings on a /metrics text (`promtool check metrics`) that LINT_EXCEPTIONS
    does not explain; an exposition it cannot parse fails the test with promtool's error."""
    done = subprocess.run(
        [promtool(), "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # 0: clean, 3: lint findings (one "name finding" per line); anything else: it did not parse.
    output = (done.stdout + done.stderr).strip()
    assert done.returncode in (0, 3), f"promtool check metrics: exit {done.returncode}\n{output}"
    findings = [line for line in output.splitlines() if line.strip()]
    return [f for f in findings if not _excepted(f)]


def _excepted(finding: str) -> bool:
    name, _, text = finding.partition(" ")
    return any(
        re.fullmatch(name_re, name) and re.fullmatch(text_re, text)
        for name_re, text_re in LINT_EXCEPTIONS
    )


def gpu_exposition() -> str:
    """The gateway's gpu collector rendered as on a GPU host, from NVML's answers captured on a
    real H200 (on a host without a GPU the collector is down and exposes nothing)."""
    calls = json.loads(NVML_CAPTURE.read_text())["calls"]
    families = GpuSource(lambda: NvmlReader(ReplayNvml(calls))).read()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode()


class _Families:
    """A fixed list of families, as a prometheus_client collector."""

    def __init__(self, families: list):
        self.families = families

    def collect(self) -> list:
        return self.families


def dashboard_queries() -> dict[str, str]:
    """Every PromQL expression of the shipped dashboards, by where it is (file, panel, target)."""
    out = {}
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out[f"{path.name}: {panel['title']} ({target['refId']})"] = target["expr"]
    return out


def rule_queries() -> dict[str, str]:
    """Every PromQL expression of the shipped rule files, by where it is (file, rule)."""
    out = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                out[f"{path.name}: {name}"] = rule["expr"]
    return out


def dashboards_as_rules(path: Path) -> Path:
    """The dashboards' queries as a rules file of recording rules at `path`, so that promtool
    parses them with Prometheus's own PromQL parser (it has no command for a bare query)."""
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(queries.values())]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    return path


# PromQL's tokens, as far as finding metric names needs: string literals and label matchers
# (whose quoted values may hold anything, "}" included), range and subquery brackets, numbers
# and durations (so that "5m" or "1e3" is no name), names, and any other character.
_STRING = r'"(?:\\.|[^"\\])*"|' + r"'(?:\\.|[^'\\])*'|`[^`]*`"
_TOKEN = re.compile(
    rf"(?P<string>{_STRING})"
    rf"|(?P<matchers>\{{(?:{_STRING}|[^}}\"'`])*\}})"
    r"|(?P<range>\[[^\]]*\])"
    r"|(?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[a-zA-Z]*)"
    r"|(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<other>\S)"
)
# Words that are PromQL's, not metrics'. Those before a parenthesised list of labels: the list
# is skipped. Functions are told apart by the "(" that follows them, aggregations also by the
# "by" or "without" that may stand between ("sum by (model) (...)").
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _LABEL_LISTS | {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}
_AGGREGATION = re.compile(
    r"sum|min|max|avg|group|stddev|stdvar|count(_values)?|bottomk|topk|quantile|limitk|limit_ratio"
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (histogram series such as x_bucket as they
    are written): names followed by "{" or "[" or standing alone, not functions or keywords."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    names, i = set(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1].lower() if i + 1 < len(tokens) else ""
        if kind != "name":
            pass
        elif text.lower() in _LABEL_LISTS and following == "(":
            i = tokens.index(("other", ")"), i + 1)  # label lists hold no parentheses
        elif _AGGREGATION.fullmatch(text) and following in ("by", "without"):
            pass
        elif text.lower() not in _KEYWORDS and following != "(":
            names.add(text)
        i += 1
    return names


def exposed_families(exposition: str) -> dict[str, str]:
    """The metric families of a /metrics text, name to type: every "# TYPE" line, and the
    names of samples without one ("untyped")."""
    families = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind
        elif line and not line.startswith("#"):
            families.setdefault(re.split(r"[{\s]", line, maxsplit=1)[0], "untyped")
    return families


def family_of(name: str, families: dict[str, str]) -> str | None:
    """The family in `families` that the series `name` belongs to (x_bucket, x_sum and x_count
    to the histogram or summary x); None if it has none."""
    if name in families:
        return name
    base, _, suffix = name.rpartition("_")
    if suffix in ("bucket", "sum", "count") and families.get(base) in ("histogram", "summary"):
        return base
    return None
