"""Stage 4: the merged model's card (README.md).

The metadata lets the Hub and lineage tools see the merge: every Hub parent in `base_model`,
`base_model_relation: merge`. The body keeps mergekit's wording ("The following models were
included in the merge:", "using [X](...) as a base") because the community's lineage tools, ours
included, read it, and it embeds the exact YAML config.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

import yaml

from .config import MergeConfig, ModelRef
from .moe import Expert, MoEConfig

if TYPE_CHECKING:
    from .plan import MergePlan

HUB = "https://huggingface.co"


def _link(ref: ModelRef) -> str:
    own = f"[{ref.path}]({HUB}/{ref.path})" if ref.hub_id else f"`{ref.path}`"
    return f"{own} + {_link(ref.adapter)}" if ref.adapter is not None else own


def shared_license(licenses: list[Optional[str]]) -> Optional[str]:
    """The license every parent declares, or None when any is missing or they differ."""
    unique = set(licenses)
    return licenses[0] if licenses and len(unique) == 1 and licenses[0] else None


def render_card(plan: "MergePlan", title: Optional[str] = None) -> str:
    config = plan.config
    parents = [m.ref for m in plan.models]
    # a model with an adapter has two parents: the model and the adapter
    hub_parents = list(dict.fromkeys(part.path for m in plan.models for part in m.parents if part.hub_id))
    license_ = shared_license([m.license for m in plan.models])
    meta: dict = {}
    if hub_parents:
        meta["base_model"] = hub_parents
    meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "mergekit", "mergeline"]
    if license_:
        meta["license"] = license_
    title = title or f"{config.method.title} merge of {', '.join(ref.path.split('/')[-1] for ref in parents)}"
    moe = isinstance(config, MoEConfig)
    if moe:
        meta["tags"].append("moe")

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", f"# {title}", ""]
    lines += _moe_details(config) if moe else _merge_details(config, parents)
    if not license_:
        licenses = sorted({m.license or "unknown" for m in plan.models})
        lines += ["### License", "",
                  f"The parents declare different or missing licenses ({', '.join(licenses)}); check each "
                  f"parent's terms before using or sharing this model.", ""]
    if plan.warnings:
        lines += ["### Notes", "", *[f"* {w}" for w in plan.warnings], ""]
    lines += [
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        config.text.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _merge_details(config: MergeConfig, parents: list[ModelRef]) -> list[str]:
    base = config.base_model
    others = [ref for ref in parents if ref != base]
    method_link = f"[{config.method.title}]({config.method.reference})" if config.method.reference \
        else config.method.title
    return [
        "This is a merge of pre-trained language models created with mergeline from a "
        "[mergekit](https://github.com/arcee-ai/mergekit)-compatible config.",
        "",
        "## Merge Details",
        "### Merge Method",
        "",
        f"This model was merged using the {method_link} merge method"
        + (f" using {_link(base)} as a base." if base else "."),
        "",
        "### Models Merged",
        "",
        "The following models were included in the merge:",
        *[f"* {_link(ref)}" for ref in others],
        "",
    ]


def _moe_details(config: MoEConfig) -> list[str]:
    def expert_line(expert: Expert) -> str:
        prompts = "; ".join(expert.positive_prompts[:3]) + ("; ..." if len(expert.positive_prompts) > 3 else "")
        return f"* {_link(expert.model)}" + (f": routed by prompts like {json.dumps(prompts)}" if prompts else "")

    lines = [
        "This is a mixture of experts built with mergeline from a "
        "[mergekit-moe](https://github.com/arcee-ai/mergekit/blob/main/docs/moe.md)-compatible config.",
        "",
        "## Merge Details",
        "### Merge Method",
        "",
        f"Attention, norms and embeddings come from {_link(config.base_model)}; each layer's MLP comes from every "
        f"expert, and a router picks {config.experts_per_token} of the {len(config.experts)} experts per token "
        f"(gate mode `{config.gate_mode}`).",
        "",
        "### Experts",
        "",
        *[expert_line(e) for e in config.experts],
        "",
    ]
    if config.shared_experts:
        lines += ["### Shared Expert", "", *[expert_line(e) for e in config.shared_experts], ""]
    return lines
