"""Serving a stored model: what an instance needs to open it (StoreLoadSpec), the model's small
files laid out in memory for vLLM, and the vLLM model-loader plugin that loads the weights.

The plugin is registered through vLLM's `vllm.general_plugins` entry point (pyproject.toml), so
every vLLM process of an instance knows the `appliance-store` load format. The launcher starts
vLLM with `--load-format appliance-store --model-loader-extra-config <spec>` and `--model`
pointing at a private directory in memory holding config.json and the tokenizer."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance import envs
from appliance.security.host import this_host_fingerprint
from appliance.security.keys import KdfParams, KeyEncryptionKey, KeySetupError
from appliance.security.process import disable_core_dumps
from appliance.store.host_cache import open_from_host_tier
from appliance.store.loader import (
    DEFAULT_THREADS,
    DEFAULT_WINDOW_BYTES,
    load_from_mapping,
    load_to_host,
    plan_windows,
    read_bytes,
    stream_to_gpu,
)
from appliance.store.model import AccessRequest, StoredModel
from appliance.store.sharding import LlamaSharding

# Under "vllm." so the lines show in the instance log with vLLM's own (it configures that tree).
log = logging.getLogger("vllm.appliance.store")

LOAD_FORMAT = "appliance-store"
# A directory in memory (tmpfs) for the model's config and tokenizer, so nothing decrypted from
# the store is written to disk; the weights themselves never leave process memory.
MEMORY_DIRS = (Path("/dev/shm"), Path("/run"))
# Instances of one model that may run on one node at once (each holds a slot of its files).
MAX_SLOTS = 64


@dataclass
class StoreLoadSpec:
    """Everything an instance needs to open one stored model (JSON on the command line)."""

    model_dir: str
    model_id: str
    key_file: str
    kdf_file: str
    user: str
    roles: list[str] = field(default_factory=list)
    trusted_signers: list[str] = field(default_factory=list)
    threads: int = 0
    gpu_decrypt: bool = True
    # The node's host-tier socket; `{node}` is the node the instance runs on.
    host_socket: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreLoadSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def host_socket_path(self) -> Path | None:
        if not self.host_socket:
            return None
        node = envs.SLURMD_NODENAME or socket.gethostname()
        return Path(self.host_socket.replace("{node}", node))

    def kek(self) -> KeyEncryptionKey:
        return load_kek(Path(self.key_file), Path(self.kdf_file), passphrase=None)

    def open(self, host: str | None = None) -> StoredModel:
        """Open and authenticate the model, checking its policy for this host."""

        access = AccessRequest(
            user=self.user,
            roles=self.roles,
            host=host or this_host_fingerprint(),
            trusted_signers=self.trusted_signers,
        )
        return StoredModel.open(
            Path(self.model_dir), kek=self.kek(), access=access, expected_id=self.model_id
        )


def load_kek(
    key_file: Path, kdf_file: Path, passphrase: str | None, create_kdf: bool = False
) -> KeyEncryptionKey:
    """The key file when it exists, else the passphrase (argument or APPLIANCE_STORE_PASSPHRASE)
    stretched with the store's Argon2id parameters (written on first use when `create_kdf`)."""
    if key_file.exists():
        return KeyEncryptionKey.from_key_file(key_file)
    passphrase = passphrase or envs.APPLIANCE_STORE_PASSPHRASE
    if not passphrase:
        raise KeySetupError(
            f"no key-encryption key: {key_file} does not exist and APPLIANCE_STORE_PASSPHRASE "
            "is not set (run `appliance store init`)"
        )
    if kdf_file.exists():
        params = KdfParams.from_dict(json.loads(kdf_file.read_text()))
    elif create_kdf:
        params = KdfParams.new()
        kdf_file.parent.mkdir(parents=True, exist_ok=True)
        kdf_file.write_text(json.dumps(params.to_dict(), indent=1) + "\n")
    else:
        raise KeySetupError(f"{kdf_file} is missing: the passphrase cannot be turned into the key")
    return KeyEncryptionKey.from_kdf_params(passphrase, params)


def _memory_dir() -> Path | None:
    return next((d for d in MEMORY_DIRS if d.is_dir() and os.access(d, os.W_OK)), None)


def _write_files(model: StoredModel, path: Path) -> None:
    for name, content in model.index.files.items():
        target = path / name
        if target.parent != path:  # names come from the authenticated index, but stay flat
            raise ValueError(f"unexpected file name in the index: {name!r}")
        target.write_bytes(content)


def materialize_model_files(model: StoredModel) -> Path:
    """config.json, tokenizer and the other small files, in a new private directory in memory;
    the caller removes it when it is done."""
    path = Path(tempfile.mkdtemp(prefix=f"appliance-{model.model_id}-", dir=_memory_dir()))
    _write_files(model, path)
    return path


class ModelFiles:
    """A model's small files in a private directory in memory whose path is the same each time
    the model starts on this node: vLLM keys its compile cache by the model's path, so a random
    path would recompile on every start. Each running instance holds one slot (a lock file says
    which are taken); `release` removes the files and frees the slot."""

    def __init__(self, path: Path, lock_fd: int):
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def claim(cls, model: StoredModel, base: Path | None = None) -> ModelFiles:
        base = base or Path(_memory_dir() or tempfile.gettempdir()) / f"appliance-{os.getuid()}"
        base.mkdir(mode=0o700, exist_ok=True)
        st = base.lstat()
        # A folder another account made (or a link) in a shared /dev/shm must not be used.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{base} is not a private folder of this account")
        for slot in range(MAX_SLOTS):
            fd = os.open(base / f"{model.model_id}.{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            files = cls(base / f"{model.model_id}.{slot}", fd)
            try:
                shutil.rmtree(files.path, ignore_errors=True)  # what a killed instance left
                files.path.mkdir(mode=0o700)
                _write_files(model, files.path)
            except BaseException:
                files.release()
                raise
            return files
        raise RuntimeError(f"{MAX_SLOTS} instances of {model.model_id} already run here")

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)


def load_stored_weights(
    model: Any,
    spec: StoreLoadSpec,
    names: set[str] | None = None,
    finish: Callable[[], None] | None = None,
    stored: StoredModel | None = None,
    kept_by_model: bool = False,
) -> None:
    """Load a stored model's weights into an initialised vLLM model, in this process only, tensor
    by tensor into vLLM's own parameters (no second copy of the model on the device). Each of
    `names` (default: the model's parameters now) must be loaded. `finish` runs once the model
    has taken them, while the tensors it was given still hold them (a reload in vLLM keeps some
    until it processes their layer). `stored`: the model already opened from `spec`.
    `kept_by_model`: the model keeps the tensors it is given beyond the next one (vLLM's
    layerwise reload holds a layer's until the layer is complete), so on a GPU each is copied
    out of the load's window, which the next window overwrites."""
    import time

    import torch

    disable_core_dumps()
    t0 = time.perf_counter()
    if stored is None:
        stored = spec.open()  # the policy is checked whichever tier the bytes come from
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    threads = spec.threads or DEFAULT_THREADS
    # Under tensor parallelism each rank reads and decrypts only the parts its weights take.
    shards = _rank_sharding(model, stored) if cuda else None
    socket_path = spec.host_socket_path()
    with contextlib.ExitStack() as sources:
        cached = open_from_host_tier(socket_path, spec.model_id) if socket_path else None
        source = "the store"
        if cached is not None:
            sources.enter_context(cached)
            source = "the host tier"
            if cuda:
                weights = stream_to_gpu(
                    stored, device=device, threads=threads, mapping=cached.map, shards=shards
                )
            else:  # views straight into the tier's mapping: vLLM copies each into its parameter
                weights = iter(load_from_mapping(stored, cached.map)[1].items())
        elif cuda:
            weights = stream_to_gpu(
                stored, device=device, threads=threads, gpu_decrypt=spec.gpu_decrypt, shards=shards
            )
        else:
            flat, views = load_to_host(stored, threads=threads)
            sources.callback(_wipe, flat)  # the staging copy holds plaintext weights
            weights = iter(views.items())
            del views
        waited = [0.0]  # in the source: reading, decrypting, copying to the device
        weights = _timed(weights, waited)
        if cuda and kept_by_model:
            weights = owned(weights)
        loaded = model.load_weights(weights)
        finish_s = time.perf_counter()
        if finish is not None:
            finish()
        finish_s = time.perf_counter() - finish_s
        del weights
    if names is None:
        names = {name for name, _ in model.named_parameters()}
    missing = names - set(loaded or ())
    if loaded is not None and missing:
        raise ValueError(f"model {spec.model_id}: weights missing in the store: {sorted(missing)}")
    seconds = time.perf_counter() - t0
    peak = ""
    if cuda:
        # Parameters plus whatever the load staged: 1.0 would be the model alone.
        ratio = torch.cuda.max_memory_allocated(device) / stored.data_bytes
        peak = f"; load_peak_gpu_bytes_over_model={ratio:.3f}"
    if shards is not None:  # on GPUs only
        # Over the rank's own parameters (its shard): what its GPU holds whatever loads them.
        own = sum(p.numel() * p.element_size() for p in model.parameters())
        over_shard = torch.cuda.max_memory_allocated(device) / own
        peak += f"; load_peak_gpu_bytes_over_shard={over_shard:.3f}"
        read = read_bytes(stored, plan_windows(stored, DEFAULT_WINDOW_BYTES, shards))
        peak += (
            f"; tensor-parallel rank {shards.rank} of {shards.world} read "
            f"{read / 1e9:.2f} GB ({read / stored.data_bytes:.3f} of the model)"
        )
    # Where a slow load spends its time: waiting for the bytes, or vLLM taking them.
    split = f"; waiting for bytes {waited[0]:.2f} s, after the last tensor {finish_s:.2f} s"
    log.info(
        "appliance-store: loaded %s from %s (%d tensors, %.2f GB) in %.2f s%s%s",
        spec.model_id,
        source,
        len(stored.index.names()),
        stored.data_bytes / 1e9,
        seconds,
        peak,
        split,
    )


def _timed(items: Iterator[Any], waited: list[float]) -> Iterator[Any]:
    """`items`, adding the seconds spent waiting for each to `waited[0]`."""
    import time

    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            waited[0] += time.perf_counter() - started
        yield item


def owned(weights: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Each tensor as a copy of its own: for a consumer that keeps tensors while the source
    reuses their memory (stream_to_gpu's window)."""
    for name, tensor in weights:
        yield name, tensor.clone()


def _wipe(flat: Any) -> None:
    import torch

    with torch.no_grad():
        flat.zero_()


def _rank_sharding(model: Any, stored: StoredModel) -> LlamaSharding | None:
    """This tensor-parallel rank's split of the model's weights, or None: one rank, or a model
    whose split is not known here (every rank then reads the whole model, as before)."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    world = get_tensor_model_parallel_world_size()
    config = stored.index.files.get("config.json")
    # The vLLM class decides how the weights are split, whatever config.json names.
    if world <= 1 or config is None or type(model).__name__ not in LlamaSharding.ARCHITECTURES:
        return None
    return LlamaSharding.from_config(config, world, get_tensor_model_parallel_rank())


def register() -> None:
    """vLLM general-plugin entry point: make the `appliance-store` load format known, and the
    store's LoRA adapters for an instance of a `lora: true` model."""
    if envs.APPLIANCE_LORA_STORE:
        # The adapters' resolver builds on this module (a cycle at the top).
        from appliance.store.lora import register_resolver

        register_resolver(envs.APPLIANCE_LORA_STORE)
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    @register_model_loader(LOAD_FORMAT)
    class ApplianceStoreLoader(BaseModelLoader):
        """Loads weights from the encrypted store straight into the model's memory."""

        def download_model(self, model_config) -> None:
            return None

        def load_weights(self, model, model_config) -> None:
            extra = self.load_config.model_loader_extra_config or {}
            load_stored_weights(model, StoreLoadSpec.from_dict(extra))
