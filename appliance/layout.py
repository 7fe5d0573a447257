"""Where the appliance keeps its state: one layout of the state directory, used by the settings,
the installer and the local Slurm cluster."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

# Unix socket paths are limited to 107 bytes; slurmstepd puts one per job step in the node's
# spool, named "<node>_<job id>.<step id>" (job ids up to 8 digits, step ids up to 10).
MAX_SOCKET_PATH = 107
_STEP_SOCKET_SUFFIX = len("_12345678.4294967291")
# What the stack's own processes create is theirs alone: 0700 folders, 0600 files.
PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700


def make_private(top: Path, skip: frozenset[Path] = frozenset()) -> None:
    """Make `top` (created if missing) and everything under it but `skip` private to its owner:
    folders 0700, files lose every group and other bit. Only what this process owns changes (root:
    everything); links are neither changed nor followed. Safe to repeat."""
    top.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    uid = os.geteuid()
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        for path in [root, *(os.path.join(root, n) for n in dirs + files)]:
            try:
                info = os.lstat(path)
                if stat.S_ISLNK(info.st_mode) or uid not in (0, info.st_uid):
                    continue
                mode = stat.S_IMODE(info.st_mode)
                private = PRIVATE_DIR_MODE if stat.S_ISDIR(info.st_mode) else mode & 0o700
                if mode != private:
                    os.chmod(path, private)
            except FileNotFoundError:  # removed meanwhile (a finished upload, a rotated log)
                continue
            except PermissionError:  # an encrypted volume the service account holds open:
                continue  # its mount answers that account only, even root


def run_privately(layout: StateLayout, *elsewhere: Path) -> None:
    """At a service's start: what it creates is its account's alone (umask 077), and the state
    an older version left readable by others is tightened (see StateLayout.make_private)."""
    os.umask(PRIVATE_UMASK)
    layout.make_private(*elsewhere)


@dataclass(frozen=True)
class LocalClusterPaths:
    """The layout of ``<state_dir>/slurm``: configs, controller state, spools, logs, pid files."""

    root: Path

    @property
    def slurm_conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def health_check(self) -> Path:
        """The node health check Slurm runs (HealthCheckProgram)."""
        return self.root / "healthcheck.sh"

    @property
    def health_config(self) -> Path:
        """The settings the health check reads (written at `up`)."""
        return self.root / "health-config.yaml"

    @property
    def prolog(self) -> Path:
        """The script each slurmd runs before a job (Prolog), with kept engines."""
        return self.root / "prolog.sh"

    @property
    def cgroup_conf(self) -> Path:
        return self.root / "cgroup.conf"

    @property
    def gres_conf(self) -> Path:
        # Slurm reads gres.conf from the directory of slurm.conf; the name is fixed.
        return self.root / "gres.conf"

    @property
    def state(self) -> Path:
        """slurmctld's StateSaveLocation: jobs, node states (drains survive restarts here)."""
        return self.root / "state"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def node_spool(self, node: str) -> Path:
        return self.spool / node

    def step_socket_length(self, node: str) -> int:
        """Length of the longest job-step socket path slurmstepd will create for `node`."""
        return len(str(self.node_spool(node))) + 1 + len(node) + _STEP_SOCKET_SUFFIX

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def run(self) -> Path:
        """Pid files."""
        return self.root / "run"

    @property
    def dev(self) -> Path:
        """Character devices standing in for GPUs, one directory per node."""
        return self.root / "dev"

    def gpu_device(self, node: str, index: int) -> Path:
        return self.dev / node / f"gpu{index}"

    def daemon_output(self, daemon: str) -> Path:
        """A daemon's stdout/stderr: a copy of its log plus errors from before the log opens."""
        return self.log / f"{daemon}.out"


@dataclass(frozen=True)
class StateLayout:
    """The state directory's layout (`state_dir`). The configuration may move a few parts
    elsewhere (the settings apply those overrides); everything else is only here. With
    `encrypted` (security.data_at_rest), the user content lives under `data`, where the
    encrypted data volume (ciphertext in `vault`) is mounted."""

    root: Path
    encrypted: bool = False

    @property
    def user_root(self) -> Path:
        """The folder of the user content: `data` when it is encrypted, else the state itself."""
        return self.data if self.encrypted else self.root

    @property
    def vault(self) -> Path:
        """The data volume's ciphertext (gocryptfs): what the disk holds of the user content."""
        return self.root / "vault"

    @property
    def data(self) -> Path:
        """Where the data volume is mounted: the user content's plaintext, while it is open."""
        return self.root / "data"

    @property
    def data_volume_key(self) -> Path:
        """The data volume's key, wrapped by the key-encryption key, and its signed policy."""
        return self.keys / "data-volume.json"

    @property
    def tmp(self) -> Path:
        """The services' scratch files while the user content is encrypted: no upload or parse
        scratch file lands in /tmp in plaintext."""
        return self.data / "tmp"

    def make_private(self, *elsewhere: Path) -> None:
        """The state directory and `elsewhere` (parts the configuration moved out of it) private
        to the service account. The local cluster's files keep their modes: the directory
        around them already shuts others out, and the Slurm tools read slurm.conf."""
        make_private(self.root, skip=frozenset({self.slurm.root}))
        for path in elsewhere:
            if not path.is_relative_to(self.root):
                make_private(path)

    @property
    def slurm(self) -> LocalClusterPaths:
        """The local cluster's files (configs, controller state, spools)."""
        return LocalClusterPaths(self.root / "slurm")

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def instances(self) -> Path:
        """One endpoint file per instance job."""
        return self.root / "instances"

    @property
    def run(self) -> Path:
        """Sockets and pid files of the node's services."""
        return self.root / "run"

    def standby_socket(self, node: str) -> Path:
        """Where a node's warm standby listens (`{node}` in the instances' scripts)."""
        return self.run / f"standby-{node}.sock"

    def store_socket(self, node: str) -> Path:
        """Where a node's store service offers its host tier to local loaders."""
        return self.run / f"store-{node}.sock"

    @property
    def supervisor_pid(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def compile_cache(self) -> Path:
        """vLLM's compile caches, one folder per node (serving.launch)."""
        return self.root / "cache" / "vllm"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def kek(self) -> Path:
        return self.keys / "kek.key"

    @property
    def policy_signing_key(self) -> Path:
        return self.keys / "policy-signing.key"

    @property
    def api_keys(self) -> Path:
        return self.keys / "api-keys.json"

    @property
    def users(self) -> Path:
        return self.keys / "users.json"

    @property
    def browser_secret(self) -> Path:
        """The key that encrypts what browsers keep for the web app."""
        return self.keys / "webapp-secret"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def internal_tls(self) -> Path:
        """The internal CA and the nodes' certificates it issued (security/internal_ca.py)."""
        return self.keys / "tls"

    @property
    def rag(self) -> Path:
        return self.user_root / "rag"

    @property
    def kb_volumes(self) -> Path:
        """The knowledge bases' encrypted volumes (ciphertext and wrapped key of each) when data
        at rest is encrypted: outside the rag folder, which may be inside a volume itself."""
        return self.root / "kb-volumes"

    @property
    def kb_mounts(self) -> Path:
        """Where the knowledge bases' encrypted volumes are mounted, one folder each: outside
        the data volume, since fusermount3 (root) cannot reach a mount point inside a FUSE
        mount that another account made, so a volume mounted inside it fails for the service
        account."""
        return self.root / "kb-mounts"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def sealed_audit(self) -> Path:
        """Where the audit log keeps the details no entry may hold in plaintext (recorded
        prompts) while the user content is encrypted: inside the data volume. The chain itself
        stays at `audit`, where root's CLI appends while the service account holds the volume.
        Unencrypted, a state has them only from a restored backup of an encrypted one."""
        return self.data / "audit" if self.encrypted else self.root / "audit-sealed"

    @property
    def usage_db(self) -> Path:
        """Tokens and requests per user and key per day (quotas survive a restart)."""
        return self.root / "usage" / "usage.sqlite3"

    @property
    def training(self) -> Path:
        return self.user_root / "training"

    @property
    def conversations(self) -> Path:
        return self.user_root / "conversations"

    @property
    def webapp(self) -> Path:
        return self.user_root / "webapp"

    @property
    def user_catalog(self) -> Path:
        return self.root / "catalog.yaml"

    @property
    def backups(self) -> Path:
        """Where `appliance upgrade` (and the installer's upgrade) puts the backup it takes."""
        return self.root / "backups"

    @property
    def service_home(self) -> Path:
        """HOME of the services and their jobs: a system account usually has no home."""
        return self.root / "home"
