"""Publishing a merged checkpoint to the Hub: create the repo, upload the folder, or leave nothing.

The token is passed straight to `huggingface_hub` for this one call and is never logged, stored
or written anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .config import MergeConfig
from .errors import MergeError

_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")


def suggest_repo_name(config: MergeConfig) -> str:
    """A readable repo name from the merged models and the method, e.g. `Beagle-Marcoro-slerp`."""
    names = []
    for ref in config.referenced_models():
        short = re.sub(r"[^A-Za-z0-9.-]+", "-", ref.path.rstrip("/").split("/")[-1])
        short = re.sub(r"-(?:\d+(?:\.\d+)?[bBmM]|v\d[\w.]*|slerp|ties|dare|merge)\b", "", short)[:20].strip("-.")
        if short and short not in names:
            names.append(short)
    return "-".join(names[:3] + [config.method.name.replace("_", "-")])[:96]


def upload_merge(folder: Path, repo: str, token: str, *, private: bool = False) -> str:
    """Create `repo` (``name`` or ``namespace/name``) and upload `folder`; returns the repo URL.

    If the upload fails, the repo created for it is deleted again, so no empty repo is left.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not token:
        raise MergeError("upload: log in with Hugging Face or paste a token with write access")
    namespace, _, name = repo.strip().rpartition("/")
    if not _NAME.match(name) or (namespace and not _NAME.match(namespace)):
        raise MergeError(f"repo name: {repo!r} is not a valid repo name; use letters, digits, '-', '_' or '.'")
    api = HfApi(token=token)
    try:
        namespace = namespace or api.whoami()["name"]
    except HfHubHTTPError:
        raise MergeError("upload: the token was refused; log in again or paste a valid token") from None
    repo_id = f"{namespace}/{name}"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=False)
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status == 409:
            raise MergeError(f"repo name: {repo_id} already exists; choose another name") from None
        if status in (401, 403):
            raise MergeError(f"upload: the token cannot create repos in {namespace}; it needs write access") from None
        raise MergeError(f"upload: could not create {repo_id} (HTTP {status})") from None
    try:
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          commit_message="Upload merged model (mergeline)")
    except Exception as exc:  # noqa: BLE001 - whatever broke the upload, do not leave an empty repo
        try:
            api.delete_repo(repo_id, missing_ok=True)
        except Exception:  # noqa: BLE001 - the upload error is the one to report
            pass
        raise MergeError(f"upload: uploading to {repo_id} failed ({type(exc).__name__}); the new repo was "
                         f"removed, try again") from None
    return str(url)
