"""The decisions of `tandem-router --processes N`: how many, what each child is told, when to restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from router_svc.processes import (
    ChildPlan,
    RestartBudget,
    child_metrics_listen,
    child_plans,
    child_router_ids,
    process_count,
    ready_info,
    with_port,
)
from router_svc.settings import RouterSettings
from runtime.config import load_config


def test_zero_means_one_per_available_cpu() -> None:
    assert process_count(0, 16) == 16
    assert process_count(0, 0) == 1
    assert process_count(3, 16) == 3


def test_ports_are_replaced_whatever_the_host() -> None:
    assert with_port("0.0.0.0:0", 50051) == "0.0.0.0:50051"
    assert with_port("[::]:0", 8080) == "[::]:8080"
    assert with_port(":0", 8080) == ":8080"


def test_metrics_ports_count_up_from_a_fixed_one_and_stay_free_for_zero() -> None:
    assert [child_metrics_listen("0.0.0.0:9402", i) for i in range(3)] == \
        ["0.0.0.0:9402", "0.0.0.0:9403", "0.0.0.0:9404"]
    assert child_metrics_listen("127.0.0.1:0", 2) == "127.0.0.1:0"
    assert child_metrics_listen("", 1) == ""


def test_router_ids_are_numbered_and_checked() -> None:
    assert child_router_ids("edge-a", 2) == ["edge-a-0", "edge-a-1"]
    with pytest.raises(ValueError, match=r"router_id must be 1\.\.128"):
        child_router_ids("r" * 127, 2)


def test_each_child_gets_the_shared_ports_and_its_own_id_metrics_and_ready_file(tmp_path: Path) -> None:
    settings = load_config(RouterSettings, ["--processes", "2", "--listen", "0.0.0.0:0", "--http-listen",
                                            "127.0.0.1:0", "--metrics-listen", "0.0.0.0:9402"],
                           prog="tandem-router", env={})
    plans = child_plans(settings, 2, 50051, 8080, tmp_path, "edge-a")
    assert plans[1] == ChildPlan(1, "edge-a-1", "0.0.0.0:50051", "127.0.0.1:8080", "0.0.0.0:9403",
                                 tmp_path / "router-1.ready.json")
    argv = plans[1].argv(["--processes", "2", "--listen", "0.0.0.0:0", "--ready-file", "/run/r.json"])
    # The child's own values come last: argparse keeps the last of a repeated flag.
    child = load_config(RouterSettings, argv, prog="tandem-router", env={"TANDEM_PROCESSES": "4"})
    assert (child.processes, child.reuse_port, child.listen, child.http_listen, child.metrics_listen) == \
        (1, True, "0.0.0.0:50051", "127.0.0.1:8080", "0.0.0.0:9403")
    assert (child.router_id, child.ready_file) == ("edge-a-1", tmp_path / "router-1.ready.json")


def test_a_child_without_http_or_metrics_gets_neither(tmp_path: Path) -> None:
    settings = load_config(RouterSettings, ["--processes", "2"], prog="tandem-router", env={})
    argv = child_plans(settings, 2, 50051, 0, tmp_path, "r")[0].argv([])
    assert "--http-listen" not in argv and "--metrics-listen" not in argv


def test_the_ready_file_names_the_shared_ports_and_every_metrics_port() -> None:
    children = [{"endpoint": "127.0.0.1:50051", "pid": 11, "metrics_port": 9402, "http_port": 8080},
                {"endpoint": "127.0.0.1:50051", "pid": 12, "metrics_port": 9403, "http_port": 8080}]
    assert ready_info(children, pid=10) == {
        "endpoint": "127.0.0.1:50051", "pid": 10, "metrics_port": 9402, "http_port": 8080,
        "metrics_ports": [9402, 9403], "processes": 2, "children": [11, 12]}


def test_restarts_back_off_and_stop_at_the_cap_within_the_window() -> None:
    budget = RestartBudget(limit=5, window_s=60, first_backoff_s=0.5, max_backoff_s=4)
    assert [budget.next_delay(t) for t in (0, 1, 2, 3, 4)] == [0.5, 1, 2, 4, 4]
    assert budget.next_delay(5) is None, "a sixth death within the minute: give up"
    assert budget.next_delay(60.5) == 4, "the first restart left the window: one more is allowed"


def test_restarts_far_apart_stay_at_the_first_backoff() -> None:
    budget = RestartBudget(limit=5, window_s=60, first_backoff_s=0.5)
    assert [budget.next_delay(t) for t in (0, 100, 200, 300, 400, 500, 600)] == [0.5] * 7
