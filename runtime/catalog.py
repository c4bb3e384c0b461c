"""The GPU catalog: datasheet figures per GPU model, and NVML-name matching.

Loaded from runtime/data/gpus.toml; an operator file named by the
TANDEM_GPU_CATALOG environment variable (same format) is merged over it, so
calibrated figures or new parts need no code change. Pure data: no I/O
beyond reading those files once.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_CATALOG = Path(__file__).parent / "data" / "gpus.toml"
CATALOG_ENV = "TANDEM_GPU_CATALOG"


class CatalogError(ValueError):
    """The catalog file is malformed; the message names the file and entry."""


@dataclass(frozen=True)
class GpuModel:
    """One GPU model's datasheet figures."""

    catalog_id: str
    nvml_names: tuple[str, ...]
    bf16_tflops: float
    memory_gb: float
    hbm_tbps: float
    memory_type: str = ""
    form: str = ""
    interconnect: str = ""
    # Dense FP8 tensor-core rate; 0 where the part has no FP8 tensor cores
    # (FP8 weights then compute at the bf16 rate, dequantized).
    fp8_tflops: float = 0.0
    # GPU-to-GPU bandwidth per GPU (GB/s) that tensor-parallel all-reduces
    # use; 0 where no figure is recorded (the step model then assumes PCIe).
    link_gbps: float = 0.0

    @property
    def bf16_flops(self) -> float:
        """Peak dense BF16 FLOP/s."""
        return self.bf16_tflops * 1e12

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12

    @property
    def fp8_flops(self) -> float:
        """Peak dense FP8 FLOP/s, or the bf16 rate where the part has none."""
        return self.fp8_tflops * 1e12 if self.fp8_tflops > 0 else self.bf16_flops

    @property
    def link_bytes_per_s(self) -> float:
        """GPU-to-GPU bytes/s per GPU; 0 when unknown."""
        return self.link_gbps * 1e9


def normalize_name(name: str) -> str:
    """Case, spaces, dashes and underscores do not matter when matching names."""
    return re.sub(r"[\s\-_]+", "", name).lower()


_REQUIRED = ("bf16_tflops", "memory_gb", "hbm_tbps")
_OPTIONAL_NUMBERS = ("fp8_tflops", "link_gbps")


def _parse(data: Mapping[str, Any], source: str) -> dict[str, GpuModel]:
    gpus = data.get("gpus")
    if not isinstance(gpus, dict):
        raise CatalogError(f"{source}: no [gpus.<id>] tables")
    models: dict[str, GpuModel] = {}
    for catalog_id, row in gpus.items():
        if not isinstance(row, dict):
            raise CatalogError(f"{source}: gpus.{catalog_id} is not a table")
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise CatalogError(f"{source}: gpus.{catalog_id} lacks {', '.join(missing)}")
        numbers = {}
        for key in _REQUIRED:
            value = row[key]
            if not isinstance(value, (int, float)) or value <= 0:
                raise CatalogError(f"{source}: gpus.{catalog_id}.{key} must be a positive number, got {value!r}")
            numbers[key] = float(value)
        for key in _OPTIONAL_NUMBERS:
            if key in row:
                value = row[key]
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                    raise CatalogError(f"{source}: gpus.{catalog_id}.{key} must be a number >= 0, got {value!r}")
                numbers[key] = float(value)
        names = row.get("nvml_names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CatalogError(f"{source}: gpus.{catalog_id}.nvml_names must be a list of strings")
        models[catalog_id] = GpuModel(
            catalog_id=catalog_id,
            nvml_names=tuple(names),
            memory_type=str(row.get("memory_type", "")),
            form=str(row.get("form", "")),
            interconnect=str(row.get("interconnect", "")),
            **numbers,
        )
    return models


class GpuCatalog:
    """Lookup by catalog id or by NVML name."""

    def __init__(self, models: Mapping[str, GpuModel]) -> None:
        self._models = dict(models)
        self._by_name: dict[str, GpuModel] = {}
        for model in self._models.values():
            self._by_name[normalize_name(model.catalog_id)] = model
            for name in model.nvml_names:
                self._by_name[normalize_name(name)] = model

    def __contains__(self, catalog_id: object) -> bool:
        return catalog_id in self._models

    def __iter__(self) -> Iterator[GpuModel]:
        return iter(self._models.values())

    def ids(self) -> list[str]:
        return list(self._models)

    def get(self, catalog_id: str) -> GpuModel:
        """The model with this catalog id; KeyError names the known ids."""
        try:
            return self._models[catalog_id]
        except KeyError:
            raise KeyError(f"unknown GPU type {catalog_id!r}; known: {', '.join(self._models)}") from None

    def match(self, nvml_name: str) -> GpuModel | None:
        """The catalog row for an NVML-reported name, or None when unknown."""
        return self._by_name.get(normalize_name(nvml_name))

    @classmethod
    def load(cls, extra: Path | None = None) -> GpuCatalog:
        """The built-in catalog with `extra` (an operator file) merged over it."""
        models = _parse(tomllib.loads(BUILTIN_CATALOG.read_text()), str(BUILTIN_CATALOG))
        if extra is not None:
            try:
                text = extra.read_text()
            except OSError as exc:
                raise CatalogError(f"{extra}: {exc.strerror}") from None
            try:
                models.update(_parse(tomllib.loads(text), str(extra)))
            except tomllib.TOMLDecodeError as exc:
                raise CatalogError(f"{extra}: {exc}") from None
        return cls(models)


@functools.cache
def default_catalog() -> GpuCatalog:
    """The process-wide catalog (built-in, plus $TANDEM_GPU_CATALOG if set)."""
    extra = os.environ.get(CATALOG_ENV)
    return GpuCatalog.load(Path(extra) if extra else None)
