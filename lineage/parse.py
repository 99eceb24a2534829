"""Stage 2: parent links from the evidence in one `ModelRecord`.

Sources, each recorded on the link it produced:

- ``card_metadata``: `base_model` (string or list) and `base_model_relation` in the card's YAML;
- ``hub_relation``: the Hub's `baseModels` data and its `base_model:<relation>:<id>` tags;
- ``mergekit_config``: mergekit_config.yml / merge.yml / mergekit_moe_config.yml, and ```yaml blocks
  of the README that contain `merge_method` or `experts` (method and per-parent weight/t/density);
- ``card_template``: the lists mergekit and LazyMergeKit write into cards ("The following models
  were included in the merge:", "... is a merge of the following models", "using [X](...) as a base");
- ``tags``: old cards that list parents only as tags (kept only if the repo exists; the crawl checks);
- ``reported``: links a curated snapshot records from elsewhere (`reportedParents` in its model info,
  each with the evidence it was read from), used by the offline demo.

Free prose ("inspired by", "see also", dataset and quantization links) never produces a link.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import yaml

from merging import untrusted_yaml
from merging.hub import repo_id_problem
from merging.refs import shown

from .fetch import CONFIG_FILES, RELATIONS, ModelRecord

HUB_URL = re.compile(r"^https?://huggingface\.co/")
_LINK = re.compile(r"\[[^\]]*\]\(https?://huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+?)/?\)")
MAX_PARENTS = 64  # per card: merges name a handful; a card listing thousands would cost a request each
_YAML_BLOCK = re.compile(r"```\s*(?:ya?ml)?\s*\n(.*?)```", re.S)
_LIST_HEADERS = re.compile(r"(The following models were included in the merge:"
                           r"|is a merge of the following models[^\n]*)")
_BASE_SENTENCE = re.compile(r"using\s+\[[^\]]*\]\(https?://huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+?)/?\)\s+as\s+a\s+base")
_NOT_PARENT_TAGS = ("base_model:", "dataset:", "datasets:", "license:", "arxiv:", "region:", "doi:", "endpoints_",
                    "autotrain", "model-index", "co2_eq")
_QUANT_TAGS = {"gguf", "gptq", "awq", "exl2", "4-bit", "8-bit", "bitsandbytes", "quantized", "mlx", "hqq"}
_ADAPTER_TAGS = {"lora", "peft", "adapter"}
SOURCE_ORDER = ("card_metadata", "hub_relation", "mergekit_config", "card_template", "reported", "tags")


@dataclass
class ParentLink:
    parent: str
    relation: str  # merge | finetune | adapter | quantized | unknown
    sources: set[str] = field(default_factory=set)
    params: dict[str, Any] = field(default_factory=dict)  # method, weight, t, density, role, layer_range
    needs_check: bool = False  # only tag evidence: keep it only if the parent repo exists


@dataclass
class ParsedRecord:
    links: dict[str, ParentLink]
    notes: list[str]
    card_status: str = "ok"  # ok | unparsable | none


def normalize_id(ref: str) -> Optional[str]:
    """A Hub repo id (`org/name`) from a config/card reference, URL prefix and `@revision` removed;
    None when what remains is not a valid repo id."""
    if not isinstance(ref, str):
        return None
    text = HUB_URL.sub("", ref.strip()).strip("/")
    text = text.split("@", 1)[0]
    return text if "/" in text and repo_id_problem(text) is None else None


def split_lora(ref: str) -> list[str]:
    """`model+lora@rev` -> [model, lora]; the LoRA is a parent too."""
    return [p for p in (normalize_id(part) for part in str(ref).split("+")) if p]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def mergekit_configs(record: ModelRecord, notes: Optional[list[str]] = None) -> list[dict]:
    """Every mergekit config the repo carries: config files first, then README yaml blocks. A text
    over the YAML limits is skipped with a note (it may be hostile); one that does not parse, quietly."""
    found = []
    texts = [(name, record.files[name]) for name in CONFIG_FILES if name in record.files]
    _, body = untrusted_yaml.split_front_matter(record.card or "")
    texts += [("a README yaml block", block) for block in _YAML_BLOCK.findall(body)
              if "merge_method" in block or "experts" in block]
    for name, text in texts:
        try:
            config = untrusted_yaml.load(text)
        except untrusted_yaml.UnsafeYAML as exc:
            if notes is not None:
                notes.append(f"{name} refused: {exc}")
            continue
        except yaml.YAMLError:
            continue
        if isinstance(config, dict) and ("merge_method" in config or "experts" in config):
            found.append(config)
    return found


def _numeric(setting: Any) -> Optional[float]:
    """A representative number for a parameter setting: the mean of every number in it."""
    numbers: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            numbers.append(float(value))
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            walk(value.get("value"))

    walk(setting)
    return sum(numbers) / len(numbers) if numbers else None


def _config_links(config: dict, keep_local: bool = False) -> list[tuple[str, dict]]:
    """(parent, parameters) for every model a mergekit config reads; `keep_local` keeps non-Hub paths."""
    method = config.get("merge_method") or ("moe" if "experts" in config else None)
    top = config.get("parameters") if isinstance(config.get("parameters"), dict) else {}
    result: list[tuple[str, dict]] = []

    def add(ref: Any, params: Optional[dict], role: Optional[str] = None, layer_range=None) -> None:
        parts = split_lora(ref) if isinstance(ref, str) else []
        if not parts and keep_local and isinstance(ref, str) and ref.strip():
            parts = [ref.strip()]
        for index, parent in enumerate(parts):
            entry: dict[str, Any] = {"method": method}
            if role:
                entry["role"] = role
            if index > 0:
                entry["lora_of"] = parts[0]
            merged = {**top, **(params or {})} if isinstance(params, dict) or top else {}
            for key in ("weight", "t", "density"):
                if key in merged:
                    entry[key] = merged[key]
            if layer_range is not None:
                entry["layer_range"] = layer_range
            result.append((parent, entry))

    base = config.get("base_model")
    if base:
        add(base, None, "base_model")
    for item in _as_list(config.get("models")):
        if isinstance(item, dict):
            add(item.get("model"), item.get("parameters"))
        elif isinstance(item, str):
            add(item, None)
    for out in _as_list(config.get("slices")):
        for src in _as_list(out.get("sources") if isinstance(out, dict) else None):
            if isinstance(src, dict):
                add(src.get("model"), src.get("parameters"), layer_range=src.get("layer_range"))
    for key, role in (("experts", "expert"), ("shared_experts", "shared expert")):
        for expert in _as_list(config.get(key)):
            if isinstance(expert, dict):
                add(expert.get("source_model"), None, role)
    return result


def _template_links(card: Optional[str]) -> list[tuple[str, dict]]:
    if not card:
        return []
    result = []
    for match in _LIST_HEADERS.finditer(card):
        for line in card[match.end():].lstrip("\n").splitlines():
            stripped = line.strip()
            if not stripped.startswith(("*", "-")):
                break
            result += [(m, {}) for m in _LINK.findall(stripped)]
    result += [(m, {"role": "base_model"}) for m in _BASE_SENTENCE.findall(card)]
    return result


def infer_relation(record: ModelRecord, parent_count: int, has_config: bool) -> str:
    """The relation to a parent when the card does not say: from structure, never from prose."""
    tags = {t.lower() for t in record.info.get("tags", []) if isinstance(t, str)}
    siblings = {s.get("rfilename", "") for s in record.info.get("siblings", [])}
    if has_config or {"merge", "mergekit"} & tags:
        return "merge"
    if tags & _QUANT_TAGS or any(f.endswith(".gguf") for f in siblings):
        return "quantized"
    if tags & _ADAPTER_TAGS or "adapter_config.json" in siblings:
        return "adapter"
    return "merge" if parent_count > 1 else "finetune"


def parse_record(record: ModelRecord) -> ParsedRecord:
    """Every parent link the record's evidence supports, duplicates merged into one link per parent."""
    notes: list[str] = []
    meta, problem = untrusted_yaml.front_matter(record.card)
    card_status = "none" if record.card is None else ("unparsable" if problem else "ok")
    if problem:
        notes.append(problem)
    hub_card = record.info.get("cardData")
    card_data = {**(meta or {}), **(hub_card if isinstance(hub_card, dict) else {})}
    configs = mergekit_configs(record, notes)
    declared = card_data.get("base_model_relation")
    declared = declared if declared in RELATIONS else None

    raw: list[tuple[str, str, Optional[str], dict]] = []  # (parent, source, explicit relation, params)
    for ref in _as_list(card_data.get("base_model")):
        parents = split_lora(ref)
        if not parents:
            notes.append(f"base_model entry {shown(ref, 60)} is not a Hub repo id; ignored")
        for parent in parents:
            raw.append((parent, "card_metadata", declared, {}))
    for parent, relation in _hub_relations(record.info):
        raw.append((parent, "hub_relation", relation, {}))
    for config in configs:
        for parent, params in _config_links(config):
            raw.append((parent, "mergekit_config", "merge", params))
    for parent, params in _template_links(record.card):
        raw.append((parent, "card_template", "merge", params))
    for reported in _as_list(record.info.get("reportedParents")):
        parent = normalize_id(reported.get("id", "")) if isinstance(reported, dict) else None
        if parent:
            relation = reported.get("relation") if reported.get("relation") in RELATIONS else None
            raw.append((parent, "reported", relation, {"evidence": reported.get("evidence", "")}))
    for tag in record.info.get("tags", []):
        if isinstance(tag, str) and "/" in tag and not tag.startswith(_NOT_PARENT_TAGS):
            parent = normalize_id(tag)
            if parent:
                raw.append((parent, "tags", None, {}))

    grouped: dict[str, list[tuple[str, Optional[str], dict]]] = {}
    for parent, source, relation, params in raw:
        if parent.lower() == record.id.lower():
            notes.append(f"self-reference to {parent} in {source} dropped")
            continue
        grouped.setdefault(parent, []).append((source, relation, params))
    if len(grouped) > MAX_PARENTS:
        notes.append(f"the card names {len(grouped):,} parents; kept the first {MAX_PARENTS}")
        grouped = dict(list(grouped.items())[:MAX_PARENTS])
    fallback = infer_relation(record, len(grouped), bool(configs))
    links: dict[str, ParentLink] = {}
    for parent, items in grouped.items():
        items.sort(key=lambda item: _rank(item[0]))
        explicit = [relation for _, relation, _ in items if relation]
        if len(set(explicit)) > 1:
            notes.append(f"{parent}: evidence disagrees on the relation ({', '.join(sorted(set(explicit)))}); "
                         f"kept {explicit[0]}")
        params: dict[str, Any] = {}
        for _, _, item_params in items:
            for key, value in item_params.items():
                params.setdefault(key, value)
        sources = {source for source, _, _ in items}
        links[parent] = ParentLink(parent, explicit[0] if explicit else fallback, sources, params,
                                   needs_check=sources == {"tags"})
    return ParsedRecord(links, sorted(set(notes), key=notes.index), card_status)


def _rank(source: str) -> int:
    return SOURCE_ORDER.index(source)


def _hub_relations(info: dict) -> Iterable[tuple[str, Optional[str]]]:
    base_models = info.get("baseModels")
    for group in _as_list(base_models):
        if isinstance(group, dict):
            relation = group.get("relation") if group.get("relation") in RELATIONS else None
            for model in _as_list(group.get("models")):
                parent = normalize_id(model.get("id") if isinstance(model, dict) else model)
                if parent:
                    yield parent, relation
    for tag in info.get("tags", []):
        if isinstance(tag, str) and tag.startswith("base_model:"):
            rest = tag[len("base_model:"):]
            relation, _, target = rest.partition(":")
            if target and relation in RELATIONS:
                parent = normalize_id(target)
                if parent:
                    yield parent, relation
            elif not target:
                parent = normalize_id(rest)
                if parent:
                    yield parent, None
