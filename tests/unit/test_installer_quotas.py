"""The installer turns quotas on wherever a gateway runs: the config.yaml it writes (golden
files) sets every limit, and the stack reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from appliance.config.security import SecuritySettings

CONFIGS = sorted(
    (Path(__file__).parent / "golden" / "installer").glob("*/etc__appliance__config.yaml")
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.parent.name for p in CONFIGS])
def test_installed_gateways_have_every_limit(path: Path):
    config = yaml.safe_load(path.read_text())
    security = SecuritySettings(**config.get("security", {}))
    limits = security.quotas.model_dump()
    if "gateway" in config:
        assert None not in limits.values(), limits
    else:
        assert set(limits.values()) == {None}  # a worker runs no gateway


def test_every_profile_is_checked():
    assert {p.parent.name for p in CONFIGS} >= {"cpu-only", "h100x1", "two-node-head"}
