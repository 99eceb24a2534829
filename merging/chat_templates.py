"""Chat templates a config can ask for by name, and `auto`: the template most inputs share."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

BUILTIN: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + "
        "'\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
        "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + "
        "eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    ),
}


def model_chat_template(directory: Optional[Path]) -> Optional[str]:
    """A model's own chat template, where transformers looks for it."""
    if directory is None:
        return None
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = json.loads(tokenizer_config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def resolve_chat_template(choice: str, model_dirs: Sequence[Optional[Path]]) -> Optional[str]:
    """The template text for a config's `chat_template`: a built-in name, `auto`, or literal Jinja."""
    if choice in BUILTIN:
        return BUILTIN[choice]
    if choice == "auto":
        found = [t for t in (model_chat_template(d) for d in model_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return choice
