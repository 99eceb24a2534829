"""Command line: ``python -m merging CONFIG.yml OUTPUT_DIR [options]``.

Every user-caused failure is one line on stderr and exit status 2; SIGINT and SIGTERM leave
nothing behind either (`cli`). torch loads only after the arguments parse, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli import add_output_options, hf_token, progress_printer, publish, run_command


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MB")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match[2].upper()]
    return int(float(match[1]) * scale)


def worker_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of threads like 0, 2 or 8")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merging", description="Merge models from a mergekit YAML config.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("config", type=Path, help="mergekit-compatible YAML config")
    parser.add_argument("output_dir", type=Path, help="directory to create for the merged model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where to compute")
    parser.add_argument("--seed", type=int, default=0, help="seed for randomized methods (dare, della)")
    parser.add_argument("--out-shard-size", type=parse_size, default="5GB", help="largest output shard")
    parser.add_argument("--dry-run", action="store_true", help="validate against headers only and print the plan")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (weights_only=True)")
    parser.add_argument("--workers", type=worker_count, default=None,
                        help="threads merging chunks (default: one per CPU, at most 8; 0: none)")
    add_output_options(parser, "the result")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(build_parser(), argv, merge)


def merge(args: argparse.Namespace) -> int:
    from .execute import MergeOptions
    from .pipeline import load_config, plan_merge, run_merge, summarize

    config = load_config(args.config)
    if args.dry_run:
        plan = plan_merge(config, token=hf_token(), allow_pickle=args.allow_pickle)
        print("\n".join(summarize(plan).lines()))
        return 0
    options = MergeOptions(device=args.device, seed=args.seed, out_shard_bytes=args.out_shard_size,
                           workers=args.workers)
    files = run_merge(config, args.output_dir, options=options, token=hf_token(), allow_pickle=args.allow_pickle,
                      on_event=progress_printer(args.quiet))
    return publish(args, args.output_dir, files)


if __name__ == "__main__":
    sys.exit(main())
