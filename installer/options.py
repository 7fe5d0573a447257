"""The installer's command line, shared by `install.sh` (system Python) and `appliance install`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Worker:
    """A worker node named on the head's command line: its host name and GPU count."""

    name: str
    gpus: int


@dataclass(frozen=True)
class Options:
    """What the operator asked for; every field has the default a fresh server wants."""

    prefix: Path = Path("/")
    dry_run: bool = False
    role: str = "auto"
    """auto (cpu-demo or gpu-server from the hardware), head or worker."""
    head: str | None = None
    """Worker: the head's host name (its slurmctld serves the configuration)."""
    workers: tuple[Worker, ...] = ()
    munge_key: Path | None = None
    """Worker: a copy of the head's /etc/munge/munge.key."""
    models: tuple[str, ...] = ()
    """Preset names to install; empty: the plan's proposal."""
    models_dir: Path | None = None
    """Offline: import presets from this directory (one sub-directory per model)."""
    offline: bool = False
    bind: str = "0.0.0.0"
    gateway_port: int = 8000
    webapp_port: int = 7860
    controller_port: int = 6817
    node_port: int = 6818
    cluster_name: str = "appliance"
    service_user: str | None = "appliance"
    admin: str = "admin"
    self_test: bool = True

    @property
    def multi_node(self) -> bool:
        return self.role in ("head", "worker")


def _worker(text: str) -> Worker:
    name, _, gpus = text.partition(":")
    if not name or not (gpus or "0").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST or HOST:GPUS, e.g. gpu02:8")
    return Worker(name, int(gpus or 0))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="install.sh",
        description="Install the appliance on this machine: detect the hardware, print the "
        "plan, install packages, write the configuration, import models, start the services "
        "and test them. Safe to run again.",
    )
    p.add_argument("--prefix", type=Path, default=Path("/"), help="install under this directory")
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--role", choices=["auto", "head", "worker"], default="auto")
    p.add_argument("--head", help="worker: host name of the head node")
    p.add_argument(
        "--worker",
        dest="workers",
        type=_worker,
        action="append",
        default=[],
        help="head: a worker node HOST:GPUS (repeat per node)",
    )
    p.add_argument("--munge-key", type=Path, help="worker: copy of the head's munge.key")
    p.add_argument("--models", default="", help="comma-separated presets (default: proposed)")
    p.add_argument("--models-dir", type=Path, help="offline: import presets from this directory")
    p.add_argument("--offline", action="store_true", help="do not use the model hub")
    p.add_argument("--bind", default="0.0.0.0", help="address the gateway and web app listen on")
    p.add_argument("--gateway-port", type=int, default=8000)
    p.add_argument("--webapp-port", type=int, default=7860)
    p.add_argument("--controller-port", type=int, default=6817, help="slurmctld port")
    p.add_argument("--node-port", type=int, default=6818, help="first slurmd port")
    p.add_argument("--cluster-name", default="appliance")
    p.add_argument("--service-user", default="appliance", help="account the services run as")
    p.add_argument("--no-service-user", action="store_true", help="run the services as root")
    p.add_argument("--admin", default="admin", help="name of the administrator account")
    p.add_argument("--no-self-test", action="store_true")
    return p


def parse(argv: list[str]) -> Options:
    args = parser().parse_args(argv)
    if args.role == "worker" and not args.head:
        parser().error("--role worker needs --head HOST")
    return Options(
        prefix=args.prefix.absolute(),
        dry_run=args.dry_run,
        role=args.role,
        head=args.head,
        workers=tuple(args.workers),
        munge_key=args.munge_key,
        models=tuple(m for m in args.models.split(",") if m),
        models_dir=args.models_dir.absolute() if args.models_dir else None,
        offline=args.offline,
        bind=args.bind,
        gateway_port=args.gateway_port,
        webapp_port=args.webapp_port,
        controller_port=args.controller_port,
        node_port=args.node_port,
        cluster_name=args.cluster_name,
        service_user=None if args.no_service_user else args.service_user,
        admin=args.admin,
        self_test=not args.no_self_test,
    )
