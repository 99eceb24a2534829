"""mergeline's lineage tools: model cards on the Hub -> a networkx genealogy -> pyvis and exports.

Pipeline: `fetch` (records from the Hub, a cache or a snapshot) -> `parse` (parent links and their
evidence) -> `graph` (crawl, cycles, roots, composition) -> `render` (pyvis page, JSON, GraphML,
Mermaid).
"""

from .fetch import DiskCache, HubSource, ModelRecord, RecordingSource, SnapshotSource, default_cache_dir
from .graph import CrawlOptions, build_lineage, composition, find_cycles, merge_preview, roots, text_tree
from .parse import parse_record
from .render import iframe, license_family, render_html, to_graphml, to_json, to_mermaid

__all__ = [
    "CrawlOptions", "DiskCache", "HubSource", "ModelRecord", "RecordingSource", "SnapshotSource", "build_lineage",
    "composition", "default_cache_dir", "find_cycles", "iframe", "merge_preview", "license_family", "parse_record",
    "render_html", "roots", "text_tree", "to_graphml", "to_json", "to_mermaid",
]
