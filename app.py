"""mergeline's Gradio app. Thin: every button calls the same `merging` functions as the CLI."""

from __future__ import annotations

import gradio as gr

from merging import MergeError, parse_config, plan_merge, summarize

EXAMPLE = """\
merge_method: slerp
base_model: mistralai/Mistral-7B-v0.1
slices:
  - sources:
      - model: mistralai/Mistral-7B-v0.1
        layer_range: [0, 32]
      - model: HuggingFaceH4/zephyr-7b-beta
        layer_range: [0, 32]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def validate(config_text: str) -> str:
    """Dry run: check the config against the models' headers and describe the merge."""
    try:
        plan = plan_merge(parse_config(config_text))
    except MergeError as exc:
        return f"Error: {exc}"
    return "\n".join(summarize(plan).lines())


def build_app() -> gr.Blocks:
    with gr.Blocks(title="mergeline") as demo:
        gr.Markdown("# mergeline\nValidate a mergekit YAML config against the models' headers (no weights downloaded).")
        config = gr.Code(EXAMPLE, language="yaml", label="Merge config")
        button = gr.Button("Validate", variant="primary")
        report = gr.Textbox(label="Plan", lines=8)
        button.click(validate, config, report, api_name="validate")
    return demo


if __name__ == "__main__":
    build_app().queue().launch()
