"""SDFT (Shenfeld et al. 2026, arXiv 2601.19897): learn from demonstrations on the student's own samples.

The student samples y from the conversation x; the same model, shown the expert demonstration in context,
scores y; the student is trained toward that teacher token by token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from sd_plugin.contexts import AUTO, resolve_template, template_name
from sd_plugin.data import Columns, RecordError
from sd_plugin.deprecated import accepts_deprecated_names
from sd_plugin.rollout import Rollouts
from sd_plugin.rows import right_pad, sdft_row, tokenize_rows, write_invalid_rows
from sd_plugin.trainers.base import SelfDistillationOptions, SelfDistillationTrainer, StepBatch

LOG = logging.getLogger("sd_plugin")


@accepts_deprecated_names
@dataclass
class SDFTOptions(SelfDistillationOptions):
    """SDFT's options on top of the shared ones (paper defaults: forward KL, per-sequence mean, skip 3)."""

    teacher_template: str = field(default="paper", metadata={"help": "paper | expert_reference | copy | like_this | same_format | system_answer | a custom string with {demonstration} (and {question}) | auto: the best of the built-in candidates and teacher_template_candidates on teacher_check_rows training rows, chosen when the trainer starts (sd_plugin.teacher_check)."})
    teacher_template_candidates: list[str] | None = field(default=None, metadata={"help": "More templates (names or strings with {demonstration}) for teacher_template: auto to consider."})
    teacher_check_rows: int = field(default=8, metadata={"help": "Training rows the teacher check scores when the trainer starts: with auto every candidate, otherwise the configured template (logged as teacher_check/*; a warning when the demonstration's in-context gain is <= 0). 0: off (not with auto)."})
    teacher_truncation: str = field(default="middle", metadata={"help": "middle: cut the demonstration's middle to fit the teacher cap | error."})
    lambda_on_policy: float = field(default=1.0, metadata={"help": "Fraction of rows trained on-policy; the rest get cross-entropy on the demonstration."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompt (string or messages)."})
    demonstration_column: str = field(default="demonstration", metadata={"help": "Column with the expert turn (privileged_context accepted)."})
    tools_column: str = field(default="tools", metadata={"help": "Column with tool schemas (optional)."})

    def check(self) -> None:
        super().check()
        if self.teacher_template != AUTO:
            resolve_template(self.teacher_template)
        for candidate in self.teacher_template_candidates or []:
            try:
                resolve_template(candidate)
            except ValueError as error:
                raise ValueError(f"teacher_template_candidates: {error}") from None
        if self.teacher_template_candidates and self.teacher_template != AUTO:
            raise ValueError("teacher_template_candidates is set but teacher_template is not auto: set teacher_template: auto")
        if self.teacher_check_rows < 0 or (self.teacher_template == AUTO and self.teacher_check_rows < 1):
            raise ValueError(f"teacher_check_rows must be >= 0 (>= 1 with teacher_template: auto), got {self.teacher_check_rows}")
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_check = None  # sd_plugin.teacher_check.TeacherCheck of the start, when it ran
        self.teacher_template_chosen = None  # with teacher_template: auto, the name of the chosen template
        if self.options.teacher_check_rows and self.train_dataset is not None:
            self.check_teacher_at_start()

    def check_teacher_at_start(self) -> None:
        """Score the teacher on `teacher_check_rows` training rows (sd_plugin.teacher_check) before any step.

        With `teacher_template: auto` every candidate is scored and the best one becomes the template: the
        teacher prompts of the datasets are rendered again with it. Otherwise the configured template is scored
        alone and a warning names it when the demonstration in context does not raise its log-prob. The numbers
        are logged with the first step's metrics as `teacher_check/*` and saved in training_config.json.
        """
        from sd_plugin.teacher_check import candidate_templates, cannot_teach, check_teacher, sample_rows
        from sd_plugin.verifiers import load_verifier

        o = self.options
        if "sd_source_row" not in self.train_dataset.column_names:
            if o.teacher_template == AUTO:
                raise ValueError("teacher_template: auto needs the rows' source records (column sd_source_row, written by "
                                 "sd_plugin.rows.sdft_row): these rows were tokenized elsewhere; prepare them again")
            LOG.warning("teacher check skipped: the training rows have no sd_source_row column (tokenized elsewhere)")
            return
        indices = sample_rows(list(range(len(self.train_dataset))), o.teacher_check_rows, seed=self.args.seed)
        rows = [json.loads(text) for text in self.train_dataset.select(indices)["sd_source_row"]]
        templates = candidate_templates(None, o.teacher_template_candidates) if o.teacher_template == AUTO else \
            {template_name(o.teacher_template): o.teacher_template}
        verifier = load_verifier(o.eval_verifier) if o.eval_verifier else None
        model = self.accelerator.unwrap_model(self.model)
        result = check_teacher(model, self.processing_class, rows, templates, verifier=verifier, verifier_name=o.eval_verifier,
                               configured=template_name(o.teacher_template), teacher=lambda: self.teacher.scoring(model),
                               max_new_tokens=o.max_completion_length)
        if self.accelerator.num_processes > 1:
            # Every process scored the same rows; rank 0's choice is everyone's, so no two processes train differently.
            from accelerate.utils import broadcast_object_list

            result = broadcast_object_list([result])[0]
        self.teacher_check = result
        if self.args.should_log:
            LOG.warning("%s", result.table())
        if o.teacher_template == AUTO:
            self.teacher_template_chosen = result.best
            chosen = result.score(result.best)
            LOG.warning("teacher_template: auto chose %s (%s)", result.best, chosen.verdict)
            self.train_dataset = self.render_teacher_prompts(self.train_dataset, chosen.template, "train")
            if self.eval_dataset is not None and "sd_source_row" in getattr(self.eval_dataset, "column_names", ()):
                self.eval_dataset = self.render_teacher_prompts(self.eval_dataset, chosen.template, "eval")
        checked = result.score(result.best if o.teacher_template == AUTO else template_name(o.teacher_template))
        if not checked.in_context_gain > 0:
            LOG.warning("teacher template %s: with the demonstration in context the teacher gives it %.3f nats per token "
                        "less than the student does without it (in-context gain %.3f <= 0): the teacher does not prefer the "
                        "demonstration, SDFT has no signal to pass on. %s", checked.name, -checked.in_context_gain,
                        checked.in_context_gain, result.verdict)
        elif cannot_teach(checked):
            what = "the eval_verifier passes" if checked.verifier_pass_rate is not None else "it writes the demonstration on"
            LOG.warning("teacher template %s: with the demonstration in context the teacher does not do the task (%s %.0f%% "
                        "of %d checked rows, similarity %.2f): SDFT cannot teach it and this run will not learn the task. "
                        "Run `sd-plugin check-teacher` on your config, set teacher_template: auto, or write a template "
                        "that names the answer's format.", checked.name, what, 100 * checked.done_rate, len(rows),
                        checked.similarity)
        # Logged with the first step's metrics (one value each: the first log reports them as they are).
        for key, value in result.metrics(checked.name).items():
            self._metrics["train"][key].append(value)

    def render_teacher_prompts(self, dataset, template: str, split: str):
        """The dataset with its teacher prompts rendered again under `template` (rows that no longer fit the caps
        fail with their index, or with skip_invalid are dropped and written to the invalid-rows file)."""
        options = dataclasses.replace(self.options, teacher_template=template)
        columns = Columns()
        teacher_ids, truncated, keep, invalid = [], [], [], []
        for index, text in enumerate(dataset["sd_source_row"]):
            raw = json.loads(text)
            try:
                row = sdft_row(self.processing_class, raw, index, columns, options)
            except RecordError as error:
                invalid.append({"row": index, "reason": f"template {template_name(template)}: {error.reason}", "record": raw})
                continue
            keep.append(index)
            teacher_ids.append(row["teacher_input_ids"])
            truncated.append(row["teacher_truncated_tokens"])
        if invalid and not options.skip_invalid:
            raise ValueError(f"{len(invalid)} of {len(dataset)} {split} rows do not fit under the teacher template chosen by "
                             f"auto (row {invalid[0]['row']}: {invalid[0]['reason']}); raise max_teacher_prompt_length or set "
                             "skip_invalid=True")
        if invalid:
            path = self.invalid_rows_path(self.args, split)
            write_invalid_rows(path, invalid, append=True)
            LOG.warning("skipped %d %s rows that do not fit under the chosen template (written to %s)", len(invalid), split, path)
        dataset = dataset.select(keep) if invalid else dataset
        dataset = dataset.remove_columns(["teacher_input_ids", "teacher_truncated_tokens"])
        return dataset.add_column("teacher_input_ids", teacher_ids).add_column("teacher_truncated_tokens", truncated)

    def extra_training_record(self) -> dict:
        """What training_config.json adds to the arguments: the teacher check and the template auto chose."""
        if self.teacher_check is None:
            return {}
        record = {"teacher_check": self.teacher_check.to_dict()}
        if self.teacher_template_chosen is not None:
            record["teacher_template_chosen"] = self.teacher_template_chosen
            record["teacher_template_chosen_text"] = self.teacher_check.score(self.teacher_template_chosen).template
        return record

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
