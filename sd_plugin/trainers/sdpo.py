"""SDPO (Huebotter et al. 2026, arXiv 2601.20802): reinforcement learning with a self-teacher.

Several rollouts per prompt are scored by a verifier. The teacher (an EMA of the student by default) sees
the prompt plus a successful sibling rollout and/or the verifier's feedback on this rollout, and scores the
same tokens; rows with neither get no distillation loss. `sdpo_mode` picks distillation only (the paper),
GRPO only, or (1 - distillation_weight) x GRPO + distillation_weight x distillation (TRL's SDPO formula).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from sd_plugin.contexts import render_ids, sdpo_teacher_messages
from sd_plugin.deprecated import accepts_deprecated_names
from sd_plugin.grpo import chunked_token_logprobs, group_advantages, grpo_loss
from sd_plugin.option_checks import check_reward_threshold
from sd_plugin.rows import tokenize_prompt_rows
from sd_plugin.teacher import output_head
from sd_plugin.trainers.base import LOG, SelfDistillationOptions, SelfDistillationTrainer, StepBatch
from sd_plugin.verifiers import TRLRewardFunctions, check_verifier, load_verifier

SDPO_MODES = ("distill", "policy", "hybrid")


@accepts_deprecated_names
@dataclass
class SDPOOptions(SelfDistillationOptions):
    """SDPO's options; the shared ones get the SDPO paper's defaults (alpha 0.5, top-100 of the student
    with a tail bucket, EMA teacher at rate 0.05, teacher prompt cap 10,240, token-level mean)."""

    max_teacher_prompt_length: int = field(default=10240, metadata={"help": "Teacher prompt cap (tokens); longer teacher prompts drop that row's teacher signal (counted)."})
    num_generations: int = field(default=8, metadata={"help": "Rollouts per prompt (the group); per_device_train_batch_size counts completions and must be a multiple of it (TRL's meaning)."})
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
    reward_funcs: list[Any] | None = field(default=None, metadata={"help": "Instead of verifier: reward functions with TRL's signature f(prompts, completions, **columns) -> list[float], as 'package.module:function' paths (or callables in Python); TRL's name (sd_plugin.verifiers.TRLRewardFunctions)."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "One weight per reward function (default 1.0 each; TRL's name)."})
    success_reward_threshold: float = field(default=1.0, metadata={"help": "A rollout with reward >= this is a solution its siblings can see."})
    dont_reprompt_on_self_success: bool = field(default=True, metadata={"help": "A successful rollout never gets itself as its teacher's solution, only a successful sibling (paper: true)."})
    include_environment_feedback: bool = field(default=True, metadata={"help": "Put the verifier's feedback on this rollout into the teacher's context."})
    environment_feedback_only_without_solution: bool = field(default=False, metadata={"help": "Use feedback only when no sibling solution exists."})
    sdpo_mode: str = field(default="distill", metadata={"help": "distill (paper) | policy (GRPO only) | hybrid ((1 - distillation_weight) x GRPO + distillation_weight x distillation)."})
    distillation_weight: float = field(default=1.0, metadata={"help": "TRL's SDPO meaning: loss = (1 - w) x GRPO + w x distillation, w in [0, 1] (1.0: distillation only, TRL's default). sdpo_mode: hybrid needs 0 < w < 1 (0.5: both terms equally)."})
    mask_uncertain_teacher_tokens: bool = field(default=False, metadata={"help": "Distil only the tokens where the teacher's entropy is at most the student's (a dropped token counts in the token mean with loss 0; not in the paper or TRL)."})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range of the GRPO term."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column with the prompt (string or messages)."})
    tools_column: str = field(default="tools", metadata={"help": "Column with tool schemas (optional)."})

    def check(self, scorer_required: bool = True) -> None:
        """scorer_required False: a verifier or reward_funcs may still come (TRL's SDPOTrainer(reward_funcs=...))."""
        super().check()
        if self.verifier is None and self.reward_funcs is None and scorer_required:
            raise ValueError("verifier is required: a built-in name (multiple_choice, tool_calls, boxed_math, python_tests) or "
                             "'package.module:callable', or reward_funcs (reward functions in TRL's signature)")
        if self.verifier is not None and self.reward_funcs is not None:
            raise ValueError("verifier and reward_funcs are both set: give one way to score the rollouts")
        if self.reward_weights is not None and self.reward_funcs is None:
            raise ValueError("reward_weights is set but reward_funcs is not")
        if self.verifier_kwargs and self.reward_funcs is not None:
            raise ValueError("verifier_kwargs is set with reward_funcs: it applies to verifier only")
        if self.sdpo_mode not in SDPO_MODES:
            raise ValueError(f"sdpo_mode must be one of {SDPO_MODES}, got {self.sdpo_mode!r}")
        if self.sdpo_mode != "distill" and self.num_generations < 2:
            raise ValueError(f"sdpo_mode={self.sdpo_mode} needs group advantages: num_generations must be >= 2, got {self.num_generations}")
        if self.sdpo_mode != "hybrid" and self.distillation_weight != 1.0:
            raise ValueError(f"distillation_weight is only used with sdpo_mode=hybrid (sdpo_mode is {self.sdpo_mode})")
        if self.sdpo_mode == "hybrid" and not 0.0 < self.distillation_weight < 1.0:
            # TRL's meaning: 1.0 (TRL's default) is distillation only, 0.0 GRPO only; a hybrid blends both.
            raise ValueError(
                f"sdpo_mode=hybrid needs 0 < distillation_weight < 1, got {self.distillation_weight}: the loss is "
                "(1 - distillation_weight) x GRPO + distillation_weight x distillation (TRL's SDPO); 0.5 weights both "
                "equally, 1.0 is sdpo_mode: distill and 0.0 is sdpo_mode: policy"
            )
        if self.sdpo_mode == "distill" and self.epsilon != 0.2:
            raise ValueError("epsilon is only used with sdpo_mode=policy or hybrid")
        if self.sdpo_mode == "policy" and self.teacher_model_kind != "live":
            raise ValueError("sdpo_mode=policy trains without a teacher: set teacher_model_kind: live (no teacher state is kept)")
        if not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        check_reward_threshold(self.success_reward_threshold)
        check_verifier(self.verifier, self.verifier_kwargs)
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
        # TRL's way, SDPOTrainer(reward_funcs=...), completes the config: the trainer checks that a scorer is set.
        self.check(scorer_required=False)


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
    deprecated_metrics = frozenset({"success_fraction", "no_teacher_signal_fraction", "clip_fraction", "teacher_prompt_overflow"})

    def __init__(self, *args, reward_funcs=None, **kwargs):
        if reward_funcs is not None:
            # TRL's SDPOTrainer(reward_funcs=...): the same as SDPOConfig(reward_funcs=...).
            config = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
            if config is None:
                raise ValueError("SDPOTrainer(reward_funcs=...) needs args=SDPOConfig(...)")
            if getattr(config, "reward_funcs", None) is not None or getattr(config, "verifier", None) is not None:
                raise ValueError("reward_funcs is given to SDPOTrainer and the config also sets verifier or reward_funcs: keep one")
            config.reward_funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        super().__init__(*args, **kwargs)
        o = self.options
        self.verifier = (TRLRewardFunctions(o.reward_funcs, o.reward_weights) if o.reward_funcs is not None
                         else load_verifier(o.verifier, o.verifier_kwargs))

    def prepare_dataset(self, dataset, tokenizer, args, split):
        if "sd_record" in dataset.column_names:
            return dataset
        self.refuse_host_tokenized(dataset, split)
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
        metrics["self_distillation/success_fraction"].append(solved.mean().item())
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
            if feedback is not None and not feedback.strip():
                feedback = None  # as TRL: feedback that is empty after stripping is no feedback (no teacher prompt)
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
        metrics["self_distillation/reprompt_sample_fraction"].append(sum(p is not None for p in prompts) / count)
        if overflow:
            metrics["self_distillation/teacher_prompt_overflow"].append(float(overflow))
            LOG.warning("%d SDPO teacher prompts exceed max_teacher_prompt_length=%d: those rollouts get no distillation loss",
                        overflow, o.max_teacher_prompt_length)
        return prompts

    # ------------------------------------------------------------------ learning signal (sd_plugin/watch.py)
    def signal_rows(self, batch: StepBatch, loss_mask: torch.Tensor) -> int:
        """Rows with a teacher signal, plus (policy / hybrid) the rows whose reward differs from their group's
        mean: a group whose rollouts all scored the same has no GRPO advantage."""
        rows = super().signal_rows(batch, loss_mask)
        if self.options.sdpo_mode == "distill":
            return rows
        rewards = torch.tensor(batch.rewards, dtype=torch.float32).reshape(-1, self.options.num_generations)
        moving = (rewards != rewards.mean(-1, keepdim=True)).reshape(-1)
        return int(((loss_mask.sum(-1) > 0).cpu() | moving).sum())

    def no_signal_advice(self) -> str:
        o = self.options
        grpo = "" if o.sdpo_mode == "distill" else " and every group's rollouts got the same reward (no GRPO advantage)"
        return (f"no rollout got a teacher prompt (no_teacher_signal_fraction 1: no sibling reached "
                f"success_reward_threshold={o.success_reward_threshold} and the verifier gave no feedback){grpo}; raise "
                "num_generations, lower success_reward_threshold, use a verifier that returns feedback "
                "(include_environment_feedback: true), make the prompts easier, or raise max_teacher_prompt_length "
                "when teacher_prompt_overflow is logged")

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
        # At the sampling temperature (as TRL's GRPO / SDPO): the policy that drew the rollouts, and the distribution
        # the sampler's recorded log-probs are taken from, so that the ratio is exactly 1 on-policy.
        logprobs = chunked_token_logprobs(student_hidden, head_weight, rollouts.completion_ids,
                                          rollouts.completion_mask, loss_chunk_size=o.loss_chunk_size,
                                          temperature=o.temperature, lm_head_bias=head_bias)
        # On-policy rollouts: the ratio is 1 in value and the clip only matters for rollouts from another engine.
        old_logprobs = rollouts.old_logprobs if rollouts.old_logprobs is not None else logprobs.detach()
        advantages = group_advantages(torch.tensor(batch.rewards, dtype=torch.float32, device=logprobs.device), o.num_generations)
        policy_loss, clip_fraction = grpo_loss(logprobs, old_logprobs, advantages, rollouts.completion_mask,
                                               epsilon=o.epsilon, loss_reduction=o.loss_reduction,
                                               normalizer=batch.policy_loss_normalizer)
        metrics["clip_ratio/region_mean"].append(clip_fraction.item())
        if o.sdpo_mode == "policy":
            return policy_loss
        # The loss has two terms: log each (TRL's names); in the other modes the loss is the one term.
        metrics["self_distillation/policy_loss"].append(policy_loss.item())
        metrics["self_distillation/distillation_loss"].append(out.loss.item())
        # TRL's SDPO blend under TRL's name: (1 - w) x policy + w x distillation.
        return (1.0 - o.distillation_weight) * policy_loss + o.distillation_weight * out.loss


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
