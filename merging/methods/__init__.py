"""Merge methods: each a small function over tensors plus a declaration of its parameters.

This module is the registry: every method's name, parameters (with defaults, the values that
have meaning and the usual ones), base-model policy and input counts, and where its kernel
lives. It imports no torch, so a config is validated without loading the kernels; a kernel's
module is imported the first time a merge runs it.

Kernels (one module per family: `linear`, `spherical`, `task_vectors`, `selective`, with `pruning`
and the fused-loop contract `chunks`, `native`, `selection` beside them) get tensors already on
the compute device in the compute dtype (float32, or float64 when asked) and return one tensor
of the same shape. They never load, cast for output or write: that is the engine's job.

Calling convention::

    merge(base, models, *, <shared parameters>, <per-model parameters as lists>, seed)

``base`` is the base model's tensor (``None`` when the method ignores or lacks a base) and
``models`` the other inputs in config order; a per-model parameter arrives as a list aligned
with ``models``. Methods that ignore the base (linear, karcher, passthrough) get every input in
``models``. ``seed`` (an int) is passed to randomized methods only.

Methods that need whole-tensor statistics but can then work chunk by chunk (TIES thresholds,
DARE rescale sums, the SLERP angle) declare ``prepare(chunks, numel, **params) -> kernel``
instead of ``merge``; the engine streams row chunks through it, and calling the method on whole
tensors runs the same code on a single chunk.

Semantics and defaults follow mergekit 0.1.5; the README lists where we deliberately differ.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional, Sequence

REQUIRED: Any = object()


class BasePolicy(str, Enum):
    REQUIRED = "required"  # needs base_model; the base is not among `models`
    OPTIONAL = "optional"  # uses base_model when one is given
    IGNORED = "ignored"  # every input, the base included, is one of `models`


@dataclass(frozen=True)
class Range:
    """An interval of numbers; an open end excludes its bound."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        def bound(x: float) -> str:
            return f"{x:g}" if math.isfinite(x) else ("-inf" if x < 0 else "inf")

        return f"{'(' if self.low_open else '['}{bound(self.low)}, {bound(self.high)}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type  # float, int or bool
    default: Any = REQUIRED
    per_model: bool = False
    optional: bool = False  # None is an accepted value (passthrough's scale)
    valid: Optional[Range] = None  # values outside have no meaning: refused when the config is read
    usual: Optional[Range] = None  # values outside are legitimate but unusual: merged with a warning

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _kernel(ref: Optional[str], options: dict[str, Any]) -> Optional[Callable]:
    """The callable `module:name` of this package names (built with `options` when given)."""
    if ref is None:
        return None
    module, _, name = ref.partition(":")
    found = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return found(**options) if options else found


@dataclass(frozen=True)
class MergeMethod:
    name: str
    title: str
    base: BasePolicy
    parameters: tuple[Parameter, ...] = ()
    min_models: int = 1  # inputs in `models` (the base excluded unless the base is ignored)
    max_models: Optional[int] = None
    randomized: bool = False  # gets a `seed` keyword; the same seed gives the same result
    # The method can work on row chunks of a tensor (after `prepare`, if any, saw the whole of it).
    chunkable: bool = False
    # Where the kernel lives, as "module:name" in this package: `merge(base, models, **params)`, or
    # `prepare(chunks, numel, **params) -> kernel` for whole-tensor statistics gathered over
    # chunks first (TIES thresholds, SLERP angle); `narrow(base, models, out_dtype, **params)` is
    # `merge`'s fused path (`chunks.FusedKernel`). `options` build a `prepare` that is a class.
    merge_ref: Optional[str] = None
    prepare_ref: Optional[str] = None
    narrow_ref: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict, compare=False)
    # Checks that span parameters, on the values resolved for one tensor: a problem in one line, or None.
    check: Optional[Callable[[dict[str, Any]], Optional[str]]] = None
    # Whether the method, with these resolved parameters, returns its single input unchanged (a
    # passthrough without scale): the engine then copies the stored bytes instead of merging them.
    copies: Optional[Callable[[dict[str, Any]], bool]] = None
    reference: str = ""

    def __post_init__(self) -> None:
        if (self.merge_ref is None) == (self.prepare_ref is None):
            raise ValueError(f"{self.name}: declare exactly one of merge_ref and prepare_ref")

    @functools.cached_property
    def param_index(self) -> dict[str, Parameter]:
        return {p.name: p for p in self.parameters}

    @functools.cached_property
    def fn(self) -> Optional[Callable]:
        return _kernel(self.merge_ref, {})

    @functools.cached_property
    def prepare(self) -> Optional[Callable]:
        return _kernel(self.prepare_ref, self.options)

    @functools.cached_property
    def narrow(self) -> Optional[Callable]:
        return _kernel(self.narrow_ref, {})

    def __call__(self, base, models: Sequence, **params: Any):
        """Merge whole tensors (the engine streams large ones through `prepare` and the kernel instead)."""
        models = list(models)
        if self.prepare is None:
            return self.fn(base, models, **params)
        from .chunks import WholeTensor

        numel = (base if base is not None else models[0]).numel()
        kernel = self.prepare(WholeTensor(base, models), numel, **params)
        return kernel(base, models, 0)


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


# --------------------------------------------------------------------------------------------
# Declarations

WEIGHT = Parameter("weight", float, per_model=True, usual=Range(0))
UNIT = Range(0, 1)


def della_window_problem(params: dict[str, Any]) -> Optional[str]:
    """DELLA keeps entries with probabilities from density - epsilon to density + epsilon: both must
    lie inside (0, 1) wherever it prunes (0 < density < 1)."""
    for k, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"])):
        if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            return (f"epsilon: della keeps entries with probabilities density +/- epsilon, which must lie inside "
                    f"(0, 1); model {k + 1} has density {density:g} and epsilon {epsilon:g}: lower epsilon")
    return None


register(MergeMethod("linear", "Linear (model soup)", BasePolicy.IGNORED, (WEIGHT, Parameter("normalize", bool, True)),
                     merge_ref="linear:linear", narrow_ref="linear:linear_narrow", chunkable=True,
                     reference="https://arxiv.org/abs/2203.05482"))
register(MergeMethod("slerp", "SLERP", BasePolicy.REQUIRED, (Parameter("t", float, valid=UNIT),),
                     min_models=1, max_models=1, chunkable=True, prepare_ref="spherical:prepare_slerp",
                     reference="https://en.wikipedia.org/wiki/Slerp"))
register(MergeMethod("nuslerp", "NuSLERP", BasePolicy.OPTIONAL,
                     (WEIGHT, Parameter("nuslerp_row_wise", bool, False), Parameter("nuslerp_flatten", bool, True)),
                     min_models=2, max_models=2, merge_ref="spherical:nuslerp"))
register(MergeMethod("multislerp", "Multi-SLERP", BasePolicy.OPTIONAL,
                     (WEIGHT, Parameter("normalize_weights", bool, True), Parameter("eps", float, 1e-8)),
                     merge_ref="spherical:multislerp", reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"))
register(MergeMethod("karcher", "Karcher mean", BasePolicy.IGNORED,
                     (Parameter("max_iter", int, 10), Parameter("tol", float, 1e-5)),
                     merge_ref="spherical:karcher", reference="https://en.wikipedia.org/wiki/Karcher_mean"))


def task_arithmetic_method(name: str, title: str, *, sparsification_method: Optional[str] = None,
                           consensus_method: Optional[str] = None, default_normalize: bool = False,
                           default_rescale: bool = False, reference: str) -> MergeMethod:
    """A method of mergekit's generalized task arithmetic, declared with mergekit's own words."""
    params = [
        Parameter("int8_mask", bool, False),
        Parameter("normalize", bool, default_normalize),
        Parameter("rescale", bool, default_rescale),
        Parameter("lambda", float, 1.0, usual=Range(0, 10)),
        WEIGHT,
        Parameter("density", float, 1.0, per_model=True, valid=UNIT),
    ]
    if sparsification_method == "magnitude_outliers":
        params.append(Parameter("gamma", float, 0.01, per_model=True, valid=UNIT))
    if sparsification_method == "della_magprune":
        params.append(Parameter("epsilon", float, 0.15, per_model=True, valid=Range(0, 0.5, high_open=True)))
    return register(MergeMethod(
        name, title, BasePolicy.REQUIRED, tuple(params),
        randomized=sparsification_method in ("random", "della_magprune"),
        chunkable=sparsification_method in (None, "magnitude", "random"),
        prepare_ref="task_vectors:TaskVectorMerge",
        options={"sparsification": sparsification_method, "consensus": consensus_method},
        check=della_window_problem if sparsification_method == "della_magprune" else None,
        reference=reference))


task_arithmetic_method("task_arithmetic", "Task arithmetic", reference="https://arxiv.org/abs/2212.04089")
task_arithmetic_method("ties", "TIES", sparsification_method="magnitude", consensus_method="sum",
                       default_normalize=True, reference="https://arxiv.org/abs/2306.01708")
task_arithmetic_method("dare_ties", "DARE-TIES", sparsification_method="random", consensus_method="sum",
                       default_rescale=True, reference="https://arxiv.org/abs/2311.03099")
task_arithmetic_method("dare_linear", "DARE (linear)", sparsification_method="random", default_rescale=True,
                       reference="https://arxiv.org/abs/2311.03099")
task_arithmetic_method("breadcrumbs", "Model Breadcrumbs", sparsification_method="magnitude_outliers",
                       reference="https://arxiv.org/abs/2312.06795")
task_arithmetic_method("breadcrumbs_ties", "Model Breadcrumbs + TIES", sparsification_method="magnitude_outliers",
                       consensus_method="sum", reference="https://arxiv.org/abs/2312.06795")
task_arithmetic_method("della", "DELLA", sparsification_method="della_magprune", consensus_method="sum",
                       default_normalize=True, default_rescale=True, reference="https://arxiv.org/abs/2406.11617")
task_arithmetic_method("della_linear", "DELLA (linear)", sparsification_method="della_magprune",
                       default_rescale=True, reference="https://arxiv.org/abs/2406.11617")

register(MergeMethod("model_stock", "Model Stock", BasePolicy.REQUIRED, (Parameter("filter_wise", bool, False),),
                     min_models=2, merge_ref="selective:model_stock", reference="https://arxiv.org/abs/2403.19522"))
register(MergeMethod("sce", "SCE", BasePolicy.REQUIRED,
                     (Parameter("int8_mask", bool, False), Parameter("select_topk", float, 1.0, valid=UNIT)),
                     merge_ref="selective:sce", reference="https://arxiv.org/abs/2408.07990"))
register(MergeMethod("nearswap", "NearSwap", BasePolicy.REQUIRED, (Parameter("t", float),),
                     min_models=1, max_models=1, chunkable=True, merge_ref="linear:nearswap",
                     reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"))
register(MergeMethod("arcee_fusion", "Arcee Fusion", BasePolicy.REQUIRED, (), min_models=1, max_models=1,
                     randomized=True, merge_ref="selective:arcee_fusion", reference="https://arcee.ai"))
register(MergeMethod("ram", "Reinforced Agent Merging", BasePolicy.REQUIRED, (Parameter("epsilon", float, 1e-5),),
                     merge_ref="selective:ram", reference="https://arxiv.org/abs/2601.13572"))
register(MergeMethod("ramplus_tl", "RAM+ (tensor-local)", BasePolicy.REQUIRED,
                     (Parameter("r", float, 0.1), Parameter("alpha", float, 0.2), Parameter("epsilon", float, 1e-5)),
                     merge_ref="selective:ramplus_tl", reference="https://arxiv.org/abs/2601.13572"))
register(MergeMethod("passthrough", "Passthrough", BasePolicy.IGNORED,
                     (Parameter("scale", float, None, per_model=True, optional=True),),
                     max_models=1, chunkable=True, merge_ref="linear:passthrough",
                     copies=lambda params: params["scale"] == [None]))

# Not a `merge_method`: the copy a mixture of experts (`merging.moe`) makes of each expert's tensors,
# with mergekit-moe's per-expert noise and residual scale. It streams through the engine like a merge, in
# chunks, except tensors with noise: those are planned `whole`, so the noise follows the seed alone.
EXPERT_COPY = MergeMethod("moe", "Mixture of Experts", BasePolicy.IGNORED,
                          (Parameter("noise_scale", float, None, optional=True),
                           Parameter("residual_scale", float, None, optional=True)),
                          max_models=1, randomized=True, chunkable=True, merge_ref="linear:expert_copy",
                          narrow_ref="linear:expert_copy_narrow",
                          copies=lambda params: params["noise_scale"] is None and params["residual_scale"] is None,
                          reference="https://github.com/arcee-ai/mergekit/blob/main/docs/moe.md")
