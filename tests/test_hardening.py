"""Hostile input, Hub faults, signals and full disks, and a hosted mode that lends nothing.

Each test drives the real code path (the CLIs in a subprocess where a signal or an exit status
matters, the fake Hub through the real `huggingface_hub` client) and checks the promise the
README makes: one line, exit status 2, nothing half-written, tokens never lent or leaked.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import networkx as nx
import pytest
import yaml
from tiny_models import Family, load_state

from app import DEMO_EXAMPLE, MergelineApp, Settings
from lineage import CrawlOptions, HubSource, build_lineage, text_tree
from merging import HostedLimits, HubError, MergeError, load_config, parse_config, plan_merge, run_merge
from merging.__main__ import main as merge_main
from merging.demo import demo_config
from merging.upload import upload_merge

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_hardening_write_token"
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


def one_line_error(stderr: str) -> str:
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr


def cli(module: str, *args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, **(env or {})}, **kwargs)


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def demo_text(tmp_path_factory) -> str:
    return demo_config(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture(scope="module")
def hub_models(hub, llama):
    hub.add_repo("hard/base", llama.base(), card_data={"license": "mit"})
    hub.add_repo("hard/ft", llama.finetune(21), card_data={"license": "mit"})
    hub.add_repo("hard/gated", llama.finetune(22, card="---\nlicense: mit\n---\n"), gated=True)
    return hub


HUB_LINEAR = """
merge_method: linear
models:
  - model: hard/base
    parameters: {weight: 0.5}
  - model: hard/ft
    parameters: {weight: 0.5}
"""

# -- 1. hostile YAML --------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "config: refused: its aliases expand to more than 100,000 values"),
    ("merge_method: linear\nmodels: " + "[" * 10_000 + "]" * 10_000 + "\n", "config: refused: nested more than 64"),
    ("merge_method: linear\nname: '" + "x" * 5_000_000 + "'\n", "config: refused: it is 4,883 KB, over the 256 KB"),
], ids=["aliases", "nesting", "size"])
def test_hostile_configs_are_refused_in_one_line(text, message):
    with pytest.raises(MergeError) as caught:
        parse_config(text)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_hostile_card_becomes_a_note_and_the_crawl_goes_on(hub, tmp_path):
    laughs = "merge_method: linear\n" + BILLION_LAUGHS
    cards = {
        "hostile/root": "---\nlicense: mit\n---\n# root\n",
        "hostile/child": ("---\nbase_model: hostile/root\nnested: " + "[" * 10_000 + "]" * 10_000 + "\n---\n"
                          f"# child\n```yaml\n{laughs}```\n"),
    }
    for repo_id, card in cards.items():
        folder = tmp_path / repo_id
        folder.mkdir(parents=True)
        (folder / "README.md").write_text(card)
        if repo_id == "hostile/child":
            (folder / "mergekit_config.yml").write_text(laughs)
        hub.add_repo(repo_id, folder, tags=["base_model:finetune:hostile/root"] if "child" in repo_id else [])
    graph = build_lineage("hostile/child", HubSource(sleep=lambda s: None), CrawlOptions(depth=2))
    notes = graph.nodes["hostile/child"]["notes"]
    assert "card metadata refused: nested more than 64 levels deep" in notes
    assert "mergekit_config.yml refused: its aliases expand to more than 100,000 values" in notes
    assert "a README yaml block refused: its aliases expand to more than 100,000 values" in notes
    assert ("hostile/root", "hostile/child") in graph.edges  # from the Hub's relation tag


# -- 2, 16. hosted mode lends nothing and tells nothing about the server ----------------------


class FakeOAuth:
    def __init__(self, token: str):
        self.token = token


def test_hosted_requests_never_carry_the_spaces_token(hub_models, hub, tmp_path, monkeypatch):
    hub.token = "hf_space_secret"
    monkeypatch.setenv("HF_TOKEN", "hf_space_secret")  # the Space's own token, in its environment
    gated = HUB_LINEAR.replace("hard/ft", "hard/gated")
    local = MergelineApp(Settings(work_root=tmp_path / "local"))
    assert "The config is valid" in local.validate(gated)[0]  # locally the environment's token is the user's

    hosted = MergelineApp(Settings(hosted=True, work_root=tmp_path / "hosted"))
    report, _ = hosted.validate(gated)
    assert "hard/gated: the repo is gated" in report
    assert "The config is valid" in hosted.validate(gated, FakeOAuth("hf_space_secret"))[0]  # a user with access
    assert "hard/gated: the repo is gated" in hosted.validate(gated)[0]  # nothing of theirs stayed cached
    assert not list((tmp_path / "hosted").rglob("config.json"))

    graph, rows, *_ = hosted.show_lineage("hard/gated", "up", 1, False)
    assert {row[0]: row[-1] for row in rows}["hard/gated"] == "gated"


@pytest.mark.parametrize("reference", ["/etc", "./models", "~/models", "../../x/y", "/tmp/x@main"])
def test_hosted_local_paths_are_refused_without_a_word_about_the_server(reference, tmp_path):
    hosted = MergelineApp(Settings(hosted=True, work_root=tmp_path))
    report, _ = hosted.validate(f"merge_method: linear\nmodels:\n  - model: {reference}\n    parameters: {{weight: 1}}\n")
    assert report == ("**Error:** models[0].model: local paths are not allowed here; use Hub repo ids like "
                      "&#x27;org/name&#x27;")


def test_the_file_route_serves_no_work_directory(client, app_url, app_settings):
    client.predict(MergelineApp(app_settings).example_config(DEMO_EXAMPLE), api_name="/merge")
    merged = next(app_settings.work_root.rglob("model.safetensors"))
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{app_url}gradio_api/file={merged}")
    assert refused.value.code in (403, 404)


def test_the_space_starts_with_the_listed_requirements(hub, tmp_path):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    env = {**os.environ, "SYSTEM": "spaces", "SPACE_ID": "tester/mergeline", "GRADIO_SERVER_PORT": str(number),
           "GRADIO_SERVER_NAME": "127.0.0.1", "OAUTH_CLIENT_ID": "client", "OAUTH_CLIENT_SECRET": "secret",
           "OAUTH_SCOPES": "openid profile write-repos", "OPENID_PROVIDER_URL": hub.endpoint,
           "MERGELINE_WORKDIR": str(tmp_path / "work"), "HF_TOKEN": "hf_space_secret"}
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        page = once_the_app_is_up(server, lambda: urllib.request.urlopen(f"http://127.0.0.1:{number}/",
                                                                         timeout=5).read().decode())
        assert "mergeline" in page
        opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,), {
            "redirect_request": lambda *args, **kwargs: None}))
        with pytest.raises(urllib.error.HTTPError) as login:
            opener.open(f"http://127.0.0.1:{number}/login/huggingface", timeout=10)
        assert login.value.code != 404  # the OAuth routes are there
    finally:
        server.terminate()
        server.wait(timeout=30)


def once_the_app_is_up(server: subprocess.Popen, attempt, seconds: float = 90):
    """`attempt()`'s result, retried every half second while the app process starts (at most `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return attempt()
        except Exception:  # noqa: BLE001 - not up yet
            if server.poll() is not None or time.monotonic() > deadline:
                output = server.stdout.read() if server.stdout else ""
                pytest.fail(f"the app did not start:\n{output}")
            time.sleep(0.5)


# -- 4, 5. Hub faults are retried; an unreachable Hub is one line ------------------------------


def test_merges_and_uploads_ride_out_429s_5xx_and_dropped_connections(hub_models, hub, tmp_path):
    hub.faults.update({r"^/api/models/hard/(base|ft)$": [429, 503, 0],
                       r"/resolve/": [503, 0, 429, 502, 503, 0],
                       r"^/api/whoami": [429, 503], r"^/api/repos/create": [503],
                       r"/commit/": [502, 0]})
    hub.write_tokens[TOKEN] = "tester"
    run_merge(parse_config(HUB_LINEAR), tmp_path / "out", cache_dir=tmp_path / "cache")
    assert upload_merge(tmp_path / "out", "faulty", TOKEN).endswith("/tester/faulty")
    assert not [statuses for statuses in hub.faults.values() if statuses]  # every fault was met and ridden out
    assert load_state(tmp_path / "out").keys() == load_state(hub_models.repos["hard/base"].root).keys()


def test_when_retries_run_out_the_request_is_named(hub_models, hub, tmp_path):
    hub.faults[r"^/api/models/hard/ft$"] = [503] * 5
    with pytest.raises(HubError) as caught:
        plan_merge(parse_config(HUB_LINEAR), cache_dir=tmp_path / "cache")
    assert str(caught.value) == (f"hard/ft: model info: the Hub at {hub.endpoint} answered HTTP 503 (a server-side "
                                 f"fault); try again later")
    hub.write_tokens[TOKEN] = "tester"
    hub.faults[r"^/api/whoami"] = [429] * 5
    with pytest.raises(HubError, match="upload: checking the token: .* is rate-limiting requests"):
        upload_merge(tmp_path, "anything", TOKEN)


def test_an_unreachable_hub_is_one_line_in_both_clis(hub_models, hub, tmp_path):
    config = tmp_path / "hub.yml"
    config.write_text(HUB_LINEAR)
    endpoint = closed_port_endpoint()
    for args in ((config, tmp_path / "out", "--quiet"), (config, tmp_path / "out", "--dry-run")):
        done = cli("merging", *args, env={"HF_ENDPOINT": endpoint})
        assert done.returncode == 2
        assert re.fullmatch(rf"error: hard/(base|ft): model info: could not reach {endpoint}: connection refused; "
                            r"check the network connection \(or HF_ENDPOINT\)\n", one_line_error(done.stderr))
    done = cli("lineage", "hard/ft", "--no-cache", env={"HF_ENDPOINT": endpoint})
    assert done.returncode == 2
    assert one_line_error(done.stderr) == (f"error: hard/ft: model info: could not reach {endpoint}: connection "
                                           f"refused; check the network connection (or HF_ENDPOINT)\n")
    assert not (tmp_path / "out").exists()


# -- 6, 7, 8. disks, signals and bad places -----------------------------------------------------


def test_a_full_disk_is_refused_before_downloading(hub_models, hub, tmp_path, monkeypatch, capsys):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    config = tmp_path / "hub.yml"
    config.write_text(HUB_LINEAR)
    assert merge_main([str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert "disk: the merge needs" in one_line_error(capsys.readouterr().err)
    assert not hub.downloaded("hard/ft") - {"config.json"} and not (tmp_path / "out").exists()


def test_a_disk_that_fills_up_while_writing_leaves_nothing(demo_text, tmp_path, monkeypatch, capsys):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    config = tmp_path / "demo.yml"
    config.write_text(demo_text)
    assert merge_main([str(config), str(tmp_path / "out"), "--quiet"]) == 2
    assert "disk: the disk holding" in one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.yml"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Models large enough that a merge runs for a moment, so a signal lands in the middle of it."""
    family = Family(tmp_path_factory.mktemp("wide"), "llama", layers=12, hidden=384)
    return {"base": family.base(), "ft1": family.finetune(1), "ft2": family.finetune(2)}


def staging_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


def start_merge_and_wait_for_staging(config: Path, out: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "merging", str(config), str(out), "--workers", "0"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not staging_dirs(out.parent):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.002)
    return process


def test_sigterm_cleans_up_and_a_later_run_sweeps_what_sigkill_left(wide, tmp_path):
    config = tmp_path / "ties.yml"
    config.write_text(f"merge_method: ties\nbase_model: {wide['base']}\nmodels:\n"
                      f"  - {{model: {wide['ft1']}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                      f"  - {{model: {wide['ft2']}, parameters: {{weight: 0.5, density: 0.5}}}}\n")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    process = start_merge_and_wait_for_staging(config, outputs / "terminated")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "error: terminated; nothing was written" in err
    assert list(outputs.iterdir()) == []

    process = start_merge_and_wait_for_staging(config, outputs / "killed")
    process.kill()
    process.communicate(timeout=60)
    left = staging_dirs(outputs)
    assert left  # SIGKILL gives no chance to clean up
    done = cli("merging", config, outputs / "next", "--quiet")
    assert done.returncode == 0 and f"removed {left[0]}" in done.stderr
    assert sorted(p.name for p in outputs.iterdir()) == ["next"]


@pytest.mark.parametrize("output, message", [
    ("/sys/mergeline-out", "OUTPUT_DIR: cannot create /sys/mergeline-out (operation not permitted)"),
    ("{file}/out", "is a file, not a directory"),
], ids=["read-only", "file-parent"])
def test_outputs_that_cannot_be_written_are_one_line(output, message, demo_text, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    config = tmp_path / "demo.yml"
    config.write_text(demo_text)
    assert merge_main([str(config), output.format(file=tmp_path / "file"), "--quiet"]) == 2
    assert message in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("text, message", [
    ("models:\n  - {model: org/" + "a" * 5000 + ", parameters: {weight: 1}}",
     "characters) is neither an existing local directory nor a Hub repo id like 'org/name' (it is 5004 characters long)"),
    ("models:\n  - {model: org/a..b, parameters: {weight: 1}}", "('a..b' contains '..')"),
    ("models:\n  - {model: org/a, parameters: {weight: 1e308}}", "weight is 1e+308, out of range"),
], ids=["long-id", "dots-id", "huge-weight"])
def test_ids_and_values_out_of_bounds_are_one_line(text, message, tmp_path, capsys):
    config = tmp_path / "bad.yml"
    config.write_text(f"merge_method: linear\n{text}\n")
    assert merge_main([str(config), str(tmp_path / "out")]) == 2
    assert message in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("repo", ["x" * 97, "tester/a..b", "../up", "tester/-dash"], ids=["long", "dots", "up", "dash"])
def test_bad_push_to_names_are_one_line(repo, demo_text, hub, tmp_path, monkeypatch, capsys):
    hub.write_tokens[TOKEN] = "tester"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = tmp_path / "demo.yml"
    config.write_text(demo_text)
    assert merge_main([str(config), str(tmp_path / "out"), "--push-to", repo, "--quiet"]) == 2
    assert "repo name: " in one_line_error(capsys.readouterr().err)


# -- 9, 10, 11. the crawl survives bad ids, huge parent lists, lattices and self-references -----


def test_bad_parent_ids_are_notes_and_parent_lists_are_capped(hub, tmp_path):
    root = tmp_path / "repos"
    parents = ["crawl/base", "crawl/a..b", "not a repo"] + [f"crawl/p{i}" for i in range(10_000)]
    for repo_id, meta in {"crawl/base": {}, "crawl/child": {"base_model": parents}}.items():
        (root / repo_id).mkdir(parents=True)
        (root / repo_id / "README.md").write_text(f"---\n{yaml.safe_dump(meta)}---\n" if meta else "# base\n")
        hub.add_repo(repo_id, root / repo_id, card_data=meta)
    graph = build_lineage("crawl/child", HubSource(sleep=lambda s: None), CrawlOptions(depth=1, max_nodes=1000))
    notes = graph.nodes["crawl/child"]["notes"]
    assert "base_model entry 'crawl/a..b' is not a Hub repo id; ignored" in notes
    assert "base_model entry 'not a repo' is not a Hub repo id; ignored" in notes
    assert "the card names 10,001 parents; kept the first 64" in notes
    assert ("crawl/base", "crawl/child") in graph.edges and graph.number_of_nodes() == 65
    assert len([r for r in hub.requests if r[1].startswith("/api/models/crawl/")]) <= 70


def test_a_lattice_prints_each_subtree_once():
    graph = nx.DiGraph(target="m7-0")
    layers = [[f"m{level}-{i}" for i in range(9)] for level in range(8)]
    layers[-1] = ["m7-0"]
    for upper, lower in zip(layers, layers[1:]):
        for parent in upper:
            for child in lower:
                graph.add_edge(parent, child, relation="merge", method="slerp")
    for node in graph:
        graph.nodes[node]["status"] = "ok"
    started = time.perf_counter()
    lines = text_tree(graph).splitlines()
    assert time.perf_counter() - started < 1 and len(lines) <= graph.number_of_edges() + 1
    assert sum(line.endswith("(see above)") for line in lines) > 0


def test_a_self_reference_through_the_hubs_children_is_dropped(hub, tmp_path):
    folder = tmp_path / "narcissus"
    folder.mkdir()
    (folder / "README.md").write_text("---\nbase_model: self/narcissus\n---\n")
    hub.add_repo("self/narcissus", folder, card_data={"base_model": "self/narcissus"},
                 tags=["base_model:self/narcissus", "base_model:finetune:self/narcissus"])
    graph = build_lineage("self/narcissus", HubSource(sleep=lambda s: None), CrawlOptions(direction="both", depth=2))
    assert list(graph.edges) == [] and graph.graph["cycles"] == []
    assert "self-reference to self/narcissus in hub_children dropped" in graph.nodes["self/narcissus"]["notes"]


# -- 12, 13. a hosted plan cannot hold the queue; sessions leave no files ---------------------


def test_hosted_plans_are_capped(demo_text, tmp_path):
    demo_models = tmp_path / "work" / "demo-models"
    text = demo_config(demo_models)
    slices = "merge_method: passthrough\nslices:\n" + "".join(
        f"  - sources: [{{model: {demo_models / 'demo-base'}, layer_range: [0, 1]}}]\n" for _ in range(300))
    hosted = MergelineApp(Settings(hosted=True, work_root=tmp_path / "work"))
    assert "slices: 300 slices exceed this Space&#x27;s limit of 256" in hosted.validate(slices)[0]
    small = MergelineApp(Settings(hosted=True, work_root=tmp_path / "work", limits=HostedLimits(max_tensors=10)))
    assert "the merge writes 39 tensors, over this Space&#x27;s limit of 10" in small.validate(text)[0]
    limits = HostedLimits(max_output_bytes=1000, allowed_local_roots=(demo_models,))
    with pytest.raises(MergeError, match="the merge writes 657.66 KB, over this Space's limit of 1.00 KB"):
        run_merge(load_config(text, limits=limits), tmp_path / "out", limits=limits)
    assert not (tmp_path / "out").exists()


def test_a_session_leaves_no_files_and_a_crashed_process_is_swept(tmp_path):
    app = MergelineApp(Settings(work_root=tmp_path))

    class Request:
        session_hash = "abc123"

    log, result, archive, job, name = list(app.merge(app.example_config(DEMO_EXAMPLE), None, request=Request()))[-1]
    app.show_lineage("mlabonne/NeuralBeagle14-7B", "up", 2, True, request=Request())
    session = app.session_dir(Request())
    assert Path(archive).is_file() and (session / "lineage").is_dir()
    app.end_session(Request())
    assert not session.exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / "sessions" / f"{dead.stdout.strip()}-gone"
    (orphan / "job-x").mkdir(parents=True)
    MergelineApp(Settings(work_root=tmp_path))
    assert not orphan.exists()


# -- 14. a failed upload says what it left ------------------------------------------------------


def test_a_repo_that_cannot_be_removed_after_a_failed_upload_is_reported(demo_text, hub, tmp_path):
    hub.write_tokens[TOKEN] = "tester"
    config = parse_config(demo_text)
    run_merge(config, tmp_path / "out")
    hub.fail_commits = 1
    hub.faults[r"^/api/repos/delete"] = [500] * 5
    with pytest.raises(MergeError) as caught:
        upload_merge(tmp_path / "out", "stuck", TOKEN)
    assert "removing the new, empty repo failed too, so it remains at" in str(caught.value)
    assert "tester/stuck" in str(caught.value) and "tester/stuck" in hub.repos
    assert len([r for r in hub.requests if r == ("DELETE", "/api/repos/delete")]) == 5


# -- 15. values with no meaning are refused; unusual ones merge with a warning ------------------


@pytest.mark.parametrize("method, params, message", [
    ("slerp", "t: 1.5", "parameters.t: t must lie in [0, 1], got 1.5"),
    ("ties", "weight: 1, density: 1.5", "density must lie in [0, 1], got 1.5"),
    ("della", "weight: 1, density: 0.2, epsilon: 0.3",
     "epsilon: della keeps entries with probabilities density +/- epsilon"),
], ids=["slerp-t", "ties-density", "della-window"])
def test_values_without_meaning_are_refused_before_merging(method, params, message, llama, tmp_path):
    base, ft = llama.base(), llama.finetune(1)
    text = f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {ft}\nparameters: {{{params}}}\n"
    with pytest.raises(MergeError, match=re.escape(message)):
        plan_merge(parse_config(text))


def test_unusual_values_merge_with_a_warning_in_the_log_and_the_card(llama, tmp_path, caplog):
    base, ft = llama.base(), llama.finetune(1)
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - {{model: {ft}, parameters: {{weight: -0.5}}}}\nparameters: {{lambda: 1.0e+30}}\ndtype: float64\n")
    run_merge(parse_config(text), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    for warning in ("models[0].parameters.weight: -0.5 is outside the usual range [0, inf]",
                    "parameters.lambda: 1e+30 is outside the usual range [0, 10]"):
        assert warning in card and warning in caplog.text


def test_with_the_hub_unreachable_every_action_of_the_space_says_so_in_one_line(tmp_path):
    from gradio_client import Client

    endpoint = closed_port_endpoint()
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    env = {**os.environ, "HF_ENDPOINT": endpoint, "GRADIO_SERVER_PORT": str(number),
           "GRADIO_SERVER_NAME": "127.0.0.1", "MERGELINE_WORKDIR": str(tmp_path / "work")}
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        client = once_the_app_is_up(server, lambda: Client(f"http://127.0.0.1:{number}/", verbose=False))
        unreachable = f"could not reach {endpoint}: connection refused"
        hint = "Hub examples need the network, the offline demos work without"
        report, preview = client.predict((ROOT / "examples" / "2-ties.yml").read_text(), api_name="/validate")
        assert unreachable in report and hint in report and "\n" not in report and preview == ""
        graph, *_ = client.predict("org/model", "up", 2, False, "relation", False, "", api_name="/lineage")
        assert unreachable in graph and hint in graph and graph.count("<p") == 1
        demo = MergelineApp(Settings(work_root=tmp_path / "work")).example_config(DEMO_EXAMPLE)
        log, result, archive, name = client.predict(demo, api_name="/merge")
        assert "Merged" in result  # the offline demo needs no network
        message = client.predict(name, False, "hf_some_token", api_name="/upload")
        assert unreachable in message and "\n" not in message
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_retries_wait_as_retry_after_says_and_back_off_without_it():
    from merging import hub

    class Response:
        def __init__(self, status: int, retry_after: str | None):
            self.status_code, self.headers = status, ({"Retry-After": retry_after} if retry_after else {})

    class Refused(Exception):
        def __init__(self, status: int, retry_after: str | None = None):
            super().__init__(f"HTTP {status}")
            self.response = Response(status, retry_after)

    answers = iter([Refused(429, "3"), Refused(503), Refused(503, "not a date"), "done"])
    waited: list[float] = []

    def request():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    policy = hub.RetryPolicy(base_delay=0.5)
    assert hub.call(request, "a request", retries=policy, sleep=waited.append) == "done"
    assert 3 <= waited[0] < 3.2 and 1 <= waited[1] < 1.2 and 2 <= waited[2] < 2.2  # Retry-After, then 0.5 * 2**n
    with pytest.raises(hub.HubError, match="^a request: the Hub at .* answered HTTP 502"):
        hub.call(lambda: (_ for _ in ()).throw(Refused(502)), "a request", retries=policy, sleep=waited.append)
