"""Vocabularies that differ: `tokenizer_source: union` and the `tokenizer:` block give mergekit
0.1.5's tensors and tokenizer, rows aligned by token string, and the result loads and round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from golden.make_vocab_golden import write_models
from safetensors.torch import load_file
from tiny_models import load_state

from merging import MergeError, parse_config, plan_merge, run_merge, summarize

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = yaml.safe_load((GOLDEN / "vocab_cases.yml").read_text())
TOKENIZERS = json.loads((GOLDEN / "vocab_tokenizers.json").read_text())


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    return write_models(tmp_path_factory.mktemp("vocab-models"))


def case_text(case: str, models: dict[str, Path], **changes) -> str:
    root = models["base"].parent
    return yaml.safe_dump({**CASES[case], **changes}).replace("MODELS/", f"{root}/")


def token_ids(tokenizer: dict) -> dict[str, int]:
    """Every token of a tokenizer.json (its model's vocabulary and its added tokens) -> id."""
    return {**tokenizer["vocab"], **tokenizer["added"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mergekit(case, vocab_models, tmp_path):
    """Token by token: mergekit 0.1.5 orders a union's tokens by a Python set (a different order per
    process), so ids may differ; every token's rows, and every other tensor, must not."""
    run_merge(parse_config(case_text(case, vocab_models)), tmp_path / "out")
    ours = load_state(tmp_path / "out")
    expected = load_file(str(GOLDEN / f"vocab_{case}.safetensors"))
    tokenizer = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    our_ids = token_ids({"vocab": tokenizer["model"]["vocab"],
                         "added": {t["content"]: t["id"] for t in tokenizer["added_tokens"]}})
    their_ids = token_ids(TOKENIZERS[case])
    assert our_ids.keys() == their_ids.keys()
    rows = TOKENIZERS[case]["vocab_size"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == rows
    assert set(ours) == set(expected)
    for name, want in expected.items():
        got = ours[name]
        assert got.shape == want.shape, name
        if want.shape[0] != rows:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
            continue
        for token, their_id in their_ids.items():
            torch.testing.assert_close(got[our_ids[token]], want[their_id], rtol=1e-5, atol=1e-6,
                                       msg=f"{name} {token}")
        torch.testing.assert_close(got[len(their_ids):], want[len(their_ids):], msg=f"{name} padding")


def test_union_loads_and_each_added_token_keeps_its_own_row(vocab_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_merge(parse_config(case_text("union_linear", vocab_models)), tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    rows = model.get_input_embeddings().weight.shape[0]
    assert max(tokenizer.get_vocab().values()) < rows
    merged = load_state(tmp_path / "out")["model.embed_tokens.weight"]
    chatml = load_state(vocab_models["chatml"])["model.embed_tokens.weight"]
    tool = load_state(vocab_models["tool"])["model.embed_tokens.weight"]
    for token, source, index in (("<|im_start|>", chatml, 32), ("<|im_end|>", chatml, 33), ("<tool>", tool, 32)):
        (token_id,) = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode([token_id]) == token
        # a token only one input has takes that input's row in every input, so the merge keeps it
        torch.testing.assert_close(merged[token_id], source[index])
    # ids follow the config's order (base, chatml, tool): <tool> moves from 32, where chatml has <|im_start|>
    assert tokenizer.convert_tokens_to_ids("<tool>") == 34
    out = model.generate(torch.tensor([[1, 32, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_source_base_with_an_added_token_where_mergekit_crashes(vocab_models, tmp_path):
    text = yaml.safe_dump({
        "merge_method": "linear", "base_model": str(vocab_models["base"]),
        "models": [{"model": str(vocab_models[m]), "parameters": {"weight": 0.5}} for m in ("base", "chatml")],
        "tokenizer": {"source": "base", "tokens": {"<|im_end|>": {"source": str(vocab_models["chatml"])}}}})
    plan = plan_merge(parse_config(text))
    assert "output vocabulary: 33 tokens" in summarize(plan).lines()
    assert "tokens added to the base's vocabulary: 1 ('<|im_end|>')" in summarize(plan).lines()
    run_merge(parse_config(text), tmp_path / "out")
    merged = load_state(tmp_path / "out")["model.embed_tokens.weight"]
    chatml = load_state(vocab_models["chatml"])["model.embed_tokens.weight"]
    assert merged.shape[0] == 33
    torch.testing.assert_close(merged[32], chatml[33])  # chatml's <|im_end|>, at the base's new id


def test_the_dry_run_reports_the_vocabulary_before_any_weight(vocab_models):
    lines = summarize(plan_merge(parse_config(case_text("block_task_arithmetic", vocab_models)))).lines()
    assert "output vocabulary: 35 tokens, 40 rows" in lines
    assert "tokens added to the base's vocabulary: 3 ('<|im_start|>', '<|im_end|>', '<tool>')" in lines
    assert any(line.startswith("tokens at other ids in") and "'<tool>'" in line for line in lines)


@pytest.mark.parametrize("tokenizer, message", [
    ({"source": "union", "tokens": {"x": {"source": "org/elsewhere"}}},
     "tokenizer.tokens.x.source: org/elsewhere is not in the merge"),
    ({"source": "union", "pad_to_multiple_of": 0}, "tokenizer.pad_to_multiple_of: must be a positive whole number"),
    ({"source": "union", "pad_to_multiple_of": "8"}, "tokenizer.pad_to_multiple_of: must be a positive whole number"),
    ({"source": "union", "tokens": {"x": {"source": {"kind": "model_token", "model": "MODELS/tool"}}}},
     "tokenizer.tokens.x.source: give exactly one of token and token_id"),
    ({"source": "union", "tokens": {"x": {"sorce": "MODELS/tool"}}},
     "tokenizer.tokens.x.sorce: unknown key (did you mean 'source'?)"),
])
def test_bad_tokenizer_blocks_are_one_line(tokenizer, message, vocab_models):
    text = case_text("union_linear", vocab_models, tokenizer=tokenizer, tokenizer_source=None)
    with pytest.raises(MergeError) as raised:
        parse_config(text.replace("tokenizer_source: null\n", ""))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_token_the_named_model_lacks_is_refused_before_any_weight(vocab_models):
    tokenizer = {"source": "union", "tokens": {"w3": {"source": {"kind": "model_token", "model": "MODELS/tool",
                                                                   "token": "<|im_start|>"}}}}
    text = case_text("union_linear", vocab_models, tokenizer=tokenizer).replace("tokenizer_source: union\n", "")
    with pytest.raises(MergeError, match=r"tokenizer.tokens.w3.source.token: .*tool's tokenizer has no token "
                                         r"'<\|im_start\|>'"):
        plan_merge(parse_config(text))


def test_tied_embeddings_stay_tied(qwen2, tmp_path):
    """A union of tied models (Qwen2: no lm_head) aligns the one embedding and writes no LM head."""
    from merging.demo import write_tokenizer

    base = qwen2.base()
    extended = qwen2._write("chatml-tied", {**qwen2.base_state, "model.embed_tokens.weight": torch.cat(
        [qwen2.base_state["model.embed_tokens.weight"], torch.ones(2, qwen2.hidden)])})
    config = json.loads((extended / "config.json").read_text())
    (extended / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 2}))
    write_tokenizer(extended, config["vocab_size"], added=("<|im_start|>", "<|im_end|>"))
    text = (f"merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {extended}, parameters: {{weight: 0.5}}}}\ntokenizer_source: union\n")
    run_merge(parse_config(text), tmp_path / "out")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    merged = load_state(tmp_path / "out")
    assert "lm_head.weight" not in merged
    rows = merged["model.embed_tokens.weight"].shape[0]
    assert rows == len(tokenizer.get_vocab()) and max(tokenizer.get_vocab().values()) < rows
    assert torch.equal(merged["model.embed_tokens.weight"][tokenizer.convert_tokens_to_ids("<|im_end|>")],
                       torch.ones(qwen2.hidden))
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["tie_word_embeddings"] is True and out["vocab_size"] == rows


def test_a_union_of_hub_models(vocab_models, hub, tmp_path):
    """Hub inputs: the plan snapshots each model's side files (tokenizers) once, the merge adds the weights."""
    for name in ("base", "chatml"):
        hub.add_repo(f"voc/{name}", vocab_models[name])
    text = ("merge_method: linear\nmodels:\n  - {model: voc/base, parameters: {weight: 0.5}}\n"
            "  - {model: voc/chatml, parameters: {weight: 0.5}}\ntokenizer_source: union\n")
    run_merge(parse_config(text), tmp_path / "out", cache_dir=tmp_path / "cache")
    for repo in ("voc/base", "voc/chatml"):
        listings = [p for m, p in hub.requests if m == "GET" and p.startswith(f"/api/models/{repo}/tree/")]
        assert len(listings) == 1, listings  # one snapshot of the side files, before the plan
    assert load_state(tmp_path / "out")["model.embed_tokens.weight"].shape[0] == 34
