"""Input models: what they contain (headers only) and getting their files (local or from the Hub).

`inspect_model` learns a model's config.json and every tensor's name, dtype and shape without
reading weights: from local safetensors headers, or from the Hub's safetensors metadata API (a
few KB of range requests per shard). `fetch_model` later downloads only the files the plan needs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import hub
from .adapters import ADAPTER_FILES, AdaptedReader, Adapter, patches
from .config import ModelRef
from .errors import MergeError, disk_full
from .refs import parse_model_ref
from .safetensors_io import TensorHeader, TensorReader, dtype_from_code, read_header
from .untrusted_yaml import front_matter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt",
                   "spiece.model")
# Small files every merge wants from the models it copies them from.
SIDE_FILES = ("config.json", "generation_config.json", "README.md") + TOKENIZER_FILES
_PICKLE_FILE = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin$")


@dataclass
class ModelSource:
    """One input model: its config, its tensors' headers and, once fetched, its local directory."""

    ref: ModelRef
    config: dict
    tensors: dict[str, TensorHeader]
    file_sizes: dict[str, int] = field(default_factory=dict)  # weight files only
    license: Optional[str] = None
    local_dir: Optional[Path] = None
    pickled: bool = False
    commit: Optional[str] = None  # the Hub commit the headers were read at; downloads pin to it
    adapter: Optional[Adapter] = None  # a LoRA adapter applied as the tensors stream (`model+adapter`)
    base_ref: Optional[ModelRef] = None  # where the weights come from, when not `ref` (a bare adapter's base)
    notes: list[str] = field(default_factory=list)  # for the log and the card

    @property
    def weights_ref(self) -> ModelRef:
        """The model whose weight files this source reads (the adapter aside)."""
        return self.base_ref or self.ref.without_adapter

    @property
    def adapter_to_fetch(self) -> Optional[Adapter]:
        """The adapter, while its files are still to be downloaded."""
        return self.adapter if self.adapter is not None and self.adapter.local_dir is None else None

    @property
    def parents(self) -> list[ModelRef]:
        """What the card names for this input: the model and its adapter, if any."""
        return [self.weights_ref] + ([self.adapter.ref] if self.adapter is not None else [])

    @property
    def label(self) -> str:
        return str(self.ref)

    def reader(self) -> "TensorReader | PickleReader":
        if self.local_dir is None:
            raise RuntimeError(f"{self.label} has not been fetched")
        reader = (PickleReader if self.pickled else TensorReader)(self.local_dir, self.tensors)
        if self.adapter is None:
            return reader
        if self.adapter.local_dir is None:
            raise RuntimeError(f"{self.adapter.ref} has not been fetched")
        return AdaptedReader(reader, TensorReader(self.adapter.local_dir, self.adapter.tensors),
                             patches(self.adapter, self.tensors))


class PickleReader:
    """Reads `pytorch_model*.bin` shards with ``weights_only=True`` and mmap, only when allowed."""

    def __init__(self, root: Path, headers: dict[str, TensorHeader]):
        self.root, self.headers = root, headers
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        file = self.headers[name].file
        if file not in self._loaded:
            self._loaded[file] = torch.load(self.root / file, map_location="cpu", weights_only=True, mmap=True)
        tensor = self._loaded[file][name]
        return (tensor if rows is None else tensor[rows[0]:rows[1]]).clone()

    def close(self) -> None:
        self._loaded.clear()


def _card_license(text: str) -> Optional[str]:
    """The `license:` of a model card's YAML front matter, if it has one."""
    meta, _ = front_matter(text)
    value = meta.get("license") if meta else None
    return str(value) if value else None


def _pickle_refused(label: str) -> MergeError:
    return MergeError(f"{label}: has only pickled .bin weights; pass --allow-pickle to load them "
                      f"(with weights_only=True), or use a safetensors copy")


def _local_headers(root: Path, label: str, allow_pickle: bool) -> tuple[dict[str, TensorHeader], dict[str, int], bool]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if files:
        headers: dict[str, TensorHeader] = {}
        for name in files:
            path = root / name
            if not path.is_file():
                raise MergeError(f"{label}: the index names {name}, which is missing")
            headers.update(read_header(path, name))
        return headers, {name: (root / name).stat().st_size for name in files}, False
    pickles = sorted(p.name for p in root.iterdir() if _PICKLE_FILE.match(p.name))
    if not pickles:
        raise MergeError(f"{label}: no safetensors weights found in {root}")
    if not allow_pickle:
        raise _pickle_refused(label)
    headers = {}
    for name in pickles:
        state = torch.load(root / name, map_location="cpu", weights_only=True, mmap=True)
        for key, tensor in state.items():
            headers[key] = TensorHeader(key, tensor.dtype, tuple(tensor.shape), name, 0,
                                        tensor.numel() * tensor.element_size())
    return headers, {name: (root / name).stat().st_size for name in pickles}, True


def inspect_model(ref: ModelRef, *, token: hub.Token = None, allow_pickle: bool = False,
                  cache_dir: Optional[Path] = None) -> ModelSource:
    """Learn a model's config and tensor headers without reading its weights."""
    try:
        base_id = _adapter_base(ref) if ref.adapter is None and ref.local else None
        if base_id is None:
            return _inspect_model(ref, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir)
    except _AdapterRepo as found:
        base_id = found.base
    # An adapter repo named as a model: that adapter on the base it names. A Hub adapter may name
    # only a Hub base: what someone else's file says must never reach this machine's file system.
    base = parse_model_ref(base_id, f"{ref} (its base_model_name_or_path)", local_roots=None if ref.local else ())
    source = inspect_model(dataclasses.replace(base, adapter=ref), token=token, allow_pickle=allow_pickle,
                           cache_dir=cache_dir)
    source.base_ref, source.ref = source.ref.without_adapter, ref
    source.notes.append(f"{ref} is a LoRA adapter: merged as {base_id}+{ref}")
    return source


def _inspect_model(ref: ModelRef, *, token: hub.Token, allow_pickle: bool,
                   cache_dir: Optional[Path]) -> ModelSource:
    if ref.adapter is not None:
        source = inspect_model(ref.without_adapter, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir)
        source.ref, source.adapter = ref, inspect_adapter(ref.adapter, token=token, cache_dir=cache_dir)
        source.adapter.check()
        patches(source.adapter, source.tensors)  # shapes checked now, before anything is downloaded
        return source
    if ref.local:
        root = Path(ref.path)
        config_path = root / "config.json"
        if not config_path.is_file():
            raise MergeError(f"{ref}: no config.json in {root}; point at a Hugging Face model directory")
        headers, sizes, pickled = _local_headers(root, str(ref), allow_pickle)
        readme = root / "README.md"
        license_ = _card_license(readme.read_text(errors="replace")) if readme.is_file() else None
        return ModelSource(ref, _read_json(config_path, ref), headers, sizes, license_, root, pickled)
    return _inspect_hub_model(ref, token=token, allow_pickle=allow_pickle, cache_dir=cache_dir)


class _AdapterRepo(Exception):
    """Inspecting a Hub repo found a bare adapter: `base` is the model it adapts."""

    def __init__(self, base: str):
        super().__init__(base)
        self.base = base


def _adapter_base(ref: ModelRef, adapter_config: Optional[Path] = None) -> Optional[str]:
    """The `base_model_name_or_path` of a bare adapter (`adapter_config` given, or a local directory
    with one and no config.json), else None."""
    if adapter_config is None:
        root = Path(ref.path)
        if (root / "config.json").is_file() or not (root / "adapter_config.json").is_file():
            return None
        adapter_config = root / "adapter_config.json"
    base = _read_json(adapter_config, ref).get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise MergeError(f"{ref}: a LoRA adapter that does not name its base (base_model_name_or_path); write "
                         f"'base+{ref}'")
    return base


def inspect_adapter(ref: ModelRef, *, token: hub.Token = None, cache_dir: Optional[Path] = None) -> Adapter:
    """An adapter's config and tensor headers (range requests on the Hub: no weights read)."""
    not_adapter = f"{ref}: not a PEFT adapter (no adapter_config.json and adapter_model.safetensors)"
    if ref.local:
        root = Path(ref.path)
        if not all((root / name).is_file() for name in ADAPTER_FILES):
            raise MergeError(not_adapter)
        return Adapter(ref, _read_json(root / "adapter_config.json", ref),
                       read_header(root / "adapter_model.safetensors"),
                       {"adapter_model.safetensors": (root / "adapter_model.safetensors").stat().st_size}, root)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, SafetensorsParsingError

    api = HfApi(token=token)
    try:
        info = hub.call(lambda: api.model_info(ref.path, revision=ref.revision, files_metadata=True),
                        f"{ref}: model info")
        siblings = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
        if not all(name in siblings for name in ADAPTER_FILES):
            raise MergeError(not_adapter)
        config_path = hub.call(lambda: api.hf_hub_download(ref.path, "adapter_config.json", revision=info.sha,
                                                           cache_dir=cache_dir), f"{ref}: adapter_config.json")
        meta = hub.call(lambda: api.parse_safetensors_file_metadata(ref.path, "adapter_model.safetensors",
                                                                    revision=info.sha),
                        f"{ref}: adapter headers")
    except MergeError:
        raise
    except (HfHubHTTPError, EntryNotFoundError, OSError, SafetensorsParsingError) as exc:
        raise _hub_error(ref, exc) from None
    headers = {name: TensorHeader(name, dtype_from_code(t.dtype, f"{ref}:{name}"), tuple(t.shape),
                                  "adapter_model.safetensors", 0, t.data_offsets[1] - t.data_offsets[0])
               for name, t in meta.tensors.items()}
    return Adapter(ref, _read_json(Path(config_path), ref), headers,
                   {"adapter_model.safetensors": siblings["adapter_model.safetensors"]}, None, info.sha)


def _read_json(path: Path, ref: ModelRef) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise MergeError(f"{ref}: {path.name} is not valid JSON ({detail})") from None


def _hub_error(ref: ModelRef, exc: Exception) -> MergeError:
    """The one line a failed Hub request for `ref` becomes (network faults were retried by `hub.call`)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, MergeError):
        return exc
    if isinstance(exc, GatedRepoError):
        return MergeError(f"{ref}: the repo is gated; accept its terms on the Hub and pass a token with access")
    if isinstance(exc, RevisionNotFoundError):
        return MergeError(f"{ref}: revision {ref.revision!r} does not exist on the Hub")
    if isinstance(exc, RepositoryNotFoundError):
        return MergeError(f"{ref}: no such model on the Hub (or it is private: pass a token that can read it)")
    if disk_full(exc):
        return MergeError(f"{ref}: the disk is full while downloading ({exc.filename or 'the Hub cache'}); free "
                          f"space or point HF_HOME at a larger disk")
    status = hub.http_status(exc)
    detail = f"HTTP {status}" if status else type(exc).__name__
    first = str(exc).splitlines()[0] if str(exc) else ""
    detail += f": {first}" if first else ""
    return MergeError(f"{ref}: the Hub at {hub.endpoint()} refused the request ({detail})")


def _inspect_hub_model(ref: ModelRef, *, token: hub.Token, allow_pickle: bool,
                       cache_dir: Optional[Path]) -> ModelSource:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        NotASafetensorsRepoError,
        SafetensorsParsingError,
    )

    api = HfApi(token=token)
    repo = ref.path
    try:
        info = hub.call(lambda: api.model_info(repo, revision=ref.revision, files_metadata=True),
                        f"{ref}: model info")
        siblings = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
        if "config.json" not in siblings and "adapter_config.json" in siblings and ref.adapter is None:
            raise _AdapterRepo(_adapter_base(ref, Path(hub.call(lambda: api.hf_hub_download(
                repo, "adapter_config.json", revision=info.sha, cache_dir=cache_dir), f"{ref}: adapter_config.json"))))
        if "config.json" not in siblings:
            raise MergeError(f"{ref}: the repo has no config.json; is it a transformers model?")
        config_path = hub.call(lambda: api.hf_hub_download(repo, "config.json", revision=info.sha,
                                                           cache_dir=cache_dir), f"{ref}: config.json")
        card = info.card_data.to_dict() if info.card_data is not None else {}
        license_ = card.get("license")
        safetensor_files = [f for f in siblings if f.endswith(".safetensors")]
        if safetensor_files:
            meta = hub.call(lambda: api.get_safetensors_metadata(repo, revision=info.sha),
                            f"{ref}: safetensors headers")
            headers = {}
            for file, file_meta in meta.files_metadata.items():
                for name, t in file_meta.tensors.items():
                    begin, end = t.data_offsets
                    headers[name] = TensorHeader(name, dtype_from_code(t.dtype, f"{ref}:{name}"), tuple(t.shape),
                                                 file, 0, end - begin)
            sizes = {f: siblings.get(f, 0) for f in meta.files_metadata}
            pickled = False
        else:
            pickles = [f for f in siblings if _PICKLE_FILE.match(f)]
            if not pickles:
                raise MergeError(f"{ref}: the repo has no safetensors or pytorch_model.bin weights")
            if not allow_pickle:
                raise _pickle_refused(str(ref))
            headers, sizes, pickled = {}, {f: siblings[f] for f in pickles}, True
    except MergeError:
        raise
    except (HfHubHTTPError, EntryNotFoundError, OSError, HFValidationError, NotASafetensorsRepoError,
            SafetensorsParsingError) as exc:
        raise _hub_error(ref, exc) from None
    return ModelSource(ref, _read_json(Path(config_path), ref), headers, sizes,
                       str(license_) if license_ else None, None, pickled, info.sha)


FileFn = Callable[[str, int, float], None]  # (file name, bytes, seconds) as each weight file arrives


def fetch_model(source: ModelSource, weight_files: set[str], *, token: hub.Token = None,
                cache_dir: Optional[Path] = None, on_file: Optional[FileFn] = None) -> None:
    """Download the given weight files plus config/tokenizer files, then re-read exact headers.

    Weight files come one request each, a few side by side, each retried on its own, and
    `on_file` hears of each as it lands (a 7B model's shards take minutes: worth watching)."""
    if source.adapter_to_fetch is not None:
        _fetch_adapter(source.adapter, token=token, cache_dir=cache_dir, on_file=on_file)
    if source.weights_ref.local:
        return
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    base = source.weights_ref
    revision = source.commit or base.revision
    weights = sorted(set(source.file_sizes) if source.pickled else weight_files)  # pickles: headers need them all

    def download(name: str) -> None:
        started = time.perf_counter()
        hub.call(lambda: hf_hub_download(base.path, name, revision=revision, cache_dir=cache_dir, token=token),
                 f"{base}: downloading {name}")
        if on_file is not None:
            on_file(name, source.file_sizes.get(name, 0), time.perf_counter() - started)

    try:
        path = hub.call(lambda: snapshot_download(base.path, revision=revision, allow_patterns=list(SIDE_FILES),
                                                  cache_dir=cache_dir, token=token), f"{base}: download")
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(download, weights))
    except (HfHubHTTPError, OSError) as exc:
        raise _hub_error(base, exc) from None
    root = Path(path)
    # Downloads fall back to whatever is cached when the Hub cannot be asked, so check that every
    # weight file we need really arrived.
    missing = [f for f in weights if not (root / f).is_file()]
    if missing:
        raise MergeError(f"{base}: download incomplete, missing {', '.join(missing[:3])}; check the "
                         f"connection and the token, then retry")
    if source.pickled:
        headers, _, _ = _local_headers(root, source.label, allow_pickle=True)
    else:
        headers = dict(source.tensors)
        for file in weight_files:
            headers.update(read_header(root / file, file))
    source.tensors = headers
    source.local_dir = root


def _fetch_adapter(adapter: Adapter, *, token: hub.Token, cache_dir: Optional[Path],
                   on_file: Optional[FileFn]) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    started = time.perf_counter()
    try:
        path = hub.call(lambda: snapshot_download(adapter.ref.path, revision=adapter.commit, cache_dir=cache_dir,
                                                  allow_patterns=list(ADAPTER_FILES), token=token),
                        f"{adapter.ref}: download")
    except (HfHubHTTPError, OSError) as exc:
        raise _hub_error(adapter.ref, exc) from None
    root = Path(path)
    if not all((root / name).is_file() for name in ADAPTER_FILES):
        raise MergeError(f"{adapter.ref}: download incomplete; check the connection and the token, then retry")
    adapter.tensors = read_header(root / "adapter_model.safetensors")
    adapter.local_dir = root
    if on_file is not None:
        on_file("adapter_model.safetensors", adapter.file_sizes.get("adapter_model.safetensors", 0),
                time.perf_counter() - started)
