"""The role gate: which role's requests a worker takes now, and its work in flight per role.

Every worker mounts both the Prefill and the Decode services over one
loaded engine; the gate admits a request only for the role the worker
serves. A request for the other role, or any request while a switch is
under way, is refused with UNAVAILABLE naming the role the worker serves,
before any work: the router then tries another worker, before any token.
The KV source (open KV handles) is not gated: handles are served until
released or expired, whatever the role.

    with gate.serving(ROLE_DECODE) as handover:   # Refused if not serving decode
        ...                                       # handover: failed when the stream must move

Contract: one gate per worker, on the event loop's thread. `close(target)`
starts a switch (no new work for any role); `wait_idle(role)` waits for the
work of `role` that was already accepted; `hand_over(role, message)` fails every
open `role` request's `handover` future with Refused(UNAVAILABLE, message),
so its servicer ends the stream and the router migrates it; `open()` takes
new work again, in the role given to `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc

from worker.admission import Refused
from worker.role_switch import Role, role_name


class RoleGate:
    def __init__(self, worker_id: str, role: Role) -> None:
        self.worker_id = worker_id
        # The role the worker serves (the target, once a switch started).
        self.role = role
        self.switching = False
        self._in_flight: dict[Role, int] = {}
        self._idle: dict[Role, asyncio.Event] = {}
        self._handovers: dict[Role, set[asyncio.Future[None]]] = {}

    def check(self, role: Role) -> None:
        """Raises Refused(UNAVAILABLE) unless the worker takes new `role` requests now."""
        if self.switching:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"worker {self.worker_id} is switching to {role_name(self.role)} and takes no new "
                          f"{role_name(role)} requests; retry on another worker")
        if role != self.role:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"worker {self.worker_id} serves {role_name(self.role)} now, not {role_name(role)}; "
                          f"retry on a {role_name(role)} worker")

    @contextlib.contextmanager
    def serving(self, role: Role) -> Iterator[asyncio.Future[None]]:
        """Counts one request of `role` for the block (Refused first if the gate is closed to it).

        Yields a future that stays pending unless the request must be handed
        over (it then holds Refused); only decode streams are ever handed over.
        """
        self.check(role)
        handover: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight[role] = self._in_flight.get(role, 0) + 1
        self._event(role).clear()
        open_ones = self._handovers.setdefault(role, set())
        open_ones.add(handover)
        try:
            yield handover
        finally:
            open_ones.discard(handover)
            if not handover.done():
                handover.cancel()
            self._in_flight[role] -= 1
            if not self._in_flight[role]:
                self._event(role).set()

    def in_flight(self, role: Role) -> int:
        return self._in_flight.get(role, 0)

    def close(self, target: Role) -> None:
        """A switch to `target` starts (or is retargeted): no new work for any role until open()."""
        self.role = target
        self.switching = True

    def open(self) -> None:
        """New work of `self.role` is taken again."""
        self.switching = False

    async def wait_idle(self, role: Role, timeout: float) -> bool:
        """Waits until no `role` request is in flight; False if some still are after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._event(role).wait()
            return True
        except TimeoutError:
            return False

    def hand_over(self, role: Role, message: str) -> int:
        """Ends every open `role` request with Refused(UNAVAILABLE, message); returns how many."""
        ended = 0
        for handover in list(self._handovers.get(role, ())):
            if not handover.done():
                handover.set_exception(Refused(grpc.StatusCode.UNAVAILABLE, message))
                ended += 1
        return ended

    def _event(self, role: Role) -> asyncio.Event:
        event = self._idle.get(role)
        if event is None:
            event = self._idle[role] = asyncio.Event()
            event.set()
        return event
