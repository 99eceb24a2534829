"""The engine's one door, shared by the command line and the app: config -> plan -> fetch -> execute -> card.

`plan_merge` is the dry run (headers only); `run_merge` does the whole merge. Both take the same
`HostedLimits` for a shared deployment, and `run_merge` reports what it does as `MergeEvent`s, so
the CLI prints and the app streams the same lines.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from . import hub
from .config import MergeConfig, ModelRef, parse_config
from .errors import MergeError
from .execute import MergeOptions, check_output_dir, execute_plan, peak_memory, resolve_device
from .moe import MoEConfig
from .moe.plan import build_moe_plan
from .plan import MergePlan, build_plan
from .sources import ModelSource, fetch_model, inspect_model

log = logging.getLogger("mergeline")


@dataclass(frozen=True)
class MergeEvent:
    """Something a merge reports while it runs: a log line, or progress through its tensors."""

    message: str  # on progress events, the tensor just written
    done: Optional[int] = None  # tensors written so far, on progress events
    total: Optional[int] = None
    written: int = 0  # bytes written so far, on progress events

    @property
    def is_progress(self) -> bool:
        return self.done is not None

    def describe(self, seconds: float) -> str:
        """A progress line: `[120/291] <tensor>: 1.23 GB in 12.3 s (100 MB/s)`."""
        rate = f" ({size_text(self.written / seconds)}/s)" if seconds > 0.05 else ""
        return f"[{self.done}/{self.total}] {self.message}: {size_text(self.written)} in {seconds:.1f} s{rate}"


EventFn = Callable[[MergeEvent], None]


@dataclass(frozen=True)
class HostedLimits:
    """What a shared deployment (a Space) accepts from anonymous users: local paths only under
    `allowed_local_roots` (enforced when the config is parsed), and plans that cannot hold the
    merge queue for long."""

    max_models: int = 6
    max_input_bytes: int = 60 * 10**9
    max_output_bytes: int = 60 * 10**9
    max_tensors: int = 4000  # a 70B Llama has 723, an 8x7B Mixtral 995
    max_slices: int = 256
    allowed_local_roots: tuple[Path, ...] = ()  # e.g. the app's own demo models


def load_config(source: Union[str, Path], *, limits: Optional[HostedLimits] = None) -> MergeConfig:
    """Parse a config from a YAML file path or from YAML text (with `limits`: as a Space accepts it)."""
    roots = limits.allowed_local_roots if limits is not None else None
    is_path = isinstance(source, str) and "\n" not in source and source.endswith((".yml", ".yaml"))
    if isinstance(source, Path) or is_path:
        path = Path(source)
        if not path.is_file():
            raise MergeError(f"CONFIG: {path} does not exist")
        return parse_config(path.read_text(), base_dir=path.parent.resolve(), local_roots=roots)
    return parse_config(source, local_roots=roots)


def inspect_inputs(config: MergeConfig, *, token: hub.Token = None, allow_pickle: bool = False,
                   cache_dir: Optional[Path] = None) -> dict[ModelRef, ModelSource]:
    """Config and tensor headers of every referenced model, looked up concurrently."""
    refs = config.referenced_models()
    with ThreadPoolExecutor(max_workers=min(8, len(refs))) as pool:
        found = pool.map(lambda ref: inspect_model(ref, token=token, allow_pickle=allow_pickle,
                                                   cache_dir=cache_dir), refs)
        return dict(zip(refs, found))


def plan_merge(config: MergeConfig, *, token: hub.Token = None, allow_pickle: bool = False,
               cache_dir: Optional[Path] = None, limits: Optional[HostedLimits] = None) -> MergePlan:
    """The dry run: the plan from configs and headers, within `limits` when given."""
    if limits is not None:
        enforce_limits(config, limits)
    sources = inspect_inputs(config, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir)
    for source in sources.values():
        if source.pickled and not source.tensors:  # a Hub .bin model: headers need the files themselves
            fetch_model(source, set(source.file_sizes), token=token, cache_dir=cache_dir)
        elif config.tokenizer is not None and source.local_dir is None:
            fetch_model(source, set(), token=token, cache_dir=cache_dir)  # tokenizers: the vocabulary is planned
    plan = build_moe_plan(config, sources) if isinstance(config, MoEConfig) else build_plan(config, sources)
    if limits is not None:
        enforce_limits(config, limits, plan)
    return plan


def size_text(n: float) -> str:
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
    details: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        return [
            f"method: {self.method}",
            *self.details,
            f"tensors to write: {self.tensors}",
            f"output layers: {self.layers}",
            f"output parameters: {_count(self.parameters)} ({size_text(self.output_bytes)})",
            f"to download: {size_text(self.download_bytes)}",
            f"estimated peak memory: {size_text(self.peak_memory_bytes)}",
            *[f"warning: {w}" for w in self.warnings],
        ]


def summarize(plan: MergePlan) -> PlanSummary:
    from .architecture import layer_count_key, text_config

    key = layer_count_key(plan.out_config)
    return PlanSummary(plan.method.name, len(plan.tensors), plan.parameter_count, plan.output_bytes,
                       plan.download_bytes, peak_memory(plan), text_config(plan.out_config)[key],
                       tuple(plan.warnings), plan.details)


def uncached_bytes(source: ModelSource, files: set[str], cache_dir: Optional[Path]) -> int:
    """Bytes of `source`'s weight `files` that are not in the Hub cache yet (none for a local model)."""
    from huggingface_hub import try_to_load_from_cache

    if source.weights_ref.local:
        return 0
    total = 0
    for name in files:
        cached = try_to_load_from_cache(source.weights_ref.path, name, cache_dir=cache_dir,
                                        revision=source.commit or source.weights_ref.revision)
        if not isinstance(cached, str):
            total += source.file_sizes.get(name, 0)
    return total


def _bytes_to_download(plan: MergePlan, cache_dir: Optional[Path]) -> int:
    """Bytes of the weight files the plan reads that are not in the Hub cache yet."""
    total = 0
    for model, files in plan.needed_files().items():
        source = plan.models[model]
        if source.adapter_to_fetch is not None:
            total += sum(source.adapter_to_fetch.file_sizes.values())
        total += uncached_bytes(source, files, cache_dir)
    return total


def check_disk(plan: MergePlan, output_dir: Path, cache_dir: Optional[Path] = None) -> None:
    """Refuse a merge whose downloads and output do not fit where they will be written."""
    require_space(_bytes_to_download(plan, cache_dir), output_dir, plan.output_bytes, cache_dir)


def require_space(download_bytes: int, output_dir: Path, output_bytes: int, cache_dir: Optional[Path] = None,
                  what: str = "the merge") -> None:
    """Refuse work whose downloads (into the Hub cache) and output do not fit on their disks."""
    from huggingface_hub import constants

    needs: dict[int, tuple[Path, int]] = {}  # per file system: (a folder on it, bytes)

    def need(folder: Path, nbytes: int) -> None:
        folder = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        device = folder.stat().st_dev
        _, held = needs.get(device, (folder, 0))
        needs[device] = (folder, held + nbytes)

    need(Path(cache_dir or constants.HF_HUB_CACHE), download_bytes)
    need(Path(output_dir).absolute().parent, output_bytes)
    for folder, nbytes in needs.values():
        needed = int(nbytes * 1.02) + 64 * 2**20  # side files, the card, the file systems' own overhead
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise MergeError(f"disk: {what} needs {size_text(needed)} on the disk holding {folder} (downloads "
                             f"and output), and only {size_text(free)} are free; free space or choose another "
                             f"OUTPUT_DIR (downloads go to HF_HOME's cache)")


def fetch_inputs(plan: MergePlan, *, token: hub.Token = None, cache_dir: Optional[Path] = None,
                 on_event: Optional[EventFn] = None) -> None:
    """Download, for each Hub input, only the weight files holding tensors the plan reads."""
    say = on_event or (lambda event: None)
    for model, files in plan.needed_files().items():
        source = plan.models[model]
        if source.weights_ref.local and source.adapter_to_fetch is None:
            continue
        nbytes = sum(source.file_sizes.get(f, 0) for f in files)
        say(MergeEvent(f"downloading {source.ref}: {len(files)} weight file{'s' * (len(files) != 1)}, "
                       f"{size_text(nbytes)}"))

        def arrived(name: str, size: int, seconds: float, ref: ModelRef = source.ref) -> None:
            rate = f", {size_text(size / seconds)}/s" if seconds > 0.5 and size else ""
            say(MergeEvent(f"  {ref}: {name} ({size_text(size)}) in {seconds:.1f} s{rate}"))

        fetch_model(source, files, token=token, cache_dir=cache_dir, on_file=arrived)
    for source in {id(m): m for m in (plan.reference, plan.tokenizer_from)}.values():
        if source.local_dir is None:  # config and tokenizer files of a model no tensor is read from
            fetch_model(source, set(), token=token, cache_dir=cache_dir)


def run_merge(config: MergeConfig, output_dir: Path, *, options: MergeOptions = MergeOptions(),
              token: hub.Token = None, allow_pickle: bool = False, cache_dir: Optional[Path] = None,
              limits: Optional[HostedLimits] = None, on_event: Optional[EventFn] = None) -> list[str]:
    """Plan, check the disk, download what is needed, merge and write `output_dir`. Returns the files written.

    Every user-caused failure is a `MergeError`, and nothing is left at `output_dir` after one."""
    say = on_event or (lambda event: None)
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    say(MergeEvent("reading model configs and safetensors headers"))
    plan = plan_merge(config, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir, limits=limits)
    for line in summarize(plan).lines():
        say(MergeEvent(line))
    for warning in plan.warnings:
        log.warning(warning)
    check_disk(plan, output_dir, cache_dir)
    fetch_inputs(plan, token=token, cache_dir=cache_dir, on_event=say)
    background = ThreadPoolExecutor(1, thread_name_prefix="mergeline-routers")
    if isinstance(config, MoEConfig):  # the experts' tensors stream while the routers are computed
        plan.computing = background.submit(compute_routers, plan, options, say)
    say(MergeEvent("merging tensor by tensor"))
    sizes = {tensor.name: tensor.out.nbytes for tensor in plan.tensors}
    written = 0

    def progress(done: int, total: int, name: str) -> None:
        nonlocal written
        written += sizes[name]
        say(MergeEvent(name, done, total, written))

    try:
        return execute_plan(plan, output_dir, options, progress=progress)
    finally:
        background.shutdown(cancel_futures=True)


def compute_routers(plan: MergePlan, options: MergeOptions, say: EventFn) -> None:
    """A mixture of experts' routers, into the plan, before its tensors stream."""
    from .moe import routers

    config: MoEConfig = plan.config
    say(MergeEvent(f"computing routers ({config.gate_mode})"))
    weights = routers.router_weights(config, plan.reference, seed=options.seed,
                                     device=str(resolve_device(options.device)),
                                     say=lambda line: say(MergeEvent(line)))
    degenerate = routers.degenerate_layers(weights)
    if degenerate:
        plan.warnings.append(f"routers: {len(degenerate)} of {weights.shape[0]} layers barely tell the experts apart "
                             f"(layers {', '.join(map(str, degenerate[:8]))}{'...' * (len(degenerate) > 8)}); "
                             f"the prompts may be too similar")
        log.warning(plan.warnings[-1])
    routers.fill_routers(plan, weights)


def enforce_limits(config: MergeConfig, limits: HostedLimits, plan: Optional[MergePlan] = None) -> None:
    """Refuse too many models or slices, and plans that read, write or hold the queue too long."""
    refs = config.referenced_models()
    if len(refs) > limits.max_models:
        raise MergeError(f"models: {len(refs)} models exceed this Space's limit of {limits.max_models}; run "
                         f"mergeline locally for larger merges")
    if config.slices is not None and len(config.slices) > limits.max_slices:
        raise MergeError(f"slices: {len(config.slices)} slices exceed this Space's limit of {limits.max_slices}; "
                         f"run mergeline locally for larger merges")
    if plan is None:
        return
    if plan.download_bytes > limits.max_input_bytes:
        raise MergeError(f"models: the merge reads {size_text(plan.download_bytes)}, over this Space's limit of "
                         f"{size_text(limits.max_input_bytes)}; run mergeline locally for larger merges")
    if plan.output_bytes > limits.max_output_bytes:
        raise MergeError(f"models: the merge writes {size_text(plan.output_bytes)}, over this Space's limit of "
                         f"{size_text(limits.max_output_bytes)}; run mergeline locally for larger merges")
    if len(plan.tensors) > limits.max_tensors:
        raise MergeError(f"slices: the merge writes {len(plan.tensors):,} tensors, over this Space's limit of "
                         f"{limits.max_tensors:,}; run mergeline locally for larger merges")
