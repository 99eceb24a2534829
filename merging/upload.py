"""Publishing a merged checkpoint to the Hub: create the repo, upload the folder, or leave nothing.

The token is passed straight to `huggingface_hub` for this one call and is never logged, stored
or written anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import hub
from .config import MergeConfig
from .errors import MergeError


def short_name(path: str) -> str:
    """The last part of a repo id or path, in the characters a repo name may hold."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", path.strip().rstrip("/").split("/")[-1])


def suggest_repo_name(config: MergeConfig) -> str:
    """A readable repo name from the merged models and the method, e.g. `Beagle-Marcoro-slerp`."""
    names = []
    for ref in config.referenced_models():
        short = short_name(ref.path)
        short = re.sub(r"-(?:\d+(?:\.\d+)?[bBmM]|v\d[\w.]*|slerp|ties|dare|merge)\b", "", short)[:20].strip("-.")
        if short and short not in names:
            names.append(short)
    return re.sub(r"[-.]{2,}", "-", "-".join(names[:3] + [config.method.name.replace("_", "-")]))[:96].strip("-.")


def upload_merge(folder: Path, repo: str, token: str, *, private: bool = False) -> str:
    """Create `repo` (``name`` or ``namespace/name``) and upload `folder`; returns the repo URL.

    If the upload fails, the repo created for it is deleted again, so no empty repo is left; when
    even that fails, the message says the empty repo remains and where.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not token:
        raise MergeError("upload: log in with Hugging Face or paste a token with write access")
    repo = (repo or "").strip()
    problem = hub.repo_id_problem(repo)
    if problem:
        shown = repo if len(repo) <= 60 else repo[:60] + "..."
        raise MergeError(f"repo name: {shown!r} is not a valid repo name: {problem}")
    namespace, _, name = repo.rpartition("/")
    api = HfApi(token=token)
    try:
        namespace = namespace or hub.call(api.whoami, "upload: checking the token")["name"]
    except HfHubHTTPError:
        raise MergeError("upload: the token was refused; log in again or paste a valid token") from None
    repo_id = f"{namespace}/{name}"
    try:
        url = hub.call(lambda: api.create_repo(repo_id, private=private, exist_ok=False),
                       f"upload: creating {repo_id}")
    except HfHubHTTPError as exc:
        status = hub.http_status(exc)
        if status == 409:
            raise MergeError(f"repo name: {repo_id} already exists; choose another name") from None
        if status in (401, 403):
            raise MergeError(f"upload: the token cannot create repos in {namespace}; it needs write access") from None
        raise MergeError(f"upload: could not create {repo_id} (HTTP {status})") from None
    try:
        hub.call(lambda: api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                           commit_message="Upload merged model (mergeline)"),
                 f"upload: uploading to {repo_id}")
    except Exception as exc:  # noqa: BLE001 - whatever broke the upload, do not leave an empty repo
        cause = str(exc) if isinstance(exc, MergeError) else f"uploading to {repo_id} failed ({type(exc).__name__})"
        try:
            hub.call(lambda: api.delete_repo(repo_id, missing_ok=True), f"upload: removing {repo_id}")
        except Exception:  # noqa: BLE001 - the upload error is the one to report, with what was left
            raise MergeError(f"{cause}; removing the new, empty repo failed too, so it remains at {url}: delete it "
                             f"there or upload again into it") from None
        raise MergeError(f"{cause}; the new repo was removed, try again") from None
    return str(url)
