"""Stage 4: the merged model's card (README.md).

The metadata lets the Hub and lineage tools see the merge: every Hub parent in `base_model`,
`base_model_relation: merge`. The body keeps mergekit's wording ("The following models were
included in the merge:", "using [X](...) as a base") because the community's lineage tools, ours
included, read it, and it embeds the exact YAML config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import yaml

from .config import ModelRef

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

    base = config.base_model
    others = [ref for ref in parents if ref != base]
    method_link = f"[{config.method.title}]({config.method.reference})" if config.method.reference \
        else config.method.title
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
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
