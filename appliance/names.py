"""Names every layer agrees on: the cluster's partitions and local nodes, and the store's files
(standard library only: the installer's planner uses them before any package is installed)."""

from __future__ import annotations

import re

# Defaults of the `cluster` settings (appliance/config/cluster.py), rendered by Slurm's
# configuration (appliance/slurm/partitions.py) and the installer's planner alike.
SERVING_PARTITION = "appliance"
PREEMPTIBLE_PARTITION = "appliance-preemptible"
BATCH_PARTITION = "batch"
# Seconds a preempted job gets between SIGTERM and its end (the partitions' GraceTime).
GRACE_S = 60
# An instance job's Slurm comment starts so (followed by its model's name); the second where the
# node's standby starts its server: the cluster's prolog leaves those to ask the standby
# themselves (an embedding server's job, say, has the standby drop idle engines on its GPUs).
INSTANCE_COMMENT_PREFIX = "appliance-instance:"
STANDBY_INSTANCE_COMMENT_PREFIX = "appliance-instance+standby:"


def local_node_names(count: int) -> list[str]:
    """Slurm names of the local cluster's nodes (`cluster.nodes` of them, all on this host)."""
    return [f"n{i}" for i in range(1, count + 1)]


# A model in the store is a folder with this header (appliance/store/format.py) beside its data.
STORE_HEADER_FILE = "header.json"

# A model's name: in the catalog, the store, adapters' names and the breaker's grammar (patterns
# are applied with fullmatch: `$` alone would let a trailing newline through).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
