"""Shared fixtures: tiny model families on disk and a loopback fake Hub.

The fake Hub starts before anything imports `huggingface_hub`, because the client reads
HF_ENDPOINT once at import time. Nothing in the suite reaches the network.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_hub import FakeHub  # noqa: E402

_HUB = FakeHub().start()
_HF_HOME = tempfile.mkdtemp(prefix="mergeline-hf-home-")
os.environ.update({
    "HF_ENDPOINT": _HUB.endpoint,
    "HF_HOME": _HF_HOME,
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_ETAG_TIMEOUT": "5",
    "TOKENIZERS_PARALLELISM": "false",
})
for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "SPACE_ID"):
    os.environ.pop(name, None)

import pytest  # noqa: E402
from tiny_models import Family  # noqa: E402


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama(models_root) -> Family:
    return Family(models_root, "llama", layers=4, hidden=32)


@pytest.fixture(scope="session")
def mistral(models_root) -> Family:
    return Family(models_root, "mistral", layers=4, hidden=64)


@pytest.fixture(scope="session")
def qwen2(models_root) -> Family:
    return Family(models_root, "qwen2", layers=4, hidden=32)


@pytest.fixture(scope="session")
def hub() -> FakeHub:
    return _HUB


@pytest.fixture(autouse=True)
def _clean_hub(hub):
    hub.requests.clear()
    hub.faults.clear()
    hub.token = None
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory):
    os.environ["MERGELINE_CACHE"] = str(tmp_path_factory.mktemp("mergeline-cache"))
    from app import Settings

    return Settings(work_root=tmp_path_factory.mktemp("app-work"))


@pytest.fixture(scope="module")
def mergeline_app(app_settings):
    from app import MergelineApp

    return MergelineApp(app_settings)


@pytest.fixture(scope="module")
def app_url(mergeline_app):
    from app import launch

    demo = mergeline_app.blocks()
    port = _free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)
