"""mergeline's Gradio app: a Merge tab and a Lineage tab.

Thin by design: every action calls the same `merging` and `lineage` functions as the command
lines. This module keeps each session's files, decides whose token a request carries, and
turns results into widgets.

On a Space (`SPACE_ID` set) a request carries the user's own token (the Hugging Face login, or
one pasted) or none at all: never the Space's. Each session's files live in a folder of its own
that Gradio never serves directly, removed when the session ends; what a crashed process left
is removed at the next start.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import gradio as gr

import lineage
from merging import HostedLimits, MergeError, MergeEvent, MergeOptions, load_config, plan_merge, run_merge, summarize
from merging.cleanup import remove_orphans
from merging.cli import split_names
from merging.demo import demo_config, demo_moe_config
from merging.errors import HubUnreachable
from merging.extract import plan_extraction, run_extraction
from merging.hub import Token, request_token
from merging.upload import short_name, suggest_repo_name, upload_merge

log = logging.getLogger("mergeline.app")

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
DEMO_EXAMPLE = "Offline demo: TIES of tiny local models"
DEMO_MOE_EXAMPLE = "Offline demo: mixture of experts of tiny local models"
DEMOS = {DEMO_EXAMPLE: demo_config, DEMO_MOE_EXAMPLE: demo_moe_config}  # configs of the app's own tiny models
DEMO_LINEAGE = "mlabonne/NeuralBeagle14-7B"
_SESSION = re.compile(r"^(\d+)-[\w-]+$")
CSS = """
#merge-log textarea { font-family: ui-monospace, monospace; font-size: 13px; }
#lineage-models { overflow-x: auto; }
.mergeline-error { color: var(--error-text-color, #c0392b); }
"""
SCROLL_LOG_TO_END = """() => { setTimeout(() => {
  const log = document.querySelector('#merge-log textarea'); if (log) log.scrollTop = log.scrollHeight; }, 50); }"""


def examples() -> dict[str, Optional[Path]]:
    """Example configs by title: the offline demos (None: their models are written on first use),
    then `examples/*.yml`, each titled by its first line's comment."""
    found: dict[str, Optional[Path]] = dict.fromkeys(DEMOS)
    for path in sorted(EXAMPLES_DIR.glob("*.yml")):
        first = path.read_text().splitlines()[0]
        found[first.lstrip("# ").strip() if first.startswith("#") else path.stem] = path
    return found


@dataclass(frozen=True)
class Settings:
    """What the app runs with; `from_environment` reads it the way a Space sets it."""

    hosted: bool = False
    work_root: Path = Path(tempfile.gettempdir()) / "mergeline"
    limits: HostedLimits = field(default_factory=HostedLimits)
    zip_limit: int = 2 * 10**9  # offer a zip of the result up to this size
    cache_age: int = 2 * 3600  # Gradio's copies of files handed out are removed after this long

    @property
    def demo_models(self) -> Path:
        return self.work_root / "demo-models"

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Settings":
        work_root = Path(environ.get("MERGELINE_WORKDIR") or Path(tempfile.gettempdir()) / "mergeline")
        limits = HostedLimits(
            max_models=int(environ.get("MERGELINE_MAX_MODELS", "6")),
            max_input_bytes=int(float(environ.get("MERGELINE_MAX_INPUT_GB", "60")) * 10**9),
            max_output_bytes=int(float(environ.get("MERGELINE_MAX_OUTPUT_GB", "60")) * 10**9),
            max_tensors=int(environ.get("MERGELINE_MAX_TENSORS", "4000")),
            max_slices=int(environ.get("MERGELINE_MAX_SLICES", "256")),
        )
        return cls(hosted=bool(environ.get("SPACE_ID")), work_root=work_root, limits=limits)


# What each action shows, by name: a new action always replaces every output of the last one.
class ValidateView(NamedTuple):
    report: str = ""
    preview: str = ""


class MergeView(NamedTuple):
    log: str = ""
    result: str = ""
    archive: Optional[str] = None
    job: Optional[dict] = None
    repo_name: str = ""


class LineageView(NamedTuple):
    graph: str = ""
    models: Optional[list[list]] = None
    cycles: str = ""
    composition: str = ""
    exports: Optional[list[str]] = None


def explain(exc: Exception) -> str:
    """The one line a failure shows in the page; an unreachable Hub says what still works."""
    message = str(exc)
    if isinstance(exc, HubUnreachable):
        message += "; Hub examples need the network, the offline demos work without"
    return message


def error_markdown(exc: Exception) -> str:
    return f"**Error:** {html.escape(explain(exc))}"


def error_html(exc: Exception) -> str:
    return f'<p class="mergeline-error"><strong>Error:</strong> {html.escape(explain(exc))}</p>'


class MergelineApp:
    """The actions behind the widgets, for one deployment's `Settings`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # On a Space, the app's own demo models are the only local paths a config may name.
        self.limits = (dataclasses.replace(settings.limits, allowed_local_roots=(settings.demo_models,))
                       if settings.hosted else None)
        self.sessions_root.mkdir(parents=True, exist_ok=True)
        remove_orphans(self.sessions_root, _SESSION)

    # -- sessions and tokens ------------------------------------------------------------------

    @property
    def sessions_root(self) -> Path:
        return self.settings.work_root / "sessions"

    def session_dir(self, request: Optional[gr.Request]) -> Path:
        """This session's own folder (named with our pid, so a later start can sweep it)."""
        session = re.sub(r"[^\w-]", "_", getattr(request, "session_hash", None) or "direct")[:64]
        folder = self.sessions_root / f"{os.getpid()}-{session}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def end_session(self, request: gr.Request) -> None:
        shutil.rmtree(self.session_dir(request), ignore_errors=True)

    def token(self, pasted: Optional[str], oauth: Optional[gr.OAuthToken]) -> Token:
        own = (pasted or "").strip() or (oauth.token if oauth is not None else "")
        return request_token(own, hosted=self.settings.hosted)

    def example_config(self, name: str) -> str:
        path = examples().get(name)
        return DEMOS[name](self.settings.demo_models) if path is None else path.read_text()

    # -- actions ------------------------------------------------------------------------------

    def validate(self, config_text: str, oauth_token: Optional[gr.OAuthToken] = None,
                 request: Optional[gr.Request] = None) -> ValidateView:
        """Dry run: check the config against the models' headers and show the plan and the family it makes."""
        cache = Path(tempfile.mkdtemp(prefix="validate-", dir=self.session_dir(request)))
        try:
            config = load_config(config_text, limits=self.limits)
            plan = plan_merge(config, token=self.token(None, oauth_token), cache_dir=cache, limits=self.limits)
        except MergeError as exc:
            return ValidateView(report=error_markdown(exc))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        licenses = {str(model.ref): model.license for model in plan.models}
        report = "\n".join(f"- {line}" for line in [*summarize(plan).lines(), lineage.required_license(licenses)])
        return ValidateView(f"**The config is valid.**\n\n{report}",
                            lineage.embed(lineage.merge_preview(config.mapping, "(this merge)")))

    def merge(self, config_text: str, job: Optional[dict], oauth_token: Optional[gr.OAuthToken] = None,
              request: Optional[gr.Request] = None, progress=gr.Progress()):
        """Plan, download, merge; streams the log (a line per step, per downloaded file and per
        twentieth of the tensors, with time and throughput)."""
        cleanup_job(job)  # one result per session: a new merge replaces the last
        try:
            config = load_config(config_text, limits=self.limits)
        except MergeError as exc:
            yield MergeView(log=f"error: {explain(exc)}", result=error_markdown(exc))
            return
        token = self.token(None, oauth_token)

        def work(output: Path, cache: Path, on_event) -> None:
            run_merge(config, output, options=MergeOptions(device="auto"), token=token, cache_dir=cache,
                      limits=self.limits, on_event=on_event)

        yield from self._stream_job(suggest_repo_name(config), "Merged", work, request, progress)

    def extract_lora(self, finetuned: str, base: str, rank: float, modules: str, job: Optional[dict],
                     oauth_token: Optional[gr.OAuthToken] = None, request: Optional[gr.Request] = None,
                     progress=gr.Progress()):
        """Extract a LoRA adapter from a fine-tune and its base; streams its log like a merge."""
        cleanup_job(job)
        token = self.token(None, oauth_token)
        rank = int(rank or 0)
        name = short_name(finetuned or "model")[:80]

        def work(output: Path, cache: Path, on_event) -> None:
            plan = plan_extraction(finetuned.strip(), base.strip(), rank, modules=split_names(modules or ""),
                                   token=token, cache_dir=cache, limits=self.limits)
            on_event(MergeEvent("\n".join(plan.summary())))
            run_extraction(plan, output, device="auto", token=token, cache_dir=cache, on_event=on_event)

        yield from self._stream_job(f"{name}-lora-r{rank}", "Extracted", work, request, progress)

    def _stream_job(self, name: str, verb: str, work, request: Optional[gr.Request], progress):
        """Run `work(output, cache, on_event)` in a thread of its own, streaming its events into the log,
        then offer the result as a zip and for upload; a failure is one line and leaves nothing."""
        lines: list[str] = []
        job_dir = Path(tempfile.mkdtemp(prefix="job-", dir=self.session_dir(request)))
        output = job_dir / name
        events: "queue.Queue[object]" = queue.Queue()

        def run() -> None:
            cache = job_dir / "hub-cache"
            try:
                work(output, cache, events.put)
                events.put(None)
            except MergeError as exc:
                events.put(exc)
            except Exception as exc:  # noqa: BLE001 - a bug: log it, show one line, keep the app alive
                log.exception("%s failed", name)
                events.put(RuntimeError(f"internal error ({type(exc).__name__}); the work stopped and nothing "
                                        f"was written"))
            finally:
                shutil.rmtree(cache, ignore_errors=True)

        threading.Thread(target=run, name="mergeline-job", daemon=True).start()
        started, reported = time.perf_counter(), 0
        while True:
            event = events.get()
            if isinstance(event, MergeEvent):
                if not event.is_progress:
                    lines.append(event.message)
                    started = time.perf_counter()
                else:
                    progress((event.done, event.total), desc="Working", unit="tensors")
                    if event.done == event.total or event.done - reported >= max(1, event.total // 20):
                        lines.append(event.describe(time.perf_counter() - started))
                        reported = event.done
                yield MergeView(log="\n".join(lines), repo_name=name)
            elif isinstance(event, Exception):
                shutil.rmtree(job_dir, ignore_errors=True)
                lines.append(f"error: {explain(event)}")
                yield MergeView(log="\n".join(lines), result=error_markdown(event))
                return
            else:
                break
        size = sum(p.stat().st_size for p in output.iterdir())
        archive = None
        if size <= self.settings.zip_limit:
            archive = job_dir / f"{name}.zip"
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
                for path in sorted(output.iterdir()):
                    bundle.write(path, f"{name}/{path.name}")
        lines.append(f"Done: {len(list(output.iterdir()))} files, {size / 1e6:.1f} MB")
        where = "" if self.settings.hosted else f" in `{output}`"
        result = f"**{verb}{where}.** Upload it below" + (", or download the files." if archive else ".")
        yield MergeView("\n".join(lines), result, str(archive) if archive else None,
                        {"dir": str(job_dir), "output": str(output)}, name)

    def upload(self, job: Optional[dict], repo_name: str, private: bool, token_text: str,
               oauth_token: Optional[gr.OAuthToken] = None) -> str:
        """Create the repo in the user's namespace and upload the merged folder."""
        if not job:
            return error_markdown(MergeError("upload: merge a model first"))
        token = self.token(token_text, oauth_token)
        try:
            url = upload_merge(Path(job["output"]), repo_name, token or "", private=private)
        except MergeError as exc:
            return error_markdown(exc)
        return f"**Uploaded:** [{html.escape(url)}]({html.escape(url)})"

    def show_lineage(self, model_id: str, direction: str, depth: int, use_demo: bool, color_by: str = "relation",
                     verify: bool = False, token_text: str = "", oauth_token: Optional[gr.OAuthToken] = None,
                     request: Optional[gr.Request] = None) -> LineageView:
        """Crawl a model's family: the graph, a table of its models, cycles, composition and exports."""
        model_id = (model_id or "").strip()
        if not model_id:
            return LineageView(error_html(lineage.LineageError("model id: enter a Hub model id such as org/name")))
        try:
            options = lineage.CrawlOptions(direction=direction, depth=int(depth), verify_weights=verify)
            if use_demo:
                from lineage.demo import DEMO_SNAPSHOT
                source = lineage.SnapshotSource(DEMO_SNAPSHOT)
            else:
                source = lineage.HubSource(token=self.token(token_text, oauth_token),
                                           cache=lineage.DiskCache(lineage.default_cache_dir()))
            graph = lineage.build_lineage(model_id, source, options)
            if graph.nodes[model_id]["status"] == "missing":
                where = (f"the offline snapshot, which holds only the family of {DEMO_LINEAGE}; untick the offline "
                         f"demo to ask the Hub" if use_demo else "the Hub (or it is private: paste a token that can "
                         "read it)")
                raise lineage.LineageError(f"model id: {model_id} is not in {where}")
        except (lineage.LineageError, MergeError) as exc:
            return LineageView(error_html(exc))
        rows = [[node, data.get("relation", ""), data.get("license") or "unknown", lineage.conflict_text(data),
                 weights_text(graph, node), data.get("downloads", 0), data.get("generation", 0),
                 data["status"] + (f", cut: {data['cut']}" if data.get("cut") else "")]
                for node, data in sorted(graph.nodes(data=True), key=lambda item: (item[1]["generation"], item[0]))]
        cycles = graph.graph["cycles"]
        cycles_md = ("**Cycles:** " + "; ".join(" -> ".join(c + c[:1]) for c in cycles)) if cycles else "No cycles."
        if graph.graph["truncated"]:
            cycles_md += " The crawl was cut short (dashed outlines; raise the depth to see more)."
        export_dir = self.session_dir(request) / "lineage"
        shutil.rmtree(export_dir, ignore_errors=True)  # one family's exports per session
        export_dir.mkdir()
        stem = export_dir / model_id.replace("/", "__")
        stem.with_suffix(".html").write_text(lineage.render_html(graph, color_by=color_by))
        stem.with_suffix(".json").write_text(json.dumps(lineage.to_json(graph), indent=1))
        lineage.to_graphml(graph, stem.with_suffix(".graphml"))
        stem.with_suffix(".mmd").write_text(lineage.to_mermaid(graph))
        stem.with_suffix(".svg").write_text(lineage.to_svg(graph, color_by=color_by))
        files = [str(stem.with_suffix(ext)) for ext in (".html", ".json", ".graphml", ".mmd", ".svg")]
        composition = f"**Ancestry composition:** {html.escape(lineage.composition_text(graph))}"
        return LineageView(lineage.embed(graph, color_by=color_by), rows, html.escape(cycles_md), composition, files)

    # -- widgets ------------------------------------------------------------------------------

    def blocks(self) -> gr.Blocks:
        hosted = self.settings.hosted
        titles = list(examples())
        with gr.Blocks(title="mergeline", delete_cache=(600, self.settings.cache_age)) as demo:
            gr.Markdown("# mergeline\nMerge models from a mergekit YAML config, tensor by tensor, and explore "
                        "merge family trees.")
            if hosted:
                gr.LoginButton()
            with gr.Tab("Merge"):
                example = gr.Dropdown(titles, value=titles[0], label="Examples")
                config = gr.Code(self.example_config(titles[0]), language="yaml", label="Merge config (mergekit YAML)",
                                 lines=18)
                with gr.Row():
                    validate_button = gr.Button("Validate", elem_id="validate")
                    merge_button = gr.Button("Merge", variant="primary", elem_id="merge")
                with gr.Accordion("Or extract a LoRA adapter from a fine-tune and its base", open=False,
                                  elem_id="extract"):
                    with gr.Row():
                        finetuned = gr.Textbox(label="Fine-tuned model", placeholder="org/model-ft",
                                               elem_id="extract-finetuned")
                        extract_base = gr.Textbox(label="Its base model", placeholder="org/model",
                                                  elem_id="extract-base")
                        rank = gr.Number(16, label="Rank", precision=0, minimum=1, elem_id="extract-rank")
                    modules = gr.Textbox(label="Layer weights to decompose (optional)",
                                         placeholder="q_proj, v_proj (default: every 2-D layer weight)")
                    extract_button = gr.Button("Extract LoRA", elem_id="extract-button")
                report = gr.Markdown(elem_id="report")
                preview = gr.HTML(elem_id="preview")
                result = gr.Markdown(elem_id="merge-result")
                merge_log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="merge-log")
                archive = gr.File(label="Merged model (zip)", elem_id="archive")
                job = gr.State(None, time_to_live=6 * 3600, delete_callback=cleanup_job)
                with gr.Group():
                    gr.Markdown("### Upload to the Hub")
                    with gr.Row():
                        repo_name = gr.Textbox(label="Repo name", placeholder="name or namespace/name",
                                               elem_id="repo-name")
                        private = gr.Checkbox(label="Private", value=False)
                    token = gr.Textbox(label="Hugging Face token (write)", type="password", visible=not hosted,
                                       placeholder="hf_... (never stored)")
                    upload_button = gr.Button("Upload", elem_id="upload")
                    upload_result = gr.Markdown(elem_id="upload-result")

                example.change(self.example_config, example, config, api_visibility="private")
                validate_button.click(self.validate, config, [report, preview], api_name="validate")
                merge_button.click(self.merge, [config, job], [merge_log, result, archive, job, repo_name],
                                   api_name="merge", concurrency_limit=1, concurrency_id="merge",
                                   show_progress_on=[result])
                extract_button.click(self.extract_lora, [finetuned, extract_base, rank, modules, job],
                                     [merge_log, result, archive, job, repo_name], api_name="extract_lora",
                                     concurrency_limit=1, concurrency_id="merge", show_progress_on=[result])
                # Gradio's own autoscroll misses streamed updates: keep the last line in view.
                merge_log.change(None, None, None, js=SCROLL_LOG_TO_END, queue=False, api_visibility="private")
                upload_button.click(self.upload, [job, repo_name, private, token], upload_result, api_name="upload",
                                    concurrency_limit=2)

            with gr.Tab("Lineage"):
                with gr.Row():
                    model_id = gr.Textbox(DEMO_LINEAGE, label="Model id", elem_id="model-id")
                    direction = gr.Radio(["up", "down", "both"], value="both", label="Direction")
                    depth = gr.Slider(1, 8, value=6, step=1, label="Depth")
                with gr.Row():
                    use_demo = gr.Checkbox(True, label="Offline demo snapshot (NeuralBeagle14-7B family)",
                                           elem_id="use-demo")
                    color_by = gr.Radio(["relation", "license"], value="relation", label="Colour by")
                    verify = gr.Checkbox(False, label="Check parents against the weights (reads a few rows)",
                                         elem_id="verify-weights")
                lineage_token = gr.Textbox(label="Token for private or gated models (optional, never stored)",
                                           type="password", visible=False, elem_id="lineage-token")
                lineage_button = gr.Button("Draw the family tree", variant="primary", elem_id="draw")
                graph_html = gr.HTML(elem_id="lineage-graph")
                cycles = gr.Markdown(elem_id="lineage-cycles")
                shares = gr.Markdown(elem_id="lineage-composition")
                nodes = gr.Dataframe(headers=["id", "relation", "license", "license check", "parents by weights",
                                              "downloads", "generation", "status"],
                                     label="Models", interactive=False, wrap=False, elem_id="lineage-models")
                exports = gr.File(label="Downloads (HTML, JSON, GraphML, Mermaid, SVG)", file_count="multiple")
                inputs = [model_id, direction, depth, use_demo, color_by, verify, lineage_token]
                outputs = [graph_html, nodes, cycles, shares, exports]
                lineage_button.click(self.show_lineage, inputs, outputs, api_name="lineage", concurrency_limit=4)
                use_demo.change(lambda demo_on: gr.update(visible=not demo_on), use_demo, lineage_token,
                                api_visibility="private")
                demo.load(self.show_lineage, inputs, outputs, api_visibility="private")
            demo.unload(self.end_session)
        return demo


def weights_text(graph, node: str) -> str:
    """What the weights said of a model's parents (and whom they suggest), for the models table."""
    parts = [f"{parent}: {verdict}" for parent, _, verdict in sorted(graph.in_edges(node, data="weights")) if verdict]
    suggestion = graph.nodes[node].get("suggested_parent")
    if suggestion:
        parts.append(f"suggested parent {suggestion['id']} (cosine {suggestion['cosine']:.2f})")
    return "; ".join(parts)


def cleanup_job(job: Optional[dict]) -> None:
    if job and job.get("dir"):
        shutil.rmtree(job["dir"], ignore_errors=True)


def build_app(settings: Optional[Settings] = None) -> gr.Blocks:
    return MergelineApp(settings or Settings.from_environment()).blocks()


def launch(blocks: gr.Blocks, **options) -> None:
    """Serve the app (merges queue one at a time; the other actions run four at a time)."""
    blocks.queue(default_concurrency_limit=4).launch(css=CSS, **options)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    launch(build_app())
