from __future__ import annotations

import logging

import pytest

from registry.keys import KeyRef, Keys, Kind, check_name
from registry.records import SCHEMA_VERSION, RecordError, encode, from_kv, parse
from tandem.v1 import common_pb2, registry_pb2


def test_layout_matches_the_documented_paths() -> None:
    keys = Keys("/tandem")
    assert keys.node("gpu-1") == "/tandem/v1/nodes/gpu-1"
    assert keys.worker("p-0") == "/tandem/v1/workers/p-0"
    assert keys.gpu_claim("GPU-abc") == "/tandem/v1/gpus/GPU-abc"
    assert keys.health("p-0") == "/tandem/v1/health/p-0"
    assert keys.drain("p-0") == "/tandem/v1/admin/drain/p-0"
    assert keys.cordon("gpu-1") == "/tandem/v1/admin/cordon/gpu-1"
    assert keys.model("llama") == "/tandem/v1/models/llama"
    assert keys.election(0x1234) == "/tandem/v1/election/controlplane/0000000000001234"
    assert Keys("custom/").worker("w") == "/custom/v1/workers/w"


def test_parse_roundtrips_and_rejects_foreign_keys() -> None:
    keys = Keys()
    for kind in Kind:
        name = "0000000000001234" if kind is Kind.ELECTION else "name-1"
        key = keys.election(0x1234) if kind is Kind.ELECTION else keys.key(kind, name)
        assert keys.parse(key) == KeyRef(kind, name)
    assert keys.parse("/other/v1/workers/x") is None
    assert keys.parse("/tandem/v1/unknown/x") is None
    assert keys.parse("/tandem/v1/admin/drain/") is None
    assert keys.parse(b"/tandem/v1/workers/w") == KeyRef(Kind.WORKER, "w")


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 129, "sp ace", "é"])
def test_bad_names_are_refused_with_the_rule(bad: str) -> None:
    with pytest.raises(ValueError, match=r"1\.\.128 characters"):
        check_name(bad, "worker_id")


def test_records_roundtrip_as_readable_json() -> None:
    record = registry_pb2.WorkerRecord(worker_id="d-0", role=common_pb2.ROLE_DECODE, model="tiny",
                                       endpoint="127.0.0.1:5000", gpu_type="H100-SXM")
    value = encode(record)
    assert b'"workerId": "d-0"' in value and b'"role": "ROLE_DECODE"' in value
    decoded = parse(Kind.WORKER, value)
    assert decoded.schema_version == SCHEMA_VERSION
    assert decoded.endpoint == "127.0.0.1:5000"
    assert record.schema_version == 0, "encode must not modify its argument"


def test_malformed_values_are_skipped_with_a_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert from_kv(Kind.WORKER, "w", b"{not json", 5, key="/tandem/v1/workers/w") is None
    assert "malformed" in caplog.text
    with pytest.raises(RecordError, match="without schema_version"):
        parse(Kind.WORKER, b'{"workerId": "w"}')
    with pytest.raises(RecordError, match="newer than this reader"):
        parse(Kind.WORKER, b'{"workerId": "w", "schemaVersion": 99}')
    with pytest.raises(RecordError, match="not a WorkerRecord"):
        parse(Kind.WORKER, b'{"workerId": 5, "schemaVersion": 1, "role": "NOPE"}')
