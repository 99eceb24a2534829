"""Project hygiene that CI depends on."""

from __future__ import annotations

import re
import subprocess
import sys
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
    assert "pytest" not in runtime and "peft" not in runtime and "playwright" not in runtime
    assert "pytest" in (ROOT / "requirements-test.txt").read_text()


def test_transformers_is_imported_only_for_moe_routers(tmp_path):
    """The app, the CLIs and plain merges never load transformers; only a MoE's routers do."""
    script = f"""
import sys
from pathlib import Path
import app, lineage, merging.__main__
from merging import parse_config, run_merge
from merging.demo import demo_config
run_merge(parse_config(demo_config(Path({str(tmp_path)!r}) / "models")), Path({str(tmp_path)!r}) / "out")
assert "transformers" not in sys.modules, "transformers was imported"
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_space_front_matter_matches_the_pinned_gradio():
    import yaml

    readme = (ROOT / "README.md").read_text()
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["hf_oauth"] is True
    assert "write-repos" in meta["hf_oauth_scopes"]
    pinned = re.search(r"^gradio(?:\[[\w,]+\])?==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert str(meta["sdk_version"]) == pinned


def test_the_linter_passes():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_console_scripts_name_the_clis_main_functions():
    import importlib

    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"mergeline-merge", "mergeline-extract-lora", "mergeline-lineage"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_parsing_a_config_imports_no_torch():
    import subprocess
    import sys

    check = ("import sys; from merging import parse_config; "
             "parse_config('merge_method: ties\\nbase_model: org/a\\nmodels:\\n  - model: org/b\\n"
             "    parameters: {weight: 1, density: 0.5}\\ndtype: bfloat16\\n'); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_no_source_file_is_over_500_lines():
    sources = [p for folder in ("merging", "lineage") for p in (ROOT / folder).rglob("*.py")] + [ROOT / "app.py"]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > 500}
    assert not long
