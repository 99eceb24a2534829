"""mergeline's merge engine: mergekit-compatible YAML configs, merged tensor by tensor.

Pipeline: `parse_config` -> `build_plan` (via `plan_merge`) -> `execute_plan` (via `run_merge`),
which writes the checkpoint and its card. `MergeError` is the only exception users need to catch.
"""

from .config import MergeConfig, ModelRef, parse_config
from .errors import MergeError
from .execute import MergeOptions, execute_plan
from .methods import REGISTRY as METHODS
from .pipeline import (HostedLimits, PlanSummary, enforce_limits, fetch_inputs, load_config, plan_merge, run_merge,
                       summarize)
from .plan import MergePlan, build_plan

__all__ = [
    "HostedLimits", "METHODS", "MergeConfig", "MergeError", "MergeOptions", "MergePlan", "ModelRef", "PlanSummary",
    "build_plan", "enforce_limits", "execute_plan", "fetch_inputs", "load_config", "parse_config", "plan_merge", "run_merge",
    "summarize",
]
