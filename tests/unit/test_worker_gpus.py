"""A worker's GPU type: a catalog id or nothing, and the node agent's inventory over the flags."""

from __future__ import annotations

import pytest

from runtime.config import load_config
from runtime.setting import ConfigError
from tandem.v1 import registry_pb2
from worker.registration import gpus_from_inventory
from worker.settings import WorkerSettings


def test_gpu_type_is_spelt_as_the_catalog_does() -> None:
    assert WorkerSettings(gpu_type="h100 sxm").gpu_type == "H100-SXM"
    assert WorkerSettings(gpu_type="NVIDIA A100-SXM4-80GB").gpu_type == "A100-80GB"
    assert WorkerSettings().gpu_type == "", "no GPU (a CPU worker) stays allowed"


def test_an_unknown_gpu_type_is_refused_at_start_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"--gpu-type must be a GPU catalog id \(H100-SXM, .*A100-80GB.*\) "
                                          r"or empty, got 'H100-SMX' \(env TANDEM_GPU_TYPE\)"):
        load_config(WorkerSettings, ["--gpu-type", "H100-SMX"], prog="tandem-decode", env={})


def node(*gpus: tuple[str, str]) -> registry_pb2.NodeRecord:
    return registry_pb2.NodeRecord(node="n1", gpus=[registry_pb2.GpuInfo(uuid=u, catalog_id=c, name=f"NVIDIA {c}")
                                                    for u, c in gpus])


INVENTORY = node(("GPU-0", "H100-SXM"), ("GPU-1", "H100-SXM"), ("GPU-2", "A100-80GB"), ("GPU-3", ""))


def test_the_inventory_names_type_and_count_of_the_claimed_gpus() -> None:
    assert gpus_from_inventory(INVENTORY, ["GPU-0", "GPU-1"], "", 1) == ("H100-SXM", 2, "")
    assert gpus_from_inventory(INVENTORY, ["GPU-0", "GPU-1"], "H100-SXM", 2) == ("H100-SXM", 2, "")


def test_flags_that_contradict_the_inventory_lose_and_say_so() -> None:
    gpu_type, count, why = gpus_from_inventory(INVENTORY, ["GPU-2"], "H100-SXM", 1)
    assert (gpu_type, count) == ("A100-80GB", 1)
    assert "1x A100-80GB" in why and "not --gpu-type 'H100-SXM'" in why


@pytest.mark.parametrize(("uuids", "said"), [
    (["GPU-9"], "not in node 'n1'"),
    (["GPU-0", "GPU-2"], "not of one catalog type"),
    (["GPU-3"], "not of one catalog type"),
])
def test_where_the_inventory_cannot_answer_the_flags_stand(uuids: list[str], said: str) -> None:
    gpu_type, count, why = gpus_from_inventory(INVENTORY, uuids, "L40S", 1)
    assert (gpu_type, count) == ("L40S", 1) and said in why


def test_no_agent_or_no_claimed_gpus_keep_the_flags_quietly() -> None:
    assert gpus_from_inventory(None, ["GPU-0"], "L40S", 1) == ("L40S", 1, "")
    assert gpus_from_inventory(INVENTORY, [], "L40S", 1) == ("L40S", 1, "")
