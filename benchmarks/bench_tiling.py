"""Benchmark: peak memory of a student forward + backward vs sequence length, with and without sequence tiling.

On the tiny random Qwen3 / Qwen3.5 (sd_plugin.testing.build_model, hidden 64, 4 layers, fp32, CPU; Qwen3.5:
2 Gated DeltaNet + 2 full-attention layers through transformers' torch fallback kernels), one row of T tokens
(T - 256 prompt + 256 completion) runs `completion_hidden_states` (the trainers' student forward) and a
backward from the completion's hidden states. Each run is its own subprocess; after one warm-up step of the same
length, the number is the second step's own peak RSS: VmHWM (reset just before it) minus the RSS before it. Workers run with
MALLOC_MMAP_THRESHOLD_=1 MiB so RSS follows live tensors.

Without tiling the model runs as the trainers run it untiled: HF gradient checkpointing on, SDPA attention.
With tiling (`sequence_tile_size`) each layer runs in checkpointed tiles. The planner's prediction for the same
shapes (`sd_plugin.planner.plan`, device cpu, fp32, full fine-tuning, teacher and loss left out) is printed
next to each measurement.

    python benchmarks/bench_tiling.py                                   # 4K-32K, both models, tile 1024 and off
    python benchmarks/bench_tiling.py --lengths 4096,8192 --tiles 0,512,2048 --kinds qwen3_5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "example_configs" / "assets" / "tiny-qwen3"
RESULT_PREFIX = "BENCH_RESULT "
COMPLETION = 256
MiB = 2**20


def vm_status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def worker(kind: str, length: int, tile: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from sd_plugin.testing import build_model
    from sd_plugin.trainers.base import completion_hidden_states

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = build_model(kind, tokenizer, num_layers=4)
    model.config._attn_implementation = "sdpa"
    model.train()
    if not tile:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, model.config.vocab_size, (1, length - COMPLETION), generator=generator)
    completion = torch.randint(10, model.config.vocab_size, (1, COMPLETION), generator=generator)
    weights = torch.randn(1, COMPLETION, model.config.hidden_size, generator=generator)

    def step():
        hidden = completion_hidden_states(model, model, prompt, torch.ones_like(prompt), completion,
                                          torch.ones_like(completion), sequence_tile_size=tile)
        (hidden * weights).sum().backward()
        model.zero_grad(set_to_none=False)

    step()  # warm-up at the same length: the first step's allocator and thread-pool growth is not the step's
    before = vm_status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = vm_status("VmHWM")
    return {"kind": kind, "length": length, "tile": tile, "own_peak": peak - before, "rss_before": before,
            "seconds": seconds}


def predicted(kind: str, length: int, tile: int) -> int:
    """The planner's step memory for the benchmark's shapes: student activations + backward (no teacher, no loss)."""
    from transformers import AutoTokenizer

    from sd_plugin.planner import ModelShape, TrainingSetup, plan
    from sd_plugin.testing import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    shape = ModelShape.from_hf_config(tiny_config(kind, len(tokenizer), num_layers=4).to_dict(), name=f"tiny-{kind}")
    setup = TrainingSetup(shape=shape, weight_format="fp32", compute_bytes=4, adapter=None,
                          gradient_checkpointing="full", attention="sdpa", prompt_length=length - COMPLETION,
                          teacher_prompt_length=length - COMPLETION, completion_length=COMPLETION, device="cpu",
                          sequence_tile_size=tile)
    result = plan(setup, suggest=False)
    return result.student_activations + result.backward_working_set


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--tiles", default="0,1024", help="sequence_tile_size values (0: untiled)")
    parser.add_argument("--kinds", default="qwen3,qwen3_5")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "LENGTH", "TILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, length, tile = args.worker
        print(RESULT_PREFIX + json.dumps(worker(kind, int(length), int(tile))), flush=True)
        return 0

    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", PYTHONPATH=str(REPO))
    print("| model | T | sequence_tile_size | step own peak RSS | planner | step time |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        for tile in (int(t) for t in args.tiles.split(",")):
            for length in (int(n) for n in args.lengths.split(",")):
                done = subprocess.run([sys.executable, __file__, "--worker", kind, str(length), str(tile)], env=env,
                                      capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
                if done.returncode or not lines:
                    print(f"| {kind} | {length} | {tile} | failed: {done.stderr.strip().splitlines()[-1:]} | | |", flush=True)
                    continue
                row = json.loads(lines[0][len(RESULT_PREFIX):])
                row["planner"] = predicted(kind, length, tile)
                rows.append(row)
                print(f"| {kind} | {length:,} | {tile or 'off'} | {row['own_peak'] / MiB:.0f} MiB | "
                      f"{row['planner'] / MiB:.0f} MiB | {row['seconds']:.1f} s |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
