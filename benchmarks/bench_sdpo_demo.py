"""Benchmark: SDPO's training reward on a real model (SmolLM2-135M-Instruct, `sd-plugin demo-model`), CPU.

RL with a self-teacher on 32 "What is the capital of X?" questions the base model mostly answers (greedy: 75%),
scored by `sd_plugin.demo_task:AnswerContainsVerifier` (reward 1 when the reply names the capital; its feedback on
a miss is "The answer should be <capital>."). Several rollouts per question at temperature 1; the teacher sees a
successful sibling and/or the feedback (the SDPO paper's reprompt template) and scores the same tokens.
Prints the per-step training reward, completion length and clipped fraction, and the last step's rollouts
(`log_completions`), so a run shows whether the training reward rises and what the student writes.

    python benchmarks/bench_sdpo_demo.py --steps 8 --teacher-model-kind base
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "outputs" / "SmolLM2-135M-Instruct"), help="sd-plugin demo-model output")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4, help="questions per step")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-completion-length", type=int, default=24)
    parser.add_argument("--teacher-model-kind", default="ema")
    parser.add_argument("--sdpo-mode", default="distill", help="distill (the paper) | policy (GRPO) | hybrid")
    parser.add_argument("--distillation-weight", type=float, default=0.5,
                        help="hybrid only: (1 - w) x GRPO + w x distillation (TRL's meaning)")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin import SDPOConfig, SDPOTrainer
    from sd_plugin.testing import read_jsonl

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    data = Dataset.from_list(read_jsonl(REPO / "example_configs" / "assets" / "data" / "capitals_test.jsonl"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = SDPOConfig(
        output_dir=str(REPO / "outputs" / "bench_sdpo_demo"), max_steps=args.steps, per_device_train_batch_size=args.batch * args.num_generations,  # completions (TRL)
        num_generations=args.num_generations, learning_rate=args.lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=2, seed=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        max_completion_length=args.max_completion_length, max_prompt_length=128, temperature=args.temperature,
        verifier="sd_plugin.demo_task:AnswerContainsVerifier", teacher_model_kind=args.teacher_model_kind,
        sdpo_mode=args.sdpo_mode, distillation_weight=args.distillation_weight if args.sdpo_mode == "hybrid" else 1.0,
        log_completions=True, num_completions_to_print=4,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = SDPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config)
    start = time.time()
    trainer.train()
    print(f"\nSDPO on capitals: {vars(args)}, {time.time() - start:.0f} s")
    print("| step | training reward | groups with a success | completion length | clipped |")
    print("|---|---|---|---|---|")
    for entry in trainer.state.log_history:
        if "self_distillation/reward_mean" in entry:
            print(f"| {entry['step']} | {entry['self_distillation/reward_mean']:.3f} | "
                  f"{entry['self_distillation/success_group_fraction']:.2f} | {entry['completions/mean_length']:.1f} | "
                  f"{entry['completions/clipped_ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
