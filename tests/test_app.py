"""The Gradio app driven through gradio_client, as a remote user would."""

from __future__ import annotations

import zipfile
from pathlib import Path

from app import DEMO_EXAMPLE, DEMO_MOE_EXAMPLE, MergelineApp, Settings, examples


def test_validate_reports_a_bad_config(client):
    report, preview = client.predict("merge_method: ties\nmodels:\n  - model: org/a\n    parameters: {densty: 1}\n",
                                     api_name="/validate")
    assert "Error:" in report and "models[0].parameters.densty" in report and "did you mean" in report
    assert preview == ""


def test_demo_merge_then_upload(client, mergeline_app, hub):
    config = mergeline_app.example_config(DEMO_EXAMPLE)
    report, preview = client.predict(config, api_name="/validate")
    assert "The config is valid" in report and "tensors to write: 39" in report
    assert "(this merge)" in preview and "srcdoc=" in preview

    log, result, archive, name = client.predict(config, api_name="/merge")
    assert "Merged" in result and "[39/39]" in log and name == "demo-base-demo-chat-demo-code-ties"
    with zipfile.ZipFile(archive) as bundle:
        names = bundle.namelist()
    assert f"{name}/model.safetensors" in names and f"{name}/README.md" in names

    hub.write_tokens["hf_app_token"] = "app-user"
    message = client.predict(name, False, "hf_app_token", api_name="/upload")
    assert "Uploaded:" in message and f"app-user/{name}" in message
    landed = hub.repos[f"app-user/{name}"]
    assert {"model.safetensors", "README.md", "config.json", "mergekit_config.yml"} <= set(landed.files())
    assert "base_model_relation: merge" in (landed.root / "README.md").read_text()


def test_mixture_of_experts_in_the_space(client, mergeline_app):
    assert "Mixture of experts (LazyMergeKit style, 4x7B)" in examples()  # the Hub example beside the demo
    config = mergeline_app.example_config(DEMO_MOE_EXAMPLE)
    report, preview = client.predict(config, api_name="/validate")
    assert "The config is valid" in report and "output: MixtralForCausalLM, 2 experts, 1 per token" in report
    assert "routers: hidden from 5 prompts" in report and "demo-code" in preview.replace("&quot;", '"')
    log, result, archive, name = client.predict(config, api_name="/merge")
    assert "Merged" in result and "computing routers (hidden)" in log and "routers: layer 4/4" in log
    assert name == "demo-base-demo-chat-demo-code-moe"
    with zipfile.ZipFile(archive) as bundle:
        assert f"{name}/mergekit_moe_config.yml" in bundle.namelist()


def test_extract_a_lora_in_the_space_then_upload(client, mergeline_app, hub):
    from merging.demo import ensure_demo_models

    models = ensure_demo_models(mergeline_app.settings.demo_models)
    log, result, archive, name = client.predict(str(models["demo-chat"]), str(models["demo-base"]), 4,
                                                "q_proj, v_proj", api_name="/extract_lora")
    assert result.startswith("**Extracted") and "LoRA of rank 4 on 8 weights (q_proj, v_proj)" in log
    assert "the rank keeps" in log and name == "demo-chat-lora-r4"
    with zipfile.ZipFile(archive) as bundle:
        assert {f"{name}/adapter_config.json", f"{name}/adapter_model.safetensors"} <= set(bundle.namelist())
    hub.write_tokens["hf_app_token"] = "app-user"
    message = client.predict(name, False, "hf_app_token", api_name="/upload")
    assert "Uploaded:" in message and "adapter_model.safetensors" in set(hub.repos[f"app-user/{name}"].files())
    log, result, archive, name = client.predict(str(models["demo-chat"]), "org/nope", 4, "", api_name="/extract_lora")
    assert result.startswith("**Error:**") and "org/nope" in result and archive is None


def test_merge_error_is_one_line_and_leaves_no_job(client, app_settings):
    log, result, archive, name = client.predict("merge_method: slerp\nmodels:\n  - model: org/nope\n",
                                                api_name="/merge")
    assert result.startswith("**Error:**") and "\n" not in result and archive is None
    assert not [p for p in app_settings.work_root.rglob("job-*") if any(p.iterdir())]


def test_lineage_on_the_offline_demo(client):
    graph, nodes, cycles, shares, files = client.predict("mlabonne/NeuralBeagle14-7B", "both", 8, True, "relation", False, "",
                                                         api_name="/lineage")
    assert graph.startswith("<iframe srcdoc=") and "vis.Network" in graph.replace("&quot;", '"')
    ids = [row[0] for row in nodes["data"]]
    assert "mlabonne/Beagle14-7B" in ids and "leveldevai/TurdusBeagle-7B" in ids
    assert "50% fblgit/UNA-TheBeagle-7b-v1" in shares
    assert sorted(Path(f).suffix for f in files) == [".graphml", ".html", ".json", ".mmd", ".svg"]


def test_lineage_on_the_hub(client, hub, tmp_path):
    root = tmp_path / "repos"
    for repo_id, card in {"fam/base": "---\nlicense: mit\n---\n",
                          "fam/child": "---\nbase_model: fam/base\n---\n"}.items():
        (root / repo_id).mkdir(parents=True)
        (root / repo_id / "README.md").write_text(card)
        hub.add_repo(repo_id, root / repo_id, card_data={"base_model": "fam/base"} if "child" in repo_id else
                     {"license": "mit"})
    graph, nodes, cycles, shares, files = client.predict("fam/child", "up", 2, False, "relation", False, "", api_name="/lineage")
    assert [row[0] for row in nodes["data"]] == ["fam/base", "fam/child"]
    assert "100% fam/base" in shares and "No cycles" in cycles


def test_hosted_mode_refuses_local_paths(tmp_path):
    hosted = MergelineApp(Settings(hosted=True, work_root=tmp_path / "work"))
    report, _ = hosted.validate(f"merge_method: linear\nmodels:\n  - model: {tmp_path}\n    parameters: {{weight: 1}}\n")
    assert "local paths are not allowed here" in report
    demo_report, _ = hosted.validate(hosted.example_config(DEMO_EXAMPLE))
    assert "The config is valid" in demo_report  # the app's own demo models stay allowed
