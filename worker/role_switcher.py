"""Live role switches of one worker process: the driver around worker.role_switch's decisions.

    record SWITCHING, role = target (routers stop routing to it); the gate
    closes to new work -> the old role's work in flight ends: prefills finish;
    decode streams finish within `role_switch_grace`, then the rest are handed
    over (UNAVAILABLE "handed over: ..."; the router continues each one
    elsewhere from the tokens it already has) -> record READY in the target
    role, role_since set, the gate opens for the target role.

No process restart, no model reload: every role's services are mounted and
the engine stays loaded; open KV handles are served throughout.

Contract (event loop only):
- `on_intent(intent)` takes every change of this worker's RoleIntent (None:
  removed) and never blocks: a switch runs in its own task. A new intent
  during a switch retargets it. Removing the intent keeps the current role.
- `role_at_start(intent)`, before the worker first becomes READY: the role
  to register in (the intent's, when it can take it; no switch needed).
- A drain wins: `abandon()` (the drain handler calls it first) stops a
  switch; the worker keeps the target role, and the drain goes on as
  always. `reconsider()` after an undrain looks at the intent again.
- `close()` stops a switch (shutdown). Safe twice.
- An intent it cannot follow is logged once per intent, with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

from runtime.tasks import cancel_and_wait
from tandem.v1 import common_pb2, registry_pb2
from worker.admission import Admission
from worker.metrics import WorkerMetrics
from worker.registration import WorkerRegistration
from worker.role_gate import RoleGate
from worker.role_switch import Decision, Role, Step, decide, role_name

log = logging.getLogger(__name__)

# After the grace, handed-over streams end within a few engine steps; this bounds the wait for them.
HANDOVER_WAIT_S = 10.0


class RoleSwitcher:
    def __init__(self, *, gate: RoleGate, admission: Admission, registration: Callable[[], WorkerRegistration],
                 metrics: WorkerMetrics, switchable: Collection[Role], grace_s: float) -> None:
        self.gate = gate
        self.admission = admission
        # The registration is built after the switcher (it needs on_intent), hence a getter.
        self._registration = registration
        self.metrics = metrics
        self.switchable = tuple(switchable)
        self.grace_s = grace_s
        self.ready = False
        self.switches = 0
        self._wanted: registry_pb2.RoleIntent | None = None
        self._refused: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        # The role served before the switch under way (its work is what the switch waits for).
        self._from: Role | None = None
        # The role the worker last took in full (READY in it, or drained in it).
        self._served: Role = gate.role

    @property
    def switching(self) -> bool:
        return self._task is not None and not self._task.done()

    def role_at_start(self, intent: registry_pb2.RoleIntent | None) -> Role:
        """The role to register READY in: the intent's when this worker can take it, else the current one."""
        self._wanted = intent
        decision = self._decide()
        if decision.step is Step.START:
            log.info("starting in role %s, as the role intent asks", role_name(decision.role),
                     extra={"worker_id": self.gate.worker_id})
            self.gate.role = decision.role
            self.metrics.set_role(role_name(decision.role))
        self._served = self.gate.role
        return self.gate.role

    def on_intent(self, intent: registry_pb2.RoleIntent | None) -> None:
        self._wanted = intent
        if self.ready:
            self.reconsider()

    def reconsider(self) -> None:
        """Acts on the latest intent (after READY, after an undrain)."""
        decision = self._decide()
        if decision.step is Step.START:
            self._from = self.gate.role
            self._start(decision.role)
        elif decision.step is Step.RETARGET:
            log.info("role switch retargeted to %s", role_name(decision.role), extra={"worker_id": self.gate.worker_id})
            # What was admitted before the switch is still the old role's; the new target's has none in flight.
            self._from = self.gate.role
            self._start(decision.role)

    def abandon(self) -> None:
        """Stops a switch under way (a drain wins); the worker keeps the target role, its record says so."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            log.info("role switch to %s cut short: the worker drains in its new role", role_name(self.gate.role),
                     extra={"worker_id": self.gate.worker_id})
            self._took(self.gate.role)
        self._from = None
        self.gate.open()

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    # -- internals ----------------------------------------------------------------------------------

    def _decide(self) -> Decision:
        wanted = self._wanted.role if self._wanted is not None else None
        decision = decide(current=self._from if self.switching and self._from is not None else self.gate.role,
                          switching_to=self.gate.role if self.switching else None, wanted=wanted,
                          switchable=self.switchable, draining=self.admission.draining)
        if decision.step is Step.REFUSE:
            key = (self._wanted.role, self._wanted.requested_at_unix_ms) if self._wanted is not None else None
            if key != self._refused:
                self._refused = key
                log.warning("role intent not followed: %s", decision.reason,
                            extra={"worker_id": self.gate.worker_id,
                                   "requested_by": self._wanted.requested_by if self._wanted else ""})
        return decision

    def _start(self, target: Role) -> None:
        previous = self._task
        if previous is not None and not previous.done():
            previous.cancel()
        self.gate.close(target)
        self._task = asyncio.create_task(self._switch(previous, target), name="role-switch")

    async def _switch(self, previous: asyncio.Task[None] | None, target: Role) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await self._run(target)
        except Exception:
            # Never leave the gate closed: serve the target role (the record says so) and say what broke.
            log.exception("role switch to %s failed; serving it anyway", role_name(target),
                          extra={"worker_id": self.gate.worker_id})
            self._took(target)
            self._from = None
            self.gate.open()

    async def _run(self, target: Role) -> None:
        old = self._from if self._from is not None else target
        registration = self._registration()
        worker_id = self.gate.worker_id
        began = time.monotonic()
        if self._served != target:
            log.info("role switch %s -> %s: taking no new work, finishing the old role's", role_name(self._served),
                     role_name(target), extra={"worker_id": worker_id})
        await registration.set_role(target, registry_pb2.WORKER_STATE_SWITCHING)
        handed_over = 0
        if old == common_pb2.ROLE_PREFILL:
            await self.gate.wait_idle(common_pb2.ROLE_PREFILL, timeout=float("inf"))
        elif old == common_pb2.ROLE_DECODE:
            if not await self.gate.wait_idle(common_pb2.ROLE_DECODE, timeout=self.grace_s):
                handed_over = self.gate.hand_over(
                    common_pb2.ROLE_DECODE, f"handed over: worker {worker_id} switching to {role_name(target)}")
                log.info("role switch grace (%.1f s) over: %d decode stream(s) handed over", self.grace_s,
                         handed_over, extra={"worker_id": worker_id})
                if not await self.gate.wait_idle(common_pb2.ROLE_DECODE, timeout=HANDOVER_WAIT_S):
                    log.warning("%d decode stream(s) still open after their hand-over",
                                self.gate.in_flight(common_pb2.ROLE_DECODE), extra={"worker_id": worker_id})
        if self.admission.draining:
            return  # a drain began meanwhile: it owns the record's state now
        served = self._served
        self._took(target)
        await registration.set_role(target, registry_pb2.WORKER_STATE_READY)
        self.gate.open()
        self._from = None
        if served == target:
            log.info("role switch called off: serving %s again", role_name(target), extra={"worker_id": worker_id})
        else:
            log.info("role switch %s -> %s done in %.2f s (%d decode stream(s) handed over)", role_name(served),
                     role_name(target), time.monotonic() - began, handed_over, extra={"worker_id": worker_id})

    def _took(self, role: Role) -> None:
        """The worker now has `role` for good: role_since, metrics' role label, the switch counted."""
        if role == self._served:
            return
        self._registration().record.role_since_unix_ms = int(time.time() * 1000)
        self.metrics.set_role(role_name(role))
        self.metrics.role_switches.labels(role_name(self._served)).inc()
        self.switches += 1
        self._served = role
