"""Stage 4: draw the genealogy with pyvis, and export it as node-link JSON, GraphML and Mermaid.

The page is self-contained: vis-network's script and stylesheet (shipped inside pyvis) are
inlined, so it works inside an iframe `srcdoc` with no CDN. Every string that came from a card or
the Hub is untrusted: it is HTML-escaped for tooltips and JSON-encoded with `<`, `>` and `&` as
unicode escapes inside the script, so no card text can open a tag.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional

import networkx as nx

RELATION_COLORS = {"merge": "#8e44ad", "finetune": "#2980b9", "adapter": "#16a085", "quantized": "#7f8c8d",
                   "unknown": "#bdc3c7"}
LICENSE_COLORS = {"permissive": "#27ae60", "custom": "#f39c12", "non-commercial": "#c0392b", "unknown": "#95a5a6"}
STATUS_SHAPES = {"ok": "dot", "missing": "diamond", "gated": "square", "private": "square", "error": "triangle"}

# Hub license ids (https://huggingface.co/docs/hub/repositories-licenses) by what they allow.
LICENSE_FAMILIES: dict[str, str] = {
    **dict.fromkeys([
        "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "bsl-1.0", "isc",
        "zlib", "unlicense", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
        "cc-by-sa-4.0", "afl-3.0", "artistic-2.0", "ecl-2.0", "epl-1.0", "epl-2.0", "gpl", "gpl-2.0", "gpl-3.0",
        "lgpl", "lgpl-2.1", "lgpl-3.0", "lgpl-lr", "agpl-3.0", "mpl-2.0", "wtfpl", "postgresql", "ncsa", "ofl-1.1",
        "pddl", "odc-by", "odbl", "osl-3.0", "lppl-1.3c", "eupl-1.1", "eupl-1.2", "cdla-permissive-1.0",
        "cdla-permissive-2.0", "cdla-sharing-1.0", "c-uda", "etalab-2.0", "gfdl", "pddl", "openrail",
    ], "permissive"),
    **dict.fromkeys([
        "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "bigscience-openrail-m",
        "creativeml-openrail-m", "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "openrail++", "apple-ascl",
        "intel-research", "deepfloyd-if-license", "h-research", "fair-noncommercial-research-license",
    ], "custom"),
    **dict.fromkeys([
        "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0",
        "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cc-by-nd-4.0", "apple-amlr", "llama-research",
    ], "non-commercial"),
}


def license_family(license_id: Optional[str]) -> str:
    """permissive / custom (community licenses with conditions) / non-commercial / unknown."""
    return LICENSE_FAMILIES.get((license_id or "").strip().lower(), "unknown")


def _vis_assets() -> tuple[str, str]:
    import pyvis

    lib = Path(pyvis.__file__).parent / "templates" / "lib"
    folder = max(lib.glob("vis-*"), key=lambda p: p.name)
    return (folder / "vis-network.min.js").read_text(), (folder / "vis-network.css").read_text()


def _script_json(value) -> str:
    """JSON safe to embed in a <script>: no character of it can close the tag or start markup."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _node_title(node: str, data: dict) -> str:
    rows = [("status", data.get("status", "")), ("license", data.get("license") or "unknown"),
            ("downloads", f"{data.get('downloads', 0):,}"), ("likes", data.get("likes", 0)),
            ("generation", data.get("generation")), ("tags", ", ".join(data.get("tags", [])[:12]))]
    if data.get("cut"):
        rows.append(("crawl cut", data["cut"]))
    rows += [("note", n) for n in data.get("notes", [])]
    return "\n".join([node] + [f"{k}: {v}" for k, v in rows if v not in ("", None)])


def _edge_title(parent: str, child: str, data: dict) -> str:
    lines = [f"{parent} -> {child}", f"relation: {data.get('relation')}"]
    for key in ("method", "role", "weight", "t", "density", "layer_range", "lora_of"):
        if key in data:
            lines.append(f"{key}: {json.dumps(data[key]) if not isinstance(data[key], str) else data[key]}")
    lines.append(f"evidence: {', '.join(data.get('sources', []))}")
    return "\n".join(lines)


def build_network(graph: nx.DiGraph, *, color_by: str = "relation", physics: bool = False):
    """A pyvis Network of the graph: hierarchical top-down by default, physics on request."""
    from pyvis.network import Network

    net = Network(directed=True, height="640px", width="100%", cdn_resources="remote")
    target = graph.graph.get("target")
    max_downloads = max([d.get("downloads", 0) for _, d in graph.nodes(data=True)] + [1])
    incoming = {n: next(iter(graph.in_edges(n, data="relation")), (None, None, "unknown"))[2] for n in graph}
    for node, data in graph.nodes(data=True):
        if color_by == "license":
            color = LICENSE_COLORS[license_family(data.get("license"))]
        else:
            color = RELATION_COLORS.get(incoming[node] or "unknown", RELATION_COLORS["unknown"])
        size = 12 + 28 * math.log1p(data.get("downloads", 0)) / math.log1p(max_downloads)
        net.add_node(node, label=html.escape(node), title=html.escape(_node_title(node, data)),
                     color={"background": color, "border": "#f1c40f" if node == target else color},
                     borderWidth=5 if node == target else 1, size=size,
                     shape=STATUS_SHAPES.get(data.get("status"), "dot"),
                     level=data.get("generation", 0), url=f"https://huggingface.co/{node}")
    for parent, child, data in graph.edges(data=True):
        net.add_edge(parent, child, title=html.escape(_edge_title(parent, child, data)),
                     color=RELATION_COLORS.get(data.get("relation"), RELATION_COLORS["unknown"]),
                     label=html.escape(data.get("method") or data.get("relation", "")), arrows="to")
    options = {
        "layout": {"hierarchical": {"enabled": not physics, "direction": "UD", "sortMethod": "directed",
                                    "levelSeparation": 110, "nodeSpacing": 300}},
        "physics": {"enabled": physics, "stabilization": {"iterations": 200}},
        "interaction": {"hover": True, "tooltipDelay": 120},
        "edges": {"smooth": {"type": "cubicBezier"}, "font": {"size": 10, "align": "middle"}},
        "nodes": {"font": {"size": 13}},
    }
    net.set_options(json.dumps(options))
    return net


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>{css}
html, body {{ margin: 0; font-family: system-ui, sans-serif; }}
#lineage {{ width: 100%; height: {height}; border: 1px solid #ddd; box-sizing: border-box; }}
#legend {{ font-size: 12px; padding: 4px 8px; }}
#legend span {{ display: inline-block; margin-right: 12px; }}
#legend i {{ display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; }}
div.vis-tooltip {{ white-space: pre-line; max-width: 420px; }}
</style>
<script>{js}</script></head>
<body><div id="legend">{legend}</div><div id="lineage"></div>
<script>
var nodes = new vis.DataSet({nodes});
var edges = new vis.DataSet({edges});
var network = new vis.Network(document.getElementById("lineage"), {{nodes: nodes, edges: edges}}, {options});
network.once("afterDrawing", function () {{ network.fit(); }});
window.addEventListener("resize", function () {{ network.fit(); }});
network.on("doubleClick", function (params) {{
  if (params.nodes.length) {{ window.open(nodes.get(params.nodes[0]).url, "_blank", "noopener"); }}
}});
</script></body></html>
"""


def render_html(graph: nx.DiGraph, *, color_by: str = "relation", physics: bool = False) -> str:
    """A standalone interactive page (double-click a node to open its Hub page)."""
    net = build_network(graph, color_by=color_by, physics=physics)
    nodes, edges, _, height, _, options = net.get_network_data()
    js, css = _vis_assets()
    palette = LICENSE_COLORS if color_by == "license" else RELATION_COLORS
    legend = "".join(f'<span><i style="background:{c}"></i>{html.escape(k)}</span>' for k, c in palette.items())
    legend += "<span>&#9670; missing &#9632; gated/private &#9650; error; outlined: the target</span>"
    return _PAGE.format(title=html.escape(f"Lineage of {graph.graph.get('target', '')}"), css=css, js=js,
                        height=height, legend=legend, nodes=_script_json(nodes), edges=_script_json(edges),
                        options=_script_json(json.loads(options)))


def iframe(page: str, height: int = 700) -> str:
    """The page inside an iframe `srcdoc`, escaped so the host page never parses it as markup."""
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{height}px;border:0" '
            f'sandbox="allow-scripts allow-popups allow-popups-to-escape-sandbox"></iframe>')


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
