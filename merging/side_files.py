"""The files beside the weights: config.json, generation config, tokenizer, chat template, the
config as written and the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from . import card as card_stage
from .chat_templates import resolve_chat_template
from .plan import MergePlan
from .sources import TOKENIZER_FILES


def write_side_files(plan: MergePlan, directory: Path, title: Optional[str] = None) -> list[str]:
    """config.json, generation_config.json, tokenizer files, chat template, card and config copy."""
    written = []
    out_config = dict(plan.out_config)
    dtypes = {t.out.dtype for t in plan.tensors if t.out.dtype.is_floating_point}
    dtype_name = str(max(dtypes, key=lambda d: d.itemsize)).removeprefix("torch.") if dtypes else None
    if dtype_name:
        out_config["dtype" if "torch_dtype" not in out_config else "torch_dtype"] = dtype_name
        if "torch_dtype" in out_config:
            out_config["dtype"] = dtype_name
    (directory / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=False) + "\n")
    written.append("config.json")

    reference_dir = plan.reference.local_dir
    generation = reference_dir / "generation_config.json" if reference_dir else None
    if generation and generation.is_file():
        shutil.copyfile(generation, directory / "generation_config.json")
        written.append("generation_config.json")

    if plan.vocabulary is not None:  # the merged vocabulary, consistent with the aligned rows
        from .vocabulary import save_tokenizer

        written += save_tokenizer(plan.vocabulary, directory)
    else:
        tokenizer_dir = plan.tokenizer_from.local_dir
        for name in TOKENIZER_FILES:
            if tokenizer_dir and (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, directory / name)
                written.append(name)

    if plan.config.chat_template:
        template = resolve_chat_template(plan.config.chat_template, [m.local_dir for m in plan.models])
        if template is not None:
            (directory / "chat_template.jinja").write_text(template)
            if "chat_template.jinja" not in written:
                written.append("chat_template.jinja")
            tokenizer_config = directory / "tokenizer_config.json"
            if tokenizer_config.is_file():  # one place for the template, so transformers never has to choose
                data = json.loads(tokenizer_config.read_text())
                if data.pop("chat_template", None) is not None:
                    tokenizer_config.write_text(json.dumps(data, indent=2) + "\n")

    (directory / plan.config.config_file).write_text(plan.config.text.rstrip() + "\n")
    written.append(plan.config.config_file)
    (directory / "README.md").write_text(card_stage.render_card(plan, title))
    written.append("README.md")
    return written
