"""Configuration of where model catalogs and model files live."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class CatalogSettings(BaseModel):
    """Which catalog files are read besides the built-in presets."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    files: list[Path] = Field(default_factory=list)
    """Extra catalog YAML files. Entries override presets of the same name. Models added with
    `appliance models add` go to `<state_dir>/catalog.yaml`, which is always read."""

    include_presets: bool = True
    """Offer the built-in presets (tiny model, 7-8B and 13-14B instruct models, embeddings)."""

    models_dir: Path | None = None
    """Where model files are kept. Unset: `<state_dir>/models`."""
