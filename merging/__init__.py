"""mergeline's merge engine: mergekit-compatible YAML configs, merged tensor by tensor.

Pipeline: `parse_config` -> `plan_merge` -> `run_merge` (download what the plan reads, stream,
write the checkpoint and its card); a config with `experts:` is a mixture of experts (`MoEConfig`)
and takes the same path. `plan_extraction` -> `run_extraction` extract a LoRA adapter.
`MergeError` is the only exception users need to catch.

Names are imported on first use, so `import merging.config` (or the Hub helpers) does not load
torch and the kernels.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MergeConfig": "config", "ModelRef": "config", "parse_config": "config",
    "HubError": "errors", "MergeError": "errors",
    "MergeOptions": "execute", "execute_plan": "execute",
    "plan_extraction": "extract", "run_extraction": "extract",
    "MoEConfig": "moe",
    "METHODS": "methods",
    "HostedLimits": "pipeline", "MergeEvent": "pipeline", "PlanSummary": "pipeline", "enforce_limits": "pipeline",
    "fetch_inputs": "pipeline", "load_config": "pipeline", "plan_merge": "pipeline", "run_merge": "pipeline",
    "summarize": "pipeline",
    "MergePlan": "plan", "build_plan": "plan",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'merging' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), "REGISTRY" if name == "METHODS" else name)
    globals()[name] = value
    return value
