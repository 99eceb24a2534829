"""LoRA adapters (PEFT's layout) applied to a model's tensors as they stream: mergekit's `model+adapter`.

An adapter names, per module, two small matrices A (r x in) and B (out x r); the adapted weight
is W + scale * B @ A with PEFT's scale (lora_alpha / r, or lora_alpha / sqrt(r) with
`use_rslora`; per module from `rank_pattern` and `alpha_pattern`). A row chunk of the result
needs only B's rows: W[rows] + scale * B[rows] @ A, so memory stays a few tensors whatever the
model. Embeddings (`lora_embedding_A` r x vocab, `lora_embedding_B` hidden x r) and
`fan_in_fan_out` layers store the product transposed: their rows are A[:, rows].T @ B.T.
Tensors listed in `modules_to_save` replace the base's. Adapters that cannot be applied exactly
this way (DoRA, LoHa, LoKr, ...) are refused by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import ModelRef
from .errors import MergeError
from .safetensors_io import TensorHeader, TensorReader

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PREFIX = "base_model.model."


@dataclass
class Adapter:
    """An adapter's config and tensor headers and, once fetched, its directory."""

    ref: ModelRef
    config: dict
    tensors: dict[str, TensorHeader]
    file_sizes: dict[str, int] = field(default_factory=dict)
    local_dir: Optional[Path] = None
    commit: Optional[str] = None

    def check(self) -> None:
        kind = str(self.config.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise MergeError(f"{self.ref}: {kind} adapters are not supported; only LoRA adapters are applied exactly")
        if self.config.get("use_dora"):
            raise MergeError(f"{self.ref}: DoRA adapters are not supported (their magnitude vector needs the whole "
                             f"merged weight); merge it with peft's merge_and_unload first")


@dataclass(frozen=True)
class Patch:
    """How one base tensor changes: a low-rank delta, or a replacement from `modules_to_save`."""

    a: Optional[str] = None  # adapter tensor names
    b: Optional[str] = None
    scale: float = 1.0
    transposed: bool = False  # embeddings and fan_in_fan_out layers: delta = (B @ A).T
    replace: Optional[str] = None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first pattern that ends the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def patches(adapter: Adapter, base: dict[str, TensorHeader]) -> dict[str, Patch]:
    """Base tensor name -> its patch, checked against the base's shapes."""
    config = adapter.config
    found: dict[str, Patch] = {}
    names = set(adapter.tensors)
    for name in sorted(names):
        key = name.removeprefix(_PREFIX)
        for suffix, b_suffix, transposed in ((".lora_A.weight", ".lora_B.weight", False),
                                             (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(suffix):
                module = key[:-len(suffix)]
                target = module + ".weight"
                b_name = name[:-len(suffix)] + b_suffix
                if b_name not in names or target not in base:
                    raise MergeError(f"{adapter.ref}: {key} has no counterpart in the base model ({target}); is it "
                                     f"an adapter for another model?")
                rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
                alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
                scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
                flip = transposed or bool(config.get("fan_in_fan_out"))
                a, b = adapter.tensors[name], adapter.tensors[b_name]
                shape = (a.shape[1], b.shape[0]) if flip else (b.shape[0], a.shape[1])
                if shape != base[target].shape:
                    raise MergeError(f"{adapter.ref}: the adapter's {module} makes a {list(shape)} update, but the "
                                     f"base's {target} is {list(base[target].shape)}; the base does not match")
                found[target] = Patch(name, b_name, scale, flip)
        if ".lora_" in key or key.endswith(".base_layer.weight"):
            continue
        if key in base:  # modules_to_save: the whole tensor
            if adapter.tensors[name].shape != base[key].shape:
                raise MergeError(f"{adapter.ref}: {key} is {list(adapter.tensors[name].shape)} in the adapter and "
                                 f"{list(base[key].shape)} in the base; the base does not match")
            found[key] = Patch(replace=name)
    if not found:
        raise MergeError(f"{adapter.ref}: the adapter changes none of the base's tensors; is it for another model?")
    return found


class AdaptedReader:
    """A model's tensors with its adapter applied, read row range by row range."""

    def __init__(self, base: TensorReader, adapter: TensorReader, changes: dict[str, Patch]):
        self.base, self.adapter, self.changes = base, adapter, changes

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        weight = self.base.read(name, rows)
        patch = self.changes.get(name)
        if patch is None:
            return weight
        if patch.replace is not None:
            return self.adapter.read(patch.replace, rows).to(weight.dtype)
        a, b = self.adapter.read(patch.a).float(), self.adapter.read(patch.b).float()
        if patch.transposed:
            delta = (b @ (a if rows is None else a[:, rows[0]:rows[1]])).T
        else:
            delta = (b if rows is None else b[rows[0]:rows[1]]) @ a
        return (weight.float() + delta * patch.scale).to(weight.dtype)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()
