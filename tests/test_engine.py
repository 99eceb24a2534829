"""End-to-end merges on tiny real checkpoints: outputs load in transformers and generate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from tiny_models import TIES_CONFIG, load_state

from merging import MergeError, MergeOptions, parse_config, run_merge


def generate(directory, steps: int = 4) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory))
    ids = torch.tensor([[1, 5, 6, 7]])
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + steps
    return out[0].tolist()


def lazymergekit_slerp(base, other, layers) -> str:
    return f"""
slices:
  - sources:
      - model: {base}
        layer_range: [0, {layers}]
      - model: {other}
        layer_range: [0, {layers}]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_lazymergekit_slerp_gradients_and_filters(llama, tmp_path):
    base, other = llama.base(), llama.finetune(1)
    run_merge(parse_config(lazymergekit_slerp(base, other, 4)), tmp_path / "out")
    merged, a, b = load_state(tmp_path / "out"), load_state(base), load_state(other)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    # first layer: self_attn t=0 -> the base, mlp t=1 -> the other model; norms t=0.5
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"],
                               a["model.layers.0.self_attn.q_proj.weight"].bfloat16())
    torch.testing.assert_close(merged["model.layers.0.mlp.up_proj.weight"],
                               b["model.layers.0.mlp.up_proj.weight"].bfloat16())
    # last layer: self_attn t=1 -> other, mlp t=0 -> base
    torch.testing.assert_close(merged["model.layers.3.self_attn.k_proj.weight"],
                               b["model.layers.3.self_attn.k_proj.weight"].bfloat16())
    torch.testing.assert_close(merged["model.layers.3.mlp.down_proj.weight"],
                               a["model.layers.3.mlp.down_proj.weight"].bfloat16())
    # layer 1 of 4 sits at t=1/3 of the curve [0, .5, .3, .7, 1] -> 0.5 + (1/3*4-1)*(0.3-0.5)
    from merging.methods.spherical import slerp_pair
    name = "model.layers.1.self_attn.o_proj.weight"
    want = slerp_pair(0.5 - (4 / 3 - 1) * 0.2, a[name].bfloat16().float(), b[name].bfloat16().float())
    torch.testing.assert_close(merged[name].float(), want, rtol=1e-2, atol=1e-2)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    generate(tmp_path / "out")


def test_qwen2_passthrough_frankenmerge_loads_in_transformers(qwen2, tmp_path):
    base, other = qwen2.base(), qwen2.finetune(1)
    text = f"""
slices:
  - sources: [{{model: {base}, layer_range: [0, 3]}}]
  - sources: [{{model: {other}, layer_range: [1, 4]}}]
merge_method: passthrough
dtype: float16
"""
    run_merge(parse_config(text), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert len(config["layer_types"]) == 6
    merged, src = load_state(tmp_path / "out"), load_state(other)
    assert "lm_head.weight" not in merged  # tied embeddings stay tied
    torch.testing.assert_close(merged["model.layers.3.self_attn.q_proj.bias"],
                               src["model.layers.1.self_attn.q_proj.bias"].half())
    assert not any(".layers.6." in n for n in merged)
    generate(tmp_path / "out")


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "read-write"])
def test_passthrough_copies_stored_bytes_without_merging(kernel_copy, llama, tmp_path, monkeypatch):
    """A tensor the merge returns unchanged is copied file to file, in row chunks, bit for bit."""
    import os

    from merging.execute import _Merger

    if not kernel_copy:  # a file system (or platform) without copy_file_range falls back to read and write
        monkeypatch.setattr(os, "copy_file_range", lambda *args: (_ for _ in ()).throw(OSError(18, "EXDEV")),
                            raising=False)
    monkeypatch.setattr(_Merger, "merge_chunk", lambda *args: pytest.fail("a verbatim copy was merged"))
    base = llama.base()
    text = f"slices:\n  - sources: [{{model: {base}, layer_range: [0, 4]}}]\nmerge_method: passthrough\n"
    run_merge(parse_config(text), tmp_path / "out", options=MergeOptions(chunk_elements=100))
    merged, src = load_state(tmp_path / "out"), load_state(base)
    assert set(merged) == set(src) and all(torch.equal(merged[n], src[n]) for n in src)


def test_sharded_output_with_index_loads(mistral, tmp_path):
    base, ft1, ft2 = mistral.base(), mistral.finetune(1), mistral.finetune(2)
    text = TIES_CONFIG.format(base=base, ft1=ft1, ft2=ft2) + "dtype: float32\nout_dtype: bfloat16\n"
    files = run_merge(parse_config(text), tmp_path / "out", options=MergeOptions(out_shard_bytes=60_000))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    merged = load_state(tmp_path / "out")
    assert set(index["weight_map"]) == set(merged) == set(load_state(base))
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in merged.values())
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    generate(tmp_path / "out")


def test_tokenizer_source_and_builtin_chat_template(llama, tmp_path):
    base = llama.base()
    other = llama._write("templated", llama.base_state, chat_template="{{ 'custom' }}")
    text = f"""
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 1}}}}
  - {{model: {other}, parameters: {{weight: 1}}}}
tokenizer_source: {other}
chat_template: chatml
"""
    run_merge(parse_config(text), tmp_path / "out")
    out = tmp_path / "out"
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith("<|im_start|>user\nhi<|im_end|>")


def test_chat_template_auto_picks_the_most_common(llama, tmp_path):
    a = llama._write("tpl-a", llama.base_state, chat_template="{{ 'A' }}")
    b = llama._write("tpl-b", llama.base_state, chat_template="{{ 'A' }}")
    c = llama._write("tpl-c", llama.base_state, chat_template="{{ 'C' }}")
    text = f"merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\nchat_template: auto\n"
    run_merge(parse_config(text), tmp_path / "out")
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ 'A' }}"


def test_card_metadata_and_license(llama, tmp_path):
    base = llama._write("lic-base", llama.base_state, card="---\nlicense: apache-2.0\n---\n# base\n")
    ft = llama._write("lic-ft", llama.base_state, card="---\nlicense: apache-2.0\n---\n# ft\n")
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1.0}}\n"
    run_merge(parse_config(text), tmp_path / "same")
    card = (tmp_path / "same" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "apache-2.0" and meta["base_model_relation"] == "merge"
    assert meta["tags"][:2] == ["merge", "mergekit"] and meta["library_name"] == "transformers"
    assert "```yaml\n" + text.strip() in card
    assert (tmp_path / "same" / "mergekit_config.yml").read_text().strip() == text.strip()

    other = llama._write("lic-other", llama.base_state, card="---\nlicense: cc-by-nc-4.0\n---\n")
    run_merge(parse_config(text.replace(str(ft), str(other))), tmp_path / "mixed")
    card = (tmp_path / "mixed" / "README.md").read_text()
    assert "license" not in yaml.safe_load(card.split("---")[1])
    assert "different or missing licenses (apache-2.0, cc-by-nc-4.0)" in card


def test_vocabulary_mismatch_truncates_or_follows_tokenizer_source(llama, tmp_path):
    base = llama.base()
    bigger_state = dict(llama.base_state)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = torch.randn(4, llama.hidden)
        bigger_state[name] = torch.cat([llama.base_state[name], extra])
    bigger = llama._write("vocab100", bigger_state)
    config = json.loads((bigger / "config.json").read_text())
    config["vocab_size"] += 4
    (bigger / "config.json").write_text(json.dumps(config))
    from merging.demo import write_tokenizer
    write_tokenizer(bigger, 96, added=("<a>", "<b>", "<c>", "<d>"))

    text = f"merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: 1}}}}\n  - {{model: {bigger}, parameters: {{weight: 1}}}}\n"
    run_merge(parse_config(text), tmp_path / "truncated")
    merged = load_state(tmp_path / "truncated")
    assert merged["model.embed_tokens.weight"].shape[0] == 96
    assert "truncated to the common 96 rows" in (tmp_path / "truncated" / "README.md").read_text()

    run_merge(parse_config(text + f"tokenizer_source: {bigger}\n"), tmp_path / "extended")
    merged = load_state(tmp_path / "extended")
    embed = merged["model.embed_tokens.weight"]
    assert embed.shape[0] == 100
    assert json.loads((tmp_path / "extended" / "config.json").read_text())["vocab_size"] == 100
    # tokens only the bigger model has take its rows in every input, so the merge keeps them
    torch.testing.assert_close(embed[96:], bigger_state["model.embed_tokens.weight"][96:])


def test_failure_midway_leaves_nothing(llama, tmp_path):
    from safetensors.torch import save_file

    state = load_state(llama.finetune(1))
    state["model.layers.2.mlp.up_proj.weight"][0, 0] = float("inf")  # the merge fails at this tensor
    broken = tmp_path / "inputs" / "broken"
    shutil.copytree(llama.finetune(1), broken)
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    text = (f"merge_method: linear\nmodels:\n  - {{model: {llama.base()}, parameters: {{weight: 1}}}}\n"
            f"  - {{model: {broken}, parameters: {{weight: 1}}}}\n")
    progress = []
    with pytest.raises(MergeError, match="model.layers.2.mlp.up_proj.weight: the merge produced NaN or infinite"):
        run_merge(parse_config(text), tmp_path / "out", on_event=progress.append)
    assert any(event.is_progress for event in progress)  # it failed midway, after tensors were written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_pickled_weights_need_allow_pickle(llama, tmp_path):
    from safetensors.torch import load_file

    source = llama.finetune(1)
    pickled = tmp_path / "pickled"
    shutil.copytree(source, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    text = f"merge_method: linear\nmodels:\n  - {{model: {llama.base()}, parameters: {{weight: 1}}}}\n  - {{model: {pickled}, parameters: {{weight: 1}}}}\n"
    with pytest.raises(MergeError, match="--allow-pickle"):
        run_merge(parse_config(text), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    run_merge(parse_config(text), tmp_path / "allowed", allow_pickle=True)
    merged = load_state(tmp_path / "allowed")
    want = (load_state(llama.base())["lm_head.weight"] + load_state(source)["lm_head.weight"]) / 2
    torch.testing.assert_close(merged["lm_head.weight"], want)


@pytest.mark.parametrize("method, params", [
    ("linear", "weight: 0.5"), ("ties", "weight: 0.5, density: 0.3"), ("dare_ties", "weight: 0.5, density: 0.3"),
    ("dare_linear", "weight: 0.5, density: 0.6"), ("task_arithmetic", "weight: 0.7"),
])
def test_streaming_in_row_chunks_gives_identical_results(method, params, llama, tmp_path, monkeypatch):
    base, ft1, ft2 = llama.base(), llama.finetune(1), llama.finetune(2)
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - {{model: {base}, parameters: {{weight: 0.2}}}}\n"
            f"  - {{model: {ft1}, parameters: {{{params}}}}}\n  - {{model: {ft2}, parameters: {{{params}}}}}\n")
    run_merge(parse_config(text), tmp_path / "whole", options=MergeOptions(seed=3))
    run_merge(parse_config(text), tmp_path / "chunked", options=MergeOptions(seed=3, chunk_elements=100))
    whole, chunked = load_state(tmp_path / "whole"), load_state(tmp_path / "chunked")
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


@pytest.mark.parametrize("method, params", [
    ("ties", "weight: 0.5, density: 0.3"), ("dare_ties", "weight: 0.5, density: 0.3"), ("linear", "weight: 0.5"),
])
def test_results_do_not_depend_on_the_worker_threads(method, params, llama, tmp_path, monkeypatch):
    base, ft1, ft2 = llama.base(), llama.finetune(1), llama.finetune(2)
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - {{model: {base}, parameters: {{weight: 0.2}}}}\n"
            f"  - {{model: {ft1}, parameters: {{{params}}}}}\n  - {{model: {ft2}, parameters: {{{params}}}}}\n")
    run_merge(parse_config(text), tmp_path / "inline", options=MergeOptions(seed=3, workers=0, chunk_elements=100))
    run_merge(parse_config(text), tmp_path / "threads", options=MergeOptions(seed=3, workers=3, chunk_elements=100))
    inline, threads = load_state(tmp_path / "inline"), load_state(tmp_path / "threads")
    assert all(torch.equal(inline[k], threads[k]) for k in inline)


@pytest.mark.parametrize("random_method, magnitude_method", [("dare_ties", "ties"), ("dare_linear", "task_arithmetic")])
def test_density_zero_drops_a_whole_delta_and_one_keeps_it_in_random_pruning(random_method, magnitude_method, llama,
                                                                              tmp_path):
    # At densities 0 and 1 random and magnitude pruning agree: mergekit's all-empty and all-full masks.
    base, ft1, ft2 = llama.base(), llama.finetune(1), llama.finetune(2)
    models = (f"models:\n  - {{model: {ft1}, parameters: {{weight: 0.6, density: 0.0}}}}\n"
              f"  - {{model: {ft2}, parameters: {{weight: 0.4, density: 1.0}}}}\nparameters: {{normalize: false}}\n")
    random_text = f"merge_method: {random_method}\nbase_model: {base}\n{models}"
    run_merge(parse_config(random_text), tmp_path / "random", options=MergeOptions(seed=3))
    if magnitude_method == "ties":
        run_merge(parse_config(f"merge_method: ties\nbase_model: {base}\n{models}"), tmp_path / "magnitude")
    else:  # task arithmetic has no density: the dropped model weighs nothing
        run_merge(parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                               f"  - {{model: {ft1}, parameters: {{weight: 0.0}}}}\n"
                               f"  - {{model: {ft2}, parameters: {{weight: 0.4}}}}\nparameters: {{normalize: false}}\n"),
                  tmp_path / "magnitude")
    random_state, magnitude_state = load_state(tmp_path / "random"), load_state(tmp_path / "magnitude")
    assert all(torch.equal(random_state[k], magnitude_state[k]) for k in random_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method, params", [
    ("dare_ties", "weight: 0.5, density: 0.3"), ("dare_linear", "weight: 0.5, density: 0.6"),
    ("breadcrumbs_ties", "weight: 0.5, density: 0.6, gamma: 0.1"), ("della", "weight: 0.5, density: 0.4, epsilon: 0.1"),
])
def test_a_gpu_draws_what_the_cpu_draws(method, params, llama, tmp_path, monkeypatch):
    base, ft1, ft2 = llama.base(), llama.finetune(1), llama.finetune(2)
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - {{model: {base}}}\n"
            f"  - {{model: {ft1}, parameters: {{{params}}}}}\n  - {{model: {ft2}, parameters: {{{params}}}}}\n"
            f"dtype: float32\n")
    run_merge(parse_config(text), tmp_path / "cpu", options=MergeOptions(seed=3, chunk_elements=100))
    run_merge(parse_config(text), tmp_path / "cuda", options=MergeOptions(seed=3, device="cuda", chunk_elements=100))
    cpu, cuda = load_state(tmp_path / "cpu"), load_state(tmp_path / "cuda")
    for name in cpu:  # the same kept entries; float32 arithmetic may round differently on the GPU
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method, params", [
    ("ties", "weight: 0.5, density: 0.3"), ("dare_ties", "weight: 0.5, density: 0.3"), ("slerp", "t: 0.3"),
])
def test_inputs_held_in_many_slabs_give_identical_results(method, params, llama, tmp_path, monkeypatch):
    base, ft1 = llama.base(), llama.finetune(1)
    if method == "slerp":
        text = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - {{model: {base}}}\n  - {{model: {ft1}}}\n"
        text += f"parameters: {{{params}}}\n"
    else:
        text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - {{model: {base}}}\n"
                f"  - {{model: {ft1}, parameters: {{{params}}}}}\n")
    run_merge(parse_config(text), tmp_path / "one-slab", options=MergeOptions(seed=3, workers=2, chunk_elements=100))
    # a few chunks per slab; samples cross slabs
    run_merge(parse_config(text), tmp_path / "slabs", options=MergeOptions(seed=3, workers=2, chunk_elements=100,
                                                                           slab_bytes=300))
    one, slabs = load_state(tmp_path / "one-slab"), load_state(tmp_path / "slabs")
    assert all(torch.equal(one[k], slabs[k]) for k in one)


def test_a_failing_chunk_leaves_no_output(llama, tmp_path, monkeypatch):
    base, ft1 = llama.base(), llama.finetune(1)
    text = (f"merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: 1.0}}}}\n"
            f"  - {{model: {ft1}, parameters: {{weight: -1.0}}}}\n")  # normalizing divides by zero
    with pytest.raises(MergeError, match="NaN or infinite"):
        run_merge(parse_config(text), tmp_path / "out", options=MergeOptions(workers=2, chunk_elements=100))
    assert list(tmp_path.iterdir()) == []


def test_reads_map_inputs_copy_on_write_and_refuse_a_file_cut_short(llama, tmp_path):
    from merging.safetensors_io import TensorReader, read_header

    model = tmp_path / "model"
    shutil.copytree(llama.finetune(1), model)
    shard = model / "model.safetensors"
    headers = read_header(shard)
    name = max(headers, key=lambda n: headers[n].nbytes)
    before = shard.read_bytes()
    reader = TensorReader(model, headers)
    rows = reader.read(name, (1, 3))
    assert torch.equal(rows, load_state(model)[name][1:3])
    rows.fill_(7.0)  # a method working in place changes its copy of the pages, never the input
    assert shard.read_bytes() == before and not torch.equal(reader.read(name, (1, 3)), rows)
    reader.close()

    with open(shard, "r+b") as f:
        f.truncate(headers[name].start + headers[name].nbytes - 1)
    text = (f"merge_method: linear\nmodels:\n  - {{model: {model}, parameters: {{weight: 0.5}}}}\n"
            f"  - {{model: {llama.base()}, parameters: {{weight: 0.5}}}}\n")
    with pytest.raises(MergeError, match="model.safetensors: the file ends inside tensor .*download it again"):
        run_merge(parse_config(text), tmp_path / "out")
    assert not (tmp_path / "out").exists()
