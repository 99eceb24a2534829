"""YAML written by someone else (model cards, embedded and pasted configs), read with limits.

PyYAML builds aliases as shared references, so "aliases of aliases" cost nothing to load but
expand to billions of elements in whatever walks or copies the result (JSON, a card, a deep
copy); and its composer recurses once per nesting level, so ten thousand levels exhaust the
stack. Here the text's size, its nesting and the number of nodes it stands for once aliases are
expanded are bounded before a single Python object is built.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import yaml

MAX_CHARS = 256 * 1024  # a 2,000-layer slice list is about 100 KB
MAX_DEPTH = 64
MAX_NODES = 100_000  # counted with every alias expanded

_FRONT_MATTER = re.compile(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", re.S)


class UnsafeYAML(ValueError):
    """The text is over one of the limits: one line saying which."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise UnsafeYAML(f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document with every alias expanded, counted in time linear in distinct nodes."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise UnsafeYAML("an alias refers to a node that contains it")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        open_nodes.discard(key)
        if total > MAX_NODES:
            raise UnsafeYAML(f"its aliases expand to more than {MAX_NODES:,} values")
        sizes[key] = total
        return total

    return size(root)


_BRACKETS = re.compile(r"[\[\]{}]")
_INDENT = re.compile(r"^( *)", re.M)


def _plainly_within_limits(text: str) -> bool:
    """True when `text` has no anchors or aliases and is visibly shallow (brackets and indentation),
    so libyaml's C parser can read it: most cards and configs, ten times faster."""
    if "&" in text or "*" in text:
        return False
    depth = deepest = 0
    for bracket in _BRACKETS.finditer(text):
        depth += 1 if bracket.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest <= MAX_DEPTH // 2 and max((len(m.group(1)) for m in _INDENT.finditer(text)), default=0) <= MAX_DEPTH


def load(text: str) -> Any:
    """`yaml.safe_load` within the limits: raises `UnsafeYAML` past them, `yaml.YAMLError` on bad syntax."""
    if len(text) > MAX_CHARS:
        raise UnsafeYAML(f"it is {len(text) / 1024:,.0f} KB, over the {MAX_CHARS // 1024} KB limit")
    if getattr(yaml, "CSafeLoader", None) is not None and _plainly_within_limits(text):
        return yaml.load(text, Loader=yaml.CSafeLoader)  # the C twin of SafeLoader
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def split_front_matter(card: str) -> tuple[Optional[str], str]:
    """(the YAML front matter's text or None, the card's body)."""
    match = _FRONT_MATTER.match(card)
    return (match.group(1), card[match.end():]) if match else (None, card)


def front_matter(card: Optional[str]) -> tuple[Optional[dict], Optional[str]]:
    """(a card's metadata mapping or None, why it could not be read or None)."""
    meta_text, _ = split_front_matter(card or "")
    if meta_text is None:
        return None, None
    try:
        meta = load(meta_text)
    except UnsafeYAML as exc:
        return None, f"card metadata refused: {exc}"
    except yaml.YAMLError:
        return None, "card metadata (YAML front matter) does not parse"
    if meta is not None and not isinstance(meta, dict):
        return None, "card metadata (YAML front matter) is not a mapping"
    return meta, None
