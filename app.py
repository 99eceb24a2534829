"""mergeline's Gradio app: a Merge tab and a Lineage tab.

Thin by design: every action calls the same `merging` and `lineage` functions as the command
lines. This module only keeps each user's job directory and turns results into widgets.
"""

from __future__ import annotations

import html
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Optional

import gradio as gr
import yaml

import lineage
from merging import (HostedLimits, MergeError, MergeOptions, enforce_limits, execute_plan, fetch_inputs, parse_config,
                     plan_merge, summarize)
from merging.demo import demo_config
from merging.upload import suggest_repo_name, upload_merge

log = logging.getLogger("mergeline.app")

HOSTED = bool(os.environ.get("SPACE_ID"))
WORK_ROOT = Path(os.environ.get("MERGELINE_WORKDIR", Path(tempfile.gettempdir()) / "mergeline"))
DEMO_MODELS = WORK_ROOT / "demo-models"
LIMITS = HostedLimits(
    max_models=int(os.environ.get("MERGELINE_MAX_MODELS", "6")),
    max_input_bytes=int(float(os.environ.get("MERGELINE_MAX_INPUT_GB", "60")) * 10**9),
    allowed_local_roots=(DEMO_MODELS,),
)
ZIP_LIMIT = 2 * 10**9  # offer a zip download of results up to this size
DEMO_LINEAGE = "mlabonne/NeuralBeagle14-7B"

EXAMPLES = {
    "Offline demo: TIES of tiny local models": None,  # written on first use, see demo_config
    "SLERP with self_attn/mlp t-curves (LazyMergeKit)": """\
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "TIES": """\
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: OpenPipe/mistral-ft-optimized-1218
    parameters:
      density: 0.5
      weight: 0.5
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
dtype: bfloat16
""",
    "DARE-TIES": """\
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacusai/Slerp-CM-mist-dpo
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
""",
    "Model Stock": """\
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: HuggingFaceH4/zephyr-7b-beta
  - model: teknium/OpenHermes-2.5-Mistral-7B
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
merge_method: model_stock
base_model: mistralai/Mistral-7B-v0.1
dtype: bfloat16
""",
    "Passthrough frankenmerge (2x7B -> 11B)": """\
slices:
  - sources:
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 24]
  - sources:
      - model: teknium/OpenHermes-2.5-Mistral-7B
        layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
""",
}
DEFAULT_EXAMPLE = next(iter(EXAMPLES))


def example_config(name: str) -> str:
    text = EXAMPLES.get(name)
    return demo_config(DEMO_MODELS) if text is None else text


def _error(exc: Exception) -> str:
    return f"**Error:** {html.escape(str(exc))}"


def _preview(config_text: str) -> str:
    config = yaml.safe_load(config_text)
    graph = lineage.merge_preview(config, "(this merge)")
    return lineage.iframe(lineage.render_html(graph), height=420)


def validate(config_text: str) -> tuple[str, str]:
    """Dry run: check the config against the models' headers and show the plan and the family it makes."""
    try:
        config = parse_config(config_text)
        if HOSTED:
            enforce_limits(config, LIMITS)
        plan = plan_merge(config, cache_dir=WORK_ROOT / "metadata-cache")
        if HOSTED:
            enforce_limits(config, LIMITS, plan)
    except MergeError as exc:
        return _error(exc), ""
    report = "\n".join(f"- {line}" for line in summarize(plan).lines())
    return f"**The config is valid.**\n\n{report}", _preview(config_text)


def _cleanup_job(job: Optional[dict]) -> None:
    if job and job.get("dir"):
        shutil.rmtree(job["dir"], ignore_errors=True)


def merge(config_text: str, job: Optional[dict], progress=gr.Progress(track_tqdm=True)):
    """Plan, download, merge; streams the log. Yields (log, result, zip, job, suggested repo name)."""
    _cleanup_job(job)  # one result per session: a new merge replaces the last
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)

    try:
        config = parse_config(config_text)
        if HOSTED:
            enforce_limits(config, LIMITS)
    except MergeError as exc:
        yield f"error: {exc}", _error(exc), None, None, ""
        return
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=WORK_ROOT))
    name = suggest_repo_name(config)
    output = job_dir / name
    events: "queue.Queue[tuple]" = queue.Queue()

    def work() -> None:
        cache = job_dir / "hub-cache"
        try:
            events.put(("log", "Reading model configs and safetensors headers..."))
            plan = plan_merge(config, cache_dir=cache)
            if HOSTED:
                enforce_limits(config, LIMITS, plan)
            summary = summarize(plan)
            needed = int((summary.download_bytes + summary.output_bytes) * 1.05)
            free = shutil.disk_usage(job_dir).free
            if needed > free:
                raise MergeError(f"disk: the merge needs {needed / 1e9:.1f} GB (download + output), only "
                                 f"{free / 1e9:.1f} GB are free")
            for line in summary.lines():
                events.put(("log", line))
            events.put(("log", "Downloading the needed files..."))
            fetch_inputs(plan, cache_dir=cache)
            events.put(("log", "Merging tensor by tensor..."))
            execute_plan(plan, output, MergeOptions(device="auto"),
                         progress=lambda done, total, tensor: events.put(("progress", done, total, tensor)))
            events.put(("done", None))
        except MergeError as exc:
            events.put(("error", exc))
        except Exception as exc:  # noqa: BLE001 - a bug: log it, show one line, keep the app alive
            log.exception("merge failed")
            events.put(("error", RuntimeError(f"internal error ({type(exc).__name__}); see the server log")))
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    threading.Thread(target=work, name="mergeline-merge", daemon=True).start()
    while True:
        event = events.get()
        if event[0] == "log":
            say(event[1])
            progress(0, desc=event[1])
        elif event[0] == "progress":
            _, done, total, tensor = event
            progress((done, total), desc=f"Merging {tensor}", unit="tensors")
            if done == total or done % max(1, total // 20) == 0:
                say(f"[{done}/{total}] {tensor}")
        elif event[0] == "error":
            shutil.rmtree(job_dir, ignore_errors=True)
            say(f"error: {event[1]}")
            yield "\n".join(lines), _error(event[1]), None, None, ""
            return
        else:
            break
        yield "\n".join(lines), "", None, None, name
    size = sum(p.stat().st_size for p in output.iterdir())
    archive = None
    if size <= ZIP_LIMIT:
        archive = job_dir / f"{name}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
            for path in sorted(output.iterdir()):
                bundle.write(path, f"{name}/{path.name}")
    say(f"Done: {len(list(output.iterdir()))} files, {size / 1e6:.1f} MB")
    where = "" if HOSTED else f" in `{output}`"
    result = f"**Merged{where}.** Upload it below" + (", or download the files." if archive else ".")
    yield "\n".join(lines), result, str(archive) if archive else None, {"dir": str(job_dir), "output": str(output)}, name


def upload(job: Optional[dict], repo_name: str, private: bool, token_text: str,
           oauth_token: Optional[gr.OAuthToken] = None) -> str:
    """Create the repo in the user's namespace and upload the merged folder."""
    if not job:
        return _error(MergeError("upload: merge a model first"))
    token = oauth_token.token if oauth_token is not None else ("" if HOSTED else (token_text or "").strip())
    try:
        url = upload_merge(Path(job["output"]), repo_name, token, private=private)
    except MergeError as exc:
        return _error(exc)
    return f"**Uploaded:** [{html.escape(url)}]({html.escape(url)})"


def show_lineage(model_id: str, direction: str, depth: int, use_demo: bool, token_text: str = ""):
    """Crawl a model's family; returns (graph iframe, node rows, cycles, composition, export files)."""
    model_id = (model_id or "").strip()
    if not model_id:
        return _error(ValueError("model id: enter a Hub model id such as org/name")), [], "", "", None
    try:
        options = lineage.CrawlOptions(direction=direction, depth=int(depth))
    except ValueError as exc:
        return _error(exc), [], "", "", None
    if use_demo:
        from lineage.demo import DEMO_SNAPSHOT
        source = lineage.SnapshotSource(DEMO_SNAPSHOT)
    else:
        token = None if HOSTED else ((token_text or "").strip() or None)
        source = lineage.HubSource(token=token, cache=lineage.DiskCache(lineage.default_cache_dir()) if not token else None)
    graph = lineage.build_lineage(model_id, source, options)
    rows = []
    for node, data in sorted(graph.nodes(data=True), key=lambda item: (item[1]["generation"], item[0])):
        relations = sorted({r for _, _, r in graph.in_edges(node, data="relation")})
        rows.append([node, ", ".join(relations) or "root", data.get("license") or "unknown",
                     data.get("downloads", 0), data.get("generation", 0), data.get("status", "")])
    cycles = graph.graph["cycles"]
    cycles_md = ("**Cycles:** " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)) if cycles else "No cycles."
    if graph.graph["truncated"]:
        cycles_md += " The crawl was cut short (raise the depth to see more)."
    shares = lineage.composition(graph)
    composition_md = "**Ancestry composition:** " + ", ".join(f"{share:.0%} {root}" for root, share in shares.items())
    export_dir = Path(tempfile.mkdtemp(prefix="lineage-", dir=WORK_ROOT if WORK_ROOT.exists() else None))
    stem = model_id.replace("/", "__")
    page = lineage.render_html(graph)
    (export_dir / f"{stem}.html").write_text(page)
    (export_dir / f"{stem}.json").write_text(json.dumps(lineage.to_json(graph), indent=1))
    lineage.to_graphml(graph, export_dir / f"{stem}.graphml")
    files = [str(export_dir / f"{stem}.{ext}") for ext in ("html", "json", "graphml")]
    return lineage.iframe(page), rows, html.escape(cycles_md), html.escape(composition_md), files


def build_app() -> gr.Blocks:
    with gr.Blocks(title="mergeline") as demo:
        gr.Markdown("# mergeline\nMerge models from a mergekit YAML config, tensor by tensor, and explore "
                    "merge family trees.")
        with gr.Tab("Merge"):
            example = gr.Dropdown(list(EXAMPLES), value=DEFAULT_EXAMPLE, label="Examples")
            config = gr.Code(example_config(DEFAULT_EXAMPLE), language="yaml", label="Merge config (mergekit YAML)",
                             lines=18)
            with gr.Row():
                validate_button = gr.Button("Validate", elem_id="validate")
                merge_button = gr.Button("Merge", variant="primary", elem_id="merge")
            report = gr.Markdown(elem_id="report")
            preview = gr.HTML(elem_id="preview")
            merge_log = gr.Textbox(label="Log", lines=8, max_lines=16, autoscroll=True, elem_id="merge-log")
            result = gr.Markdown(elem_id="merge-result")
            archive = gr.File(label="Merged model (zip)", elem_id="archive")
            job = gr.State(None, time_to_live=6 * 3600, delete_callback=_cleanup_job)
            with gr.Group():
                gr.Markdown("### Upload to the Hub")
                with gr.Row():
                    repo_name = gr.Textbox(label="Repo name", placeholder="name or namespace/name", elem_id="repo-name")
                    private = gr.Checkbox(label="Private", value=False)
                if HOSTED:
                    gr.LoginButton()
                    token = gr.Textbox(visible=False)
                else:
                    token = gr.Textbox(label="Hugging Face token (write)", type="password",
                                       placeholder="hf_... (never stored)")
                upload_button = gr.Button("Upload", elem_id="upload")
                upload_result = gr.Markdown(elem_id="upload-result")

            example.change(example_config, example, config, api_visibility="private")
            validate_button.click(validate, config, [report, preview], api_name="validate")
            merge_button.click(merge, [config, job], [merge_log, result, archive, job, repo_name], api_name="merge",
                               concurrency_limit=1, concurrency_id="merge")
            upload_button.click(upload, [job, repo_name, private, token], upload_result, api_name="upload",
                                concurrency_limit=2)

        with gr.Tab("Lineage"):
            with gr.Row():
                model_id = gr.Textbox(DEMO_LINEAGE, label="Model id", elem_id="model-id")
                direction = gr.Radio(["up", "down", "both"], value="both", label="Direction")
                depth = gr.Slider(1, 8, value=6, step=1, label="Depth")
                use_demo = gr.Checkbox(True, label="Offline demo snapshot (NeuralBeagle14-7B family)")
            lineage_token = gr.Textbox(visible=not HOSTED, label="Token for private or gated models (optional)",
                                       type="password")
            lineage_button = gr.Button("Draw the family tree", variant="primary", elem_id="draw")
            graph_html = gr.HTML(elem_id="lineage-graph")
            cycles = gr.Markdown()
            shares = gr.Markdown()
            nodes = gr.Dataframe(headers=["id", "relation", "license", "downloads", "generation", "status"],
                                 label="Models", interactive=False)
            exports = gr.File(label="Downloads (HTML, JSON, GraphML)", file_count="multiple")
            lineage_button.click(show_lineage, [model_id, direction, depth, use_demo, lineage_token],
                                 [graph_html, nodes, cycles, shares, exports], api_name="lineage",
                                 concurrency_limit=4)
    return demo


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    build_app().queue(default_concurrency_limit=4).launch(allowed_paths=[str(WORK_ROOT)])
