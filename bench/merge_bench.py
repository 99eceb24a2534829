"""Merge benchmark: mergeline against the I/O floor and (optionally) mergekit, same machine, same run.

    python bench/merge_bench.py [--layers 4] [--methods linear,slerp,ties,dare_ties,moe] [--device cpu|cuda]
                                [--against-mergekit /tmp/mk/bin/mergekit-yaml] [--json out.json]

Inputs are generated once and cached under bench/.cache: checkpoints with real Mistral-7B widths
(hidden 4096, intermediate 14336, vocab 32000, 8 KV heads) and `--layers` layers, bf16, sharded
like Hub checkpoints: a base and three fine-tunes (base plus sparse noise). Each merge runs in its
own process; peak RSS is the largest sum of VmRSS over that process tree, sampled every 20 ms
(mmap'd file pages count). The I/O floor is a plain read of every input byte the merge reads plus
a write of as many bytes as the output, timed on the same files in the same run.

`moe` builds a mixture of four experts (the three fine-tunes and the base) with hidden-state
routers from a handful of prompts, against `mergekit-moe` beside `mergekit-yaml`. Its floor reads
every input file whole, though the experts' attention and embeddings are never read.

mergekit lives in its own virtualenv, never in our requirements:
    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from merging.demo import llama_shapes, write_tokenizer  # noqa: E402
from merging.safetensors_io import OutputTensor, ShardedWriter  # noqa: E402

MODELS = ("base", "ft1", "ft2", "ft3")


@dataclass(frozen=True)
class Widths:
    hidden: int = 4096
    intermediate: int = 14336
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 8

    def shapes(self, layers: int) -> dict[str, tuple[int, ...]]:
        return llama_shapes(self.config(layers))

    def config(self, layers: int) -> dict:
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "sliding_window": None, "tie_word_embeddings": False, "dtype": "bfloat16",
                "bos_token_id": 1, "eos_token_id": 2}


def generate(cache: Path, widths: Widths, layers: int, shard_bytes: int) -> dict[str, Path]:
    """Write the four checkpoints once; tensors are made one at a time, so memory stays small."""
    key = f"{widths.hidden}x{widths.intermediate}x{widths.vocab}-{layers}l"
    paths = {name: cache / key / name for name in MODELS}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    shapes = widths.shapes(layers)
    specs = [OutputTensor(n, torch.bfloat16, s) for n, s in shapes.items()]
    for index, name in enumerate(MODELS):
        directory = paths[name]
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        writer = ShardedWriter(directory, specs, shard_bytes)
        for tensor_index, (tensor_name, shape) in enumerate(shapes.items()):
            base_gen = torch.Generator().manual_seed(tensor_index)
            base = torch.randn(shape, generator=base_gen) * 0.02 if len(shape) > 1 else torch.ones(shape)
            if index:
                noise_gen = torch.Generator().manual_seed(1000 * index + tensor_index)
                noise = torch.randn(shape, generator=noise_gen) * 0.004
                noise *= torch.rand(shape, generator=noise_gen) < 0.1
                base += noise
            writer.write(tensor_name, base.bfloat16())
        writer.close()
        (directory / "config.json").write_text(json.dumps(widths.config(layers), indent=2))
        write_tokenizer(directory, 64)
        print(f"generated {directory}", file=sys.stderr)
    return paths


def config_for(method: str, paths: dict[str, Path], layers: int) -> str:
    base, ft1, ft2, ft3 = (str(paths[n]) for n in MODELS)
    if method == "linear":
        return (f"merge_method: linear\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 0.5}}}}\n"
                f"  - {{model: {ft2}, parameters: {{weight: 0.3}}}}\n"
                f"  - {{model: {ft3}, parameters: {{weight: 0.2}}}}\n"
                f"dtype: bfloat16\n")
    if method == "slerp":
        return (f"merge_method: slerp\nbase_model: {base}\nslices:\n  - sources:\n"
                f"      - {{model: {base}, layer_range: [0, {layers}]}}\n"
                f"      - {{model: {ft1}, layer_range: [0, {layers}]}}\n"
                f"parameters:\n  t:\n    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}\n"
                f"    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}\n    - {{value: 0.5}}\ndtype: bfloat16\n")
    if method in ("ties", "dare_ties"):
        return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                f"  - {{model: {ft1}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                f"  - {{model: {ft2}, parameters: {{weight: 0.3, density: 0.5}}}}\n"
                f"  - {{model: {ft3}, parameters: {{weight: 0.2, density: 0.5}}}}\n"
                f"parameters: {{normalize: true, int8_mask: true}}\ndtype: bfloat16\n")
    if method == "moe":
        prompts = {ft1: ["w1 w2 w3", "w4 w5"], ft2: ["w10 w11 w12", "w13"], ft3: ["w20 w21", "w22 w23 w24"],
                   base: ["w30 w31 w32 w33", "w40"]}
        experts = "".join(f"  - source_model: {model}\n    positive_prompts: {json.dumps(p)}\n"
                          for model, p in prompts.items())
        return f"base_model: {base}\ngate_mode: hidden\ndtype: bfloat16\nexperts_per_token: 2\nexperts:\n{experts}"
    raise SystemExit(f"unknown benchmark method {method!r}; choose from linear, slerp, ties, dare_ties, moe")


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


@dataclass
class Run:
    seconds: float
    peak_rss: int
    returncode: int


def measure(command: list[str], env: Optional[dict] = None) -> Run:
    os.sync()  # no contender starts while the last one's writes are still going to disk
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode:
        print(err.decode(errors="replace")[-2000:], file=sys.stderr)
    return Run(seconds, peak, process.returncode)


def input_files(method: str, paths: dict[str, Path]) -> list[Path]:
    used = {"linear": ("ft1", "ft2", "ft3"), "slerp": ("base", "ft1")}.get(method, MODELS)
    return [f for name in used for f in sorted(paths[name].glob("*.safetensors"))]


def io_floor(files: list[Path], output_bytes: int, scratch: Path) -> float:
    """Seconds to read every input byte and write `output_bytes`, plainly, on this machine."""
    os.sync()
    block = 16 << 20
    start = time.perf_counter()
    buffer = bytearray(block)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    with open(scratch, "wb") as f:
        left = output_bytes
        while left > 0:
            f.write(memoryview(buffer)[:min(block, left)])
            left -= block
    seconds = time.perf_counter() - start
    scratch.unlink()
    return seconds


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--methods", default="linear,slerp,ties,dare_ties,moe")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--against-mergekit", type=Path, help="path to mergekit-yaml in its own virtualenv")
    parser.add_argument("--json", type=Path, help="write the results here (default: bench/results-<device>.json)")
    parser.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    parser.add_argument("--small", action="store_true", help="tiny widths: a smoke run that keeps the script working")
    args = parser.parse_args(argv)

    widths = Widths(hidden=64, intermediate=128, vocab=256, heads=4, kv_heads=2) if args.small else Widths()
    shard_bytes = 2 * 10**9 if not args.small else 100_000
    paths = generate(args.cache, widths, args.layers, shard_bytes)
    per_model = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    results = []
    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.cache))
    try:
        for method in args.methods.split(","):
            config = work / f"{method}.yml"
            config.write_text(config_for(method, paths, args.layers))
            files = input_files(method, paths)
            for f in files:  # same page-cache state for every contender
                f.read_bytes() if f.stat().st_size < 4 * 10**9 else None
            ours_out = work / f"ours-{method}"
            ours = measure([sys.executable, "-m", "merging", str(config), str(ours_out), "--quiet",
                            "--device", args.device], env={**os.environ, "PYTHONPATH": str(ROOT)})
            output_bytes = sum(f.stat().st_size for f in ours_out.glob("*.safetensors")) if ours.returncode == 0 else 0
            shutil.rmtree(ours_out, ignore_errors=True)
            floor = io_floor(files, output_bytes, work / "floor.bin")
            row = {"method": method, "inputs_gb": sum(f.stat().st_size for f in files) / 1e9,
                   "output_gb": output_bytes / 1e9, "ours_s": ours.seconds, "ours_rss_gb": ours.peak_rss / 1e9,
                   "ours_ok": ours.returncode == 0, "floor_s": floor,
                   "ours_gbps": output_bytes / 1e9 / ours.seconds, "vs_floor": ours.seconds / floor}
            if args.against_mergekit:
                mk_out = work / f"mergekit-{method}"
                tool = args.against_mergekit.with_name("mergekit-moe") if method == "moe" else args.against_mergekit
                command = [str(tool), str(config), str(mk_out), "--no-copy-tokenizer"]
                if args.device == "cuda":
                    command += ["--device", "cuda"] if method == "moe" else ["--cuda"]
                elif method == "moe":
                    command += ["--device", "cpu"]
                mk = measure(command)
                shutil.rmtree(mk_out, ignore_errors=True)
                row.update({"mergekit_s": mk.seconds, "mergekit_rss_gb": mk.peak_rss / 1e9,
                            "mergekit_ok": mk.returncode == 0, "speedup": mk.seconds / ours.seconds})
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = ["method", "ours s", "ours RSS GB", "out GB/s", "I/O floor s", "x floor"]
    if args.against_mergekit:
        header += ["mergekit s", "mergekit RSS GB", "speedup"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in results:
        cells = [r["method"], f"{r['ours_s']:.1f}", f"{r['ours_rss_gb']:.2f}", f"{r['ours_gbps']:.2f}",
                 f"{r['floor_s']:.1f}", f"{r['vs_floor']:.1f}"]
        if args.against_mergekit:
            cells += [f"{r['mergekit_s']:.1f}", f"{r['mergekit_rss_gb']:.2f}", f"{r['speedup']:.1f}x"]
        print(" | ".join(cells))
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "device": args.device},
              "date": time.strftime("%Y-%m-%d"), "layers": args.layers, "widths": asdict(widths),
              "model_gb": per_model / 1e9, "results": results}
    out = args.json or ROOT / "bench" / f"results-{args.device}{'-small' if args.small else ''}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["ours_ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
