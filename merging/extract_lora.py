"""Command line: ``python -m merging.extract_lora FINETUNED BASE OUTPUT_DIR --rank R [options]``.

Writes a PEFT LoRA adapter that turns BASE into (nearly) FINETUNED (`merging.extract`). Models are
local directories or Hub repo ids; failures are one line and exit status 2, as for merges.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli import add_output_options, hf_token, progress_printer, publish, run_command, split_names


def _rank(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rank like 8, 16 or 64")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m merging.extract_lora",
                                     description="Extract a LoRA adapter from a fine-tune and its base.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("finetuned", help="the fine-tuned model (a local directory or a Hub repo id)")
    parser.add_argument("base", help="the model it was fine-tuned from")
    parser.add_argument("output_dir", type=Path, help="directory to create for the adapter")
    parser.add_argument("--rank", type=_rank, required=True, help="LoRA rank r (lora_alpha = r)")
    parser.add_argument("--modules", type=split_names, default=(),
                        help="layer weights to decompose, e.g. q_proj,v_proj (default: every 2-D layer weight)")
    parser.add_argument("--save-modules", type=split_names, default=(),
                        help="modules stored whole as modules_to_save, e.g. embed_tokens,lm_head,norm")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where to run the SVDs")
    parser.add_argument("--dry-run", action="store_true", help="check both models' headers and print the plan")
    add_output_options(parser, "the adapter")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(build_parser(), argv, extract)


def extract(args: argparse.Namespace) -> int:
    from .extract import plan_extraction, run_extraction

    plan = plan_extraction(args.finetuned, args.base, args.rank, modules=args.modules,
                           save_modules=args.save_modules, token=hf_token())
    if args.dry_run:
        print("\n".join(plan.summary()))
        return 0
    files = run_extraction(plan, args.output_dir, device=args.device, token=hf_token(),
                           on_event=progress_printer(args.quiet))
    return publish(args, args.output_dir, files)


if __name__ == "__main__":
    sys.exit(main())
