"""Which Admin calls need the bearer token, and how tokens are read."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.admin import check_model_spec
from controlplane.auth import READ_METHODS, bearer_token, load_token, requires_token
from tandem.v1 import admin_pb2, registry_pb2


def test_every_admin_method_is_a_read_or_needs_the_token() -> None:
    methods = admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods
    mutations = {m.name for m in methods if requires_token(f"/tandem.v1.Admin/{m.name}")}
    assert mutations == {"DrainWorker", "UndrainWorker", "CordonNode", "UncordonNode", "PutModelSpec",
                         "DeleteModelSpec", "SetWorkerRole", "ClearWorkerRole"}
    assert READ_METHODS == {m.name for m in methods} - mutations
    assert not requires_token("/grpc.health.v1.Health/Check")
    assert requires_token("/tandem.v1.Admin/SomethingAddedLater"), "new Admin methods default to protected"


def test_bearer_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("x", "Bearer abc")]) == "" and bearer_token(None) == ""


def test_load_token_from_flag_or_file(tmp_path: Path) -> None:
    assert load_token("", None) == ""
    assert load_token("t0k", None) == "t0k"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    assert load_token("", path) == "from-file"
    with pytest.raises(ValueError, match="not both"):
        load_token("t0k", path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_token("", path)
    with pytest.raises(ValueError, match="No such file"):
        load_token("", tmp_path / "missing")


@pytest.mark.parametrize("spec,field", [
    (registry_pb2.ModelSpec(name=""), "spec.name"),
    (registry_pb2.ModelSpec(name="m", slo=registry_pb2.ServiceLevelObjectives(ttft_ms=-1)), "spec.slo.ttft_ms"),
    (registry_pb2.ModelSpec(name="m", max_context_tokens=10, max_output_tokens=11), "spec.max_output_tokens"),
    (registry_pb2.ModelSpec(name="m", engine_args={"a b": "1"}), "spec.engine_args"),
])
def test_bad_model_specs_name_the_field(spec: registry_pb2.ModelSpec, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_model_spec(spec)
    check_model_spec(registry_pb2.ModelSpec(name="m", max_context_tokens=10, max_output_tokens=10))
