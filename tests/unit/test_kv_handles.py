"""The producer's handle store: TTL, idempotent release, exactly-once freeing. Driven by a fake clock."""

from __future__ import annotations

import pytest

from engine.base import KvBlob, KvLayoutSpec
from engine.kv.checksum import crc32c
from engine.kv.handles import HandleStore, StoreFull
from engine.kv.layout import layout_from_proto, layout_to_proto

LAYOUT = KvLayoutSpec("fp", num_layers=4, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def blob(size: int = 64) -> KvBlob:
    return KvBlob(LAYOUT, 3, bytes(size))


def test_put_get_release_is_idempotent_and_frees_once() -> None:
    store = HandleStore(clock=Clock())
    freed: list[str] = []
    entry = store.put(blob())
    entry.on_release = lambda: freed.append(entry.handle_id)

    assert store.get(entry.handle_id) is entry and len(store) == 1 and store.nbytes == 64
    assert store.release(entry.handle_id) is True
    assert store.release(entry.handle_id) is False
    assert store.get(entry.handle_id) is None
    assert freed == [entry.handle_id] and len(store) == 0


def test_handles_expire_on_their_ttl_and_sweep_frees_them() -> None:
    clock = Clock()
    store = HandleStore(clock=clock, default_ttl_s=10)
    freed: list[str] = []
    short, long = store.put(blob(), ttl_s=1), store.put(blob())
    for entry in (short, long):
        entry.on_release = lambda e=entry: freed.append(e.handle_id)

    clock.now = 0.999
    assert store.sweep() == 0
    clock.now = 1.0
    assert store.get(short.handle_id) is None  # lazily expired at once
    assert store.sweep() == 0  # already freed by the get
    clock.now = 10.0
    assert store.sweep() == 1
    assert freed == [short.handle_id, long.handle_id]
    assert store.expired_total == 2 and len(store) == 0


def test_release_of_an_expired_handle_reports_false_but_frees_it() -> None:
    clock = Clock()
    store = HandleStore(clock=clock, default_ttl_s=1)
    entry = store.put(blob())
    clock.now = 5
    assert store.release(entry.handle_id) is False
    assert len(store) == 0


def test_close_frees_everything_and_is_safe_twice() -> None:
    store = HandleStore(clock=Clock())
    freed: list[int] = []
    for i in range(3):
        store.put(blob()).on_release = lambda i=i: freed.append(i)
    store.close()
    store.close()
    assert sorted(freed) == [0, 1, 2] and len(store) == 0


def test_a_failing_free_does_not_stop_the_others() -> None:
    store = HandleStore(clock=Clock())

    def boom() -> None:
        raise OSError("segment vanished")

    store.put(blob()).on_release = boom
    ok: list[bool] = []
    store.put(blob()).on_release = lambda: ok.append(True)
    store.close()
    assert ok == [True]


def test_bad_ttls_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="default_ttl_s"):
        HandleStore(default_ttl_s=0)
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        HandleStore().put(blob(), ttl_s=-1)


def test_a_full_store_refuses_by_count_keeps_nothing_and_hints_the_soonest_expiry() -> None:
    clock = Clock()
    store = HandleStore(clock=clock, default_ttl_s=10, max_handles=2)
    first = store.put(blob())
    clock.now = 4.0
    store.put(blob())

    with pytest.raises(StoreFull, match=r"2 open KV handles \(limit 2\).*retry after 6.00s") as refused:
        store.put(blob())
    assert refused.value.retry_after_s == pytest.approx(6.0)
    assert len(store) == 2 and store.nbytes == 128 and store.refused_total == 1

    store.release(first.handle_id)  # room again at once
    store.put(blob())
    clock.now = 20.0  # both expired: a put frees them first instead of refusing
    store.put(blob())
    assert len(store) == 1 and store.nbytes == 64 and store.expired_total == 2


def test_a_full_store_refuses_by_bytes_naming_them() -> None:
    store = HandleStore(clock=Clock(), max_bytes=100)
    store.put(blob(60))
    with pytest.raises(StoreFull, match=r"60 bytes under open KV handles, 50 more asked \(limit 100\)"):
        store.put(blob(50))
    store.check_room(40)
    store.put(blob(40))
    assert store.nbytes == 100
    with pytest.raises(StoreFull):
        store.check_room(1)
    store.close()
    assert store.nbytes == 0 and len(store) == 0


def test_bad_caps_are_refused() -> None:
    with pytest.raises(ValueError, match="max_handles and max_bytes must be >= 1"):
        HandleStore(max_handles=0)


def test_crc32c_matches_the_standard_check_value_and_continues() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    # RFC 3720 B.4: 32 zero bytes, 32 0xFF bytes, 0x00..0x1F.
    assert (crc32c(bytes(32)), crc32c(b"\xff" * 32), crc32c(bytes(range(32)))) == (0x8A9136AA, 0x62A8AB43, 0x46DD794E)
    data = bytes(range(256)) * 5
    assert crc32c(data[700:], crc32c(data[:700])) == crc32c(data)
    assert crc32c(memoryview(bytearray(data))) == crc32c(data)


def test_layout_round_trips_through_the_proto() -> None:
    assert layout_from_proto(layout_to_proto(LAYOUT)) == LAYOUT
