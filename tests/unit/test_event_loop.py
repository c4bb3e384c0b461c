"""--event-loop: every service runs on uvloop by default, on asyncio's loop when asked."""

from __future__ import annotations

import asyncio

import pytest

from runtime.event_loop import loop_runner, running_loop_name


async def _name() -> str:
    return running_loop_name()


def test_auto_runs_on_uvloop_when_it_is_installed() -> None:
    # uvloop is a declared dependency: "auto" must not fall back silently on this platform.
    assert loop_runner("auto")(_name()) == "uvloop"
    assert loop_runner("uvloop")(_name()) == "uvloop"


def test_asyncio_runs_on_the_standard_loop() -> None:
    assert loop_runner("asyncio") is asyncio.run
    assert loop_runner("asyncio")(_name()) == "asyncio"


def test_an_unknown_loop_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, asyncio, uvloop"):
        loop_runner("trio")
