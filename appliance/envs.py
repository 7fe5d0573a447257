"""Every environment variable the stack reads or sets, declared in one place.

Configuration fields themselves are read by pydantic-settings from ``APPLIANCE_<SECTION>__<FIELD>``
(for example ``APPLIANCE_GATEWAY__PORT=8080``); this module lists the variables that are not
configuration fields, so nothing else in the code base calls ``os.environ`` with a literal name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# Prefix and nesting delimiter of configuration fields in the environment.
CONFIG_ENV_PREFIX = "APPLIANCE_"
CONFIG_ENV_NESTED_DELIMITER = "__"

# Variables the stack sets for the processes it starts (vLLM, embedding servers, Slurm tools).
# Nothing downloads at run time and nothing phones home.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
}


# Set for every GPU process the stack starts (instance jobs, the benchmarks' own vLLM): NVLink
# multicast (NVLS) off in NCCL, PyTorch and NVSHMEM. On a host whose GPUs are shared or
# virtualised, a program that uses it can put the host's GPUs out of service for a day or more;
# tensor parallelism runs without it (NCCL's ring and tree, vLLM's own all-reduce).
NVLINK_MULTICAST_OFF: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def gradio_environment(upload_dir: os.PathLike[str] | str) -> dict[str, str]:
    """What the web app sets before importing gradio: offline, and uploads in `upload_dir`
    (gradio's GRADIO_TEMP_DIR) rather than /tmp/gradio."""
    return {**OFFLINE_ENV, "GRADIO_TEMP_DIR": str(upload_dir)}


environment_variables: dict[str, Callable[[], Any]] = {
    # Path of the YAML configuration file. Default: /etc/appliance/config.yaml when it exists.
    "APPLIANCE_CONFIG": lambda: os.environ.get("APPLIANCE_CONFIG"),
    # Slurm's own: which slurm.conf the Slurm tools read. Set by the stack for its local cluster.
    "SLURM_CONF": lambda: os.environ.get("SLURM_CONF"),
    # Set by Slurm inside a job: the job id and the node the job runs on.
    "SLURM_JOB_ID": lambda: os.environ.get("SLURM_JOB_ID"),
    "SLURMD_NODENAME": lambda: os.environ.get("SLURMD_NODENAME"),
    # Set by Slurm inside a job that asked for GPUs with --gres.
    "CUDA_VISIBLE_DEVICES": lambda: os.environ.get("CUDA_VISIBLE_DEVICES"),
    "SLURM_JOB_GPUS": lambda: os.environ.get("SLURM_JOB_GPUS"),
    # CUDA's: the order of its device numbers. Set to PCI_BUS_ID for a server the node's warm
    # standby starts outside its job's cgroup (appliance/serving/standby.py renumbers its GPUs).
    "CUDA_DEVICE_ORDER": lambda: os.environ.get("CUDA_DEVICE_ORDER"),
    # Set by the instance sbatch script: wall-clock time (epoch seconds) at which the job started.
    "APPLIANCE_JOB_STARTED_AT": lambda: os.environ.get("APPLIANCE_JOB_STARTED_AT"),
    # Debian's: set to "noninteractive" when the stack installs packages with apt-get.
    "DEBIAN_FRONTEND": lambda: os.environ.get("DEBIAN_FRONTEND"),
    # Tests and benchmarks: where built artefacts (the tiny model) are cached between runs.
    # Default: <repository>/.state/test-cache.
    "APPLIANCE_TEST_CACHE": lambda: os.environ.get("APPLIANCE_TEST_CACHE"),
    # Set by sshd for a forced command: what the client asked to run (the breaker parses it,
    # never runs it).
    "SSH_ORIGINAL_COMMAND": lambda: os.environ.get("SSH_ORIGINAL_COMMAND"),
    # Tests: where the browser tests save their screenshots. Default:
    # <repository>/.state/test-artifacts.
    "APPLIANCE_TEST_ARTIFACTS": lambda: os.environ.get("APPLIANCE_TEST_ARTIFACTS"),
    # Passphrase of the store's key-encryption key, when there is no key file (a secret: it is
    # never read from the YAML file).
    "APPLIANCE_STORE_PASSPHRASE": lambda: os.environ.get("APPLIANCE_STORE_PASSPHRASE"),
    # An administrator's API key, for `appliance instances` once the gateway has keys.
    "APPLIANCE_API_KEY": lambda: os.environ.get("APPLIANCE_API_KEY"),
    # Gradio's: where the web app's uploads wait until they are sent to the gateway. Set by the
    # web app (see gradio_environment).
    "GRADIO_TEMP_DIR": lambda: os.environ.get("GRADIO_TEMP_DIR"),
    # Set by the launcher for the vLLM of a `lora: true` model: JSON with the base model's catalog
    # name and how to open adapters in the store (appliance/store/lora.py resolves them).
    "APPLIANCE_LORA_STORE": lambda: os.environ.get("APPLIANCE_LORA_STORE"),
    # vLLM's: load LoRA adapters named in requests at run time (set with APPLIANCE_LORA_STORE).
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": lambda: os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
    # Set for a kept engine's vLLM server by whoever starts it: the token its claim and release
    # routes ask for (appliance/serving/kept_engine.py).
    "APPLIANCE_KEPT_ENGINE_TOKEN": lambda: os.environ.get("APPLIANCE_KEPT_ENGINE_TOKEN"),
    # vLLM CPU backend: KV-cache size in GiB (without it vLLM wants 90% of RAM free).
    "VLLM_CPU_KVCACHE_SPACE": lambda: os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
}


def __getattr__(name: str) -> Any:
    """Read a declared variable lazily: ``envs.SLURM_JOB_ID``."""
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
