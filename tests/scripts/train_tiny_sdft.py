"""Train SDFTTrainer (LoRA) on the tiny local Qwen3, as a subprocess of the resume and multi-process tests.

    python tests/scripts/train_tiny_sdft.py OUTPUT_DIR [--teacher ema] [--max-steps 5] [--save-steps 2]
        [--resume CHECKPOINT|last] [--auto-resume] [--block-at-step S] [--exit-during-save S:plugin|S:host]
        [--expect-error] [--batch-size 2] [--rows 6] [--top-k N] [--nan-at-step S]
    python tests/scripts/train_tiny_sdft.py --jobs JOBS.json    (a JSON list of argument lists, run in order)
    python tests/scripts/train_tiny_sdft.py OUTPUT_DIR --sdpo-mode hybrid ...   (SDPOTrainer instead: 2 scripted
        rollouts per prompt, `sd_plugin.testing.scripted_grouped_rollouts`, rewarded by `length_parity_verifier`)
    torchrun --nproc_per_node 2 tests/scripts/train_tiny_sdft.py OUTPUT_DIR ...   (gloo on CPU)

Writes OUTPUT_DIR/result_rank{R}.pt: the final trainable parameters, the teacher state, the log history and
the completions sampled at every step (token ids per dataset row). `--block-at-step S` writes
OUTPUT_DIR/blocked-at-S once optimizer step S has ended (the checkpoints of earlier steps are complete on
disk) and then sleeps, so that the test can SIGKILL the process from outside, like a preempted job.
`--exit-during-save S:plugin` ends the process (exit status 17) while it saves checkpoint-S, once the trainer's
state files are written and before any of the host's; `S:host` once the host has written all its files but
`trainer_state.json`: a deterministic kill inside a checkpoint save. `--auto-resume` resumes as Axolotl's
auto_resume_from_checkpoints does (an incomplete checkpoint falls back to the previous complete one);
`--expect-error` writes the ValueError that `train` raises to OUTPUT_DIR/error.txt instead of a result.
`--nan-at-step S` turns the student's hidden states into NaN during the student forward of optimizer step
S (counted from 1; on rank `--nan-rank` only): a real non-finite loss for the numerics guard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
TINY_MODEL = REPO / "example_configs" / "assets" / "tiny-qwen3"
DATA = REPO / "example_configs" / "assets" / "data" / "quickstart_sdft.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--teacher", default="base", choices=["base", "ema", "live"])
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from (last: the last one, as True)")
    parser.add_argument("--auto-resume", action="store_true", help="trainer.auto_resume, as the Axolotl plugin sets it")
    parser.add_argument("--exit-during-save", default=None, help="S:plugin or S:host (see the module doc)")
    parser.add_argument("--expect-error", action="store_true")
    parser.add_argument("--block-at-step", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2, help="per-device batch size")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--top-k", type=int, default=None, help="rollout top-k (1: greedy rollouts)")
    parser.add_argument("--max-completion-length", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--nan-at-step", type=int, default=0)
    parser.add_argument("--nan-rank", type=int, default=0)
    parser.add_argument("--max-consecutive-nonfinite-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-reduction", default="sequence", choices=["sequence", "token"])
    parser.add_argument("--data", default=str(DATA), help="SDFT records (jsonl)")
    parser.add_argument("--lambda-on-policy", type=float, default=1.0, help="0: SFT rows (demonstrations of different lengths)")
    parser.add_argument("--optim", default="adamw_torch", help="sgd: the step is the gradient (no Adam normalisation)")
    parser.add_argument("--sdpo-mode", default=None, choices=["policy", "hybrid"], help="SDPO with its GRPO term instead of SDFT")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from sd_plugin import SDFTConfig, SDFTTrainer
    from sd_plugin.testing import read_jsonl

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    output_dir = Path(args.output_dir)
    records = read_jsonl(args.data)[: args.rows]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "demonstration": r["demonstration"]} for r in records])
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    common = dict(
        output_dir=str(output_dir), per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps, learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=1, report_to="none", use_cpu=True, seed=args.seed, data_seed=args.seed,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        max_completion_length=args.max_completion_length, top_k=args.top_k, loss_reduction=args.loss_reduction,
        max_consecutive_nonfinite_steps=args.max_consecutive_nonfinite_steps, optim=args.optim,
        dataloader_num_workers=0, ddp_backend="gloo" if "RANK" in os.environ else None,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)  # the LoRA initialization
    if args.sdpo_mode:
        from sd_plugin import SDPOConfig, SDPOTrainer
        from sd_plugin.testing import length_parity_verifier, scripted_grouped_rollouts

        SDPOTrainer.sample = scripted_grouped_rollouts(tokenizer.eos_token_id, tokenizer.pad_token_id or 0,
                                                       [2, 9, 4, 13, 1, 7, 3], 2)
        mode = dict(teacher_model_kind="live") if args.sdpo_mode == "policy" else dict(
            distillation_weight=0.5, teacher_model_kind=args.teacher, teacher_update_rate=0.3 if args.teacher == "ema" else 0.05)
        config = SDPOConfig(**common, verifier="multiple_choice", num_generations=2, sdpo_mode=args.sdpo_mode, **mode)
        dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in records])
        trainer = SDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
        trainer.verifier = length_parity_verifier
    else:
        config = SDFTConfig(**common, teacher_model_kind=args.teacher, teacher_update_rate=0.3 if args.teacher == "ema" else 0.01,
                            num_loss_tokens_to_skip=1, lambda_on_policy=args.lambda_on_policy)
        trainer = SDFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)

    completions: dict[int, dict[int, list[int]]] = {}  # optimizer step (from 1) -> dataset row -> completion ids
    row_of_prompt = {tuple(ids): i for i, ids in enumerate(trainer.train_dataset["input_ids"])}
    real_make_rollouts = trainer.make_rollouts

    def recording_make_rollouts(model, inputs):
        batch = real_make_rollouts(model, inputs)
        step = trainer.state.global_step + 1
        ids, mask = batch.rollouts.completion_ids, batch.rollouts.completion_mask
        for i, (prompt, prompt_mask) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"])):
            row = row_of_prompt[tuple(prompt[prompt_mask.bool()].tolist())]
            completions.setdefault(step, {})[row] = ids[i][mask[i].bool()].tolist()
        return batch

    trainer.make_rollouts = recording_make_rollouts

    if args.nan_at_step:
        decoder = trainer.accelerator.unwrap_model(trainer.model).get_decoder()

        def poison(module, inputs, output):
            # Only the student forward (with gradient) of the chosen step, on the chosen rank.
            if torch.is_grad_enabled() and trainer.state.global_step + 1 == args.nan_at_step and rank == args.nan_rank:
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        decoder.register_forward_hook(poison)

    class BlockAtStep(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            if args.block_at_step and state.global_step == args.block_at_step:
                # Checkpoints are saved after on_step_end: those of the steps before this one are complete.
                (output_dir / f"blocked-at-{state.global_step}").write_text(str(os.getpid()))
                while True:
                    time.sleep(1)

    trainer.add_callback(BlockAtStep())
    if args.exit_during_save:
        exit_step, where = args.exit_during_save.split(":")
        # The last file written before the exit: the trainer's own state, or the host's RNG state (its last file
        # before trainer_state.json).
        method = "save_checkpoint_state" if where == "plugin" else "_save_rng_state"
        real_save = getattr(trainer, method)

        def save_then_exit(folder, *rest):
            real_save(folder, *rest)
            if trainer.state.global_step == int(exit_step):
                os._exit(17)

        setattr(trainer, method, save_then_exit)
    trainer.auto_resume = args.auto_resume
    resume = True if args.resume == "last" else args.resume
    if args.expect_error:
        try:
            trainer.train(resume_from_checkpoint=resume)
        except ValueError as error:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "error.txt").write_text(str(error))
            return
        raise AssertionError("train() did not raise the expected ValueError")
    trainer.train(resume_from_checkpoint=resume)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    result = {
        "params": {n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad},
        "teacher": trainer.teacher.state_dict(),
        "log_history": trainer.state.log_history,
        "completions": completions,
        "nonfinite_steps_skipped": getattr(trainer, "nonfinite_steps_skipped", None),
        "world_size": trainer.args.world_size,
    }
    torch.save(result, output_dir / f"result_rank{rank}.pt")
    print(json.dumps({"rank": rank, "global_step": trainer.state.global_step}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--jobs"]:
        # Several runs in one process: the import of torch / transformers / peft is most of a tiny run's time.
        for job in json.loads(Path(sys.argv[2]).read_text()):
            main(job)
    else:
        main()
