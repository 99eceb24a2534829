"""LoRA extraction: a PEFT adapter that turns BASE into (nearly) FINETUNED.

For each target weight (the 2-D weights of the decoder layers: attention and MLP projections), the
difference FINETUNED - BASE is computed in float32 and truncated to its top `rank` singular
directions: A = sqrt(S) Vh, B = U sqrt(S) (mergekit's split of the scale), with `lora_alpha = r`, so
PEFT applies B @ A unscaled. Large matrices use a randomized SVD (`torch.svd_lowrank`, seeded),
which is exact for a difference of rank at most `rank`; the log says how much of each difference
(its squared Frobenius norm) the rank keeps. Embeddings, the LM head and norms are never
decomposed; when they changed, the log says so, and `save_modules` stores them whole
(`modules_to_save`). Tensors stream one at a time, so memory is a few tensors.

`plan_extraction` is the dry run (headers only); `run_extraction` downloads, decomposes and writes
the adapter (adapter_config.json, adapter_model.safetensors, README.md) the way a merge is written.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import yaml

from . import hub
from .architecture import detect_layout
from .errors import MergeError, did_you_mean
from .execute import check_output_dir, resolve_device, staged_output
from .pipeline import HostedLimits, MergeEvent, require_space, size_text, uncached_bytes
from .refs import parse_model_ref
from .safetensors_io import OutputTensor, ShardedWriter
from .sources import ModelSource, fetch_model, inspect_model

EventFn = Callable[[MergeEvent], None]
_EXACT_SVD_SIDE = 512  # below this, a full SVD costs little and is exact
_OVERSAMPLE, _POWER_ITERATIONS = 16, 4


def module_kind(name: str) -> str:
    """`model.layers.0.self_attn.q_proj.weight` -> `q_proj`: what --modules and target_modules name."""
    return name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Target:
    module: str  # "model.layers.0.self_attn.q_proj"
    rank: int  # the rank kept: at most the requested one, at most the matrix's smaller side
    shape: tuple[int, int]  # (out features, in features)

    @property
    def kind(self) -> str:
        return module_kind(self.module)


@dataclass(frozen=True)
class ExtractionPlan:
    finetuned: ModelSource
    base: ModelSource
    rank: int
    targets: tuple[Target, ...]
    saved: tuple[str, ...]  # tensors stored whole (modules_to_save)
    save_modules: tuple[str, ...]
    checked: tuple[str, ...]  # other tensors compared, so the log can say what changed and was left out

    @property
    def output_bytes(self) -> int:
        lora = sum(t.rank * (t.shape[0] + t.shape[1]) * self.finetuned.tensors[f"{t.module}.weight"].dtype.itemsize
                   for t in self.targets)
        return lora + sum(self.finetuned.tensors[n].nbytes for n in self.saved)

    @property
    def reads(self) -> list[str]:
        """Every tensor the extraction reads, in both models."""
        return [f"{t.module}.weight" for t in self.targets] + list(self.saved) + list(self.checked)

    def files(self, source: ModelSource) -> set[str]:
        """The weight files of `source` (FINETUNED or BASE) holding tensors the extraction reads."""
        return {source.tensors[n].file for n in self.reads if n in source.tensors}

    @property
    def download_bytes(self) -> int:
        """Bytes of the Hub weight files the extraction reads."""
        return sum(sum(s.file_sizes.get(f, 0) for f in self.files(s)) for s in (self.finetuned, self.base)
                   if not s.ref.local)

    def summary(self) -> list[str]:
        return [f"LoRA of rank {self.rank} on {len(self.targets)} weights "
                f"({', '.join(sorted({t.kind for t in self.targets}))})",
                *([f"saved whole: {len(self.saved)} tensors ({', '.join(self.save_modules)})"] if self.saved else []),
                f"adapter size: {size_text(self.output_bytes)}", f"to download: {size_text(self.download_bytes)}"]


def plan_extraction(finetuned: str, base: str, rank: int, *, modules: Sequence[str] = (),
                    save_modules: Sequence[str] = (), token: hub.Token = None, cache_dir: Optional[Path] = None,
                    limits: Optional[HostedLimits] = None) -> ExtractionPlan:
    """Which weights become LoRA pairs and which are stored whole, from the two models' headers."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise MergeError(f"rank: must be a whole number of at least 1, got {rank!r}")
    roots = limits.allowed_local_roots if limits is not None else None
    refs = [parse_model_ref(finetuned, "FINETUNED", local_roots=roots),
            parse_model_ref(base, "BASE", local_roots=roots)]
    for ref, where in zip(refs, ("FINETUNED", "BASE")):
        if ref.adapter is not None:
            raise MergeError(f"{where}: {ref} is a model with an adapter; extract from plain models")
    with ThreadPoolExecutor(2) as pool:
        ft, bs = pool.map(lambda ref: inspect_model(ref, token=token, cache_dir=cache_dir), refs)
    layout = detect_layout(ft)
    in_layers = {layout.layer_tensor(i, s) for i, suffixes in layout.layer_suffixes.items() for s in suffixes}
    linear = [n for n in ft.tensors if n in in_layers and n.endswith(".weight") and len(ft.tensors[n].shape) == 2]
    available = {module_kind(n) for n in linear}
    for name in modules:
        if name not in available:
            raise MergeError(f"--modules: no layer weight is named {name!r}{did_you_mean(name, available)}; these "
                             f"models have {', '.join(sorted(available))}")
    every = {module_kind(n) for n in ft.tensors}
    for name in save_modules:
        if name not in every:
            raise MergeError(f"--save-modules: no module is named {name!r}{did_you_mean(name, every)}")
    saved = [n for n in ft.tensors if module_kind(n) in save_modules]
    chosen = [n for n in linear if (not modules or module_kind(n) in modules) and n not in saved]
    for name in chosen + saved:
        theirs = bs.tensors.get(name)
        if theirs is None:
            raise MergeError(f"BASE: {bs.label} has no {name}; FINETUNED must be a fine-tune of BASE")
        if theirs.shape != ft.tensors[name].shape and name not in saved:
            raise MergeError(f"BASE: {name} is {list(theirs.shape)} in {bs.label} and {list(ft.tensors[name].shape)} "
                             f"in {ft.label}; FINETUNED must be a fine-tune of BASE")
    targets = tuple(Target(n.removesuffix(".weight"), min(rank, *ft.tensors[n].shape), tuple(ft.tensors[n].shape))
                    for n in chosen)
    if not targets and not saved:
        raise MergeError("--modules: nothing to extract; name layer weights such as q_proj or v_proj")
    checked = tuple(n for n in ft.tensors if n not in chosen and n not in saved and n in bs.tensors
                    and bs.tensors[n].shape == ft.tensors[n].shape)
    plan = ExtractionPlan(ft, bs, rank, targets, tuple(saved), tuple(save_modules), checked)
    if limits is not None and plan.download_bytes > limits.max_input_bytes:
        raise MergeError(f"models: the extraction reads {size_text(plan.download_bytes)}, over this Space's limit "
                         f"of {size_text(limits.max_input_bytes)}; run mergeline locally for larger models")
    return plan


def low_rank(delta: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of the top `rank` singular directions of `delta` (float32)."""
    smaller = min(delta.shape)
    if smaller <= _EXACT_SVD_SIDE or rank + _OVERSAMPLE >= smaller:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    with torch.random.fork_rng(devices=[delta.device] if delta.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=rank + _OVERSAMPLE, niter=_POWER_ITERATIONS)
    return u[:, :rank], s[:rank], v[:, :rank].T


def run_extraction(plan: ExtractionPlan, output_dir: Path, *, device: str = "cpu", token: hub.Token = None,
                   cache_dir: Optional[Path] = None, on_event: Optional[EventFn] = None) -> list[str]:
    """Download what the plan reads, decompose each difference and write the adapter to `output_dir`."""
    say = on_event or (lambda event: None)
    compute = resolve_device(device)
    check_output_dir(Path(output_dir))
    require_space(sum(uncached_bytes(s, plan.files(s), cache_dir) for s in (plan.finetuned, plan.base)),
                  Path(output_dir), plan.output_bytes, cache_dir, what="the extraction")
    for source in (plan.finetuned, plan.base):
        files = plan.files(source)
        say(MergeEvent(f"reading {source.ref}: {len(files)} weight file{'s' * (len(files) != 1)}"))
        fetch_model(source, files, token=token, cache_dir=cache_dir)
    out_tensors, kept, changed = [], [], set()  # changed: module kinds with a difference somewhere
    for target in plan.targets:
        dtype = plan.finetuned.tensors[f"{target.module}.weight"].dtype
        out_tensors += [OutputTensor(f"base_model.model.{target.module}.lora_A.weight", dtype,
                                     (target.rank, target.shape[1])),
                        OutputTensor(f"base_model.model.{target.module}.lora_B.weight", dtype,
                                     (target.shape[0], target.rank))]
    out_tensors += [OutputTensor(f"base_model.model.{n}", plan.finetuned.tensors[n].dtype,
                                 plan.finetuned.tensors[n].shape) for n in plan.saved]
    ft_reader, base_reader = plan.finetuned.reader(), plan.base.reader()
    try:
        with staged_output(Path(output_dir), plan.output_bytes) as staging:
            writer = ShardedWriter(staging, out_tensors, 1 << 62, stem="adapter_model")
            written = 0
            try:
                for index, target in enumerate(plan.targets):
                    name = f"{target.module}.weight"
                    delta = ft_reader.read(name).to(compute, torch.float32) - base_reader.read(name).to(compute,
                                                                                                       torch.float32)
                    total = float(delta.square().sum())
                    u, s, vh = low_rank(delta, target.rank, seed=index)
                    root = s.sqrt()
                    dtype = out_tensors[2 * index].dtype
                    writer.write(out_tensors[2 * index].name, (root[:, None] * vh).to("cpu", dtype).contiguous())
                    writer.write(out_tensors[2 * index + 1].name, (u * root[None, :]).to("cpu", dtype).contiguous())
                    written += (out_tensors[2 * index].nbytes + out_tensors[2 * index + 1].nbytes)
                    if total == 0:
                        say(MergeEvent(f"{target.module}: unchanged", index + 1, len(plan.targets), written))
                        continue
                    changed.add(target.kind)
                    kept.append(float(s.square().sum()) / total)
                    say(MergeEvent(f"{target.module}: rank {target.rank} keeps {100 * min(kept[-1], 1.0):.1f}% of the "
                                   f"difference", index + 1, len(plan.targets), written))
                for name in plan.saved:
                    writer.write(f"base_model.model.{name}", ft_reader.read(name).contiguous())
                files = writer.close()
            except BaseException:
                writer.abort()
                raise
            left_out = _changed_but_left_out(plan, ft_reader, base_reader)
            unchanged = sorted({t.kind for t in plan.targets} - changed)
            report = _report(kept, left_out, unchanged, sorted(changed))
            files += _write_side_files(plan, staging, Path(output_dir).name, report)
            for line in report:
                say(MergeEvent(line))
    finally:
        ft_reader.close()
        base_reader.close()
    return sorted(files)


def _changed_but_left_out(plan: ExtractionPlan, ft_reader, base_reader) -> list[str]:
    """Module kinds (norm, embed_tokens, ...) whose tensors differ but are neither decomposed nor saved."""
    changed: dict[str, int] = {}
    for name in plan.checked:
        if not torch.equal(ft_reader.read(name), base_reader.read(name)):
            changed[module_kind(name)] = changed.get(module_kind(name), 0) + 1
    return [f"{kind} ({count})" for kind, count in sorted(changed.items())]


def _report(kept: list[float], left_out: list[str], unchanged: list[str], changed: list[str]) -> list[str]:
    lines = []
    if kept:
        ordered = sorted(kept)
        lines.append(f"the rank keeps {100 * ordered[0]:.1f}% (worst) to {100 * min(ordered[-1], 1.0):.1f}% (best) "
                     f"of each difference, {100 * ordered[len(ordered) // 2]:.1f}% at the median")
    if left_out:
        lines.append(f"changed but not in the adapter: {', '.join(left_out)}; add them with --save-modules to "
                     f"store them whole")
    if unchanged and changed:
        lines.append(f"unchanged in every layer: {', '.join(unchanged)}; --modules {','.join(changed)} leaves them "
                     f"out of the adapter")
    return lines


def _link(source: ModelSource) -> str:
    ref = source.ref
    return f"[{ref.path}](https://huggingface.co/{ref.path})" if ref.hub_id else f"`{ref.path}`"


def _write_side_files(plan: ExtractionPlan, directory: Path, title: str, report: list[str]) -> list[str]:
    ranks = {t.module: t.rank for t in plan.targets if t.rank != plan.rank}
    config = {
        "base_model_name_or_path": plan.base.ref.path, "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": plan.rank, "lora_alpha": plan.rank, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": sorted({t.kind for t in plan.targets}),
        "modules_to_save": list(plan.save_modules) or None, "rank_pattern": ranks, "alpha_pattern": ranks,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = {"base_model": plan.base.ref.path} if plan.base.ref.hub_id else {}
    meta.update(base_model_relation="adapter", library_name="peft", tags=["lora", "mergeline", "extracted"])
    if plan.finetuned.license and plan.finetuned.license == plan.base.license:
        meta["license"] = plan.finetuned.license
    card = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {title}",
            "", f"A LoRA adapter of rank {plan.rank} extracted with mergeline from {_link(plan.finetuned)} against "
            f"its base {_link(plan.base)}: each weight's difference, truncated to its top singular directions. "
            f"Load it with peft on the base.", "", "## Extraction", "",
            f"* target modules: {', '.join(config['target_modules'])}",
            *[f"* {line}" for line in report], ""]
    (directory / "README.md").write_text("\n".join(card))
    return ["adapter_config.json", "README.md"]

