"""mergeline's lineage tools: model cards on the Hub -> a networkx genealogy -> pyvis and exports.

Pipeline: `fetch` (records from the Hub, a cache or a snapshot) -> `parse` (parent links and their
evidence) -> `graph` (crawl, cycles, roots, composition) -> `render` (the interactive pyvis page) and
`export` (JSON, GraphML, Mermaid, SVG). `licenses` holds the Hub's license ids by family.
"""

from .export import to_graphml, to_json, to_mermaid, to_svg
from .fetch import (
    DiskCache,
    HubSource,
    LineageError,
    ModelRecord,
    RecordingSource,
    SnapshotSource,
    default_cache_dir,
)
from .graph import (
    CrawlOptions,
    build_lineage,
    composition,
    composition_text,
    find_cycles,
    merge_preview,
    percentages,
    roots,
    text_tree,
)
from .licenses import check_licenses, conflict_text, license_family, required_license
from .parse import parse_record
from .render import embed, render_html

__all__ = [
    "CrawlOptions", "DiskCache", "HubSource", "LineageError", "ModelRecord", "RecordingSource", "SnapshotSource",
    "build_lineage", "check_licenses", "composition", "composition_text", "conflict_text", "default_cache_dir",
    "embed", "find_cycles", "license_family", "merge_preview", "parse_record", "percentages", "render_html",
    "required_license", "roots", "text_tree", "to_graphml", "to_json", "to_mermaid", "to_svg",
]
