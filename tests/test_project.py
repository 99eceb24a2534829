"""Project hygiene that CI depends on."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_torch_is_pinned_and_test_packages_are_separate():
    runtime = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", runtime, re.M)
    assert "pytest" not in runtime and "transformers" not in runtime
    assert "pytest" in (ROOT / "requirements-test.txt").read_text()


def test_space_front_matter_matches_the_pinned_gradio():
    import yaml

    readme = (ROOT / "README.md").read_text()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["hf_oauth"] is True
    assert "write-repos" in meta["hf_oauth_scopes"]
    pinned = re.search(r"^gradio(?:\[[\w,]+\])?==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert str(meta["sdk_version"]) == pinned
