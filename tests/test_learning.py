"""Learning on a real model (SmolLM2-135M-Instruct, `sd-plugin demo-model`): a test that fails when learning breaks.

Cross-entropy rows (`lambda_on_policy: 0`, plain SFT through the self-distillation trainer) teach the
contact-card format: the held-out exact-card score goes from 0 (the prompt does not describe the format)
to most cards in 16 steps. The same run as `benchmarks/bench_sft_vs_sdft.py`'s sft/lr0.0003/seed0 row
(0 -> 0.958 on 48 held-out cards), scored here on the first 24. Fixed seed, CPU.
"""

from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig

from sd_plugin import SDFTConfig, SDFTTrainer

DATA = Path(__file__).resolve().parents[1] / "example_configs" / "assets" / "data"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
STEPS = 16


@pytest.mark.slow
def test_cross_entropy_rows_teach_the_demo_model_the_held_out_task(demo_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    held_out = tmp_path / "contact_test.jsonl"
    held_out.write_text("".join((DATA / "contact_test.jsonl").read_text().splitlines(keepends=True)[:24]))
    records = load_dataset("json", data_files=str(DATA / "contact_train.jsonl"), split="train").remove_columns(["answer"])
    args = SDFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=3e-4,
        lr_scheduler_type="constant_with_warmup", warmup_steps=2, seed=0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, max_completion_length=32, max_prompt_length=256, max_teacher_prompt_length=512,
        lambda_on_policy=0.0, eval_prompts=str(held_out), eval_verifier="sd_plugin.demo_task:ContactCardVerifier",
        eval_max_new_tokens=32,
    )
    trainer = SDFTTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer,
                          peft_config=LoraConfig(**LORA))
    trainer.train()
    scores = {e["step"]: e for e in trainer.state.log_history if "eval_task_reward" in e}
    assert scores[0]["eval_task_reward"] == 0.0 and scores[0]["eval_task_format_rate"] == 0.0
    assert scores[STEPS]["eval_task_format_rate"] >= 0.75
    assert scores[STEPS]["eval_task_reward"] >= 0.5
