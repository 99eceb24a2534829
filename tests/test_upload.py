"""Uploading a merge to the (fake) Hub with the real huggingface_hub client."""

from __future__ import annotations

import pytest
import yaml

from merging import MergeError, parse_config, run_merge
from merging.__main__ import main
from merging.demo import demo_config
from merging.upload import suggest_repo_name, upload_merge

TOKEN = "hf_write_token_for_tests"


@pytest.fixture()
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("upload")
    config = parse_config(demo_config(root / "models"))
    run_merge(config, root / "out")
    return root / "out"


def test_upload_lands_every_file_and_the_card(hub, merged):
    hub.write_tokens[TOKEN] = "tester"
    url = upload_merge(merged, "demo-upload", TOKEN)
    assert url.endswith("/tester/demo-upload")
    repo = hub.repos["tester/demo-upload"]
    assert sorted(repo.files()) == sorted(p.name for p in merged.iterdir())
    card = (repo.root / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model_relation"] == "merge"
    assert (repo.root / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()


def test_failed_upload_leaves_no_empty_repo(hub, merged):
    hub.write_tokens[TOKEN] = "tester"
    hub.fail_commits = 1
    with pytest.raises(MergeError, match="the new repo was removed"):
        upload_merge(merged, "tester/doomed", TOKEN)
    assert "tester/doomed" not in hub.repos
    assert ("DELETE", "/api/repos/delete") in hub.requests


def test_existing_repo_and_bad_token_are_one_line_errors(hub, merged):
    hub.write_tokens[TOKEN] = "tester"
    upload_merge(merged, "tester/taken", TOKEN)
    with pytest.raises(MergeError, match=r"^repo name: tester/taken already exists"):
        upload_merge(merged, "tester/taken", TOKEN)
    with pytest.raises(MergeError, match="token was refused"):
        upload_merge(merged, "other", "hf_wrong")
    with pytest.raises(MergeError, match="not a valid repo name"):
        upload_merge(merged, "bad name!", TOKEN)


def test_cli_push_to(hub, tmp_path, monkeypatch):
    hub.write_tokens[TOKEN] = "tester"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = tmp_path / "demo.yml"
    config.write_text(demo_config(tmp_path / "models"))
    assert main([str(config), str(tmp_path / "out"), "--push-to", "cli-merge", "--quiet"]) == 0
    assert "model.safetensors" in hub.repos["tester/cli-merge"].files()


def test_repo_name_suggestion(tmp_path):
    config = parse_config(demo_config(tmp_path))
    assert suggest_repo_name(config) == "demo-base-demo-chat-demo-code-ties"
