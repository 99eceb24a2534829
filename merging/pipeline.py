"""The engine's entry points, shared by the command line and the app: config -> plan -> execute -> card."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .config import MergeConfig, ModelRef, parse_config
from .errors import MergeError
from .execute import MergeOptions, ProgressFn, execute_plan, peak_memory
from .plan import MergePlan, build_plan
from .sources import ModelSource, fetch_model, inspect_model

log = logging.getLogger("mergeline")


def load_config(source: Union[str, Path]) -> MergeConfig:
    """Parse a config from a YAML file path or from YAML text."""
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yml", ".yaml"))):
        path = Path(source)
        if not path.is_file():
            raise MergeError(f"CONFIG: {path} does not exist")
        return parse_config(path.read_text(), base_dir=path.parent.resolve())
    return parse_config(source)


def inspect_inputs(config: MergeConfig, *, token: Optional[str] = None, allow_pickle: bool = False,
                   cache_dir: Optional[Path] = None) -> dict[ModelRef, ModelSource]:
    """Config and tensor headers of every referenced model, looked up concurrently."""
    refs = config.referenced_models()
    with ThreadPoolExecutor(max_workers=min(8, len(refs))) as pool:
        found = pool.map(lambda ref: inspect_model(ref, token=token, allow_pickle=allow_pickle,
                                                   cache_dir=cache_dir), refs)
        return dict(zip(refs, found))


def plan_merge(config: MergeConfig, *, token: Optional[str] = None, allow_pickle: bool = False,
               cache_dir: Optional[Path] = None) -> MergePlan:
    sources = inspect_inputs(config, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir)
    for source in sources.values():
        if source.pickled and not source.tensors:  # a Hub .bin model: headers need the files themselves
            fetch_model(source, set(source.file_sizes), token=token, cache_dir=cache_dir)
    return build_plan(config, sources)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


@dataclass(frozen=True)
class PlanSummary:
    method: str
    tensors: int
    parameters: int
    output_bytes: int
    download_bytes: int
    peak_memory_bytes: int
    layers: int
    warnings: tuple[str, ...]

    def lines(self) -> list[str]:
        return [
            f"method: {self.method}",
            f"tensors to write: {self.tensors}",
            f"output layers: {self.layers}",
            f"output parameters: {_count(self.parameters)} ({_size(self.output_bytes)})",
            f"to download: {_size(self.download_bytes)}",
            f"estimated peak memory: {_size(self.peak_memory_bytes)}",
            *[f"warning: {w}" for w in self.warnings],
        ]


def summarize(plan: MergePlan) -> PlanSummary:
    from .architecture import layer_count_key, text_config

    key = layer_count_key(plan.out_config)
    return PlanSummary(plan.method.name, len(plan.tensors), plan.parameter_count, plan.output_bytes,
                       plan.download_bytes, peak_memory(plan), text_config(plan.out_config)[key],
                       tuple(plan.warnings))


def fetch_inputs(plan: MergePlan, *, token: Optional[str] = None, cache_dir: Optional[Path] = None) -> None:
    """Download, for each Hub input, only the weight files holding tensors the plan reads."""
    for model, files in plan.needed_files().items():
        fetch_model(plan.models[model], files, token=token, cache_dir=cache_dir)
    for source in {id(m): m for m in (plan.reference, plan.tokenizer_from)}.values():
        if source.local_dir is None:
            fetch_model(source, set(), token=token, cache_dir=cache_dir)


def run_merge(config: MergeConfig, output_dir: Path, *, options: MergeOptions = MergeOptions(),
              token: Optional[str] = None, allow_pickle: bool = False, cache_dir: Optional[Path] = None,
              progress: Optional[ProgressFn] = None,
              on_plan: Optional[Callable[[MergePlan], None]] = None) -> list[str]:
    """Plan, download what is needed, merge and write `output_dir`. Returns the files written."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise MergeError(f"OUTPUT_DIR: {output_dir} already exists; choose a new directory or remove it")
    plan = plan_merge(config, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir)
    if on_plan:
        on_plan(plan)
    for warning in plan.warnings:
        log.warning(warning)
    fetch_inputs(plan, token=token, cache_dir=cache_dir)
    return execute_plan(plan, output_dir, options, progress)


@dataclass(frozen=True)
class HostedLimits:
    """What a shared deployment (a Space) accepts from anonymous users."""

    max_models: int = 6
    max_input_bytes: int = 60 * 10**9
    allowed_local_roots: tuple[Path, ...] = ()  # e.g. the app's own demo models


def enforce_limits(config: MergeConfig, limits: HostedLimits, plan: Optional[MergePlan] = None) -> None:
    """Refuse local paths outside the allowed roots, too many models, or too many input bytes."""
    refs = config.referenced_models()
    for ref in refs:
        if ref.local and not any(Path(ref.path).resolve().is_relative_to(root.resolve())
                                 for root in limits.allowed_local_roots):
            raise MergeError(f"{ref.path}: local paths are not allowed here; use Hub repo ids")
    if len(refs) > limits.max_models:
        raise MergeError(f"models: {len(refs)} models exceed this Space's limit of {limits.max_models}; run "
                         f"mergeline locally for larger merges")
    if plan is not None and plan.download_bytes > limits.max_input_bytes:
        raise MergeError(f"models: the merge reads {_size(plan.download_bytes)}, over this Space's limit of "
                         f"{_size(limits.max_input_bytes)}; run mergeline locally for larger merges")
