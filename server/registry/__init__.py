"""The model registry: `models.yaml` entries resolved to local GGUF files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from server.errors import ModelNotFoundError
from server.registry.schema import ModelsFile, ModelSpec, load_models_file
from server.registry.sources import download, local_file, verify


class Registry:
    """Look up models by name or alias."""

    def __init__(self, models: ModelsFile) -> None:
        self.file = models
        self._by_name: dict[str, ModelSpec] = {}
        for spec in models.models.values():
            for name in (spec.id, *spec.aliases):
                self._by_name[name] = spec

    @classmethod
    def from_path(cls, path: Path) -> Registry:
        return cls(load_models_file(path))

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.file.models.values())

    def get(self, name: str) -> ModelSpec:
        spec = self._by_name.get(name)
        if spec is None:
            raise ModelNotFoundError(
                f"model '{name}' is not in the registry (see GET /v1/models)", param="model"
            )
        return spec

    def __contains__(self, name: str) -> bool:
        return name in self._by_name


__all__ = ["ModelSpec", "ModelsFile", "Registry", "download", "local_file", "verify"]
