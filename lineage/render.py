"""Stage 4: draw the genealogy as an interactive pyvis / vis-network page.

The page is self-contained: vis-network's script and stylesheet (shipped inside pyvis) are
inlined, so it works inside an iframe `srcdoc` with no CDN. Every string that came from a card
or the Hub is untrusted: it is JSON-encoded with `<`, `>` and `&` as unicode escapes inside the
script, so no card text can open a tag, and vis-network shows tooltips as text (`innerText`).

What a reader sees: a node's colour is its own relation to its parents (or its license family),
whatever direction or depth was drawn, with roots in a colour of their own; a dashed outline
marks where the crawl stopped. The page follows the reader's light or dark colour scheme, fits
the graph on load without shrinking labels past reading, and zooms with Ctrl+wheel or after a
click, so the wheel scrolls the page around it.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import networkx as nx

from .licenses import conflict_text, license_family

# Mid-tone colours that read on a white and on a near-black page alike.
RELATION_COLORS = {"root": "#e67e22", "merge": "#9b59b6", "finetune": "#3498db", "adapter": "#1abc9c",
                   "quantized": "#95a5a6", "unknown": "#7f8c8d"}
LICENSE_COLORS = {"permissive": "#27ae60", "copyleft": "#2e86c1", "custom": "#f39c12", "non-commercial": "#e74c3c",
                  "unknown": "#95a5a6"}
CONFLICT_BORDER = "#e74c3c"
# Edge verdicts of `lineage.weights`: solid where the weights bear the card out, red where they do not.
CONFIRMED = ("consistent", "verified merge")
CONTRADICTED = ("unrelated", "config does not reproduce the weights")
STATUS_SHAPES = {"ok": "dot", "missing": "diamond", "gated": "square", "private": "square", "error": "triangle"}
TARGET_BORDER = "#f1c40f"
LEVEL_SEPARATION = 120
LEGEND_PX = 88  # the legend above the graph: room for four lines on a phone, the graph takes what is left


def node_color(data: dict, color_by: str = "relation") -> str:
    if color_by == "license":
        return LICENSE_COLORS[license_family(data.get("license"))]
    return RELATION_COLORS.get(data.get("relation") or "unknown", RELATION_COLORS["unknown"])


def graph_height(graph: nx.DiGraph) -> int:
    """Pixels the drawing needs: its generations stacked at LEVEL_SEPARATION, within [360, 900]."""
    levels = len({g for _, g in graph.nodes(data="generation", default=0)}) or 1
    return max(360, min(900, 120 + LEVEL_SEPARATION * levels))


def _vis_assets() -> tuple[str, str]:
    import pyvis

    lib = Path(pyvis.__file__).parent / "templates" / "lib"
    folder = max(lib.glob("vis-*"), key=lambda p: p.name)
    return (folder / "vis-network.min.js").read_text(), (folder / "vis-network.css").read_text()


def _script_json(value) -> str:
    """JSON safe to embed in a <script>: no character of it can close the tag or start markup."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def node_title(node: str, data: dict) -> str:
    rows = [("status", data.get("status", "")), ("relation", data.get("relation", "")),
            ("license", data.get("license") or "unknown"), ("downloads", f"{data.get('downloads', 0):,}"),
            ("likes", data.get("likes", 0)), ("generation", data.get("generation")),
            ("tags", ", ".join(data.get("tags", [])[:12]))]
    if data.get("cut"):
        rows.append(("crawl stopped here", data["cut"]))
    if data.get("license_conflict"):
        rows.append(("license conflict", conflict_text(data)))
    if data.get("suggested_parent"):
        rows.append(("suggested parent", f"{data['suggested_parent']['id']} (cosine "
                                         f"{data['suggested_parent']['cosine']:.3f} on sampled weights)"))
    rows += [("note", n) for n in data.get("notes", [])]
    return "\n".join([node] + [f"{k}: {v}" for k, v in rows if v not in ("", None)])


def edge_title(parent: str, child: str, data: dict) -> str:
    lines = [f"{parent} -> {child}", f"relation: {data.get('relation')}"]
    for key in ("method", "role", "weight", "t", "density", "layer_range", "lora_of", "weights", "weights_cosine",
                "weights_distance", "weights_reason"):
        if key in data:
            lines.append(f"{key}: {json.dumps(data[key]) if not isinstance(data[key], str) else data[key]}")
    lines.append(f"evidence: {', '.join(data.get('sources', []))}")
    return "\n".join(lines)


def build_network(graph: nx.DiGraph, *, color_by: str = "relation", physics: bool = False):
    """A pyvis Network of the graph: hierarchical top-down by default, physics on request."""
    from pyvis.network import Network

    net = Network(directed=True, height=f"{graph_height(graph)}px", width="100%", cdn_resources="remote")
    target = graph.graph.get("target")
    max_downloads = max([d.get("downloads", 0) for _, d in graph.nodes(data=True)] + [1])
    for node, data in graph.nodes(data=True):
        color = node_color(data, color_by)
        conflict = bool(data.get("license_conflict"))
        border = TARGET_BORDER if node == target else CONFLICT_BORDER if conflict else color
        size = 14 + 22 * math.log1p(data.get("downloads", 0)) / math.log1p(max_downloads)
        label = data.get("label") or node
        net.add_node(node, label=f"\u26a0 {label}" if conflict else label, title=node_title(node, data),
                     color={"background": color, "border": border},
                     borderWidth=5 if node == target or conflict else (3 if data.get("cut") else 1), size=size,
                     shapeProperties={"borderDashes": [6, 4] if data.get("cut") else False},
                     shape=STATUS_SHAPES.get(data.get("status"), "dot"),
                     level=data.get("generation", 0), url=f"https://huggingface.co/{node}")
    checked = graph.graph.get("weights_checked", False)
    for parent, child, data in graph.edges(data=True):
        verdict = data.get("weights")
        contradicted = verdict in CONTRADICTED
        net.add_edge(parent, child, title=edge_title(parent, child, data), arrows="to",
                     dashes=checked and verdict not in CONFIRMED and not contradicted, width=3 if contradicted else 2,
                     color=CONFLICT_BORDER if contradicted else
                     RELATION_COLORS.get(data.get("relation"), RELATION_COLORS["unknown"]))
    options = {
        "layout": {"hierarchical": {"enabled": not physics, "direction": "UD", "sortMethod": "directed",
                                    "levelSeparation": LEVEL_SEPARATION, "nodeSpacing": 320}},
        "physics": {"enabled": physics, "stabilization": {"iterations": 200}},
        "interaction": {"hover": True, "tooltipDelay": 120, "zoomView": False},
        "edges": {"smooth": {"type": "cubicBezier"}, "width": 2},
        "nodes": {"font": {"size": 18}},
    }
    net.set_options(json.dumps(options))
    return net


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}
:root {{ color-scheme: light dark; --ink: #1f2328; --paper: #ffffff; --line: #d0d7de; }}
@media (prefers-color-scheme: dark) {{ :root {{ --ink: #e6edf3; --paper: #0d1117; --line: #30363d; }} }}
html, body {{ margin: 0; height: 100%; font-family: system-ui, sans-serif; color: var(--ink);
  background: var(--paper); }}
body {{ display: flex; flex-direction: column; }}
#lineage {{ flex: 1 1 auto; min-height: {min_height}px; width: 100%; border: 1px solid var(--line);
  box-sizing: border-box; }}
#legend {{ flex: 0 0 auto; font-size: 13px; line-height: 1.6; padding: 4px 8px; }}
#legend span {{ display: inline-block; margin-right: 12px; }}
#legend i {{ display: inline-block; width: 11px; height: 11px; border-radius: 6px; margin-right: 4px; }}
div.vis-tooltip {{ white-space: pre-line; max-width: 420px; color: var(--ink); background: var(--paper);
  border: 1px solid var(--line); font-family: system-ui, sans-serif; }}
</style>
<script>{js}</script></head>
<body><div id="legend">{legend_html}</div><div id="lineage"></div>
<script>
var dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
var ink = dark ? "#e6edf3" : "#1f2328", paper = dark ? "#0d1117" : "#ffffff";
var nodes = new vis.DataSet({nodes});
var edges = new vis.DataSet({edges});
var options = {options};
options.nodes.font.color = ink;
options.nodes.font.strokeWidth = 3;
options.nodes.font.strokeColor = paper;
var container = document.getElementById("lineage");
var network = new vis.Network(container, {{nodes: nodes, edges: edges}}, options);
var READABLE = 0.6;  // the smallest zoom at which labels stay readable
function fit() {{
  network.fit();
  if (network.getScale() < READABLE) {{
    var target = {target};
    var focus = target && nodes.get(target) ? network.getPosition(target) : network.getViewPosition();
    network.moveTo({{position: focus, scale: READABLE}});
  }}
}}
network.once("afterDrawing", fit);
window.addEventListener("resize", fit);
// The wheel scrolls the page; Ctrl+wheel, or the wheel after a click on the graph, zooms it.
container.addEventListener("click", function () {{ network.setOptions({{interaction: {{zoomView: true}}}}); }});
container.addEventListener("mouseleave", function () {{ network.setOptions({{interaction: {{zoomView: false}}}}); }});
container.addEventListener("wheel", function (event) {{
  if (!event.ctrlKey) return;
  event.preventDefault();
  network.moveTo({{scale: network.getScale() * (event.deltaY < 0 ? 1.15 : 1 / 1.15)}});
}}, {{passive: false}});
network.on("doubleClick", function (params) {{
  if (params.nodes.length) {{ window.open(nodes.get(params.nodes[0]).url, "_blank", "noopener"); }}
}});
</script></body></html>
"""


def legend_items(color_by: str) -> list[tuple[str, str]]:
    """(name, colour) of what node colours mean."""
    return list((LICENSE_COLORS if color_by == "license" else RELATION_COLORS).items())


def legend_html(color_by: str, checked: bool = False) -> str:
    items = "".join(f'<span><i style="background:{c}"></i>{html.escape(k)}</span>' for k, c in legend_items(color_by))
    return (items + "<span>&#9670; missing &#9632; gated/private &#9650; error</span>"
            "<span>yellow outline: the model asked for; dashed: the crawl stopped there; "
            "&#9888; red outline: license more permissive than an ancestor's</span>"
            + ("<span>edges: solid, the weights bear the card out; dashed, not checked or unknown; red, the "
               "weights contradict it</span>" if checked else ""))


def render_html(graph: nx.DiGraph, *, color_by: str = "relation", physics: bool = False) -> str:
    """A standalone interactive page (double-click a node to open its Hub page)."""
    net = build_network(graph, color_by=color_by, physics=physics)
    nodes, edges, _, _, _, options = net.get_network_data()
    js, css = _vis_assets()
    return _PAGE.format(title=html.escape(f"Lineage of {graph.graph.get('target', '')}"), css=css, js=js,
                        min_height=graph_height(graph) // 2,
                        legend_html=legend_html(color_by, graph.graph.get("weights_checked", False)),
                        nodes=_script_json(nodes), edges=_script_json(edges),
                        options=_script_json(json.loads(options)),
                        target=_script_json(graph.graph.get("target")))


def embed(graph: nx.DiGraph, *, color_by: str = "relation") -> str:
    """The page in an iframe `srcdoc` sized to the drawing, escaped so the host page never parses it."""
    page = render_html(graph, color_by=color_by)
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" title="family tree" '
            f'style="width:100%;height:{graph_height(graph) + LEGEND_PX + 8}px;border:0" '
            f'sandbox="allow-scripts allow-popups allow-popups-to-escape-sandbox"></iframe>')
