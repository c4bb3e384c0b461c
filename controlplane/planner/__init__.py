"""The role planner's pure core: predict goodput of a prefill/decode assignment and plan role switches.

No I/O, no clock: the control-plane leader's service loop feeds it observed
demand and supply and applies the Plan; benchmarks drive it on a virtual
clock. See goodput.py for the predictor's queueing approximation and
assign.py for the switching limits.
"""

from controlplane.planner.assign import plan_roles
from controlplane.planner.goodput import predict_goodput
from controlplane.planner.types import (
    DECODE,
    PREFILL,
    Change,
    Demand,
    GoodputEstimate,
    Plan,
    PlannerConfig,
    Slo,
    WorkerSupply,
)

__all__ = ["DECODE", "PREFILL", "Change", "Demand", "GoodputEstimate", "Plan", "PlannerConfig", "Slo",
           "WorkerSupply", "plan_roles", "predict_goodput"]
