"""The genealogy as files: node-link JSON, GraphML, Mermaid and an SVG picture for model cards."""

from __future__ import annotations

import html
import json
from pathlib import Path

import networkx as nx


def to_json(graph: nx.DiGraph) -> dict:
    """networkx node-link data: edges under `edges`, `source` = parent, `target` = child."""
    return nx.node_link_data(graph, edges="edges")


def to_graphml(graph: nx.DiGraph, path: Path) -> None:
    """GraphML wants scalar attributes: lists and mappings are stored as JSON text."""
    flat = nx.DiGraph()
    scalar = (str, int, float, bool)
    for node, data in graph.nodes(data=True):
        flat.add_node(node, **{k: v if isinstance(v, scalar) else json.dumps(v) for k, v in data.items()})
    for u, v, data in graph.edges(data=True):
        flat.add_edge(u, v, **{k: x if isinstance(x, scalar) else json.dumps(x) for k, x in data.items()})
    flat.graph.update({k: v if isinstance(v, scalar) else json.dumps(v) for k, v in graph.graph.items()})
    nx.write_graphml(flat, str(path))


def to_mermaid(graph: nx.DiGraph) -> str:
    ids = {node: f"n{i}" for i, node in enumerate(sorted(graph))}

    def text(value: str) -> str:
        return html.escape(value, quote=True).replace("|", "&#124;")

    lines = ["graph TD"]
    for node in sorted(graph):
        lines.append(f'  {ids[node]}["{text(node)}"]')
    for parent, child, data in sorted(graph.edges(data=True)):
        label = data.get("method") or data.get("relation", "")
        lines.append(f"  {ids[parent]} -->|{text(label)}| {ids[child]}")
    target = graph.graph.get("target")
    if target in ids:
        lines.append(f"  style {ids[target]} stroke-width:4px")
    return "\n".join(lines) + "\n"


def to_svg(graph: nx.DiGraph, *, color_by: str = "relation") -> str:
    """A still picture of the family, generations top to bottom, for a model card (the Hub shows
    SVG images in cards). Labels are the model names; colours and outlines as on the live page."""
    from .render import RELATION_COLORS, TARGET_BORDER, legend_items, node_color

    rows: dict[int, list[str]] = {}
    for node, generation in sorted(graph.nodes(data="generation", default=0), key=lambda item: (item[1], item[0])):
        rows.setdefault(generation, []).append(node)
    col, row_height, margin, legend = 250, 110, 30, 40
    width = margin * 2 + col * max((len(r) for r in rows.values()), default=1)
    height = margin * 2 + legend + row_height * len(rows)
    where: dict[str, tuple[float, float]] = {}
    for level, (_, nodes) in enumerate(sorted(rows.items())):
        offset = (width - col * len(nodes)) / 2
        for k, node in enumerate(nodes):
            where[node] = (offset + col * (k + 0.5), margin + legend + row_height * (level + 0.5))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="system-ui, sans-serif" font-size="13">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#7f8c8d"/></marker></defs>',
             '<rect width="100%" height="100%" fill="#ffffff"/>']
    x = margin
    for name, color in legend_items(color_by):
        parts.append(f'<circle cx="{x + 6}" cy="{margin}" r="6" fill="{color}"/>'
                     f'<text x="{x + 16}" y="{margin + 4}" fill="#1f2328">{html.escape(name)}</text>')
        x += 24 + 8 * len(name)
    for parent, child, data in graph.edges(data=True):
        (x1, y1), (x2, y2) = where[parent], where[child]
        color = RELATION_COLORS.get(data.get("relation"), RELATION_COLORS["unknown"])
        parts.append(f'<line x1="{x1:.0f}" y1="{y1 + 14:.0f}" x2="{x2:.0f}" y2="{y2 - 16:.0f}" stroke="{color}" '
                     f'stroke-width="2" marker-end="url(#arrow)"><title>{html.escape(data.get("relation", ""))}'
                     f'</title></line>')
    target = graph.graph.get("target")
    for node, data in graph.nodes(data=True):
        cx, cy = where[node]
        border = TARGET_BORDER if node == target else node_color(data, color_by)
        dash = ' stroke-dasharray="5 3"' if data.get("cut") else ""
        parts.append(f'<circle cx="{cx:.0f}" cy="{cy:.0f}" r="12" fill="{node_color(data, color_by)}" '
                     f'stroke="{border}" stroke-width="{4 if node == target else 2}"{dash}/>'
                     f'<text x="{cx:.0f}" y="{cy + 30:.0f}" text-anchor="middle" fill="#1f2328">'
                     f'{html.escape(node if len(node) <= 34 else node[:33] + "…")}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"
