"""Each serving instance's own vLLM metrics (`vllm:*`: running and waiting requests, KV-cache
use, time to first token, inter-token latency, tokens), scraped from its /metrics and exposed
again verbatim, with labels saying which instance (Slurm job) and node they come from."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


@dataclass(frozen=True)
class Target:
    """One instance to scrape."""

    job_id: int
    model: str
    node: str
    url: str


def relabel(text: str, target: Target, keep_prefix: str = "vllm:") -> list[Metric]:
    """The `vllm:*` families of one scrape, each sample labelled with its instance."""
    out = []
    extra = {"job_id": str(target.job_id), "node": target.node, "appliance_model": target.model}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(keep_prefix):
            continue
        family.samples = [
            Sample(s.name, {**s.labels, **extra}, s.value, s.timestamp, s.exemplar)
            for s in family.samples
        ]
        out.append(family)
    return out


def merge(families: Iterable[Metric]) -> list[Metric]:
    """Families of several instances as one family per name (an exposition lists each once)."""
    merged: dict[str, Metric] = {}
    for family in families:
        if family.name in merged:
            merged[family.name].samples.extend(family.samples)
        else:
            merged[family.name] = family
    return list(merged.values())


def scrape(targets: Iterable[Target], client: httpx.Client) -> tuple[list[Metric], list[str]]:
    """Every target's families merged, and the problems met (one failing instance does not
    hide the others). `client` is kept from scrape to scrape: a new one builds a TLS context,
    tens of milliseconds with the GIL held, beside the gateway's event loop."""
    families, problems = [], []
    for target in targets:
        try:
            response = client.get(target.url.rstrip("/") + "/metrics")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            problems.append(f"instance {target.job_id}: {exc!r}")
            continue
        families += relabel(response.text, target)
    return merge(families), problems
