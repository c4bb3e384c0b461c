"""The committed stubs in protos/tandem/v1 are exactly what `make protos` makes.

Stubs are committed (not generated at install) so the package imports with
no build step and grpcio-tools stays a dev-only dependency; this test is the
guard that keeps them honest: edit a .proto without regenerating and it fails.
"""

from __future__ import annotations

import filecmp
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos"
PROTO_PACKAGE = PROTO_DIR / "tandem" / "v1"
generate = runpy.run_path(str(PROTO_DIR / "generate.py"))["generate"]


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = tmp_path / "tandem" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert generated, "protoc generated nothing"
    stale = [
        name
        for name in generated
        if not (PROTO_PACKAGE / name).exists()
        or not filecmp.cmp(fresh / name, PROTO_PACKAGE / name, shallow=False)
    ]
    assert not stale, f"generated stubs are stale, run `make protos`: {stale}"
    committed = sorted(p.name for p in PROTO_PACKAGE.iterdir()
                       if p.name.endswith((".py", ".pyi")) and p.name != "__init__.py")
    orphans = sorted(set(committed) - set(generated))
    assert not orphans, f"stubs without a .proto, remove them: {orphans}"


def test_every_service_is_importable() -> None:
    from tandem.v1 import admin_pb2_grpc, inference_pb2_grpc, worker_pb2_grpc

    assert hasattr(inference_pb2_grpc, "InferenceStub")
    assert hasattr(admin_pb2_grpc, "AdminStub")
    for name in ("PrefillStub", "DecodeStub", "KvSourceStub", "WorkerStub"):
        assert hasattr(worker_pb2_grpc, name)
