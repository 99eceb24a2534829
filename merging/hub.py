"""The Hub as mergeline talks to it: whose token a request carries, which failures are retried,
and the one line a failure becomes.

Shared by the merge engine, the upload, lineage and the app, so every door says the same thing
about the same fault. Nothing here imports torch.

Tokens: a request carries the user's own token, or `False` (no token at all). `None` lets
`huggingface_hub` fall back to the environment's token (`HF_TOKEN`, the login cache): right for
the command lines, never for a shared deployment, where the environment's token is the Space's
own (`request_token`).
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar, Union

from .errors import HubError, HubUnreachable

T = TypeVar("T")
Token = Union[str, bool, None]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Hub repo ids: `name` or `namespace/name`, each part at most 96 characters of letters, digits,
# '-', '_' and '.', neither starting nor ending with '-' or '.', without '--' or '..'.
_REPO_PART = re.compile(r"^(?![-.])[\w.-]{1,96}(?<![-.])$", re.ASCII)


def request_token(user_token: Optional[str], *, hosted: bool) -> Token:
    """The token a request runs with: the user's own, else none at all when `hosted` (never the
    environment's, which on a Space is the Space's), else whatever the environment provides."""
    token = (user_token or "").strip()
    if token:
        return token
    return False if hosted else None


def repo_id_problem(repo_id: str) -> Optional[str]:
    """Why `repo_id` is not a valid Hub repo id, or None when it is."""
    if not isinstance(repo_id, str) or not repo_id:
        return "it is empty"
    if len(repo_id) > 200:
        return f"it is {len(repo_id)} characters long"
    parts = repo_id.split("/")
    if len(parts) > 2:
        return "it has more than one '/'"
    for part in parts:
        if len(part) > 96:
            return f"{part[:20]!r}... is longer than 96 characters"
        if not _REPO_PART.match(part):
            return f"{part!r} may only use letters, digits, '-', '_' and '.', and not start or end with '-' or '.'"
        for pair in ("--", ".."):
            if pair in part:
                return f"{part!r} contains {pair!r}"
    return None


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


@dataclass(frozen=True)
class RetryPolicy:
    """How often a Hub request is tried. A refused connection or an unknown host seldom heals in
    seconds, so those get fewer tries than a 429, a 5xx or a connection dropped mid-answer."""

    attempts: int = 5
    connect_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 30.0


DEFAULT_RETRIES = RetryPolicy()


@dataclass(frozen=True)
class _Failure:
    message: str
    connect: bool  # nothing reached the Hub: the host is unknown or refused the connection
    retry_after: Optional[float] = None


def http_status(exc: BaseException) -> Optional[int]:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _retry_after(exc: BaseException) -> Optional[float]:
    response = getattr(exc, "response", None)
    header = response.headers.get("Retry-After") if response is not None else None
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:  # the other form Retry-After takes: an HTTP date
        return max(0.0, email.utils.parsedate_to_datetime(header).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _transport_error(exc: BaseException) -> Optional[BaseException]:
    """The httpx transport error (refused, unresolved, timed out, dropped) behind `exc`, if any:
    huggingface_hub raises some bare and wraps others (a download's LocalEntryNotFoundError)."""
    seen = 0
    while exc is not None and seen < 8:
        if any(c.__name__ == "TransportError" and c.__module__.startswith("httpx") for c in type(exc).__mro__):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _network_reason(exc: BaseException) -> tuple[str, bool]:
    """(what happened, in a few words; whether the connection never opened)."""
    name, text = type(exc).__name__, str(exc).lower()
    if "name or service not known" in text or "nodename nor servname" in text or "getaddrinfo" in text \
            or "temporary failure in name resolution" in text:
        return "the host name does not resolve", True
    if "refused" in text:
        return "connection refused", True
    if "unreachable" in text:
        return "the network is unreachable", True
    if "Timeout" in name:
        return ("connecting timed out", True) if "Connect" in name else ("the answer timed out", False)
    if name == "ConnectError":
        return f"could not connect ({str(exc).splitlines()[0] if str(exc) else name})", True
    return "the connection dropped mid-answer", False


def failure(exc: BaseException) -> Optional[_Failure]:
    """What went wrong, when retrying may help or the network is at fault; None for anything else
    (a missing repo, a refused token): the caller explains those in its own terms."""
    status = http_status(exc)
    if status in RETRY_STATUSES:
        if status == 429:
            return _Failure(f"the Hub at {endpoint()} is rate-limiting requests (HTTP 429); wait a few minutes "
                            f"and try again, or use a token (signed-in requests get higher limits)",
                            False, _retry_after(exc))
        return _Failure(f"the Hub at {endpoint()} answered HTTP {status} (a server-side fault); try again later",
                        False, _retry_after(exc))
    transport = _transport_error(exc)
    if transport is not None:
        reason, connect = _network_reason(transport)
        return _Failure(f"could not reach {endpoint()}: {reason}; check the network connection (or HF_ENDPOINT)",
                        connect)
    return None


def call(fn: Callable[[], T], what: str, *, retries: RetryPolicy = DEFAULT_RETRIES,
         sleep: Callable[[float], None] = time.sleep) -> T:
    """`fn()`, retried with exponential backoff (honouring Retry-After) on 429, 5xx and network
    faults. When the tries run out, a `HubError` names `what` was asked and what went wrong; other
    errors pass through untouched for the caller to explain."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - only Hub and network faults are ours; the rest re-raise
            fault = failure(exc)
            if fault is None:
                raise
            if attempt >= (retries.connect_attempts if fault.connect else retries.attempts):
                raise (HubUnreachable if fault.connect else HubError)(f"{what}: {fault.message}") from None
            delay = fault.retry_after if fault.retry_after is not None else retries.base_delay * 2 ** (attempt - 1)
            sleep(min(retries.max_delay, delay) + random.uniform(0, retries.base_delay / 4))
