"""Wall time of one held-out evaluation (step 0 or the end) of the quickstart's prompt sets, greedy only (what the
evaluation did before sampled pass@1 existed: eval_num_generations 0) against greedy + n samples per prompt at the
rollout temperature (--settings, default 0,1,2; the default is 1), on the demo model (example_configs/quickstart.yml) and on the tiny Qwen3 of
quickstart-tiny.yml.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_cost.py [--demo-model outputs/SmolLM2-135M-Instruct]

Prints one row per (model, setting): seconds for both sets (48 task + 32 prior prompts, 32 new tokens at most),
answers scored, and the task set's greedy and sampled pass rates.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-model", default=str(REPO / "outputs" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--settings", default="0,1,2", help="eval_num_generations values to time")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin.data import end_of_turn_ids
    from sd_plugin.evaluation import EvaluationSettings, evaluate_sets, load_prompt_sets, sample_sizes
    from sd_plugin.trainers.sdft import SDFTOptions

    os.chdir(REPO)  # the config's paths are relative to the repository
    block = yaml.safe_load((REPO / "example_configs" / "quickstart.yml").read_text())["sdft"]
    models = [("SmolLM2-135M (quickstart.yml)", args.demo_model), ("tiny-qwen3 (quickstart-tiny.yml)",
                                                                   str(REPO / "example_configs" / "assets" / "tiny-qwen3"))]
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'model':<34}{'eval_num_generations':>22}{'seconds':>9}{'answers':>9}{'task greedy':>13}{'task sampled':>14}")
    for label, path in models:
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        eos = end_of_turn_ids(tokenizer, model)
        for n in [int(value) for value in args.settings.split(",")]:
            options = SDFTOptions(**{**block, "eval_num_generations": n})
            sets = load_prompt_sets(options, tokenizer)
            settings = EvaluationSettings.from_options(options, seed=42)
            start = time.perf_counter()
            results, _ = evaluate_sets(model, tokenizer, sets, settings, eos)
            seconds = time.perf_counter() - start
            answers = sum(sum(sample_sizes(s, settings).values()) for s in sets)
            sampled = results["task"].get("sampled_pass_rate")
            print(f"{label:<34}{n:>22}{seconds:>9.1f}{answers:>9}{results['task']['pass_rate']:>13.3f}"
                  f"{'-' if sampled is None else f'{sampled:.3f}':>14}", flush=True)


if __name__ == "__main__":
    main()
