"""SD-Zero (He et al. 2026, arXiv 2604.12002): self-revision turns binary rewards into dense supervision.

Two phases, one trainer (`phase`):

- `srt` (Self-Revision Training): supervised training on revisions collected by `sd-plugin collect-revisions`
  (rows {"prompt", ..., "y_init", "control_phrase", "y_revised"}). Each row gives a revision objective
  (cross-entropy on y_revised + end-of-turn, given chat(x) + y_init + separator P_r separator) and/or a
  generation objective (cross-entropy on the whole turn y_init + separator P_r separator + y_revised +
  end-of-turn, given chat(x)); `srt_objective` picks joint (the paper's L_revision + L_generation, as the TRL
  pull request trains it) or one of them (the official code's two stages: generation, then revision).
- `distill` (self-distillation): the student samples y; a binary verifier picks the control phrase P_r; the
  frozen SRT model scores chat(x) + y + separator P_r separator + y, and the loss covers only the second copy
  of y (teacher top-64, both renormalized, 0.5 forward + 0.5 reverse KL, token-level mean by default).

Token sequences are concatenations of separately tokenized segments (chat-template prompt, y, delimiter, y),
never re-tokenized across a boundary, so the masked positions are exactly the intended tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from sd_plugin.contexts import control_phrases, sdzero_delimiter_ids, sdzero_teacher_ids
from sd_plugin.data import Columns
from sd_plugin.deprecated import accepts_deprecated_names
from sd_plugin.option_checks import check_reward_threshold
from sd_plugin.revisions import SDZeroSharedOptions
from sd_plugin.rollout import Rollouts
from sd_plugin.rows import right_pad, srt_rows, tokenize_prompt_rows, tokenize_rows
from sd_plugin.trainers.base import LOG, SelfDistillationOptions, SelfDistillationTrainer, StepBatch
from sd_plugin.verifiers import check_verifier, load_verifier

PHASES = ("srt", "distill")
SRT_OBJECTIVES = ("joint", "revision", "generation")
# Options that only one phase reads; setting one in the other phase is an error (never a silently ignored knob).
PHASE_ONLY_OPTIONS = {
    "distill": (
        "max_teacher_prompt_length", "num_generations", "temperature", "top_p", "top_k",
        "distillation_alpha", "distillation_divergence", "distillation_mode", "distillation_topk",
        "distillation_support", "distillation_add_tail", "distillation_temperature", "num_loss_tokens_to_skip",
        "distillation_is_clip", "liger_loss", "teacher_model_kind", "teacher_update_rate", "teacher_ema_rank",
        "teacher_sync_steps", "verifier", "verifier_kwargs", "success_reward_threshold", "control_phrase_family",
        "control_phrase_correct", "control_phrase_incorrect", "importance_sampling_correction", "use_vllm", "vllm_mode",
        "vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_tensor_parallel_size", "vllm_max_model_length",
        "vllm_model_impl", "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
        "vllm_group_port",
        "log_completions", "num_completions_to_print", "prefill_chunk_size",
    ),
    "srt": ("srt_objective",),
}


@accepts_deprecated_names
@dataclass
class SDZeroOptions(SDZeroSharedOptions, SelfDistillationOptions):
    """SD-Zero's options; the shared ones get the paper's defaults (official code: NeMo-RL distillation).

    The verifier, control phrase and column fields are `SDZeroSharedOptions`, declared once for collect-revisions too.
    """

    phase: str | None = field(default=None, metadata={"help": "Required: srt (self-revision training on collected revisions) | distill (self-distillation from the frozen SRT model)."})
    max_completion_length: int = field(default=4096, metadata={"help": "distill: rollout cap (max new tokens); srt: cap on the whole assistant turn y_init + P_r + y_revised (longer rows are refused)."})
    max_teacher_prompt_length: int = field(default=32768, metadata={"help": "Cap on the teacher's whole input chat(x) + y + P_r + y (official MAX_TEACHER_TOKENS); over it y is shortened in both copies, x is never cut."})
    distillation_alpha: float = field(default=0.5, metadata={"help": "Weight of the reverse KL: 0 forward, 1 reverse, 0.5 = the paper's 0.5 forward + 0.5 reverse (with distillation_divergence: mixed)."})
    distillation_divergence: str = field(default="mixed", metadata={"help": "For 0 < alpha < 1: mixed ((1 - alpha) forward KL + alpha reverse KL, SD-Zero) | jsd (generalized JSD)."})
    distillation_mode: str = field(default="topk_logits", metadata={"help": "full_logits | topk_logits | sampled_token (TRL's names)."})
    distillation_topk: int | None = field(default=64, metadata={"help": "K for distillation_mode=topk_logits (paper: 64)."})
    distillation_support: str = field(default="teacher", metadata={"help": "Whose top-K: teacher (paper) | student."})
    loss_reduction: str = field(default="token", metadata={"help": "token (mean over all tokens of the batch, paper) | sequence."})
    num_loss_tokens_to_skip: int = field(default=0, metadata={"help": "distill: first completion tokens left out of the loss (paper: 0)."})
    teacher_model_kind: str | None = field(default=None, metadata={"help": "distill: base (default: the frozen SRT model, i.e. the model with its LoRA adapter disabled, or a frozen copy) | ema | live; srt trains without a teacher."})
    srt_objective: str = field(default="joint", metadata={"help": "srt: joint (revision + generation rows, the paper's L_SRT) | revision | generation (the official code's stages 2 and 1)."})

    def __post_init__(self):
        self.resolve_teacher()

    def resolve_teacher(self) -> None:
        """teacher unset: base (the frozen SRT model) for distill; for srt no teacher is kept (live = no copy)."""
        if self.teacher_model_kind is None:
            self.teacher_model_kind = "live" if self.phase == "srt" else "base"

    def check(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase is required: srt or distill, got {self.phase!r}")
        defaults = {f.name: f.default for f in fields(self)}
        other_phase = "distill" if self.phase == "srt" else "srt"
        for name in PHASE_ONLY_OPTIONS[other_phase]:
            unset = self.teacher_model_kind == "live" if name == "teacher_model_kind" else getattr(self, name) == defaults[name]
            if not unset:
                raise ValueError(f"{name} is only used with phase: {other_phase} (phase is {self.phase})")
        super().check()
        control_phrases(self.control_phrase_family, self.control_phrase_correct, self.control_phrase_incorrect)
        if self.srt_objective not in SRT_OBJECTIVES:
            raise ValueError(f"srt_objective must be one of {SRT_OBJECTIVES}, got {self.srt_objective!r}")
        if self.phase == "distill" and self.verifier is None:
            raise ValueError("phase: distill needs a verifier: a built-in name (multiple_choice, tool_calls, boxed_math, "
                             "python_tests) or 'package.module:callable'")
        if self.phase == "distill":
            check_reward_threshold(self.success_reward_threshold)
            check_verifier(self.verifier, self.verifier_kwargs)


@accepts_deprecated_names
@dataclass
class SDZeroConfig(SDZeroOptions, TrainingArguments):
    """Training arguments for `SDZeroTrainer`: `transformers.TrainingArguments` plus `SDZeroOptions`."""

    learning_rate: float = field(default=5e-6, metadata={"help": "Paper: 5e-6 (both phases)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        self.resolve_teacher()
        self.check()


def tokenize_srt_rows(dataset, tokenizer, options: SDZeroOptions, *, invalid_rows_file: str | None = None):
    """Kept revisions -> SRT rows (one or two per revision, see `sd_plugin.rows.srt_rows`); invalid rows fail with their index."""
    from datasets import Dataset

    columns = Columns(prompt=options.prompt_column, tools=options.tools_column)
    nested = tokenize_rows(dataset, lambda raw, index: {"rows": srt_rows(tokenizer, raw, index, columns, options)},
                           skip_invalid=options.skip_invalid, invalid_rows_file=invalid_rows_file)
    return Dataset.from_list([row for rows in nested["rows"] for row in rows])


@dataclass
class SRTStepBatch(StepBatch):
    objectives: list[str] = field(default_factory=list)  # "revision" | "generation" per row


class SDZeroTrainer(SelfDistillationTrainer):
    """Self-Distillation Zero, both phases (`phase: srt | distill`).

    Example (phase 2, after SRT and merging its adapter into the model):
        args = SDZeroConfig(output_dir="out", phase="distill", verifier="multiple_choice")
        trainer = SDZeroTrainer(model=srt_model, args=args, train_dataset=problems, processing_class=tokenizer,
                                peft_config=LoraConfig(...))   # teacher_model_kind: base = the frozen SRT model
        trainer.train()

    `train_dataset` rows: phase srt, the kept revisions of `sd_plugin.revisions.collect_revisions`
    ({"prompt", "system"?, "tools"?, "y_init", "control_phrase", "y_revised"}) or rows prepared by the Axolotl
    strategy `sd_plugin.axolotl.strategies.sdzero`; phase distill, prompt rows ({"prompt", "system"?, "tools"?,
    task fields the verifier reads}) or rows of `sd_plugin.axolotl.strategies.prompts`.
    """

    options_class = SDZeroOptions
    deprecated_metrics = frozenset({"correct_fraction", "no_teacher_signal_fraction"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        self.verifier = None
        self.delimiter_ids = None
        if o.phase == "distill":
            self.verifier = load_verifier(o.verifier, o.verifier_kwargs)
            phrases = control_phrases(o.control_phrase_family, o.control_phrase_correct, o.control_phrase_incorrect)
            self.control_phrase_texts = {outcome: f"control phrase: {phrase}" for outcome, phrase in phrases.items()}
            self.delimiter_ids = {outcome: sdzero_delimiter_ids(self.processing_class, phrase, o.separator)
                                  for outcome, phrase in phrases.items()}

    def prepare_dataset(self, dataset, tokenizer, args, split):
        o = self.options
        columns = dataset.column_names
        self.refuse_host_tokenized(dataset, split)
        invalid_file = self.invalid_rows_path(args, split)
        if o.phase == "srt":
            if "completion_ids" in columns:
                return dataset
            if "sd_record" in columns:
                raise ValueError("phase: srt trains on kept revisions (type sd_plugin.axolotl.strategies.sdzero), "
                                 "but the dataset holds prompt rows (type sd_plugin.axolotl.strategies.prompts)")
            return tokenize_srt_rows(dataset, tokenizer, o, invalid_rows_file=invalid_file)
        if "sd_record" in columns:
            return dataset
        if "completion_ids" in columns:
            raise ValueError("phase: distill samples from prompt rows (type sd_plugin.axolotl.strategies.prompts), "
                             "but the dataset holds SRT rows (type sd_plugin.axolotl.strategies.sdzero)")
        return tokenize_prompt_rows(dataset, tokenizer, o, invalid_rows_file=invalid_file)

    # ------------------------------------------------------------------ step 1: the completions
    def make_rollouts(self, model, inputs) -> StepBatch:
        if self.options.phase == "srt":
            return self.srt_batch(inputs)
        return super().make_rollouts(model, inputs)

    def srt_batch(self, inputs) -> SRTStepBatch:
        """The rows' targets as completions, every row trained with cross-entropy (no rollout, no teacher)."""
        prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
        device = prompt_ids.device
        completion_ids, completion_mask = right_pad([list(ids) for ids in inputs["completion_ids"]],
                                                    self.processing_class.pad_token_id)
        size = prompt_ids.shape[0]
        rollouts = Rollouts(completion_ids.to(device), completion_mask.to(device), torch.arange(size, device=device),
                            torch.zeros(size, dtype=torch.bool, device=device))
        return SRTStepBatch(prompt_ids, prompt_mask, rollouts, torch.ones(size, dtype=torch.bool, device=device),
                            objectives=list(inputs["srt_objective"]))

    # ------------------------------------------------------------------ step 2: correct or not
    def score_rollouts(self, inputs, batch: StepBatch) -> None:
        """distill: verify every rollout; its outcome picks the control phrase of its teacher input."""
        if self.options.phase == "srt":
            return
        self.verify_rollouts(inputs, batch, self.verifier, self.options.success_reward_threshold)
        batch.teacher_contexts = [self.control_phrase_texts[verdict.correct] for verdict in batch.verdicts]
        self._metrics[self.mode]["self_distillation/success_fraction"].append(sum(v.correct for v in batch.verdicts) / len(batch.verdicts))

    def no_signal_advice(self) -> str:
        if self.options.phase == "srt":
            return super().no_signal_advice()
        return (f"no teacher input fits max_teacher_prompt_length={self.options.max_teacher_prompt_length} even with the "
                "rollout cut to one token (no_teacher_signal_fraction 1); raise max_teacher_prompt_length or shorten the prompts")

    # ------------------------------------------------------------------ step 3: the teacher inputs
    def teacher_prompts(self, inputs, batch: StepBatch) -> list[list[int] | None]:
        """distill: chat(x) + y + delimiter (the control phrase of the rollout's outcome) for each rollout.

        When the teacher input would exceed max_teacher_prompt_length, y is shortened symmetrically: the row's
        `scored_lengths` entry is the kept length, so student and teacher score the same y[:L].
        """
        o = self.options
        if o.phase == "srt":
            return [None] * batch.prompt_ids.shape[0]
        metrics = self._metrics[self.mode]
        rollouts = batch.rollouts
        prompts, batch.scored_lengths, truncated_tokens = [], [], 0
        for i, verdict in enumerate(batch.verdicts):
            response = rollouts.completion_ids[i, : int(rollouts.completion_mask[i].sum())].tolist()
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            teacher = sdzero_teacher_ids(prompt, response, self.delimiter_ids[verdict.correct],
                                         max_length=o.max_teacher_prompt_length, end_of_turn_ids=self.eos_token_ids)
            prompts.append(None if teacher is None else teacher.teacher_input_ids)
            batch.scored_lengths.append(None if teacher is None else teacher.scored_length)
            truncated_tokens += 0 if teacher is None else teacher.truncated_tokens
        without_signal = sum(p is None for p in prompts)
        metrics["teacher_truncated_tokens"].append(float(truncated_tokens))
        metrics["self_distillation/reprompt_sample_fraction"].append(1.0 - without_signal / len(prompts))
        if without_signal:
            LOG.warning("%d SD-Zero teacher inputs do not fit max_teacher_prompt_length=%d even with y cut to one token: "
                        "those rollouts get no loss (the prompt is never cut)", without_signal, o.max_teacher_prompt_length)
        return prompts

    # ------------------------------------------------------------------ metrics
    def record_step_metrics(self, mode, batch: StepBatch, out, loss_mask, ce_mask) -> None:
        super().record_step_metrics(mode, batch, out, loss_mask, ce_mask)
        if self.options.phase != "srt":
            return
        # SRT skips no token, so the per-token losses are exactly the mask's tokens in row-major order.
        per_row = torch.split(out.per_token_divergence, loss_mask.sum(-1).long().tolist())
        for objective in ("revision", "generation"):
            losses = [values for values, name in zip(per_row, batch.objectives) if name == objective]
            if losses:
                self._metrics[mode][f"{objective}_loss"].append(torch.cat(losses).mean().item())
