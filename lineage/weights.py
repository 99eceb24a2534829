"""Parents checked against the weights: what cards claim, measured on a sample of rows.

For every edge whose parent and child both have safetensors on the Hub, the same few rows of the
same few tensors are read from each (HTTP range requests through `huggingface_hub`'s session:
the headers, then a few rows, some hundred KB per model; never a whole weight file) and compared:

- `consistent`: the child's rows lie close to the parent's (cosine >= 0.5); `unrelated`: they
  do not (cosine < 0.2: the card's claim does not hold); `unknown` otherwise, or with the reason
  the weights could not be compared (gated, no safetensors, shapes differ: a frankenmerge or
  another architecture, a refused range request).
- Where the child's card embeds a mergekit config whose method works element by element (linear,
  task arithmetic, passthrough, nearswap) the sampled rows are merged again from the parents'
  with the engine's own method; for SLERP, whose angle needs whole tensors, the child's rows must
  be one fixed combination a*first + b*second of its parents' rows with the slerp weights of the
  config's t. Within the output dtype's rounding: `verified merge`; else `config does not
  reproduce the weights`.
- A model with no declared parent, or only unrelated ones, gets `suggested_parent`: the model of
  the graph with the same sampled tensors closest to it. An attribute, never an edge.

Everything degrades to `unknown` with a reason, never to an exception.
"""

from __future__ import annotations

import json
import math
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import networkx as nx

from merging import hub
from merging.errors import HubError, MergeError

CONSISTENT, UNRELATED = 0.5, 0.2  # cosine similarity of the sampled rows
SAMPLED_TENSORS = 4
ELEMENTWISE = ("linear", "task_arithmetic", "passthrough", "nearswap")
_LAYER = re.compile(r"\.(\d+)\.")


class Unavailable(Exception):
    """Why a model's weights cannot be sampled: the reason an `unknown` verdict gives."""


class WeightReader:
    """Safetensors headers and sampled rows of Hub models, read with range requests and kept."""

    def __init__(self, token: hub.Token = None):
        self.token = token
        self._headers: dict[str, object] = {}
        self._rows: dict[tuple[str, str], object] = {}

    def _get(self, model: str, file: str, start: int, end: int, revision: Optional[str] = None) -> bytes:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        def request() -> bytes:
            headers = {**build_hf_headers(token=self.token), "Range": f"bytes={start}-{end}"}
            response = get_session().get(hf_hub_url(model, file, revision=revision), follow_redirects=True,
                                         headers=headers)
            hf_raise_for_status(response)
            if response.status_code != 206 and len(response.content) != end - start + 1:
                raise Unavailable("the Hub refused a range request")
            return response.content[:end - start + 1] if response.status_code != 206 else response.content

        return hub.call(request, f"{model}: {file}")

    def headers(self, model: str, siblings: list[str], gated: bool) -> dict:
        """Tensor name -> TensorHeader over every safetensors shard, or raise `Unavailable`."""
        if model not in self._headers:
            try:
                self._headers[model] = self._read_headers(model, siblings)
            except Unavailable as exc:
                self._headers[model] = exc
            except (HubError, MergeError, OSError, ValueError) as exc:
                from huggingface_hub.errors import GatedRepoError

                reason = "gated: pass a token with access" if isinstance(exc, GatedRepoError) or gated else \
                    f"headers unreadable ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"
                self._headers[model] = Unavailable(reason)
        found = self._headers[model]
        if isinstance(found, Unavailable):
            raise found
        return found

    def _read_headers(self, model: str, siblings: list[str]) -> dict:
        from merging.safetensors_io import headers_from_json

        files = sorted(f for f in siblings if f.endswith(".safetensors"))
        if not files:
            raise Unavailable("no safetensors weights")
        headers = {}
        for file in files:
            (length,) = struct.unpack("<Q", self._get(model, file, 0, 7))
            if length > 100_000_000:
                raise Unavailable(f"{file}: not a safetensors header")
            try:
                header = json.loads(self._get(model, file, 8, 8 + length - 1))
                headers.update(headers_from_json(header, file, 8 + length))
            except (ValueError, KeyError, TypeError, MergeError):
                raise Unavailable(f"{file}: the safetensors header is truncated or corrupt") from None
        return headers

    def rows(self, model: str, header, indices: tuple[int, ...]):
        """Rows `indices` of one tensor, as float32 (a [len(indices), columns] tensor)."""
        import torch

        key = (model, f"{header.file}:{header.name}")
        if key not in self._rows:
            row_bytes = header.nbytes // header.shape[0]
            parts = [self._get(model, header.file, header.start + r * row_bytes, header.start + (r + 1) * row_bytes - 1)
                     for r in indices]
            data = torch.frombuffer(bytearray(b"".join(parts)), dtype=header.dtype)
            self._rows[key] = data.reshape(len(indices), -1).float()
        return self._rows[key]


def sample_plan(headers: dict) -> dict[str, tuple[int, ...]]:
    """The tensors and rows to compare, chosen from one model's headers: a few 2-D layer tensors
    spread over the stack, each read at its first, a middle and its last rows."""
    names = sorted(n for n, h in headers.items() if len(h.shape) == 2 and h.dtype.is_floating_point
                   and _LAYER.search(n) and h.shape[0] > 1)
    if not names:
        names = sorted(n for n, h in headers.items() if len(h.shape) == 2 and h.dtype.is_floating_point)
    chosen = [names[round(i * (len(names) - 1) / max(1, SAMPLED_TENSORS - 1))] for i in range(SAMPLED_TENSORS)] \
        if names else []
    return {n: tuple(sorted({0, headers[n].shape[0] // 2, headers[n].shape[0] - 1})) for n in dict.fromkeys(chosen)}


def _similarity(a, b) -> tuple[float, float]:
    """(cosine, relative distance |a - b| / |b|) of two sampled row sets."""
    dot, na, nb = float((a * b).sum()), float(a.norm()), float(b.norm())
    cosine = dot / (na * nb) if na and nb else 0.0
    return cosine, float((a - b).norm()) / nb if nb else math.inf


class WeightCheck:
    """Verdicts for one graph's edges; see the module's docstring."""

    def __init__(self, graph: nx.DiGraph, records: dict, reader: WeightReader):
        self.graph, self.records, self.reader = graph, records, reader

    def _headers(self, model: str) -> dict:
        info = self.records[model].info if model in self.records else {}
        siblings = [s.get("rfilename", "") for s in info.get("siblings", [])]
        return self.reader.headers(model, siblings, bool(info.get("gated")))

    def _sample(self, model: str, plan: dict[str, tuple[int, ...]]) -> dict:
        headers = self._headers(model)
        missing = [n for n in plan if n not in headers]
        if missing:
            raise Unavailable(f"{missing[0]} is missing: a frankenmerge or another architecture")
        return {n: self.reader.rows(model, headers[n], rows) for n, rows in plan.items()}

    def plan_for(self, child: str) -> dict[str, tuple[int, ...]]:
        return sample_plan(self._headers(child))

    def compare(self, child: str, parent: str, plan: dict) -> dict:
        try:
            mine, theirs = self._sample(child, plan), self._sample(parent, plan)
        except Unavailable as exc:
            return {"weights": "unknown", "weights_reason": str(exc)}
        if any(mine[n].shape != theirs[n].shape for n in plan):
            return {"weights": "unknown", "weights_reason": "shapes differ: a frankenmerge or another architecture"}
        import torch

        cosine, distance = _similarity(torch.cat([mine[n].reshape(-1) for n in plan]),
                                       torch.cat([theirs[n].reshape(-1) for n in plan]))
        verdict = "consistent" if cosine >= CONSISTENT else "unrelated" if cosine < UNRELATED else "unknown"
        result = {"weights": verdict, "weights_cosine": round(cosine, 6), "weights_distance": round(distance, 6)}
        if verdict == "unknown":
            result["weights_reason"] = f"weakly related (cosine {cosine:.2f})"
        return result

    def run(self) -> None:
        graph = self.graph
        graph.graph["weights_checked"] = True
        children = [n for n in graph if graph.in_degree(n)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            plans = dict(zip(children, pool.map(self._plan_or_reason, children)))
            edges = [(p, c) for c in children for p in graph.predecessors(c)]
            verdicts = pool.map(lambda e: self.compare(e[1], e[0], plans[e[1]]) if isinstance(plans[e[1]], dict)
                                else {"weights": "unknown", "weights_reason": plans[e[1]]}, edges)
            for (parent, child), verdict in zip(edges, verdicts):
                graph.edges[parent, child].update(verdict)
        for child in children:
            if isinstance(plans[child], dict):
                self._check_config(child, plans[child])
        for node in graph:
            parents = list(graph.predecessors(node))
            if not parents or all(graph.edges[p, node].get("weights") == "unrelated" for p in parents):
                self._suggest_parent(node)

    def _plan_or_reason(self, child: str):
        try:
            return self.plan_for(child)
        except Unavailable as exc:
            return str(exc)

    def _check_config(self, child: str, plan: dict) -> None:
        """Merge the parents' sampled rows again as the child's own mergekit config says."""
        from lineage.parse import mergekit_configs

        configs = mergekit_configs(self.records[child]) if child in self.records else []
        if not configs:
            return
        verdict = self._reproduce(child, configs[0], plan)
        if verdict is None:
            return
        for parent in self.graph.predecessors(child):
            if "mergekit_config" in self.graph.edges[parent, child].get("sources", []):
                self.graph.edges[parent, child]["weights"] = verdict

    def _reproduce(self, child: str, config: dict, plan: dict) -> Optional[str]:
        import torch
        import yaml

        from merging import parse_config
        from merging.methods import REQUIRED
        from merging.plan import evaluate_setting

        try:
            parsed = parse_config(yaml.safe_dump(config), local_roots=())
        except MergeError:
            return None  # local paths, or a config the engine refuses: nothing to check against
        if parsed.models is None or parsed.method.name not in (*ELEMENTWISE, "slerp"):
            return None
        refs = [e.model for e in parsed.model_entries()]
        try:
            mine = self._sample(child, plan)
            inputs = {str(ref.path): self._sample(ref.path, plan) for ref in refs}
        except Unavailable:
            return None
        layers = 1 + max((int(m.group(1)) for n in plan for m in [_LAYER.search(n)] if m), default=0)
        dtype = self._headers(child)[next(iter(plan))].dtype
        scopes = {str(e.model.path): e.parameters for e in parsed.model_entries()}
        base = str(parsed.base_model.path) if parsed.base_model else None
        others = [r.path for r in refs if r.path != base]
        for name in plan:
            layer = _LAYER.search(name)
            t = int(layer.group(1)) / max(1, layers - 1) if layer else 0.0

            def value(param: str, model: Optional[str] = None, name: str = name, t: float = t):
                for scope in ([scopes.get(model, {})] if model else []) + [parsed.parameters]:
                    if param in scope:
                        found = evaluate_setting(scope[param], name, t)
                        if found is not None:
                            return found
                default = parsed.method.param_index[param].default
                return None if default is REQUIRED else default

            if parsed.method.name == "slerp":
                if base is None or len(others) != 1:
                    return None
                if not _is_slerp(mine[name], inputs[base][name], inputs[others[0]][name], float(value("t"))):
                    return "config does not reproduce the weights"
                continue
            params = {}
            for param in parsed.method.parameters:
                if param.per_model:
                    models = others if parsed.method.base.value != "ignored" else [r.path for r in refs]
                    params[param.name] = [value(param.name, m) for m in models]
                else:
                    params[param.name] = value(param.name)
            if parsed.method.randomized:
                return None
            models = [inputs[m][name] for m in (others if parsed.method.base.value != "ignored"
                                                   else [r.path for r in refs])]
            try:
                merged = parsed.method(inputs[base][name] if base and parsed.method.base.value != "ignored" else None,
                                       models, **params)
            except (TypeError, ValueError, RuntimeError):
                return None
            if not torch.allclose(merged.to(dtype).float(), mine[name], rtol=2 * torch.finfo(dtype).eps, atol=1e-6):
                return "config does not reproduce the weights"
        return "verified merge"

    def _suggest_parent(self, node: str) -> None:
        try:
            plan = self.plan_for(node)
            mine = self._sample(node, plan)
        except Unavailable:
            return
        import torch

        best = None
        for other in self.graph:
            if other == node or other in nx.descendants(self.graph, node):
                continue
            try:
                theirs = self._sample(other, plan)
            except Unavailable:
                continue
            if any(theirs[n].shape != mine[n].shape for n in plan):
                continue
            cosine, _ = _similarity(torch.cat([mine[n].reshape(-1) for n in plan]),
                                    torch.cat([theirs[n].reshape(-1) for n in plan]))
            if cosine >= CONSISTENT and (best is None or cosine > best[0]):
                best = (cosine, other)
        if best is not None:
            self.graph.nodes[node]["suggested_parent"] = {"id": best[1], "cosine": round(best[0], 6)}


def _is_slerp(child, first, second, t: float) -> bool:
    """Whether `child` = a*first + b*second with SLERP's weights for some angle (within bf16 rounding)."""
    import torch

    basis = torch.stack([first.reshape(-1), second.reshape(-1)], dim=1).double()
    coefficients = torch.linalg.lstsq(basis, child.reshape(-1, 1).double()).solution.reshape(-1)
    a, b = float(coefficients[0]), float(coefficients[1])
    residual = float((basis @ coefficients - child.reshape(-1).double()).norm() / child.double().norm())
    if residual > 1e-2:
        return False
    if abs(a + b - 1) < 1e-3 and abs(b - t) < 1e-2:  # collinear inputs: slerp falls back to lerp
        return True
    # a = sin((1-t)θ)/sin θ, b = sin(tθ)/sin θ for one θ: solve θ from b/a and check it
    for theta in (x * math.pi / 2000 for x in range(1, 2000)):
        if abs(math.sin((1 - t) * theta) / math.sin(theta) - a) < 2e-2 and \
                abs(math.sin(t * theta) / math.sin(theta) - b) < 2e-2:
            return True
    return False


def verify_weights(graph: nx.DiGraph, records: dict, token: hub.Token = None) -> None:
    """Give every edge of `graph` a `weights` verdict (and the numbers), in place."""
    WeightCheck(graph, records, WeightReader(token)).run()
