"""Stage 1: what the Hub knows about a model, as a plain `ModelRecord`.

A record is everything lineage reads about one repo: model info (card data, tags, license,
downloads, likes, siblings, the Hub's own `baseModels`), the README text and any mergekit config
files. Sources of records:

- `HubSource`: the live Hub through `huggingface_hub`, with `merging.hub`'s retries (429/5xx and
  dropped connections, honouring Retry-After), a per-run cache and an on-disk cache with expiry;
- `SnapshotSource`: a saved JSON snapshot (the offline demo, tests, reproducible reports);
- `RecordingSource`: wraps another source and saves what it saw as a snapshot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, TypeVar

from merging import hub
from merging.errors import HubError, HubUnreachable

log = logging.getLogger("mergeline.lineage")

CONFIG_FILES = ("mergekit_config.yml", "merge.yml", "mergekit_moe_config.yml")
RELATIONS = ("merge", "finetune", "adapter", "quantized")
SNAPSHOT_VERSION = 1
MAX_TEXT_BYTES = 2 * 2**20

T = TypeVar("T")


class LineageError(ValueError):
    """A problem the user can fix (an option, a snapshot file, a model id): one line that names it.
    Hub outages arrive as `merging.errors.HubError`."""


@dataclass
class ModelRecord:
    id: str
    status: str = "ok"  # ok | missing | gated | private | error
    info: dict = field(default_factory=dict)  # model-info fields as the Hub API names them
    card: Optional[str] = None  # README.md text
    files: dict[str, str] = field(default_factory=dict)  # mergekit config files by name
    detail: str = ""  # why the status is not ok

    @classmethod
    def from_dict(cls, data: dict) -> "ModelRecord":
        return cls(**{k: data[k] for k in ("id", "status", "info", "card", "files", "detail") if k in data})


def child_tag(model_id: str, relation: Optional[str] = None) -> str:
    """The tag the Hub puts on a model's children: `base_model:<id>`, or `base_model:<relation>:<id>`."""
    return f"base_model:{relation}:{model_id}" if relation else f"base_model:{model_id}"


class RecordSource(Protocol):
    def record(self, model_id: str) -> ModelRecord: ...

    def children(self, model_id: str) -> list[tuple[str, Optional[str]]]:
        """(child, relation or None) for each model the Hub lists as made from `model_id`."""


_INFO_FIELDS = ["cardData", "tags", "downloads", "likes", "gated", "private", "siblings", "baseModels",
                "childrenModelCount", "sha", "lastModified", "library_name", "pipeline_tag"]


class DiskCache:
    """JSON files under a directory, each valid for `ttl` seconds. Never holds private or gated data."""

    def __init__(self, directory: Path, ttl: float = 24 * 3600):
        self.directory, self.ttl = Path(directory), ttl

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def get(self, key: str):
        path = self._path(key)
        try:
            if time.time() - path.stat().st_mtime > self.ttl:
                return None
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, value) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)


def default_cache_dir() -> Path:
    """`lineage/` under mergeline's cache root (`$MERGELINE_CACHE`, default ~/.cache/mergeline)."""
    return Path(os.environ.get("MERGELINE_CACHE") or Path.home() / ".cache" / "mergeline") / "lineage"


class HubSource:
    """Records from the live Hub (or whatever HF_ENDPOINT points at).

    A Hub that cannot be reached at all raises `HubError` (the crawl cannot go on); any other
    failure of one repo becomes that repo's `error` status and the crawl goes on.
    """

    def __init__(self, token: hub.Token = None, cache: Optional[DiskCache] = None,
                 sleep: Callable[[float], None] = time.sleep):
        from huggingface_hub import HfApi

        self._api = HfApi(token=token)
        self._token = token
        self._scope = f"{hub.endpoint()}|{_token_scope(token)}"
        self._cache = cache
        self._files = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lineage-files")
        self._sleep = sleep
        self._memory: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def token(self) -> hub.Token:
        return self._token

    def _cached(self, key: str, compute: Callable[[], T], shareable: Callable[[T], bool]) -> T:
        with self._lock:
            if key in self._memory:
                return self._memory[key]  # type: ignore[return-value]
        value = self._cache.get(f"{self._scope}|{key}") if self._cache else None
        if value is None:
            value = compute()
            if self._cache and shareable(value):
                self._cache.put(f"{self._scope}|{key}", value)
        with self._lock:
            self._memory[key] = value
        return value

    def _hub(self, call: Callable[[], T], what: str) -> T:
        return hub.call(call, what, sleep=self._sleep)

    def record(self, model_id: str) -> ModelRecord:
        def fetch() -> dict:
            return asdict(self._fetch_record(model_id))

        # What a token let us read (private and gated repos) never reaches a cache another scope reads.
        data = self._cached(f"record:{model_id}", fetch,
                            lambda d: d["status"] in ("ok", "missing") and not d["info"].get("private")
                            and not d["info"].get("gated"))
        return ModelRecord.from_dict(data)

    def _fetch_record(self, model_id: str) -> ModelRecord:
        """Metadata (one request, `expand`ed to the fields lineage reads) and, alongside it, the
        card: nearly every repo has one, so asking at once saves a round trip per generation.
        Config files are asked for once the metadata says they exist."""
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

        card = self._files.submit(self._read_file, model_id, "README.md", None)
        try:
            response = self._hub(lambda: self._model_info(model_id), f"{model_id}: model info")
        except RepositoryNotFoundError:
            return ModelRecord(model_id, "missing", detail="no such repo, or private")
        except HubUnreachable:
            raise
        except HubError as exc:
            return ModelRecord(model_id, "error", detail=str(exc))
        except (HfHubHTTPError, HFValidationError, OSError) as exc:
            return ModelRecord(model_id, "error", detail=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        info = _info_dict(response)
        record = ModelRecord(model_id, "private" if info.get("private") else "ok", info)
        siblings = {s["rfilename"] for s in info.get("siblings", [])}
        configs = [name for name in CONFIG_FILES if name in siblings]
        texts = dict(zip(configs, self._files.map(lambda name: self._read_file(model_id, name, info.get("sha")),
                                                  configs)))
        if "README.md" in siblings:
            texts = {"README.md": card.result(), **texts}
        for name, text in texts.items():
            if isinstance(text, GatedRepoError):
                record.status, record.detail = "gated", "gated: accept the terms on the Hub and pass a token"
                record.card, record.files = None, {}
                break
            if isinstance(text, HubUnreachable):
                raise text
            if isinstance(text, Exception):
                record.detail = f"{name}: {type(text).__name__}"
            elif name == "README.md":
                record.card = text
            else:
                record.files[name] = text
        return record

    def _model_info(self, model_id: str) -> dict:
        """The Hub's model-info JSON with only the fields lineage reads (`expand`): as the API
        names them, without building huggingface_hub's ModelInfo, which costs more than the crawl's
        own work per model."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        response = get_session().get(f"{hub.endpoint()}/api/models/{model_id}",
                                     params=[("expand", field) for field in _INFO_FIELDS],
                                     headers=build_hf_headers(token=self._token))
        hf_raise_for_status(response)
        return response.json()

    def _read_file(self, model_id: str, name: str, revision: Optional[str]):
        """A card or config's text (at most MAX_TEXT_BYTES) in one GET, or the error that refused it.
        Nothing is written to disk, so what a token let us read stays in this process."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(model_id, name, revision=revision)

        def get() -> str:
            with get_session().stream("GET", url, headers=build_hf_headers(token=self._token),
                                      follow_redirects=True) as response:
                hf_raise_for_status(response)
                data = b""
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) >= MAX_TEXT_BYTES:
                        break
            return data[:MAX_TEXT_BYTES].decode("utf-8", errors="replace")

        try:
            return self._hub(get, f"{model_id}: {name}")
        except (HfHubHTTPError, HubError, OSError) as exc:  # the caller decides what each one means
            return exc

    def children(self, model_id: str) -> list[tuple[str, Optional[str]]]:
        """(child, relation or None) for every model the Hub lists as made from `model_id`: one
        listing, the relation read off each child's `base_model:<relation>:<id>` tag."""
        tag = child_tag(model_id)

        def relation_of(tags: list[str]) -> Optional[str]:
            return next((r for r in RELATIONS if child_tag(model_id, r) in tags), None)

        def fetch() -> list[list]:
            return self._hub(lambda: [[m.id, relation_of(list(m.tags or []))]
                                      for m in self._api.list_models(filter=tag, limit=1000)],
                             f"{model_id}: listing children")

        return [(child, relation) for child, relation in self._cached(f"children:{tag}", fetch, lambda _: True)]


def _token_scope(token: hub.Token) -> str:
    """Who a request speaks for, as a cache key part: anonymous, the environment's login, or a hash
    of the token (the token itself is never written)."""
    if token is False:
        return "anonymous"
    if token is None:
        return "environment"
    return "token-" + hashlib.sha256(str(token).encode()).hexdigest()[:16]


def _info_dict(info: dict) -> dict:
    """The model-info fields lineage uses, JSON-ready, named as the Hub API names them."""
    card = info.get("cardData")
    return {
        "id": info.get("id"), "sha": info.get("sha"), "cardData": card if isinstance(card, dict) else None,
        "tags": [t for t in info.get("tags") or [] if isinstance(t, str)],
        "downloads": info.get("downloads") or 0, "likes": info.get("likes") or 0, "gated": info.get("gated") or False,
        "private": bool(info.get("private")),
        "siblings": [{"rfilename": s["rfilename"]} for s in info.get("siblings") or []
                     if isinstance(s, dict) and isinstance(s.get("rfilename"), str)],
        "baseModels": info.get("baseModels"), "childrenModelCount": info.get("childrenModelCount"),
    }


class SnapshotSource:
    """Records from a saved snapshot; anything the snapshot lacks is `missing`."""

    def __init__(self, path: Path):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise LineageError(f"SNAPSHOT: cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
        if not isinstance(data, dict) or data.get("version") != SNAPSHOT_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise LineageError(f"SNAPSHOT: {path} is not a mergeline lineage snapshot (version {version!r})")
        self.records = {k: ModelRecord.from_dict(v) for k, v in data["records"].items()}
        self.child_lists: dict[str, list[str]] = data.get("children", {})
        self.target: Optional[str] = data.get("target")

    def record(self, model_id: str) -> ModelRecord:
        return self.records.get(model_id) or ModelRecord(model_id, "missing", detail="not in the snapshot")

    def children(self, model_id: str) -> list[tuple[str, Optional[str]]]:
        by_relation = {child: relation for relation in RELATIONS
                       for child in self.child_lists.get(child_tag(model_id, relation), [])}
        listed = self.child_lists.get(child_tag(model_id), [])
        return [(child, by_relation.get(child)) for child in dict.fromkeys([*listed, *by_relation])]


class RecordingSource:
    """Passes calls to `inner` and keeps what came back, to save as a snapshot."""

    def __init__(self, inner: RecordSource):
        self.inner = inner
        self.records: dict[str, ModelRecord] = {}
        self.child_lists: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def record(self, model_id: str) -> ModelRecord:
        record = self.inner.record(model_id)
        with self._lock:
            self.records[model_id] = record
        return record

    def children(self, model_id: str) -> list[tuple[str, Optional[str]]]:
        found = self.inner.children(model_id)
        with self._lock:  # in the Hub's own form: a list per tag
            self.child_lists[child_tag(model_id)] = [child for child, _ in found]
            for relation in {r for _, r in found} - {None}:
                self.child_lists[child_tag(model_id, relation)] = [c for c, r in found if r == relation]
        return found

    def save(self, path: Path, target: Optional[str] = None) -> None:
        write_snapshot(path, self.records.values(), self.child_lists, target)


def write_snapshot(path: Path, records, children: dict[str, list[str]], target: Optional[str] = None) -> None:
    # Private and gated repos' contents stay out of snapshots: a snapshot is meant to be shared.
    public = {r.id: asdict(r) if r.status in ("ok", "missing") else asdict(ModelRecord(r.id, r.status, detail=r.detail))
              for r in records}
    payload = {"version": SNAPSHOT_VERSION, "target": target, "records": public, "children": children}
    Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
