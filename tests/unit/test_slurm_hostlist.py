"""Expansion of Slurm hostlist expressions."""

from __future__ import annotations

import pytest

from appliance.slurm.hostlist import HostlistError, expand_hostlist


@pytest.mark.parametrize(
    "expr,hosts",
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("n[1-3,7]", ["n1", "n2", "n3", "n7"]),
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
        ("n[1-2],login", ["n1", "n2", "login"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a[1,3]b", ["a1b", "a3b"]),
        ("", []),
        (" n1 ", ["n1"]),
    ],
)
def test_expand(expr, hosts):
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize("expr", ["n[1-2", "n1-2]", "n[a-b]", "n[3-1]", "n[1-9999999]"])
def test_malformed(expr):
    with pytest.raises(HostlistError):
        expand_hostlist(expr)
