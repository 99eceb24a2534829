"""What both merge command lines share: progress lines, and failures as one line with an exit status.

Every user-caused failure is one line on stderr and exit status 2; SIGINT and SIGTERM unwind the
work (removing its staging folder) and say that nothing was written.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import MergeError


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so the work unwinds and removes its staging folder."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def progress_printer(quiet: bool) -> Callable:
    """An `on_event` that prints log lines, and progress lines that overwrite each other, on stderr."""
    started = time.perf_counter()

    def report(event) -> None:
        nonlocal started
        if quiet:
            return
        if event.is_progress:
            line = event.describe(time.perf_counter() - started)
            print(f"\r{line[:110]:<110}", end="" if event.done < event.total else "\n", file=sys.stderr)
        else:
            print(event.message, file=sys.stderr)
            started = time.perf_counter()

    return report


def run_command(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                work: Callable[[argparse.Namespace], int]) -> int:
    """Parse the arguments, then `work(args)` with failures as one line (`run_guarded`)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    return run_guarded(lambda: work(args))


def run_guarded(work: Callable[[], int]) -> int:
    """`work()`'s exit status, or 2 / 130 / 143 with one line on stderr for what stopped it."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return work()
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def split_names(text: str) -> tuple[str, ...]:
    """`q_proj, v_proj` -> ("q_proj", "v_proj"): module lists as the command line and the Space take them."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--push-to, --private and --quiet, for a command that writes `what` (the result, the adapter)."""
    parser.add_argument("--push-to", metavar="REPO", help=f"upload {what} to this Hub repo (needs HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="with --push-to: create a private repo")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def hf_token() -> Optional[str]:
    return os.environ.get("HF_TOKEN") or None


def publish(args: argparse.Namespace, output_dir: Path, files: list[str]) -> int:
    """Upload `output_dir` when --push-to asks for it, and say what was written."""
    from .upload import upload_merge

    url = upload_merge(output_dir, args.push_to, hf_token() or "", private=args.private) if args.push_to else None
    if not args.quiet:
        print(f"wrote {len(files)} files to {output_dir}" + (f"; uploaded to {url}" if url else ""))
    return 0
