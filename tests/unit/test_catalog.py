from __future__ import annotations

from pathlib import Path

import pytest

from runtime.catalog import CatalogError, GpuCatalog, default_catalog


def test_builtin_catalog_has_datasheet_figures() -> None:
    catalog = default_catalog()
    for catalog_id in ("H100-SXM", "H200", "A100-80GB", "A100-40GB", "L40S", "L4", "B200"):
        assert catalog_id in catalog
    h100 = catalog.get("H100-SXM")
    assert (h100.bf16_tflops, h100.memory_gb, h100.hbm_tbps) == (989, 80, 3.35)
    assert catalog.get("L40S").hbm_bytes_per_s == pytest.approx(0.864e12)


@pytest.mark.parametrize(
    ("nvml_name", "catalog_id"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("nvidia h100 80gb  hbm3", "H100-SXM"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200-NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB-PCIE"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA L40S", "L40S"),
        ("h100-sxm", "H100-SXM"),
    ],
)
def test_nvml_names_match_loosely(nvml_name: str, catalog_id: str) -> None:
    model = default_catalog().match(nvml_name)
    assert model is not None and model.catalog_id == catalog_id


def test_unknown_name_does_not_match() -> None:
    assert default_catalog().match("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(KeyError, match="known: H100-SXM"):
        default_catalog().get("RTX-4090")


def test_operator_file_overrides_and_extends(tmp_path: Path) -> None:
    extra = tmp_path / "gpus.toml"
    extra.write_text(
        '[gpus.H100-SXM]\nnvml_names=["NVIDIA H100 80GB HBM3"]\nbf16_tflops=700\nmemory_gb=80\nhbm_tbps=3.0\n'
        '[gpus.RTX-4090]\nnvml_names=["NVIDIA GeForce RTX 4090"]\nbf16_tflops=165\nmemory_gb=24\nhbm_tbps=1.0\n'
    )
    catalog = GpuCatalog.load(extra)
    assert catalog.get("H100-SXM").bf16_tflops == 700
    assert catalog.match("NVIDIA GeForce RTX 4090").catalog_id == "RTX-4090"  # type: ignore[union-attr]
    assert catalog.get("H200").hbm_tbps == 4.8


def test_malformed_operator_file_is_refused_with_its_name(tmp_path: Path) -> None:
    extra = tmp_path / "bad.toml"
    extra.write_text("[gpus.X]\nbf16_tflops=-1\nmemory_gb=1\nhbm_tbps=1\n")
    with pytest.raises(CatalogError, match=r"bad.toml: gpus.X.bf16_tflops must be a positive number"):
        GpuCatalog.load(extra)
