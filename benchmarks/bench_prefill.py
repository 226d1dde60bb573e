"""Benchmark: peak memory of a rollout after a long prompt, with and without a chunked prefill (`prefill_chunk_size`).

On a small random Qwen3.5 / Qwen3 (sd_plugin.testing.build_model with hidden 256, MLP 1024, 4 layers, fp32, CPU,
SDPA; Qwen3.5: 2 Gated DeltaNet + 2 full-attention layers through transformers' torch fallback kernels; hidden 256
so that the per-token activations, not the chunk's [chunk, T] attention mask, dominate, as at 9B with
flash-attention), one prompt of T tokens gets one 32-token rollout from `generate_rollouts` (the trainers'
sampler). Each run is its own subprocess; after a warm-up rollout on a 512-token prompt, the number is the
rollout's own peak RSS: VmHWM (reset just before it) minus the RSS before it. Workers run with
MALLOC_MMAP_THRESHOLD_=1 MiB so RSS follows live tensors. The planner's rollout terms for the same shapes
(`sd_plugin.planner.plan`, device cpu, fp32: rollout_kv_cache + rollout_working_set) are printed next to each
measurement.

    python benchmarks/bench_prefill.py                          # T 8K-32K, Qwen3.5, chunk off / 256 / 1024
    python benchmarks/bench_prefill.py --lengths 8192 --chunks 0,4096 --kinds qwen3,qwen3_5 --hidden 64
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

# bench_tiling.py sits next to this script (its directory is on sys.path when run as a script).
from bench_tiling import TOKENIZER_DIR, reset_peak, vm_status

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
NEW_TOKENS = 32
MiB = 2**20


def worker(kind: str, length: int, chunk: int, hidden: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from sd_plugin.rollout import SamplingOptions, generate_rollouts
    from sd_plugin.testing import build_model

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = build_model(kind, tokenizer, num_layers=4, hidden_size=hidden, intermediate_size=4 * hidden)
    model.config._attn_implementation = "sdpa"
    options = SamplingOptions(max_new_tokens=NEW_TOKENS, prefill_chunk_size=chunk or None)
    eos = [10**9]  # no end-of-turn token: every rollout has NEW_TOKENS tokens
    generator = torch.Generator().manual_seed(0)

    def rollout(prompt_length: int):
        prompt = torch.randint(10, model.config.vocab_size, (1, prompt_length), generator=generator)
        return generate_rollouts(model, prompt, torch.ones_like(prompt), options, eos, tokenizer.pad_token_id)

    rollout(512)  # warm-up: thread pools, allocator arenas, generate's first-call setup
    before = vm_status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    rollouts = rollout(length)
    seconds = time.perf_counter() - start
    peak = vm_status("VmHWM")
    assert rollouts.completion_ids.shape[1] == NEW_TOKENS
    return {"kind": kind, "length": length, "chunk": chunk, "hidden": hidden, "own_peak": peak - before,
            "rss_before": before, "seconds": seconds}


def predicted(kind: str, length: int, chunk: int, hidden: int) -> int:
    """The planner's rollout terms for the benchmark's shapes: KV cache + working set."""
    from transformers import AutoTokenizer

    from sd_plugin.planner import ModelShape, TrainingSetup, plan
    from sd_plugin.testing import tiny_config

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = tiny_config(kind, len(tokenizer), num_layers=4, hidden_size=hidden, intermediate_size=4 * hidden)
    shape = ModelShape.from_hf_config(config.to_dict(), name=f"tiny-{kind}")
    setup = TrainingSetup(shape=shape, weight_format="fp32", compute_bytes=4, adapter=None, attention="sdpa",
                          prompt_length=length, teacher_prompt_length=length, completion_length=NEW_TOKENS,
                          device="cpu", prefill_chunk_size=chunk or None)
    result = plan(setup, suggest=False)
    return result.rollout_kv_cache + result.rollout_working_set


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384,32768", help="prompt lengths")
    parser.add_argument("--chunks", default="0,256,1024", help="prefill_chunk_size values (0: one pass)")
    parser.add_argument("--kinds", default="qwen3_5")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (MLP: 4x)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "LENGTH", "CHUNK", "HIDDEN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, length, chunk, hidden = args.worker
        print(RESULT_PREFIX + json.dumps(worker(kind, int(length), int(chunk), int(hidden))), flush=True)
        return 0

    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", PYTHONPATH=str(REPO))
    print(f"| model | prompt T | prefill_chunk_size | rollout ({NEW_TOKENS} tokens) own peak RSS | planner | time |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        for chunk in (int(c) for c in args.chunks.split(",")):
            for length in (int(n) for n in args.lengths.split(",")):
                command = [sys.executable, __file__, "--worker", kind, str(length), str(chunk), str(args.hidden)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
                if done.returncode or not lines:
                    error = done.stderr.strip().splitlines()[-1:]
                    print(f"| {kind} | {length:,} | {chunk or 'off'} | failed: {error} | | |", flush=True)
                    continue
                row = json.loads(lines[0][len(RESULT_PREFIX):])
                row["planner"] = predicted(kind, length, chunk, args.hidden)
                rows.append(row)
                print(f"| {kind} | {length:,} | {chunk or 'off'} | {row['own_peak'] / MiB:.0f} MiB | "
                      f"{row['planner'] / MiB:.0f} MiB | {row['seconds']:.1f} s |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
