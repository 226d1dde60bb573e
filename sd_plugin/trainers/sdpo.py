"""SDPO (Huebotter et al. 2026, arXiv 2601.20802): reinforcement learning with a self-teacher.

Several rollouts per prompt are scored by a verifier. The teacher (an EMA of the student by default) sees
the prompt plus a successful sibling rollout and/or the verifier's feedback on this rollout, and scores the
same tokens; rows with neither get no distillation loss. `sdpo_mode` picks distillation only (the paper),
GRPO only, or GRPO + weight x distillation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from sd_plugin.contexts import render_ids, sdpo_teacher_messages
from sd_plugin.deprecated import accepts_deprecated_names
from sd_plugin.grpo import chunked_token_logprobs, group_advantages, grpo_loss
from sd_plugin.rows import tokenize_prompt_rows
from sd_plugin.teacher import output_head
from sd_plugin.trainers.base import LOG, SelfDistillationOptions, SelfDistillationTrainer, StepBatch
from sd_plugin.verifiers import load_verifier

SDPO_MODES = ("distill", "policy", "hybrid")


@accepts_deprecated_names
@dataclass
class SDPOOptions(SelfDistillationOptions):
    """SDPO's options; the shared ones get the SDPO paper's defaults (alpha 0.5, top-100 of the student
    with a tail bucket, EMA teacher at rate 0.05, teacher prompt cap 10,240, token-level mean)."""

    max_teacher_prompt_length: int = field(default=10240, metadata={"help": "Teacher prompt cap (tokens); longer teacher prompts drop that row's teacher signal (counted)."})
    num_generations: int = field(default=8, metadata={"help": "Rollouts per prompt (the group)."})
    distillation_alpha: float = field(default=0.5, metadata={"help": "0 forward KL, 1 reverse KL, 0.5 JSD (SDPO paper; rich-feedback runs: 1.0)."})
    distillation_mode: str = field(default="topk_logits", metadata={"help": "full_logits | topk_logits | sampled_token (TRL's names)."})
    distillation_topk: int | None = field(default=100, metadata={"help": "K for distillation_mode=topk_logits (rich-feedback runs: 20)."})
    distillation_add_tail: bool = field(default=True, metadata={"help": "Top-K plus one tail bucket instead of renormalizing."})
    loss_reduction: str = field(default="token", metadata={"help": "token (mean over all tokens of the batch) | sequence."})
    num_loss_tokens_to_skip: int = field(default=0, metadata={"help": "First completion tokens left out of the loss."})
    teacher_model_kind: str = field(default="ema", metadata={"help": "base | ema | live (sdpo_mode: policy needs no teacher)."})
    teacher_update_rate: float = field(default=0.05, metadata={"help": "EMA rate a in phi <- (1-a) phi + a theta."})
    verifier: str | None = field(default=None, metadata={"help": "multiple_choice | tool_calls | boxed_math | python_tests | package.module:callable."})
    verifier_kwargs: dict[str, Any] | None = field(default=None, metadata={"help": "Keyword arguments of the verifier (e.g. answer_field)."})
    success_reward_threshold: float = field(default=1.0, metadata={"help": "A rollout with reward >= this is a solution its siblings can see."})
    dont_reprompt_on_self_success: bool = field(default=True, metadata={"help": "A successful rollout never gets itself as its teacher's solution, only a successful sibling (paper: true)."})
    include_environment_feedback: bool = field(default=True, metadata={"help": "Put the verifier's feedback on this rollout into the teacher's context."})
    environment_feedback_only_without_solution: bool = field(default=False, metadata={"help": "Use feedback only when no sibling solution exists."})
    sdpo_mode: str = field(default="distill", metadata={"help": "distill (paper) | policy (GRPO only) | hybrid (GRPO + distillation_weight x distillation)."})
    distillation_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term in hybrid mode."})
    mask_uncertain_teacher_tokens: bool = field(default=False, metadata={"help": "Distil only the tokens where the teacher's entropy is at most the student's (a dropped token counts in the token mean with loss 0; not in the paper or TRL)."})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range of the GRPO term."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompt (string or messages)."})
    tools_column: str = field(default="tools", metadata={"help": "Column with tool schemas (optional)."})

    def check(self) -> None:
        super().check()
        if self.verifier is None:
            raise ValueError("verifier is required: a built-in name (multiple_choice, tool_calls, boxed_math, python_tests) or 'package.module:callable'")
        if self.sdpo_mode not in SDPO_MODES:
            raise ValueError(f"sdpo_mode must be one of {SDPO_MODES}, got {self.sdpo_mode!r}")
        if self.sdpo_mode != "distill" and self.num_generations < 2:
            raise ValueError(f"sdpo_mode={self.sdpo_mode} needs group advantages: num_generations must be >= 2, got {self.num_generations}")
        if self.sdpo_mode != "hybrid" and self.distillation_weight != 1.0:
            raise ValueError(f"distillation_weight is only used with sdpo_mode=hybrid (sdpo_mode is {self.sdpo_mode})")
        if self.sdpo_mode == "distill" and self.epsilon != 0.2:
            raise ValueError("epsilon is only used with sdpo_mode=policy or hybrid")
        if self.sdpo_mode == "policy" and self.teacher_model_kind != "live":
            raise ValueError("sdpo_mode=policy trains without a teacher: set teacher_model_kind: live (no teacher state is kept)")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.mask_uncertain_teacher_tokens and self.sdpo_mode == "policy":
            raise ValueError("mask_uncertain_teacher_tokens masks distillation tokens: sdpo_mode=policy has none")
        if self.environment_feedback_only_without_solution and not self.include_environment_feedback:
            raise ValueError("environment_feedback_only_without_solution needs include_environment_feedback: true")


@accepts_deprecated_names
@dataclass
class SDPOConfig(SDPOOptions, TrainingArguments):
    """Training arguments for `SDPOTrainer`: `transformers.TrainingArguments` plus `SDPOOptions`."""

    learning_rate: float = field(default=1e-5, metadata={"help": "SDPO paper: 1e-5 (LoRA runs may use more)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        TrainingArguments.__post_init__(self)
        self.check()


class SDPOTrainer(SelfDistillationTrainer):
    """Self-Distillation Policy Optimization.

    Example:
        trainer = SDPOTrainer(model=model, args=SDPOConfig(output_dir="out", verifier="multiple_choice"),
                              train_dataset=rows, processing_class=tokenizer, peft_config=LoraConfig(...))
        trainer.train()

    `train_dataset` rows: {"prompt": str | messages, "system"?, "tools"?, task fields the verifier reads
    (e.g. "answer")}, or rows prepared by the Axolotl strategy `sd_plugin.axolotl.strategies.prompts`.
    """

    options_class = SDPOOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.verifier = load_verifier(self.options.verifier, self.options.verifier_kwargs)

    def prepare_dataset(self, dataset, tokenizer, args, split):
        if "sd_record" in dataset.column_names:
            return dataset
        invalid_file = self.invalid_rows_path(args, split)
        return tokenize_prompt_rows(dataset, tokenizer, self.options, invalid_rows_file=invalid_file)

    # ------------------------------------------------------------------ step 2: rewards
    def score_rollouts(self, inputs, batch: StepBatch) -> None:
        """Every rollout decoded and verified (a verifier error gives reward 0 and a warning)."""
        self.verify_rollouts(inputs, batch, self.verifier, self.options.success_reward_threshold)
        metrics = self._metrics[self.mode]
        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        solved = torch.tensor([v.correct for v in batch.verdicts], dtype=torch.float32).reshape(-1, self.options.num_generations)
        metrics["self_distillation/reward_mean"].append(rewards.mean().item())
        metrics["self_distillation/reward_std"].append(rewards.std().item() if rewards.numel() > 1 else 0.0)
        metrics["success_fraction"].append(solved.mean().item())
        metrics["self_distillation/success_group_fraction"].append((solved.sum(-1) > 0).float().mean().item())

    # ------------------------------------------------------------------ step 3: teacher contexts
    def teacher_prompts(self, inputs, batch: StepBatch) -> list[list[int] | None]:
        o = self.options
        metrics = self._metrics[self.mode]
        verdicts, records = batch.verdicts, batch.records
        groups = batch.rollouts.prompt_index.tolist()
        if o.sdpo_mode == "policy":
            return [None] * len(groups)
        prompts, with_solution, with_feedback, overflow = [], 0, 0, 0
        for i, group in enumerate(groups):
            siblings = [j for j, g in enumerate(groups) if g == group and verdicts[j].correct and (j != i or not o.dont_reprompt_on_self_success)]
            solution = verdicts[siblings[0]].text if siblings else None
            feedback = verdicts[i].feedback if o.include_environment_feedback else None
            if o.environment_feedback_only_without_solution and solution is not None:
                feedback = None
            batch.teacher_contexts.append(teacher_context_text(solution, feedback))
            messages = sdpo_teacher_messages(records[group]["messages"], solution, feedback)
            if messages is None:
                prompts.append(None)
                continue
            ids = render_ids(self.processing_class, messages, records[group]["tools"])
            if len(ids) > o.max_teacher_prompt_length:
                # Never cut the question: this rollout trains without a teacher signal, and it is counted.
                overflow += 1
                prompts.append(None)
                continue
            with_solution += solution is not None
            with_feedback += feedback is not None
            prompts.append(ids)
        count = len(groups)
        metrics["self_distillation/success_sample_fraction"].append(with_solution / count)
        metrics["self_distillation/feedback_used_fraction"].append(with_feedback / count)
        metrics["no_teacher_signal_fraction"].append(sum(p is None for p in prompts) / count)
        if overflow:
            metrics["teacher_prompt_overflow"].append(float(overflow))
            LOG.warning("%d SDPO teacher prompts exceed max_teacher_prompt_length=%d: those rollouts get no distillation loss",
                        overflow, o.max_teacher_prompt_length)
        return prompts

    # ------------------------------------------------------------------ step 5: the loss
    def filter_loss_mask(self, batch, loss_mask, student_hidden, teacher_hidden, student_head, teacher_head):
        """mask_uncertain_teacher_tokens: drop the tokens where the teacher's entropy exceeds the student's.

        On a small model's off-topic rollouts the teacher is often less sure than the student; distilling
        there spreads the student's distribution (benchmarks/README.md, SDPO on a real model)."""
        if not self.options.mask_uncertain_teacher_tokens:
            return loss_mask
        chunk = self.options.loss_chunk_size
        student_entropy = token_entropies(student_hidden, *student_head, loss_mask, chunk)
        teacher_entropy = token_entropies(teacher_hidden, *teacher_head, loss_mask, chunk)
        keep = teacher_entropy <= student_entropy
        kept = loss_mask * keep
        total = loss_mask.sum().item()
        self._metrics[self.mode]["self_distillation/uncertain_teacher_token_fraction"].append(
            1.0 - kept.sum().item() / total if total else 0.0)
        return kept

    def total_loss(self, model, batch: StepBatch, student_hidden: torch.Tensor, out) -> torch.Tensor:
        o = self.options
        metrics = self._metrics[self.mode]
        if o.sdpo_mode == "distill":
            return out.loss
        rollouts = batch.rollouts
        head_weight, head_bias = output_head(self.accelerator.unwrap_model(model))
        logprobs = chunked_token_logprobs(student_hidden, head_weight, rollouts.completion_ids,
                                          rollouts.completion_mask, loss_chunk_size=o.loss_chunk_size, lm_head_bias=head_bias)
        # On-policy rollouts: the ratio is 1 in value and the clip only matters for rollouts from another engine.
        old_logprobs = rollouts.old_logprobs if rollouts.old_logprobs is not None else logprobs.detach()
        advantages = group_advantages(torch.tensor(batch.rewards, dtype=torch.float32, device=logprobs.device), o.num_generations)
        policy_loss, clip_fraction = grpo_loss(logprobs, old_logprobs, advantages, rollouts.completion_mask,
                                               epsilon=o.epsilon, loss_reduction=o.loss_reduction)
        metrics["clip_fraction"].append(clip_fraction.item())
        if o.sdpo_mode == "policy":
            return policy_loss
        # The loss has two terms: log each (TRL's names); in the other modes the loss is the one term.
        metrics["self_distillation/policy_loss"].append(policy_loss.item())
        metrics["self_distillation/distillation_loss"].append(out.loss.item())
        return policy_loss + o.distillation_weight * out.loss


def teacher_context_text(solution: str | None, feedback: str | None) -> str:
    """What the SDPO teacher sees that the student does not, for log_completions."""
    parts = ([f"solution: {solution}"] if solution is not None else []) + ([f"feedback: {feedback}"] if feedback is not None else [])
    return "\n".join(parts) or "(none: no teacher signal)"


@torch.no_grad()
def token_entropies(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None, mask: torch.Tensor,
                    chunk_size: int) -> torch.Tensor:
    """[N, C] entropy (nats) of softmax(hidden @ W.T + b) at the masked positions (0 elsewhere), `chunk_size` tokens at a time."""
    entropies = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    positions = mask.bool().nonzero(as_tuple=True)
    rows = hidden[positions]
    values = []
    for start in range(0, rows.shape[0], chunk_size):
        logits = torch.nn.functional.linear(rows[start:start + chunk_size], head_weight, head_bias).float()
        logprobs = torch.log_softmax(logits, -1)
        values.append(-(logprobs.exp() * logprobs).sum(-1))
    if values:
        entropies[positions] = torch.cat(values)
    return entropies
