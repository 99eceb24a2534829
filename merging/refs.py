"""Model references as configs write them: a local directory or a Hub repo id, an optional
`@revision`, and an optional LoRA adapter (`model+adapter`). Parsed from the text alone; with
`local_roots` (a shared deployment) the file system is never probed for what is not allowed."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import MergeError
from .hub import repo_id_problem


@dataclass(frozen=True)
class ModelRef:
    """A model as the config names it: a local directory or a Hub repo id, with an optional
    revision, and optionally a LoRA adapter applied to it (mergekit's `model+adapter`)."""

    path: str
    revision: Optional[str] = None
    local: bool = False
    adapter: Optional["ModelRef"] = None

    def __str__(self) -> str:
        own = f"{self.path}@{self.revision}" if self.revision else self.path
        return f"{own}+{self.adapter}" if self.adapter else own

    @property
    def without_adapter(self) -> "ModelRef":
        return dataclasses.replace(self, adapter=None)

    @property
    def hub_id(self) -> Optional[str]:
        return None if self.local else self.path



def shown(value: Any, limit: int = 80) -> str:
    """`value` as an error message quotes it, shortened past `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the file system, say: not a directory
        return False


def parse_model_ref(value: Any, where: str, base_dir: Optional[Path] = None,
                    local_roots: Optional[Sequence[Path]] = None) -> ModelRef:
    """A model reference. With `local_roots` (a shared deployment), only directories under those
    roots are local models; anything else that is not a Hub repo id is refused without looking
    at the file system, so an error never tells what exists on the server."""
    if not isinstance(value, str) or not value.strip():
        raise MergeError(f"{where}: expected a Hub repo id or a local directory, got {shown(value)}")
    text = value.strip()
    if "+" in text:
        model, _, adapter = text.partition("+")
        if not model.strip() or not adapter.strip() or "+" in adapter:
            raise MergeError(f"{where}: {shown(text)} is not 'model+adapter' (one model, one LoRA adapter)")
        base = parse_model_ref(model, where, base_dir, local_roots)
        return dataclasses.replace(base, adapter=parse_model_ref(adapter, f"{where} (adapter)", base_dir, local_roots))
    path, _, revision = text.partition("@")
    if _ and not revision:
        raise MergeError(f"{where}: {shown(text)} has an empty revision after '@'")
    looks_like_path = path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path
    if local_roots is not None:
        if looks_like_path:
            local = Path(path).resolve() if Path(path).is_absolute() else None
            if local is None or not any(local.is_relative_to(root.resolve()) for root in local_roots) \
                    or not _is_dir(local):
                raise MergeError(f"{where}: local paths are not allowed here; use Hub repo ids like 'org/name'")
            return ModelRef(str(local), None, local=True)
    else:
        local_path = Path(os.path.expanduser(path))
        if base_dir is not None and not local_path.is_absolute():
            local_path = base_dir / local_path
        if _is_dir(local_path):
            if revision:
                raise MergeError(f"{where}: a revision ('@{revision}') only applies to Hub repos, not the local "
                                 f"directory {shown(path)}")
            return ModelRef(str(local_path.resolve()), None, local=True)
    problem = None if looks_like_path else repo_id_problem(path)
    if looks_like_path or problem:
        if local_roots is not None:
            raise MergeError(f"{where}: {shown(path)} is not a Hub repo id like 'org/name' ({problem})")
        raise MergeError(f"{where}: {shown(path)} is neither an existing local directory nor a Hub repo id "
                         f"like 'org/name'" + (f" ({problem})" if problem else ""))
    return ModelRef(path, revision or None)
