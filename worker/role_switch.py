"""Whether a worker switches role, from plain values: the decision table of a live role switch. Pure.

    decide(current=ROLE_PREFILL, switching_to=None, wanted=ROLE_DECODE,
           switchable=(ROLE_PREFILL, ROLE_DECODE), draining=False)
    -> Decision(Step.START, ROLE_DECODE, "")

`wanted` is the role a RoleIntent names (None: no intent). The worker
(worker.role_switcher) feeds every intent change and acts on the answer:

- NOTHING: no intent, the role it already serves (or already switches to),
  or a drain in progress (a drain wins over a switch: the worker leaves or
  waits deregistered, and takes the intent again when undrained).
- START: close the gate to new work, finish or hand over the old role's
  work, then serve `role`.
- RETARGET: a switch is under way and the intent now names another role;
  the switch goes on towards `role` (back to `current` ends it at once).
- REFUSE: the intent names a role this worker cannot take without a restart
  (`reason` says why); the worker keeps its role and logs the reason once.

Removing an intent never switches back: the worker keeps the role it has.
No I/O, no asyncio: unit-tested with plain values.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import TypeAlias

from tandem.v1 import common_pb2

Role: TypeAlias = common_pb2.Role.ValueType
# The roles a live switch moves between; UNIFIED workers are started as such.
SWITCH_ROLES: tuple[Role, ...] = (common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE)


class Step(enum.Enum):
    NOTHING = "nothing"
    START = "start"
    RETARGET = "retarget"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    step: Step
    # The role to serve (START, RETARGET); the current one otherwise.
    role: Role
    # Why an intent is refused (REFUSE), "" otherwise.
    reason: str = ""


def role_name(role: Role) -> str:
    """"prefill", "decode", "unified"; "unspecified" for 0."""
    return common_pb2.Role.Name(role).removeprefix("ROLE_").lower() if role in common_pb2.Role.values() \
        else f"role {role}"


def decide(*, current: Role, switching_to: Role | None, wanted: Role | None, switchable: Collection[Role],
           draining: bool) -> Decision:
    """What the worker does about a role intent naming `wanted` (module docstring). Pure."""
    if wanted is None or draining:
        return Decision(Step.NOTHING, current)
    if wanted not in SWITCH_ROLES:
        return Decision(Step.REFUSE, current, f"a role intent must name prefill or decode, not {role_name(wanted)}")
    if wanted not in switchable:
        can = ", ".join(role_name(r) for r in switchable) or f"only {role_name(current)}"
        return Decision(Step.REFUSE, current, f"this worker cannot serve {role_name(wanted)} without a restart "
                                              f"(switchable roles: {can})")
    if switching_to is not None:
        return Decision(Step.NOTHING, switching_to) if wanted == switching_to else Decision(Step.RETARGET, wanted)
    if wanted == current:
        return Decision(Step.NOTHING, current)
    return Decision(Step.START, wanted)


def switchable_roles(serves_both: bool) -> list[Role]:
    """The roles a worker publishes in WorkerRecord.switchable_roles: both, or none (only its own)."""
    return list(SWITCH_ROLES) if serves_both else []
