"""Folders a process owns while it runs, named with its pid, and removing those whose process is gone.

A merge's staging folder and an app session's files carry the pid of the process that made
them. A process killed with SIGKILL cleans nothing up, so the next one sweeps: whatever matches
and belongs to a process that no longer runs is removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("mergeline")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_orphans(parent: Path, pattern: re.Pattern) -> list[Path]:
    """Remove the folders in `parent` whose names match `pattern` (its group 1 is the owner's pid)
    and whose owner no longer runs; returns them."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and entry.is_dir() and int(match[1]) != os.getpid() and not process_alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("removed %s, left behind by process %s, which did not exit cleanly", entry, match[1])
            removed.append(entry)
    return removed
