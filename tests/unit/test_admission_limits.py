"""Admission and WatchLoad caps with plain values: per caller, per worker, the interval floor."""

from __future__ import annotations

import grpc
import pytest

from tandem.v1 import worker_pb2
from worker.admission import Admission, Refused
from worker.errors import retry_hint, status_for
from worker.load import LoadReporter, WorkerLoadServicer


def test_one_caller_gets_its_share_and_others_still_get_in() -> None:
    admission = Admission("w1", max_in_flight=4, max_per_peer=2)
    with admission.admit("ipv4:10.0.0.9:5000"), admission.admit("ipv4:10.0.0.9:5000"):
        with pytest.raises(Refused) as refused:
            admission.check("ipv4:10.0.0.9:5000")
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 2 per caller" in refused.value.message and refused.value.retry_after_s == 0.5
        with admission.admit("ipv4:10.0.0.1:6000"):
            assert admission.in_flight == 3 and admission.in_flight_from("ipv4:10.0.0.9:5000") == 2
    assert admission.in_flight == 0 and admission.in_flight_from("ipv4:10.0.0.9:5000") == 0
    assert admission.refused_total == 1 and not admission._by_peer  # nothing kept per caller once idle


def test_a_full_worker_refuses_at_once_with_a_hint_in_metadata_and_message() -> None:
    admission = Admission("w1", max_in_flight=1)
    with admission.admit("a"), pytest.raises(Refused) as refused:
        admission.check("b")
    code, message = status_for(refused.value) or (None, "")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after 0.5s" in message
    assert retry_hint(refused.value) == (("tandem-retry-after-ms", "500"),)
    assert retry_hint(ValueError("no hint")) == ()


def test_draining_still_answers_unavailable_without_a_hint() -> None:
    admission = Admission("w1", max_in_flight=1)
    admission.start_draining()
    with pytest.raises(Refused) as refused:
        admission.check("a")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and retry_hint(refused.value) == ()


def test_watch_load_intervals_are_raised_to_the_floor() -> None:
    servicer = WorkerLoadServicer(LoadReporter(worker_pb2.LoadReport), min_interval_ms=50)
    assert servicer.intervals(worker_pb2.WatchLoadRequest(min_interval_ms=1)) == (0.05, 1.0)
    assert servicer.intervals(worker_pb2.WatchLoadRequest(min_interval_ms=1, max_interval_ms=1)) == (0.05, 0.05)
    assert servicer.intervals(worker_pb2.WatchLoadRequest(min_interval_ms=200)) == (0.2, 1.0)
    assert servicer.intervals(worker_pb2.WatchLoadRequest()) == (0.05, 1.0)
