"""The model catalog: presets shipped with the stack plus models the operator adds."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.atomic_files import write_text
from appliance.config import ApplianceSettings
from appliance.errors import ApplianceError
from appliance.names import STORE_HEADER_FILE

# JSON (which YAML readers also read), so the installer plans with the standard library alone,
# before any package is installed. Sizes are on-disk bf16 sizes; gpu_memory_gb is what one
# instance needs with a modest KV cache.
PRESETS_FILE = Path(__file__).with_name("presets.json")


class ModelResources(BaseModel):
    """What one instance of a model needs from a node."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(default=0, ge=0, le=16, description="Whole GPUs per instance (0: CPU model).")
    gpu_memory_gb: float = Field(
        default=0, ge=0, description="GPU memory one instance needs; less than a GPU can share it."
    )
    cpu_fallback: bool = Field(default=False, description="May run on CPU when no GPU is free.")
    cpus: int = Field(default=1, ge=1, le=512, description="CPU cores per instance.")
    memory_gb: float = Field(default=4, gt=0, description="Host memory per instance.")


class ModelSpec(BaseModel):
    """One catalog entry: what the model is, where its files are, and how it is served."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""
    kind: Literal["chat", "completion", "embedding"] = "chat"
    engine: Literal["vllm", "sentence-transformers"] = "vllm"
    source: str = Field(
        description="builtin:tiny, hf:<repo id>, dir:<path>, package:<module> or store:<model id>."
    )
    path: Path | None = Field(default=None, description="Local model directory; derived if unset.")
    parameters: str = ""
    size_gb: float = Field(default=0, ge=0)
    max_model_len: int = Field(default=4096, ge=16)
    resources: ModelResources = Field(default_factory=ModelResources)
    min_instances: int = Field(default=0, ge=0, le=64)
    max_instances: int = Field(default=1, ge=1, le=64)
    idle_timeout_s: float | None = Field(default=None, ge=0)
    preemptible: bool | None = Field(
        default=None,
        description="Instances above min_instances run in the preemptible partition, where batch "
        "jobs may take their resources back (running requests move to other instances first). "
        "Unset: serving.preemptible.",
    )
    vllm_args: list[str] = Field(default_factory=list)
    lora: bool = Field(
        default=False,
        description="Instances serve this model's LoRA adapters (vLLM --enable-lora); its "
        "fine-tunes are then stored as adapters, else as merged weights.",
    )
    base_model: str | None = Field(
        default=None,
        description="This entry is a LoRA adapter (in the store) served on instances of "
        "base_model.",
    )
    training_job: str | None = Field(
        default=None,
        description="The fine-tuning job that made this model: its weights exist only in the "
        "store, so every backup keeps them.",
    )

    @property
    def serving_model(self) -> str:
        """The model whose instances serve requests for this one."""
        return self.base_model or self.name

    def needs(self) -> str:
        """What one instance needs, for people: "CPU", "1 GPU, 16 GB (or CPU)"."""
        r = self.resources
        if not r.gpus:
            return "CPU"
        needs = f"{r.gpus} GPU, {r.gpu_memory_gb:g} GB"
        return needs + " (or CPU)" if r.cpu_fallback else needs

    @property
    def source_kind(self) -> str:
        return self.source.split(":", 1)[0]

    def model_dir(self, settings: ApplianceSettings) -> Path:
        """Directory holding the weights (for package sources, the package's bundled model)."""
        if self.path is not None:
            return self.path
        kind, _, ref = self.source.partition(":")
        if kind == "dir":
            return Path(ref)
        if kind == "store":
            return settings.store_root / ref
        if kind == "package":
            try:
                module = importlib.import_module(ref)
            except ImportError:
                raise ApplianceError(
                    f"model {self.name}: Python package {ref!r} is not installed"
                ) from None
            return Path(module.get_model_path())
        return settings.models_dir / self.name

    def installed(self, settings: ApplianceSettings) -> bool:
        """True when the weights are present locally and the model can be started."""
        try:
            directory = self.model_dir(settings)
        except ApplianceError:
            return False
        if self.source_kind == "store":
            return (directory / STORE_HEADER_FILE).exists()
        return (directory / "config.json").exists() or (directory / "modules.json").exists()


class Catalog:
    """All models the stack knows, by name; later sources override earlier ones."""

    def __init__(self, models: list[ModelSpec], settings: ApplianceSettings | None = None):
        self._models = {m.name: m for m in models}
        self._settings = settings
        self._stamp = _stamp(settings) if settings is not None else None

    def refresh(self) -> bool:
        """Read the catalog files again if one changed (a model imported or fine-tuned while
        the gateway runs); True when it did. Cheap enough for every tick: one stat per file."""
        if self._settings is None:
            return False
        stamp = _stamp(self._settings)
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a broken file is reported once, not on every tick
        self._models = load_catalog(self._settings)._models
        return True

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str) -> ModelSpec | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return list(self._models)


def _read_entries(path: Path) -> list[ModelSpec]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ApplianceError(f"catalog {path}: cannot read: {exc}") from None
    entries = data.get("models", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ApplianceError(f"catalog {path}: expected a top-level 'models:' list")
    models = []
    for i, entry in enumerate(entries):
        try:
            models.append(ModelSpec.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            label = entry.get("name", f"#{i + 1}") if isinstance(entry, dict) else f"#{i + 1}"
            raise ApplianceError(f"catalog {path}: model {label}: {problems}") from None
    return models


def _stamp(settings: ApplianceSettings) -> tuple:
    files = [*settings.catalog.files, settings.user_catalog_file]
    out = []
    for path in files:
        try:
            info = Path(path).stat()
            out.append((info.st_mtime_ns, info.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def load_catalog(settings: ApplianceSettings) -> Catalog:
    """Presets, then configured catalog files, then the models added with `appliance models add`."""
    models: list[ModelSpec] = []
    if settings.catalog.include_presets:
        models += _read_entries(PRESETS_FILE)
    for path in settings.catalog.files:
        models += _read_entries(path)
    if settings.user_catalog_file.exists():
        models += _read_entries(settings.user_catalog_file)
    return Catalog(models, settings)


def add_local_model(settings: ApplianceSettings, spec: ModelSpec) -> None:
    """Append (or replace) a model in the operator's catalog file."""
    path = settings.user_catalog_file
    existing = _read_entries(path) if path.exists() else []
    kept = [m for m in existing if m.name != spec.name] + [spec]
    payload = {"models": [m.model_dump(mode="json", exclude_defaults=True) for m in kept]}
    write_text(path, yaml.safe_dump(payload, sort_keys=False))
