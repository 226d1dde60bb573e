"""SDFT (Shenfeld et al. 2026, arXiv 2601.19897): learn from demonstrations on the student's own samples.

The student samples y from the conversation x; the same model, shown the expert demonstration in context,
scores y; the student is trained toward that teacher token by token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from sd_plugin.contexts import resolve_template
from sd_plugin.data import Columns
from sd_plugin.deprecated import accepts_deprecated_names
from sd_plugin.rollout import Rollouts
from sd_plugin.rows import right_pad, sdft_row, tokenize_rows
from sd_plugin.trainers.base import SelfDistillationOptions, SelfDistillationTrainer, StepBatch


@accepts_deprecated_names
@dataclass
class SDFTOptions(SelfDistillationOptions):
    """SDFT's options on top of the shared ones (paper defaults: forward KL, per-sequence mean, skip 3)."""

    teacher_template: str = field(default="paper", metadata={"help": "paper | expert_reference | a custom string with {demonstration} (and {question})."})
    teacher_truncation: str = field(default="middle", metadata={"help": "middle: cut the demonstration's middle to fit the teacher cap | error."})
    lambda_on_policy: float = field(default=1.0, metadata={"help": "Fraction of rows trained on-policy; the rest get cross-entropy on the demonstration."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompt (string or messages)."})
    demonstration_column: str = field(default="demonstration", metadata={"help": "Column with the expert turn (privileged_context accepted)."})
    tools_column: str = field(default="tools", metadata={"help": "Column with tool schemas (optional)."})

    def check(self) -> None:
        super().check()
        resolve_template(self.teacher_template)
        if self.teacher_truncation not in ("middle", "error"):
            raise ValueError(f"teacher_truncation must be 'middle' or 'error', got {self.teacher_truncation!r}")
        if self.num_generations != 1:
            raise ValueError(f"SDFT samples one rollout per prompt: num_generations must be 1, got {self.num_generations}")
        if not 0.0 <= self.lambda_on_policy <= 1.0:
            raise ValueError(f"lambda_on_policy must be in [0, 1], got {self.lambda_on_policy}")


@accepts_deprecated_names
@dataclass
class SDFTConfig(SDFTOptions, TrainingArguments):
    """Training arguments for `SDFTTrainer`: `transformers.TrainingArguments` plus `SDFTOptions`."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Paper sweep: 5e-6, 1e-5, 5e-5."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        self.check()


def tokenize_sdft_rows(dataset, tokenizer, options: SDFTOptions, *, invalid_rows_file: str | None = None):
    """Validate and tokenize raw SDFT records (`sd_plugin.rows.sdft_row`); invalid rows fail with their index, or are skipped and saved."""
    columns = Columns(options.prompt_column, options.demonstration_column, options.tools_column)
    return tokenize_rows(dataset, lambda raw, index: sdft_row(tokenizer, raw, index, columns, options),
                         skip_invalid=options.skip_invalid, invalid_rows_file=invalid_rows_file)


class SDFTTrainer(SelfDistillationTrainer):
    """Self-Distillation Fine-Tuning.

    Example:
        trainer = SDFTTrainer(model=model, args=SDFTConfig(output_dir="out"), train_dataset=records,
                              processing_class=tokenizer, peft_config=LoraConfig(...))
        trainer.train()

    `train_dataset` holds SDFT records ({"prompt", "demonstration", "tools"?}) or rows already tokenized by
    the Axolotl prompt strategy (`input_ids`, `teacher_input_ids`, `demonstration_ids`).
    """

    options_class = SDFTOptions

    def prepare_dataset(self, dataset, tokenizer, args, split):
        if "teacher_input_ids" in dataset.column_names:
            return dataset
        self.refuse_host_tokenized(dataset, split)
        invalid_file = self.invalid_rows_path(args, split)
        return tokenize_sdft_rows(dataset, tokenizer, self.options, invalid_rows_file=invalid_file)

    def on_policy_rows(self, size: int, device) -> torch.Tensor:
        """Which rows sample their own completion: each example independently with probability lambda_on_policy.

        The draw is seeded by (seed, step, micro-batch of the step, process, train/eval), so every micro-batch
        and process draws afresh, and a resumed run draws exactly what the uninterrupted one did.
        """
        if self.options.lambda_on_policy >= 1.0:
            return torch.ones(size, dtype=torch.bool, device=device)
        mode = self.mode
        key = (mode, self.state.global_step)
        micro_batch = self._draws[1] + 1 if getattr(self, "_draws", (None,))[0] == key else 0
        self._draws = (key, micro_batch)
        label = f"{self.args.seed}/{mode}/{self.state.global_step}/{micro_batch}/{self.accelerator.process_index}"
        seed = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        return (torch.rand(size, generator=generator) < self.options.lambda_on_policy).to(device)

    def make_rollouts(self, model, inputs) -> StepBatch:
        prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
        on_policy = self.on_policy_rows(prompt_ids.shape[0], prompt_ids.device)
        pad = self.processing_class.pad_token_id
        completions = [None] * len(on_policy)
        truncated = torch.zeros(len(on_policy), dtype=torch.bool)
        if on_policy.any():
            sampled = self.sample(model, prompt_ids[on_policy], prompt_mask[on_policy])
            rows = on_policy.nonzero().flatten().tolist()
            for i, row in enumerate(rows):
                length = int(sampled.completion_mask[i].sum())
                completions[row] = sampled.completion_ids[i, :length].tolist()
                truncated[row] = sampled.truncated[i]
        for row in (~on_policy).nonzero().flatten().tolist():
            completions[row] = list(inputs["demonstration_ids"][row])
        completion_ids, completion_mask = right_pad(completions, pad)
        device = prompt_ids.device
        rollouts = Rollouts(completion_ids.to(device), completion_mask.to(device),
                            torch.arange(len(completions), device=device), truncated.to(device))
        if on_policy.any() and sampled.old_logprobs is not None:
            # The sampler's log-probs follow their rows (demonstration rows are cross-entropy: no weight).
            rollouts.old_logprobs = torch.zeros(completion_ids.shape, device=device)
            width = min(sampled.old_logprobs.shape[1], completion_ids.shape[1])
            rollouts.old_logprobs[on_policy, :width] = sampled.old_logprobs[:, :width].to(device)
        return StepBatch(prompt_ids, prompt_mask, rollouts, ~on_policy)

    def teacher_prompts(self, inputs, batch: StepBatch):
        if "teacher_truncated_tokens" in inputs:
            self._metrics[self.mode]["teacher_truncated_tokens"].append(
                float(sum(inputs["teacher_truncated_tokens"])))
        return [list(ids) for ids in inputs["teacher_input_ids"]]
