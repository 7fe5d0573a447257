"""An instance job's batch script: its name, what it asks Slurm for (resources from the catalog
and the cluster's GPUs, the node from the model store's placement by start-up time) and the script
itself (golden-file tested). Shared by the gateway's direct access and the circuit breaker, so an
instance starts the same way whichever way the gateway reaches Slurm. The store comes in as an
interface (serving/stored_models.py)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from appliance import envs
from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.models.catalog import ModelSpec
from appliance.models.resources import InstanceRequest, plan_request
from appliance.names import INSTANCE_COMMENT_PREFIX, STANDBY_INSTANCE_COMMENT_PREFIX
from appliance.security.node_tls import ensure_internal_ca
from appliance.serving.stored_models import StoredModels

# Every instance job's name starts with this, so the gateway can find (and adopt) its own jobs
# among ordinary batch work on the same cluster.
JOB_NAME_INFIX = "-inst-"


def job_name_prefix(settings: ApplianceSettings) -> str:
    return f"{settings.cluster.name}{JOB_NAME_INFIX}"


def job_name(settings: ApplianceSettings, model: str) -> str:
    return f"{job_name_prefix(settings)}{model}"


def model_from_job_name(settings: ApplianceSettings, name: str) -> str | None:
    prefix = job_name_prefix(settings)
    return name[len(prefix) :] if name.startswith(prefix) else None


def render_instance_script(
    settings: ApplianceSettings,
    spec: ModelSpec,
    request: InstanceRequest,
    model_dir: Path,
    nodelist: str | None = None,
    preemptible: bool = False,
    exclude: frozenset[str] = frozenset(),
    store_spec: str | None = None,
    lora_store: str | None = None,
) -> str:
    """The sbatch script: Slurm directives, then the launcher that runs the model server.
    `nodelist` pins the job to a node (placement by start-up time); a `preemptible` instance
    runs in the partition batch jobs preempt; `exclude` keeps it off nodes it is leaving;
    `store_spec` and `lora_store` tell the launcher how to open a stored model and adapters."""
    q = shlex.quote
    log = settings.log_dir / f"instance-{spec.name}-%j.log"
    partition = settings.cluster.partition
    if preemptible and settings.cluster.preemptible_partition:
        partition = settings.cluster.preemptible_partition
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name(settings, spec.name)}",
        f"#SBATCH --partition={partition}",
        f"#SBATCH --output={log}",
        f"#SBATCH --chdir={settings.state_dir}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={request.cpus}",
        f"#SBATCH --mem={request.mem_mb}M",
    ]
    if request.gres:
        lines.append(f"#SBATCH --gres={request.gres}")
    if settings.serving.time_limit_min:
        lines.append(f"#SBATCH --time={settings.serving.time_limit_min}")
    if nodelist:
        lines.append(f"#SBATCH --nodelist={nodelist}")
    if exclude:
        lines.append(f"#SBATCH --exclude={','.join(sorted(exclude))}")
    # Its server from the node's standby, which the job asks for its GPUs itself (the
    # cluster's prolog has the standby drop idle kept engines for every other job).
    through_standby = settings.serving.standby and spec.engine == "vllm"
    comment = STANDBY_INSTANCE_COMMENT_PREFIX if through_standby else INSTANCE_COMMENT_PREFIX
    lines += [
        f"#SBATCH --comment={comment}{spec.name}",
        # An instance that dies is replaced by the gateway, not requeued by Slurm.
        "#SBATCH --no-requeue",
        "",
        "# What the job writes (endpoint file, caches) is the service account's alone.",
        "umask 077",
        "# Recorded first, so the gateway can split queueing from process start-up.",
        "export APPLIANCE_JOB_STARTED_AT=$(date +%s.%N)",
    ]
    if request.uses_gpu:
        lines += [
            "# NVLink multicast off: on a host whose GPUs are shared it can take them all down.",
            "export " + " ".join(f"{k}={v}" for k, v in envs.NVLINK_MULTICAST_OFF.items()),
        ]
    serving = settings.serving
    # (flag, value) pairs, one per line of the script, so an operator can read it at a glance.
    options: list[tuple[str, str | None]] = [
        ("--model", spec.name),
        ("--model-path", str(model_dir)),
        ("--engine", spec.engine),
        ("--endpoint-dir", str(settings.instances_dir)),
        ("--bind-host", serving.bind_host),
        ("--device", serving.device),
        ("--max-model-len", str(spec.max_model_len)),
        ("--cpu-kv-cache-gib", f"{serving.cpu_kv_cache_gib:g}"),
        ("--health-path", serving.health_path),
        ("--compile-cache-dir", str(settings.compile_cache_dir)),
    ]
    if store_spec is not None:
        options.append(("--store-spec", store_spec))
    if lora_store is not None:
        options.append(("--lora-store", lora_store))
    if serving.sleep_mode != "off" and spec.engine == "vllm":
        options.append(("--sleep-mode", serving.sleep_mode))
    if through_standby:
        options.append(("--standby-socket", str(settings.standby_socket("{node}"))))
        if serving.keeps_engines and store_spec is not None and not spec.lora:
            # An adapter-serving engine resolves its own model's adapters: not handed on.
            options.append(("--keep-engine", serving.keep_engines))
    if serving.tls:
        options.append(("--tls-dir", str(settings.layout.internal_tls)))
    if serving.enforce_eager:
        options.append(("--enforce-eager", None))
    if request.gpu_memory_utilization is not None:
        options.append(("--gpu-memory-utilization", f"{request.gpu_memory_utilization:g}"))
    if spec.resources.gpus > 1:
        options.append(("--tensor-parallel-size", str(spec.resources.gpus)))
    parts = [f"{q(str(serving.python))} -m appliance.serving.launch"]
    parts += [flag if value is None else f"{flag} {q(value)}" for flag, value in options]
    extra = without_content_logs(settings, [*spec.vllm_args, *serving.extra_vllm_args])
    if spec.lora:
        extra = [
            "--enable-lora",
            "--max-lora-rank",
            str(serving.max_lora_rank),
            "--max-loras",
            str(serving.max_loras),
            *extra,
        ]
    if extra:
        parts.append("-- " + " ".join(q(a) for a in extra))
    # exec: the launcher becomes the job's main process and receives Slurm's signals directly.
    lines.append("exec " + " \\\n    ".join(parts))
    return "\n".join(lines) + "\n"


log = logging.getLogger(__name__)
# vLLM's flags that put prompts (at DEBUG) and answers (at INFO) into the instance's log.
CONTENT_LOG_FLAGS = ("--enable-log-requests", "--enable-log-outputs")


def without_content_logs(settings: ApplianceSettings, args: list[str]) -> list[str]:
    """`args` without the flags that log prompts or answers while the user content is encrypted
    at rest: the instances' logs lie outside the data volume, in plaintext."""
    if not settings.security.data_at_rest.enabled:
        return args
    dropped = [a for a in args if a.split("=", 1)[0] in CONTENT_LOG_FLAGS]
    if dropped:
        log.warning(
            "vLLM arguments %s left out: they log prompts or answers, which "
            "security.data_at_rest keeps out of the plaintext logs",
            " ".join(dropped),
        )
    return [a for a in args if a not in dropped]


class ModelNotInstalled(ApplianceError):
    """A catalog model whose files are not on this appliance."""


async def instance_script(
    settings: ApplianceSettings,
    stored: StoredModels,
    spec: ModelSpec,
    cluster_gpus: int,
    *,
    preemptible: bool = False,
    avoid: frozenset[str] = frozenset(),
) -> str:
    """The batch script of one instance of `spec`, in the preemptible partition if
    `preemptible`, on none of the nodes in `avoid`; creates the directories the job writes to."""
    if not spec.installed(settings):
        raise ModelNotInstalled(
            f"model {spec.name} is not installed on this appliance "
            f"(expected files in {spec.model_dir(settings)})"
        )
    request = plan_request(spec, settings, cluster_gpus)
    node = store_spec = None
    if spec.source_kind == "store":
        node = await stored.place(spec.name, request, avoid)
        store_spec = stored.load_spec_json(spec.name)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    settings.instances_dir.mkdir(parents=True, exist_ok=True)
    # The job's launcher serves TLS with its node's certificate from the internal CA.
    ensure_internal_ca(settings)
    log.info("instance of %s: %s", spec.name, request)
    return render_instance_script(
        settings,
        spec,
        request,
        spec.model_dir(settings),
        nodelist=node,
        preemptible=preemptible,
        exclude=avoid,
        store_spec=store_spec,
        lora_store=stored.lora_store_json(spec.name) if spec.lora else None,
    )
