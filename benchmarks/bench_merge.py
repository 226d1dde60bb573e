"""Peak memory of `sd-plugin merge`: it follows the largest shard, not the model.

Builds synthetic Llama-shaped checkpoints with random bf16 weights (default: 12 and 6 layers, hidden 1024,
vocab 32000: ~220M and ~140M parameters), saves each with several shard sizes, adds a rank-16 LoRA adapter on
every Linear layer (random, non-zero B), and runs `python -m sd_plugin.cli merge` on each in a fresh process
with `--max-shard-size` equal to the base's shard size.
Peak RSS is the merge process's own VmHWM (printed by the merge report; not ru_maxrss, which on Linux also counts
the parent's memory after fork + exec); the baseline row is a process that only imports what the merge imports. Rows with "check" run the logits check too (`--verify-layers`), on the
smallest shard size.

    python benchmarks/bench_merge.py                       # the table in benchmarks/README.md
    python benchmarks/bench_merge.py --layers 2 --shards 20MB,1GB   # quick
Everything is written under --workdir (default: a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BASELINE = ("import sd_plugin.merge, transformers; from transformers import AutoTokenizer; "
            "from sd_plugin.shards import peak_rss; print(peak_rss())")


def build_base(folder: Path, layers: int, hidden: int, vocab: int, shard_sizes: list[str]) -> dict[str, Path]:
    """One random Llama-shaped model saved in bf16 with each shard size; returns shard size -> folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=vocab,
                         tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "example_configs" / "assets" / "tiny-qwen3")
    folders = {}
    for size in shard_sizes:
        path = folder / f"base-{layers}l-{size}"
        model.save_pretrained(path, max_shard_size=size)
        tokenizer.save_pretrained(path)
        folders[size] = path
    del model
    return folders


def build_adapter(base: Path, folder: Path, rank: int = 16) -> Path:
    """A rank-`rank` LoRA on every Linear layer of `base`, B random so the update is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.01)
    model.save_pretrained(folder)
    del model
    return folder


def largest_shard(folder: Path) -> int:
    return max(path.stat().st_size for path in folder.glob("*.safetensors"))


def model_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def run_merge(base: Path, adapter: Path, out: Path, verify_layers: int, shard_size: str) -> tuple[int, float, str]:
    """(peak RSS in bytes, seconds, stdout) of one `sd-plugin merge` in a fresh process."""
    command = [sys.executable, "-m", "sd_plugin.cli", "merge", "--base", str(base), "--adapter", str(adapter),
               "--out", str(out), "--overwrite", "--verify-layers", str(verify_layers), "--max-shard-size", shard_size]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"merge failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    match = re.search(r"peak memory \(this process\): ([\d.]+) (B|KB|MB|GB)", result.stdout)
    scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
    return int(float(match[1]) * scale[match[2]]), seconds, result.stdout


def dry_run_estimate(base: Path, adapter: Path, out: Path, shard_size: str) -> str:
    command = [sys.executable, "-m", "sd_plugin.cli", "merge", "--base", str(base), "--adapter", str(adapter),
               "--out", str(out), "--dry-run", "--max-shard-size", shard_size]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    printed = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    match = re.search(r"expected peak memory: merge ~([\d.]+ [KMG]?B)", printed)
    return match[1] if match else "?"


def megabytes(size: int) -> str:
    return f"{size / 1024**2:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="12,6", help="decoder layers of each synthetic model (comma separated)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shards", default="50MB,200MB,2GB", help="base shard sizes (2GB: one file); the logits check "
                        "runs with the first")
    parser.add_argument("--check-layers", type=int, default=2, help="layers of the logits check in the 'check' rows")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_merge_"))
    workdir.mkdir(parents=True, exist_ok=True)
    shard_sizes = args.shards.split(",")
    baseline = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    baseline_bytes = int(baseline.stdout.split()[-1])
    rows = [("imports only (baseline)", "-", "-", "-", "-", "-", megabytes(baseline_bytes), "-")]
    records = []
    try:
        for layers in (int(value) for value in args.layers.split(",")):
            bases = build_base(workdir, layers, args.hidden, args.vocab, shard_sizes)
            adapter = build_adapter(bases[shard_sizes[0]], workdir / f"adapter-{layers}l")
            for size, base in bases.items():
                for verify in (0, args.check_layers) if size == shard_sizes[0] else (0,):
                    out = workdir / "merged"
                    estimate = dry_run_estimate(base, adapter, out, size) if verify == 0 else "-"
                    peak, seconds, _ = run_merge(base, adapter, out, verify, size)
                    label = f"{layers} layers, {'check ' + str(verify) + ' layers' if verify else 'merge only'}"
                    row = (label, f"{model_bytes(base) / 2 / 1e6:.0f}M", megabytes(model_bytes(base)),
                           megabytes(largest_shard(base)), size,
                           estimate, megabytes(peak), f"{seconds:.1f} s")
                    rows.append(row)
                    records.append(dict(zip(("run", "parameters", "model", "largest_shard", "shard_size", "estimate",
                                                "peak_rss", "time"), row)))
                    print(" | ".join(row), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            for base in bases.values():
                shutil.rmtree(base)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    header = ("run", "parameters", "model (bf16)", "largest base shard", "--max-shard-size", "dry-run estimate (merge)",
              "peak RSS", "time")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
