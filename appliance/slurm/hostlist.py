"""Expand Slurm hostlist expressions such as ``n[1-3,7],gpu[01-02]-a`` into node names."""

from __future__ import annotations

import re

# Guard against expressions like "n[1-99999999]" turning into a huge list by mistake.
MAX_HOSTS = 100_000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class HostlistError(ValueError):
    """A hostlist expression that is not well formed."""


def expand_hostlist(expr: str) -> list[str]:
    """``"n[1-2],x"`` -> ``["n1", "n2", "x"]``; zero padding of ranges is kept (``[01-02]``)."""
    hosts: list[str] = []
    for part in _split_top_level(expr.strip()):
        if part:
            hosts.extend(_expand_one(part))
        if len(hosts) > MAX_HOSTS:
            raise HostlistError(f"hostlist {expr!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def _split_top_level(expr: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for ch in expr:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in hostlist {expr!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise HostlistError(f"unbalanced '[' in hostlist {expr!r}")
    parts.append("".join(current))
    return parts


def _expand_one(name: str) -> list[str]:
    """Expand the first bracket group of one name, then the rest recursively (``a[1-2]b[3-4]``)."""
    start = name.find("[")
    if start < 0:
        return [name]
    end = name.index("]", start)
    prefix, body, suffix = name[:start], name[start + 1 : end], name[end + 1 :]
    rests = _expand_one(suffix)
    out = []
    for item in body.split(","):
        for value in _expand_range(item, name):
            out.extend(prefix + value + rest for rest in rests)
    return out


def _expand_range(item: str, name: str) -> list[str]:
    m = _RANGE.match(item.strip())
    if not m:
        raise HostlistError(f"bad range {item!r} in hostlist {name!r}")
    lo_text, hi_text = m.group(1), m.group(2)
    if hi_text is None:
        return [lo_text]
    lo, hi = int(lo_text), int(hi_text)
    if hi < lo:
        raise HostlistError(f"descending range {item!r} in hostlist {name!r}")
    if hi - lo >= MAX_HOSTS:
        raise HostlistError(f"range {item!r} in hostlist {name!r} is too large")
    width = len(lo_text)  # "01-10" pads to two digits, as Slurm does
    return [str(i).zfill(width) for i in range(lo, hi + 1)]
