"""The exception types a user of the engine needs to catch, and the "did you mean" helper."""

from __future__ import annotations

import difflib
import errno
from typing import Iterable


class MergeError(Exception):
    """A problem with the user's input: its message is one line that names the field and the fix.

    The CLI prints it without a traceback, the app shows it as-is. Anything that is not a
    `MergeError` is a bug in mergeline.
    """


class HubError(MergeError):
    """The Hub, or the network to it, failed in a way retrying did not cure: one line that names the
    request and the endpoint and says what to do. Lineage raises it too, so both CLIs and the app
    report a Hub outage the same way."""


class HubUnreachable(HubError):
    """No connection to the Hub could be opened (unknown host, refused, timed out connecting)."""


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is the file system saying it has no room (no space, or over quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ` (did you mean 'x'?)` suffix for the closest choice, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    """Refuse a key outside `allowed`, naming it (after `where`) with the closest allowed one."""
    for key in mapping:
        if key not in allowed:
            raise MergeError(f"{where}{key}: unknown key{did_you_mean(str(key), allowed)}; "
                             f"allowed here: {', '.join(allowed)}")
