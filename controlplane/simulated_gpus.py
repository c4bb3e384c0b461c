"""Declared GPU inventories (`--simulate-gpus H100-SXM:4,A100-80GB:4`) for nodes without NVIDIA GPUs.

Pure: parses the declaration against the GPU catalog and builds GpuInfo
messages that look like NVML's (the catalog's first NVML name, its memory)
with uuids `SIM-{node}-{index}`. A node that reports them sets
`NodeRecord.simulated`, so nobody mistakes them for hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.keys import check_name
from runtime.catalog import GpuCatalog, GpuModel, default_catalog
from tandem.v1 import registry_pb2

MAX_PER_TYPE = 64
FLAG = "--simulate-gpus"


class SimulatedGpusError(ValueError):
    """The declaration is malformed; the message names the flag, the entry and what is allowed."""


@dataclass(frozen=True)
class Declared:
    model: GpuModel
    count: int


def parse_declaration(text: str, catalog: GpuCatalog | None = None) -> list[Declared]:
    """Entries of "TYPE:COUNT[,TYPE:COUNT...]", in order. TYPE is a catalog id (case-insensitive)."""
    catalog = catalog or default_catalog()
    entries: list[Declared] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        gpu_type, sep, count_text = item.rpartition(":")
        if not sep or not gpu_type.strip():
            raise SimulatedGpusError(f"{FLAG}: expected TYPE:COUNT (for example H100-SXM:4), got {item!r}")
        gpu_type = gpu_type.strip()
        model = catalog.get(gpu_type) if gpu_type in catalog else catalog.match(gpu_type)
        if model is None:
            raise SimulatedGpusError(
                f"{FLAG}: unknown GPU type {gpu_type!r}; known: {', '.join(catalog.ids())}")
        try:
            count = int(count_text.strip())
        except ValueError:
            count = 0
        if not 1 <= count <= MAX_PER_TYPE:
            raise SimulatedGpusError(
                f"{FLAG}: count for {model.catalog_id} must be 1..{MAX_PER_TYPE}, got {count_text.strip()!r}")
        if any(entry.model.catalog_id == model.catalog_id for entry in entries):
            raise SimulatedGpusError(f"{FLAG}: {model.catalog_id} is listed twice; give one count per type")
        entries.append(Declared(model, count))
    if not entries:
        raise SimulatedGpusError(f"{FLAG}: no GPUs declared (expected TYPE:COUNT[,TYPE:COUNT...])")
    return entries


def simulated_uuid(node: str, index: int) -> str:
    """The uuid `SIM-{node}-{index}`; SimulatedGpusError when it is not a valid registry name (node name too long)."""
    uuid = f"SIM-{node}-{index}"
    try:
        return check_name(uuid, "simulated GPU uuid")
    except ValueError as exc:
        raise SimulatedGpusError(f"{FLAG}: {exc}") from None


def simulated_gpus(node: str, declaration: str | list[Declared],
                   catalog: GpuCatalog | None = None) -> list[registry_pb2.GpuInfo]:
    """GpuInfo for every declared GPU, indexed 0.. in declaration order, health OK.

    Readings a simulated GPU cannot have (utilisation, temperature, power,
    ECC) stay unset, as they would on a part NVML cannot read.
    """
    entries = parse_declaration(declaration, catalog) if isinstance(declaration, str) else declaration
    gpus: list[registry_pb2.GpuInfo] = []
    for entry in entries:
        name = entry.model.nvml_names[0] if entry.model.nvml_names else entry.model.catalog_id
        for _ in range(entry.count):
            index = len(gpus)
            gpus.append(registry_pb2.GpuInfo(
                index=index,
                uuid=simulated_uuid(node, index),
                name=name,
                catalog_id=entry.model.catalog_id,
                memory_total_bytes=entry.model.memory_bytes,
                memory_used_bytes=0,
                health=registry_pb2.GPU_HEALTH_OK,
            ))
    return gpus
