"""What recording the sampler's log-probs (importance_sampling_correction: true) costs HF generate (CPU).

Times `generate_rollouts` with and without the recorder on the same prompts and seed (same tokens: the recorder
only reads the scores), alternating the two to spread machine noise, and reports the median of each: the
process's CPU time (what the recorder adds, little disturbed by other jobs on a shared machine) and wall time.

    python benchmarks/bench_rollout_logprobs.py                  # Qwen-sized vocabulary, tiny trunk, 1 thread
    python benchmarks/bench_rollout_logprobs.py --vocab 1024     # the repository's tiny tokenizer's vocabulary
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from sd_plugin.rollout import SamplingOptions, generate_rollouts
from sd_plugin.testing import tiny_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="rollouts per generate call")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = tiny_config("qwen3", args.vocab, hidden_size=args.hidden, num_layers=args.layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    eos = args.vocab - 1  # never sampled in practice: every rollout runs the full --new-tokens
    prompt = torch.randint(0, args.vocab - 1, (args.batch, args.prompt_length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    cpu = {False: [], True: []}
    wall = {False: [], True: []}

    def run(record: bool):
        options = SamplingOptions(max_new_tokens=args.new_tokens, record_logprobs=record)
        torch.manual_seed(2)
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        rollouts = generate_rollouts(model, prompt, mask, options, [eos], 0)
        cpu[record].append(time.process_time() - start_cpu)
        wall[record].append(time.perf_counter() - start_wall)
        return rollouts

    run(False)  # warm-up
    cpu[False].clear()
    wall[False].clear()
    for _ in range(args.rounds):
        for record in (False, True):
            rollouts = run(record)
    plain, recorded = statistics.median(cpu[False]), statistics.median(cpu[True])
    result = {
        "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
        "prompt_length": args.prompt_length, "new_tokens": int(rollouts.completion_ids.shape[1]),
        "threads": args.threads, "plain_cpu_s": round(plain, 3), "recorded_cpu_s": round(recorded, 3),
        "overhead_percent": round(100 * (recorded / plain - 1), 1),
        "plain_wall_s": round(statistics.median(wall[False]), 3), "recorded_wall_s": round(statistics.median(wall[True]), 3),
        "extra_bytes": args.batch * args.vocab * 4,  # one [N, V] fp32 scores tensor held between steps at most
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
