"""One self-distillation step, shared by SDFT, SDPO and SD-Zero.

    batch of prompts -> rollouts (student samples y) -> teacher prompts (method-specific)
    -> teacher forward on teacher prompt + y (no grad) -> student forward on prompt + y
    -> chunked divergence from hidden states -> backward -> teacher update (EMA / sync)

A method subclass overrides `teacher_prompts` (and, for SDPO, `make_rollouts` and `total_loss`); everything
else is here.
Both forwards return hidden states at the completion positions only: the prompt never gets an lm_head
projection and no [tokens, vocab] tensor exists for the whole sequence.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field, fields

import torch
from transformers import Trainer, TrainerCallback

from sd_plugin.contexts import render_ids
from sd_plugin.data import Columns, RecordError, end_of_turn_ids, prompt_record
from sd_plugin.losses import (
    DivergenceOptions,
    chunked_distillation_loss,
    liger_available,
    liger_distillation_loss,
    loss_token_mask,
    loss_units,
)
from sd_plugin.rollout import Rollouts, SamplingOptions, generate_rollouts
from sd_plugin.teacher import KINDS as TEACHER_KINDS
from sd_plugin.teacher import Teacher, output_head

LOG = logging.getLogger("sd_plugin")
TEACHER_STATE_FILE = "sd_teacher_state.pt"
PROMPT_COLUMNS = ("input_ids", "attention_mask", "teacher_input_ids", "demonstration_ids", "sd_record")


@dataclass
class SelfDistillationOptions:
    """Options every self-distillation method shares (defaults: the SDFT paper unless noted)."""

    max_prompt_length: int = field(default=4096, metadata={"help": "Student prompt cap (tokens); longer rows are rejected, never cut."})
    max_teacher_prompt_length: int = field(default=57344, metadata={"help": "Teacher prompt cap (tokens)."})
    max_completion_length: int = field(default=256, metadata={"help": "Rollout cap (max new tokens)."})
    num_generations: int = field(default=1, metadata={"help": "Rollouts per prompt."})
    rollout_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts."})
    rollout_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of rollouts."})
    rollout_top_k: int | None = field(default=None, metadata={"help": "Top-k sampling of rollouts (None: off)."})
    distillation_alpha: float = field(default=0.0, metadata={"help": "0 forward KL (SDFT paper), 1 reverse KL, in between see distillation_divergence."})
    distillation_divergence: str = field(default="jsd", metadata={"help": "For 0 < alpha < 1: jsd (generalized JSD, SDPO) | mixed ((1 - alpha) forward KL + alpha reverse KL, SD-Zero)."})
    distillation_mode: str = field(default="full", metadata={"help": "full | topk | sampled."})
    distillation_topk: int | None = field(default=None, metadata={"help": "K for distillation_mode=topk."})
    distillation_support: str = field(default="student", metadata={"help": "Whose top-K: student | teacher."})
    distillation_add_tail: bool = field(default=False, metadata={"help": "Top-K plus one tail bucket instead of renormalizing."})
    distillation_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both distributions in the loss."})
    loss_reduction: str = field(default="sequence", metadata={"help": "sequence (per-sequence mean, then batch mean; SDFT/TRL) | token."})
    num_loss_tokens_to_skip: int = field(default=3, metadata={"help": "First completion tokens left out of the loss."})
    importance_sampling_clip: float = field(default=2.0, metadata={"help": "Cap of the importance weight when rollouts come from another policy."})
    loss_chunk_size: int = field(default=64, metadata={"help": "Completion tokens per lm_head chunk in the loss (about 3-4 fp32 [chunk, vocab] buffers live at a time)."})
    teacher: str = field(default="base", metadata={"help": "base (the model without adapter) | ema | live | initial (the step-0 student, e.g. with a loaded round-1 adapter, frozen)."})
    teacher_ema_rate: float = field(default=0.01, metadata={"help": "EMA rate a in phi <- (1-a) phi + a theta."})
    teacher_ema_rank: int = field(default=0, metadata={"help": "LoRA EMA/sync teacher kept as rank-k factors instead of a dense fp32 Delta W per layer (0: dense, exact). 2-4x lora_r is typical; the error is logged."})
    teacher_sync_steps: int = field(default=0, metadata={"help": "Copy the student into the teacher every N steps (0: never)."})
    liger_loss: bool | None = field(default=None, metadata={"help": "Liger-Kernel's fused linear JSD for full-vocabulary steps: None = on a GPU when liger-kernel is installed, true = always, false = never."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (reported, written to invalid_rows_file) instead of failing."})
    invalid_rows_file: str | None = field(default=None, metadata={"help": "Where skipped rows go (default: output_dir/invalid_rows.jsonl)."})
    max_consecutive_nonfinite_steps: int = field(default=3, metadata={"help": "Optimizer steps skipped in a row for a non-finite loss or gradient before the run stops with an error."})
    debug_numerics: bool = field(default=False, metadata={"help": "Check every training step that each per-token divergence is >= 0 (tolerance 1e-4); stop at the first that is not."})
    sequence_tile_size: int = field(default=0, metadata={"help": "Run each decoder layer over the sequence in tiles of this many tokens (checkpointed per tile; Qwen3 / Qwen3.5 text decoders), for the student and teacher forwards: activation memory grows with the tile, not the length (0: off)."})
    sequence_tile_offload: bool = field(default=False, metadata={"help": "With sequence_tile_size: keep the layer inputs (one [T, hidden] per layer) in CPU memory between forward and backward."})

    def check(self) -> None:
        """Reject contradictory options before any training step (messages name the key)."""
        try:
            DivergenceOptions(self.distillation_alpha, self.distillation_mode, self.distillation_topk,
                              self.distillation_support, self.distillation_add_tail, self.distillation_temperature,
                              self.distillation_divergence)
        except ValueError as error:  # its messages say "alpha", "mode", ...: name the option's key
            raise ValueError(f"distillation_{error}") from None
        for key in ("rollout_temperature", "distillation_temperature", "importance_sampling_clip"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {getattr(self, key)}")
        if not 0.0 < self.rollout_top_p <= 1.0:
            raise ValueError(f"rollout_top_p must be in (0, 1], got {self.rollout_top_p}")
        for key in ("rollout_top_k", "num_loss_tokens_to_skip", "teacher_sync_steps", "teacher_ema_rank"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.loss_reduction not in ("sequence", "token"):
            raise ValueError(f"loss_reduction must be 'sequence' or 'token', got {self.loss_reduction!r}")
        if self.teacher not in TEACHER_KINDS:
            raise ValueError(f"teacher must be one of {', '.join(TEACHER_KINDS)}, got {self.teacher!r}")
        for key in ("max_prompt_length", "max_teacher_prompt_length", "max_completion_length", "num_generations", "loss_chunk_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_teacher_prompt_length < self.max_prompt_length:
            raise ValueError(
                f"max_teacher_prompt_length ({self.max_teacher_prompt_length}) is below max_prompt_length "
                f"({self.max_prompt_length}): the teacher prompt contains the student prompt"
            )
        if self.teacher_ema_rank and self.teacher != "ema" and not self.teacher_sync_steps:
            raise ValueError(f"teacher_ema_rank is set but teacher is {self.teacher!r} without teacher_sync_steps: nothing to keep")
        if self.liger_loss and self.distillation_mode != "full":
            raise ValueError(f"liger_loss: true supports distillation_mode: full only (got {self.distillation_mode!r})")
        if self.liger_loss and self.distillation_divergence == "mixed" and 0.0 < self.distillation_alpha < 1.0:
            raise ValueError("liger_loss: true computes the generalized JSD only, not distillation_divergence: mixed")
        if self.liger_loss and not liger_available():
            raise ValueError("liger_loss: true needs liger-kernel: pip install 'sd-plugin[liger]'")
        if not 0.0 < self.teacher_ema_rate <= 1.0:
            raise ValueError(f"teacher_ema_rate must be in (0, 1], got {self.teacher_ema_rate}")
        default_rate = next(f.default for f in fields(self) if f.name == "teacher_ema_rate")
        if self.teacher != "ema" and self.teacher_ema_rate != default_rate:
            raise ValueError(f"teacher_ema_rate is set but teacher is {self.teacher!r}: set teacher: ema")
        if self.sequence_tile_size < 0:
            raise ValueError(f"sequence_tile_size must be >= 0 (0: off), got {self.sequence_tile_size}")
        if self.sequence_tile_offload and not self.sequence_tile_size:
            raise ValueError("sequence_tile_offload is set but sequence_tile_size is 0: set sequence_tile_size")
        if self.max_consecutive_nonfinite_steps < 1:
            raise ValueError(f"max_consecutive_nonfinite_steps must be >= 1, got {self.max_consecutive_nonfinite_steps}")


def options_from_args(args, options_cls):
    """The method's options from training arguments: own fields (standalone) or `sd_options` (Axolotl)."""
    if getattr(args, "sd_options", None) is not None:
        options = options_cls(**args.sd_options)
    else:
        options = options_cls(**{f.name: getattr(args, f.name) for f in fields(options_cls)})
    options.check()
    return options


def tokenize_rows(dataset, tokenize_one, *, skip_invalid: bool, invalid_rows_file: str | None):
    """`tokenize_one(raw, index) -> row` over a dataset; invalid rows fail with their index, or are skipped and saved."""
    from datasets import Dataset

    rows, invalid = [], []
    for index, raw in enumerate(dataset):
        try:
            rows.append(tokenize_one(raw, index))
        except RecordError as error:
            invalid.append((index, error.reason, raw))
    if invalid and not skip_invalid:
        shown = "; ".join(f"row {i}: {reason}" for i, reason, _ in invalid[:5])
        raise ValueError(f"{len(invalid)} of {len(dataset)} rows are invalid ({shown}); fix them or set skip_invalid=True")
    if invalid:
        path = invalid_rows_file or "invalid_rows.jsonl"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            for index, reason, raw in invalid:
                handle.write(json.dumps({"row": index, "reason": reason, "record": raw}, default=str) + "\n")
        LOG.warning("skipped %d invalid rows of %d (written to %s)", len(invalid), len(dataset), path)
    if not rows:
        raise ValueError("no valid rows left in the dataset")
    return Dataset.from_list(rows)


def tokenize_prompt(tokenizer, record: dict, max_prompt_length: int, row: int | None = None) -> list[int]:
    """Chat-template ids of a prompt record (`prompt_record`), refused (never cut) above the cap."""
    ids = render_ids(tokenizer, record["messages"], record["tools"])
    if len(ids) > max_prompt_length:
        raise RecordError(row, f"the prompt has {len(ids)} tokens, over max_prompt_length={max_prompt_length}")
    return ids


def tokenize_prompt_rows(dataset, tokenizer, options, *, invalid_rows_file: str | None = None):
    """Prompt-only records ({"prompt", "tools"?, task fields}) -> rows with `input_ids` and `sd_record`.

    `sd_record` is the record as JSON ({"messages", "tools", **task fields}): what teacher contexts and
    verifiers read. `options` needs `prompt_column`, `tools_column`, `max_prompt_length`, `skip_invalid`.
    """
    columns = Columns(prompt=options.prompt_column, tools=options.tools_column)

    def tokenize_one(raw, index):
        record = prompt_record(raw, index, columns)
        ids = tokenize_prompt(tokenizer, record, options.max_prompt_length, index)
        return {"input_ids": ids, "sd_record": json.dumps(record, default=str)}

    return tokenize_rows(dataset, tokenize_one, skip_invalid=options.skip_invalid, invalid_rows_file=invalid_rows_file)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
    return ids, mask


class SelfDistillationCollator:
    """Pads the prompt columns on the left (for generation) and keeps other list columns as lists.

    Called as `cls(tokenizer, **kwargs)` by Axolotl too; rows carry `input_ids` (student prompt) and
    whatever the method needs (`teacher_input_ids`, `demonstration_ids`, task fields for verifiers).
    """

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, **unused):
        self.pad_token_id = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        batch = {}
        batch["input_ids"], batch["attention_mask"] = left_pad([list(r["input_ids"]) for r in rows], self.pad_token_id)
        for key in rows[0]:
            if key not in ("input_ids", "attention_mask", "labels", "position_ids", "length"):
                batch[key] = [r[key] for r in rows]
        return batch


@dataclass
class StepBatch:
    """Everything one loss computation needs, built by `make_rollouts` and `teacher_prompts`."""

    prompt_ids: torch.Tensor          # [N, P] left-padded student prompts
    prompt_mask: torch.Tensor
    rollouts: Rollouts                # completions y (shared by student and teacher)
    ce_rows: torch.Tensor             # [N] bool: rows trained with cross-entropy on y instead of distillation
    teacher_prompts: list[list[int] | None] = field(default_factory=list)  # None: no teacher signal for that row
    student_hidden: torch.Tensor | None = None  # [N, C, H] set by compute_loss (for a method's own loss terms)
    loss_normalizer: float | None = None  # set by get_batch_samples: the step's loss tokens (or sequences) per micro-batch

    def loss_mask(self) -> torch.Tensor:
        """[N, C]: completion tokens of the rows that get a loss (a teacher signal, or cross-entropy rows)."""
        has_teacher = torch.tensor([p is not None for p in self.teacher_prompts], device=self.prompt_ids.device)
        return self.rollouts.completion_mask * (has_teacher | self.ce_rows).unsqueeze(-1)


class _TeacherUpdate(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        teacher = self.trainer.teacher
        teacher.step(model, state.global_step)
        if teacher.factors:
            self.trainer._metrics["train"]["teacher_ema_truncation_error"].append(teacher.truncation_error)


class SelfDistillationTrainer(Trainer):
    """Base trainer; subclasses set `options_class` and implement `teacher_prompts` / `prepare_dataset`."""

    options_class = SelfDistillationOptions

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, callbacks=None, peft_config=None, **kwargs):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        processing_class.padding_side = "left"
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.options = options_from_args(args, self.options_class)
        # The batch has no labels and the loss is a mean per micro-batch: let Trainer divide by accumulation.
        args.remove_unused_columns = False
        if train_dataset is not None:
            train_dataset = self.prepare_dataset(train_dataset, processing_class, args, "train")
        if eval_dataset is not None:
            eval_dataset = self.prepare_dataset(eval_dataset, processing_class, args, "eval")
        if data_collator is None or type(data_collator).__name__ == "DataCollatorForSeq2Seq":
            data_collator = SelfDistillationCollator(processing_class)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, callbacks=callbacks, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.check_against_model()
        self.teacher = Teacher(self.model, self.options.teacher, self.options.teacher_ema_rate,
                               self.options.teacher_sync_steps, self.options.teacher_ema_rank)
        self.add_callback(_TeacherUpdate(self))
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.eos_token_ids = end_of_turn_ids(processing_class, self.model)

    # ------------------------------------------------------------------ hooks for the methods
    def prepare_dataset(self, dataset, tokenizer, args, split):
        """Turn raw records into rows with `input_ids` (+ method columns); rows already prepared pass."""
        return dataset

    def invalid_rows_path(self, args, split: str) -> str:
        """Where `skip_invalid` writes the rows it drops: `invalid_rows_file`, else output_dir/invalid_rows_{split}.jsonl."""
        return self.options.invalid_rows_file or os.path.join(args.output_dir or ".", f"invalid_rows_{split}.jsonl")

    def make_rollouts(self, model, inputs) -> StepBatch:
        """Sample completions for every prompt of the batch (subclasses may add off-policy rows)."""
        prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
        rollouts = self.sample(model, prompt_ids, prompt_mask)
        index = rollouts.prompt_index
        return StepBatch(prompt_ids[index], prompt_mask[index], rollouts,
                         torch.zeros(len(index), dtype=torch.bool, device=prompt_ids.device))

    def teacher_prompts(self, inputs, batch: StepBatch) -> list[list[int] | None]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the step
    def sampling_options(self) -> SamplingOptions:
        o = self.options
        return SamplingOptions(o.max_completion_length, o.rollout_temperature, o.rollout_top_p, o.rollout_top_k, o.num_generations)

    def sample(self, model, prompt_ids, prompt_mask) -> Rollouts:
        unwrapped = self.accelerator.unwrap_model(model)
        return generate_rollouts(unwrapped, prompt_ids, prompt_mask, self.sampling_options(),
                                 self.eos_token_ids, self.processing_class.pad_token_id)

    def check_against_model(self) -> None:
        vocab = output_head(self.model)[0].shape[0]  # also refuses LoRA on lm_head
        DivergenceOptions(self.options.distillation_alpha, self.options.distillation_mode, self.options.distillation_topk,
                          self.options.distillation_support).check_vocab(vocab)

    def prepare_step(self, model, inputs) -> StepBatch:
        """Sample and score one micro-batch, and build its teacher prompts: everything before the forwards."""
        batch = self.make_rollouts(model, inputs)
        batch.teacher_prompts = self.teacher_prompts(inputs, batch)
        return batch

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's micro-batches of one optimizer step, each with its rollouts sampled up front.

        All rollouts of a step come from the same weights either way (the optimizer steps after the last
        micro-batch); sampling them first lets the loss divide by the step's number of loss tokens (or
        sequences) over every micro-batch and process, so 1 x 8, 8 micro-batches x 1 and 2 processes x 4 give
        the same gradient. The Trainer divides each micro-batch's loss by the number of micro-batches and
        data parallelism averages over processes: the normalizer is the global count divided by both.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, num_items_in_batch
        steps, units = [], 0
        for inputs in batch_samples:
            step = self.prepare_step(self.model_wrapped, self._prepare_inputs(inputs))
            mask = loss_token_mask(step.loss_mask(), skip_first=self.options.num_loss_tokens_to_skip, unskipped_rows=step.ce_rows)
            units += loss_units(mask, self.options.loss_reduction)
            steps.append(step)
        total = torch.tensor(float(units), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        normalizer = max(total.item(), 1.0) / (len(batch_samples) * self.accelerator.num_processes)
        for inputs, step in zip(batch_samples, steps):
            step.loss_normalizer = normalizer
            inputs["sd_step"] = step
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        # Training micro-batches arrive prepared by get_batch_samples; evaluation prepares its own.
        batch = inputs.get("sd_step") or self.prepare_step(model, inputs)
        rollouts = batch.rollouts
        device = batch.prompt_ids.device
        has_teacher = torch.tensor([p is not None for p in batch.teacher_prompts], device=device)
        loss_mask = batch.loss_mask()

        # Teacher first: its no-grad forward then never coexists with the student's saved activations.
        teacher_hidden, teacher_head = None, None
        distilled = has_teacher & ~batch.ce_rows
        if distilled.any():
            teacher_ids, teacher_mask = left_pad([p if p is not None else [] for p in batch.teacher_prompts],
                                                 self.processing_class.pad_token_id)
            teacher_ids, teacher_mask = teacher_ids.to(device), teacher_mask.to(device)
            with torch.no_grad(), self.teacher.scoring(self.accelerator.unwrap_model(model)) as teacher_model:
                teacher_hidden = completion_hidden_states(teacher_model, teacher_model, teacher_ids, teacher_mask,
                                                          rollouts.completion_ids, rollouts.completion_mask,
                                                          sequence_tile_size=self.options.sequence_tile_size)
                teacher_head = output_head(teacher_model)  # inside the block: modules_to_save heads differ
            self._metrics[mode]["teacher_prompt_length"].append(teacher_mask[distilled].sum(-1).float().mean().item())
        student_hidden = batch.student_hidden = completion_hidden_states(
            self.accelerator.unwrap_model(model), model, batch.prompt_ids, batch.prompt_mask,
            rollouts.completion_ids, rollouts.completion_mask, sequence_tile_size=self.options.sequence_tile_size,
            sequence_tile_offload=self.options.sequence_tile_offload)

        head_weight, head_bias = output_head(self.accelerator.unwrap_model(model))
        teacher_weight, teacher_bias = teacher_head if teacher_head is not None else (None, None)
        o = self.options
        ce_mask = batch.ce_rows.unsqueeze(-1).expand_as(loss_mask)
        if distilled.any() and self.use_liger_loss(student_hidden, batch):
            out = liger_distillation_loss(
                student_hidden, teacher_hidden, head_weight, loss_mask, alpha=o.distillation_alpha,
                temperature=o.distillation_temperature, chunk_size=o.loss_chunk_size, reduction=o.loss_reduction,
                skip_first=o.num_loss_tokens_to_skip, lm_head_bias=head_bias, teacher_lm_head_weight=teacher_weight,
                teacher_lm_head_bias=teacher_bias, normalizer=batch.loss_normalizer,
            )
        else:
            out = chunked_distillation_loss(
                student_hidden, teacher_hidden, head_weight, loss_mask,
                chunk_size=o.loss_chunk_size, alpha=o.distillation_alpha, mode=o.distillation_mode, topk=o.distillation_topk,
                support=o.distillation_support, add_tail=o.distillation_add_tail, temperature=o.distillation_temperature,
                sampled_ids=rollouts.completion_ids, reduction=o.loss_reduction, skip_first=o.num_loss_tokens_to_skip,
                old_logprobs=rollouts.old_logprobs, importance_sampling_clip=o.importance_sampling_clip,
                ce_mask=ce_mask if batch.ce_rows.any() else None, lm_head_bias=head_bias,
                teacher_lm_head_weight=teacher_weight, teacher_lm_head_bias=teacher_bias, normalizer=batch.loss_normalizer,
                family=o.distillation_divergence,
            )
        if self.options.debug_numerics and mode == "train":
            self.check_divergence_values(out)
        loss = self.total_loss(model, batch, out, mode)
        self.record_step_metrics(mode, batch, out, loss_mask, ce_mask)
        return (loss, None) if return_outputs else loss

    def use_liger_loss(self, student_hidden: torch.Tensor, batch: StepBatch) -> bool:
        """Liger's fused loss covers full-vocabulary distillation without cross-entropy rows or importance weights."""
        o = self.options
        if o.liger_loss is False or o.distillation_mode != "full":
            return False
        if o.distillation_divergence == "mixed" and 0.0 < o.distillation_alpha < 1.0:
            return False
        if batch.ce_rows.any() or batch.rollouts.old_logprobs is not None:
            return False
        return bool(o.liger_loss) or (student_hidden.is_cuda and liger_available())

    def total_loss(self, model, batch: StepBatch, out, mode: str) -> torch.Tensor:
        """The loss to optimize from the distillation output (SDPO adds its GRPO term here)."""
        return out.loss

    def record_step_metrics(self, mode, batch: StepBatch, out, loss_mask, ce_mask) -> None:
        metrics = self._metrics[mode]
        rollouts = batch.rollouts
        on_policy = ~batch.ce_rows
        metrics["distillation_loss"].append(out.loss.item())
        lengths = rollouts.completion_mask.sum(-1).float()
        if on_policy.any():
            metrics["completion_length"].append(lengths[on_policy].mean().item())
            metrics["completion_truncated_fraction"].append(rollouts.truncated[on_policy].float().mean().item())
        metrics["on_policy_fraction"].append(on_policy.float().mean().item())
        # Diagnostics come back for the tokens in the loss, in row-major order.
        in_loss = loss_token_mask(loss_mask, skip_first=self.options.num_loss_tokens_to_skip, unskipped_rows=batch.ce_rows)
        if out.per_token_divergence is None:  # the Liger path: distilled rows only, loss only
            metrics["kl"].append(out.loss.item())
            return
        ce_tokens = ce_mask[in_loss]
        per_token = out.per_token_divergence
        if (~ce_tokens).any():
            metrics["kl"].append(per_token[~ce_tokens].mean().item())
            if out.teacher_token_logprobs is not None:
                gap = (out.teacher_token_logprobs - out.student_token_logprobs)[~ce_tokens]
                metrics["teacher_student_logprob_gap"].append(gap.mean().item())
        if ce_tokens.any():
            metrics["ce_loss"].append(per_token[ce_tokens].mean().item())

    # ------------------------------------------------------------------ numerics guards
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's forward + backward of one micro-batch, then the non-finite guard.

        A micro-batch whose loss is not finite marks its optimizer step (a NaN or inf logit makes the loss
        non-finite: the loss sums over every logit of the completion tokens). After the last micro-batch of the
        step, once the gradients are synchronized, `guard_optimizer_step` skips the step when any process saw
        a non-finite loss or holds a non-finite gradient. The backward of a non-finite loss still runs (every
        process takes part in the gradient all-reduce); its gradients are dropped, never applied.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            self._nonfinite_loss_in_step = True
            for values in self._metrics["train"].values():  # keep this micro-batch's NaNs out of the logged means
                values[:] = [value for value in values if math.isfinite(value)]
        if self.accelerator.sync_gradients:
            self.guard_optimizer_step()
        return loss

    def guard_optimizer_step(self) -> bool:
        """Skip the optimizer step about to run when it is non-finite on any process; returns whether it is skipped.

        Called once the step's gradients are complete. A skipped step's gradients are dropped (set to None), so
        the optimizer changes neither the weights nor its own state; global_step and the learning-rate schedule
        still advance. Skips are counted (`nonfinite_steps_skipped`, logged as `skipped_step_fraction`) and
        warned about; `max_consecutive_nonfinite_steps` skips in a row stop the run with a RuntimeError.
        Under DeepSpeed the optimizer steps inside backward: there the skip is DeepSpeed's own overflow check,
        and this guard only counts and stops.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        local_grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
        nonfinite_loss = self.__dict__.pop("_nonfinite_loss_in_step", False)
        nonfinite_grad = bool(local_grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(local_grads)))
        # How many processes saw each; every process must take the same decision (FSDP / ZeRO shard gradients).
        counts = torch.tensor([float(nonfinite_loss), float(nonfinite_grad)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        skipped = bool(counts.sum() > 0)
        self._metrics["train"]["skipped_step_fraction"].append(float(skipped))
        if not skipped:
            self._nonfinite_steps_in_a_row = 0
            return False
        for param in params:
            param.grad = None
        self._nonfinite_steps_in_a_row = self.__dict__.get("_nonfinite_steps_in_a_row", 0) + 1
        self._nonfinite_steps_skipped = self.nonfinite_steps_skipped + 1
        step, in_a_row, limit = self.state.global_step + 1, self._nonfinite_steps_in_a_row, self.options.max_consecutive_nonfinite_steps
        what = (f"loss on {int(counts[0])} of {self.accelerator.num_processes} process(es)" if counts[0] > 0
                else "gradient")
        LOG.warning("step %d skipped: non-finite %s; %d step(s) skipped so far, %d in a row (the run stops at %d)",
                    step, what, self._nonfinite_steps_skipped, in_a_row, limit)
        if in_a_row >= limit:
            raise RuntimeError(
                f"{in_a_row} optimizer steps in a row (the last: step {step}) had a non-finite {what}; stopping "
                f"(max_consecutive_nonfinite_steps={limit}). No skipped step changed the weights. See 'Running long "
                "jobs' in the README: lower the learning rate, look at the rows of these steps, resume from the last "
                "checkpoint."
            )
        return True

    @property
    def nonfinite_steps_skipped(self) -> int:
        """Optimizer steps skipped so far for a non-finite loss or gradient (this process's run)."""
        return self.__dict__.get("_nonfinite_steps_skipped", 0)

    def check_divergence_values(self, out) -> None:
        """`debug_numerics`: every per-token divergence of the step must be >= 0 within 1e-4, else RuntimeError.

        A divergence (forward / reverse KL, generalized JSD, cross-entropy) is never negative; a value below
        -1e-4 means the loss is computed wrongly or in too low a precision. The sampled-token estimator of
        `distillation_mode: sampled` is negative for some tokens by design and is not checked; non-finite
        values are left to the non-finite guard (the step is skipped).
        """
        if self.options.distillation_mode == "sampled" or out.per_token_divergence is None:  # Liger: loss only
            return
        tolerance = 1e-4
        values = out.per_token_divergence.detach().float()
        values = values[torch.isfinite(values)]
        if values.numel() and values.min().item() < -tolerance:
            below = int((values < -tolerance).sum())
            raise RuntimeError(
                f"debug_numerics: {below} of {values.numel()} per-token divergences of step {self.state.global_step + 1} "
                f"are below -{tolerance:g} (min {values.min().item():.4g}); a divergence is never negative, so the "
                "loss is computed wrongly or in too low a precision"
            )

    # ------------------------------------------------------------------ plumbing
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(PROMPT_COLUMNS)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = {key: (sum(v), len(v)) for key, v in self._metrics[mode].items() if v}
        if self.accelerator.num_processes > 1:
            # Every process logs: average each metric over all processes' values (a process may lack a key,
            # e.g. ce_loss without cross-entropy rows, so the dicts travel whole instead of per-key collectives).
            from accelerate.utils import gather_object

            merged = {}
            for part in gather_object([sums]):
                for key, (total, count) in part.items():
                    previous = merged.get(key, (0.0, 0))
                    merged[key] = (previous[0] + total, previous[1] + count)
            sums = merged
        averaged = {key: total / count for key, (total, count) in sums.items()}
        if mode == "eval":
            averaged = {f"eval_{key}": value for key, value in averaged.items()}
        super().log({**logs, **averaged}, start_time)
        self._metrics[mode].clear()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Saves the model (adapter) and, on the final save, `training_config.json` and `trainer_state.json`
        beside it: what `sd-plugin merge` puts in the model card (hyperparameters and metrics)."""
        super().save_model(output_dir, _internal_call)
        if _internal_call or not self.args.should_save:
            return
        folder = output_dir or self.args.output_dir
        with open(os.path.join(folder, "training_config.json"), "w", encoding="utf-8") as handle:
            json.dump(self.args.to_dict(), handle, indent=2, default=str)
        self.state.save_to_json(os.path.join(folder, "trainer_state.json"))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self.teacher.state_dict()
        if state and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(state, os.path.join(folder, TEACHER_STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, TEACHER_STATE_FILE)
        if os.path.exists(path):
            self.teacher.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        elif self.teacher.state_dict():
            LOG.warning("checkpoint %s has no %s: the %s teacher restarts from the base weights",
                        resume_from_checkpoint, TEACHER_STATE_FILE, self.options.teacher)


def completion_hidden_states(unwrapped, model, prompt_ids, prompt_mask, completion_ids, completion_mask, *,
                             sequence_tile_size: int = 0, sequence_tile_offload: bool = False) -> torch.Tensor:
    """Final hidden states at the positions that predict each completion token: [N, C, H].

    Runs the model's own forward (so DDP / FSDP / DeepSpeed wrappers see the call) with an empty
    `logits_to_keep`, and takes the decoder's output through a forward hook: no logits are computed.
    With `sequence_tile_size` the decoder runs tiled (sd_plugin/tiling.py) and returns the completion slice only.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    # Left padding: positions count real tokens only, so padded and unpadded prompts see the same rotary phases.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = prompt_ids.shape[1] - 1
    keep = slice(start, start + completion_ids.shape[1])
    captured = {}

    def grab(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    decoder = unwrapped.get_decoder()
    hook = decoder.register_forward_hook(grab)
    tiling = contextlib.nullcontext()
    if sequence_tile_size:
        from ..tiling import tiled_decoder

        tiling = tiled_decoder(decoder, sequence_tile_size, keep=keep, offload=sequence_tile_offload)
    try:
        with tiling:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device))
    finally:
        hook.remove()
    if sequence_tile_size:
        return captured["hidden"]
    return captured["hidden"][:, keep].clone()  # a copy: the [N, T, H] output is not kept alive by a view
