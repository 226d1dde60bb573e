"""One self-distillation step, shared by SDFT, SDPO and SD-Zero, in the order the code runs it:

    prepare_step   1. make_rollouts    the completions y (student samples)    hook: SDFT, SD-Zero srt
                   2. score_rollouts   the verifier's verdict on each rollout  hook: SDPO, SD-Zero distill
                   3. teacher_prompts  each row's teacher prompt, or None      hook: every method
    compute_loss   4. teacher forward on teacher prompt + y (no grad), student forward on prompt + y
                   5. chunked divergence from hidden states (+ `total_loss`: SDPO's GRPO term)
    then backward, the optimizer step (skipped if non-finite: trainers/numerics.py), the teacher update.

A method fills in its hooks and nothing else; everything else is here. The step's data is
`trainers/step.py`'s StepBatch. Both forwards return hidden states at the completion positions only: the
prompt never gets an lm_head projection and no [tokens, vocab] tensor exists for the whole sequence.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from sd_plugin.checkpoints import load_state as load_checkpoint_state
from sd_plugin.checkpoints import resolve_resume, state_file
from sd_plugin.checkpoints import save_state as save_checkpoint_state
from sd_plugin.completions_log import CompletionsLog
from sd_plugin.data import end_of_turn_ids
from sd_plugin.deprecated import accepts_deprecated_names, with_deprecated_metrics
from sd_plugin.liger import liger_available, liger_distillation_loss
from sd_plugin.losses import (
    DivergenceOptions,
    chunked_distillation_loss,
    importance_weights,
    loss_token_mask,
    loss_units,
)
from sd_plugin.option_checks import check_learning_rate, check_option_types
from sd_plugin.redact import redact_secrets
from sd_plugin.rollout import Rollouts, SamplingOptions, check_chunked_prefill, generate_rollouts
from sd_plugin.rows import SelfDistillationCollator, invalid_rows_path, left_pad
from sd_plugin.teacher import KINDS as TEACHER_KINDS
from sd_plugin.teacher import Teacher, output_head
from sd_plugin.trainers.numerics import NonFiniteStepGuard
from sd_plugin.trainers.step import StepBatch, StepGroup, completion_hidden_states
from sd_plugin.verifiers import verify_completion
from sd_plugin.watch import CollapseWatch, SignalWatch

LOG = logging.getLogger("sd_plugin")
TEACHER_STATE_FILE = state_file("teacher")
PROMPT_COLUMNS = ("input_ids", "attention_mask", "teacher_input_ids", "demonstration_ids", "sd_record")


@accepts_deprecated_names
@dataclass
class SelfDistillationOptions:
    """Options every self-distillation method shares (defaults: the SDFT paper unless noted)."""

    max_prompt_length: int = field(default=4096, metadata={"help": "Student prompt cap (tokens); longer rows are rejected, never cut."})
    max_teacher_prompt_length: int = field(default=57344, metadata={"help": "Teacher prompt cap (tokens)."})
    max_completion_length: int = field(default=256, metadata={"help": "Rollout cap (max new tokens)."})
    num_generations: int = field(default=1, metadata={"help": "Rollouts per prompt; per_device_train_batch_size counts completions and must be a multiple of it (TRL's meaning)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of rollouts."})
    top_k: int | None = field(default=None, metadata={"help": "Top-k sampling of rollouts (None: off)."})
    distillation_alpha: float = field(default=0.0, metadata={"help": "0 forward KL (SDFT paper), 1 reverse KL, in between see distillation_divergence."})
    distillation_divergence: str = field(default="jsd", metadata={"help": "For 0 < alpha < 1: jsd (generalized JSD, SDPO) | mixed ((1 - alpha) forward KL + alpha reverse KL, SD-Zero)."})
    distillation_mode: str = field(default="full_logits", metadata={"help": "full_logits | topk_logits | sampled_token (TRL's names)."})
    distillation_topk: int | None = field(default=None, metadata={"help": "K for distillation_mode=topk_logits."})
    distillation_support: str = field(default="student", metadata={"help": "Whose top-K: student | teacher."})
    distillation_add_tail: bool = field(default=False, metadata={"help": "Top-K plus one tail bucket instead of renormalizing."})
    distillation_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both distributions in the loss."})
    loss_reduction: str = field(default="sequence", metadata={"help": "sequence (per-sequence mean, then batch mean; SDFT/TRL) | token."})
    num_loss_tokens_to_skip: int = field(default=3, metadata={"help": "First completion tokens left out of the loss."})
    distillation_is_clip: float = field(default=2.0, metadata={"help": "Cap c of the importance weight min(exp(s_y - s_old_y), c) when the sampler's log-probs are recorded (importance_sampling_correction)."})
    importance_sampling_correction: bool | None = field(default=None, metadata={"help": "Weight each distilled token by min(exp(s_y - s_old_y), distillation_is_clip), s_old_y the sampler's log-prob of y: None = with vLLM when it samples the loss's distribution (temperature == distillation_temperature, no top-p / top-k), true = always (HF generate records them too), false = never."})
    loss_chunk_size: int = field(default=64, metadata={"help": "Completion tokens per lm_head chunk in the loss (about 3-4 fp32 [chunk, vocab] buffers live at a time)."})
    teacher_model_kind: str = field(default="base", metadata={"help": "base (the model without adapter) | ema | live | initial (the step-0 student, e.g. with a loaded round-1 adapter, frozen)."})
    teacher_update_rate: float = field(default=0.01, metadata={"help": "EMA rate a in phi <- (1-a) phi + a theta."})
    teacher_ema_rank: int = field(default=0, metadata={"help": "LoRA EMA teacher kept as rank-k factors instead of a dense fp32 Delta W per layer (0: dense, exact). 2-4x lora_r is typical; the error is logged."})
    teacher_sync_steps: int = field(default=1, metadata={"help": "teacher_model_kind ema: run the EMA update every N optimizer steps (TRL's name and meaning; with teacher_update_rate 1.0 the teacher is a copy of the student refreshed every N steps)."})
    liger_loss: bool | None = field(default=None, metadata={"help": "Liger-Kernel's fused linear JSD for full-vocabulary steps: None = on a GPU when liger-kernel is installed, true = always, false = never."})
    skip_invalid: bool = field(default=False, metadata={"help": "Drop invalid rows (reported, written to invalid_rows_file) instead of failing."})
    invalid_rows_file: str | None = field(default=None, metadata={"help": "Where skipped rows go (default: output_dir/invalid_rows_train.jsonl, _eval for the eval split)."})
    max_consecutive_nonfinite_steps: int = field(default=3, metadata={"help": "Optimizer steps skipped in a row for a non-finite loss or gradient before the run stops with an error."})
    max_steps_without_signal: int | None = field(default=10, metadata={"help": "Optimizer steps in a row without a learning signal (no row of the step gets a loss, e.g. SDPO with no teacher prompt; or a loss and gradient of exactly 0) before the run stops with an error; each such step warns with the reason (0 or None: never stop)."})
    stop_on_collapse: bool = field(default=False, metadata={"help": "Stop training (final evaluation and save still run) when the collapse watch finds the training reward, completion length, token entropy or a held-out evaluation outside its healthy range; without it, a warning with the numbers."})
    debug_numerics: bool = field(default=False, metadata={"help": "Check every training step that each per-token divergence is >= 0 (tolerance 1e-4); stop at the first that is not."})
    # Rollouts with vLLM through TRL's VLLMGeneration (names and defaults: TRL's GRPOConfig).
    use_vllm: bool = field(default=False, metadata={"help": "Sample rollouts with vLLM instead of transformers' generate (needs the vllm extra and a CUDA GPU)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "colocate (a vLLM engine in each training process, sharing its GPU) | server (a separate `trl vllm-serve` process)."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "colocate: share of the GPU's memory vLLM reserves (weights + KV cache); the planner counts it."})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "colocate: release vLLM's weights and KV cache between rollouts (less memory during the training step, slower rollouts)."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "colocate: GPUs per vLLM engine (must divide the number of processes)."})
    vllm_max_model_length: int | None = field(default=None, metadata={"help": "vLLM's context length (None: max_prompt_length + max_completion_length)."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "colocate: vllm | transformers | auto (vLLM's model implementation)."})
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "server: the server's URL (e.g. http://localhost:8000); overrides host and port."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "server: host of `trl vllm-serve`."})
    vllm_server_port: int = field(default=8000, metadata={"help": "server: port of `trl vllm-serve`."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "server: seconds to wait for the server to come up."})
    vllm_group_port: int = field(default=51216, metadata={"help": "server: port of the weight-update process group."})
    # Evaluation during training (sd_plugin.evaluation): greedy answers to held-out prompt sets, scored by verifiers.
    eval_prompts: str | None = field(default=None, metadata={"help": "JSONL of held-out prompt records of the task (prompt + the fields eval_verifier reads), answered greedily at step 0, every eval_generation_steps and at the end."})
    eval_verifier: str | None = field(default=None, metadata={"help": "Verifier of eval_prompts: a built-in name (sd_plugin.verifiers) or package.module:callable."})
    prior_prompts: str | None = field(default=None, metadata={"help": "JSONL of prompts the base model already answers (prior-capability probe), scored the same way: forgetting as a number."})
    prior_verifier: str | None = field(default=None, metadata={"help": "Verifier of prior_prompts (default: eval_verifier)."})
    eval_generation_steps: int = field(default=0, metadata={"help": "Evaluate the prompt sets every N steps (0: at step 0 and at the end only)."})
    eval_num_generations: int = field(default=1, metadata={"help": "Also sample this many answers per held-out prompt at the rollout temperature (top_p / top_k of the rollouts) and score them: pass@1 estimated from n samples, what sampling users see (0: greedy only)."})
    eval_temperature: float | None = field(default=None, metadata={"help": "Also score eval_num_generations answers per prompt sampled at this inference temperature (None: not scored)."})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "Greedy answer cap in the evaluation (default: max_completion_length)."})
    log_completions: bool = field(default=False, metadata={"help": "On each logging step, print prompts, rollouts, teacher contexts and rewards of the latest step (a rich table when rich is installed) and log them to W&B as a table when W&B is a reporter (TRL's name)."})
    num_completions_to_print: int | None = field(default=4, metadata={"help": "Rows of log_completions printed, drawn at random (None: all); W&B gets every row (TRL's name)."})
    sequence_tile_size: int = field(default=0, metadata={"help": "Run each decoder layer over the sequence in tiles of this many tokens (checkpointed per tile; Qwen3 / Qwen3.5 text decoders), for the student and teacher forwards: activation memory grows with the tile, not the length (0: off)."})
    sequence_tile_offload: bool = field(default=False, metadata={"help": "With sequence_tile_size: keep the layer inputs (one [T, hidden] per layer) in CPU memory between forward and backward."})
    prefill_chunk_size: int | None = field(default=None, metadata={"help": "Rollouts with transformers' generate: run the prompt's prefill through the KV cache (and Qwen3.5's Gated DeltaNet states) in chunks of this many tokens, so its activations grow with the chunk, not the prompt; sampling is unchanged (transformers' GenerationConfig.prefill_chunk_size; None: one pass)."})

    def to_dict(self) -> dict:
        """The arguments as saved (training_config.json) and logged (W&B, TensorBoard): secret-looking values
        such as an API key in `verifier_kwargs` are masked (`sd_plugin.redact`)."""
        return redact_secrets(super().to_dict() if hasattr(super(), "to_dict") else asdict(self))

    def __str__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{key}={value!r}' for key, value in sorted(self.to_dict().items()))})"

    def divergence_options(self) -> DivergenceOptions:
        """The loss's `DivergenceOptions`: the `distillation_*` options under the same names (validated)."""
        return DivergenceOptions(**{f.name: getattr(self, f.name) for f in fields(DivergenceOptions)})

    def options_type(self) -> type:
        """The options dataclass of this object: itself, or for a `*Config` its options base (SDPOOptions, ...)."""
        return next(cls for cls in type(self).__mro__ if dataclasses.is_dataclass(cls) and not issubclass(cls, TrainingArguments))

    def check(self) -> None:
        """Reject contradictory options before any training step (messages name the key)."""
        check_option_types(self, self.options_type())  # a string, bool or NaN where a number belongs names its key
        if isinstance(self, TrainingArguments):
            check_learning_rate(self.learning_rate)
        self.divergence_options()
        for key in ("temperature", "distillation_temperature", "distillation_is_clip"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {getattr(self, key)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for key in ("top_k", "num_loss_tokens_to_skip", "teacher_ema_rank"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.loss_reduction not in ("sequence", "token"):
            raise ValueError(f"loss_reduction must be 'sequence' or 'token', got {self.loss_reduction!r}")
        if self.teacher_model_kind not in TEACHER_KINDS:
            raise ValueError(f"teacher_model_kind must be one of {', '.join(TEACHER_KINDS)}, got {self.teacher_model_kind!r}")
        for key in ("max_prompt_length", "max_teacher_prompt_length", "max_completion_length", "num_generations", "loss_chunk_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_teacher_prompt_length < self.max_prompt_length:
            raise ValueError(
                f"max_teacher_prompt_length ({self.max_teacher_prompt_length}) is below max_prompt_length "
                f"({self.max_prompt_length}): the teacher prompt contains the student prompt"
            )
        if self.teacher_sync_steps < 1:
            raise ValueError(f"teacher_sync_steps must be >= 1 (TRL's meaning: the EMA teacher updates every N steps), got {self.teacher_sync_steps}")
        if self.teacher_sync_steps != 1 and self.teacher_model_kind != "ema":
            # The previous release's teacher_sync_steps hard-copied the student into any teacher every N steps.
            raise ValueError(
                f"teacher_sync_steps is {self.teacher_sync_steps} but teacher_model_kind is {self.teacher_model_kind!r}: "
                "teacher_sync_steps is how often the EMA teacher updates (TRL's meaning). To copy the student into the "
                "teacher every N steps (what teacher_sync_steps did before this release) set teacher_model_kind: ema, "
                "teacher_update_rate: 1.0, teacher_sync_steps: N")
        if self.teacher_ema_rank and self.teacher_model_kind != "ema":
            raise ValueError(f"teacher_ema_rank is set but teacher_model_kind is {self.teacher_model_kind!r}: nothing to keep")
        if self.liger_loss and self.distillation_mode != "full_logits":
            raise ValueError(f"liger_loss: true supports distillation_mode: full_logits only (got {self.distillation_mode!r})")
        if self.liger_loss and self.distillation_divergence == "mixed" and 0.0 < self.distillation_alpha < 1.0:
            raise ValueError("liger_loss: true computes the generalized JSD only, not distillation_divergence: mixed")
        if self.liger_loss and not liger_available():
            raise ValueError("liger_loss: true needs liger-kernel: pip install 'sd-plugin[liger]'")
        if not 0.0 < self.teacher_update_rate <= 1.0:
            raise ValueError(f"teacher_update_rate must be in (0, 1], got {self.teacher_update_rate}")
        default_rate = next(f.default for f in fields(self) if f.name == "teacher_update_rate")
        if self.teacher_model_kind != "ema" and self.teacher_update_rate != default_rate:
            raise ValueError(f"teacher_update_rate is set but teacher_model_kind is {self.teacher_model_kind!r}: set teacher_model_kind: ema")
        if self.num_completions_to_print is not None and self.num_completions_to_print < 1:
            raise ValueError(f"num_completions_to_print must be >= 1 or None, got {self.num_completions_to_print}")
        if self.sequence_tile_size < 0:
            raise ValueError(f"sequence_tile_size must be >= 0 (0: off), got {self.sequence_tile_size}")
        if self.sequence_tile_offload and not self.sequence_tile_size:
            raise ValueError("sequence_tile_offload is set but sequence_tile_size is 0: set sequence_tile_size")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1 (None: off), got {self.prefill_chunk_size}")
        if self.prefill_chunk_size is not None and self.use_vllm:
            raise ValueError("prefill_chunk_size chunks transformers' generate; with use_vllm, vLLM schedules its own "
                             "prefill chunks: unset prefill_chunk_size")
        if self.max_steps_without_signal is not None and self.max_steps_without_signal < 0:
            raise ValueError(f"max_steps_without_signal must be >= 0 (0 or None: never stop), got {self.max_steps_without_signal}")
        if self.max_consecutive_nonfinite_steps < 1:
            raise ValueError(f"max_consecutive_nonfinite_steps must be >= 1, got {self.max_consecutive_nonfinite_steps}")
        self.check_vllm()
        self.check_evaluation()

    def check_vllm(self) -> None:
        """vLLM options: valid values, and none set without use_vllm (never a silently ignored knob)."""
        vllm_keys = [f for f in fields(SelfDistillationOptions) if f.name.startswith("vllm_")]
        if not self.use_vllm:
            for f in vllm_keys:
                if getattr(self, f.name) != f.default:
                    raise ValueError(f"{f.name} is set but use_vllm is false: set use_vllm: true or remove {f.name}")
            return
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"vllm_mode must be 'colocate' or 'server', got {self.vllm_mode!r}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_model_impl not in ("vllm", "transformers", "auto"):
            raise ValueError(f"vllm_model_impl must be vllm, transformers or auto, got {self.vllm_model_impl!r}")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        for key in ("vllm_server_port", "vllm_group_port"):
            if not 0 < getattr(self, key) < 65536:
                raise ValueError(f"{key} must be a port number (1-65535), got {getattr(self, key)}")
        if not (math.isfinite(self.vllm_server_timeout) and self.vllm_server_timeout > 0):
            raise ValueError(f"vllm_server_timeout must be a finite number > 0, got {self.vllm_server_timeout}")
        # Each mode's own keys: the other mode ignores them (the server takes its settings on its command line).
        only = {"colocate": ("vllm_gpu_memory_utilization", "vllm_enable_sleep_mode", "vllm_tensor_parallel_size", "vllm_model_impl"),
                "server": ("vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port")}
        defaults = {f.name: f.default for f in vllm_keys}
        for mode, keys in only.items():
            for key in keys:
                if self.vllm_mode != mode and getattr(self, key) != defaults[key]:
                    raise ValueError(f"{key} is only used with vllm_mode: {mode} (vllm_mode is {self.vllm_mode!r})")
        needed = self.max_prompt_length + self.max_completion_length
        if self.vllm_max_model_length is not None and self.vllm_max_model_length < needed:
            raise ValueError(f"vllm_max_model_length ({self.vllm_max_model_length}) is below max_prompt_length + "
                             f"max_completion_length ({needed}): a rollout would not fit in vLLM's context")

    def check_evaluation(self) -> None:
        """The evaluation options: files exist, verifiers load (before any training step)."""
        from sd_plugin.verifiers import load_verifier

        for prompts_key, verifier_key in (("eval_prompts", "eval_verifier"), ("prior_prompts", "prior_verifier")):
            path, verifier = getattr(self, prompts_key), getattr(self, verifier_key) or self.eval_verifier
            if path is None:
                continue
            if not os.path.isfile(path):
                raise ValueError(f"{prompts_key}: no such file {path!r}")
            if verifier is None:
                raise ValueError(f"{prompts_key} is set but {verifier_key} is not: name a verifier to score the answers")
            try:
                load_verifier(verifier)
            except (ValueError, ImportError, TypeError) as error:
                raise ValueError(f"{verifier_key}: {error}") from None
        if self.eval_num_generations < 0:
            raise ValueError(f"eval_num_generations must be >= 0 (0: greedy only), got {self.eval_num_generations}")
        if self.eval_temperature is not None:
            if not (math.isfinite(self.eval_temperature) and self.eval_temperature > 0):
                raise ValueError(f"eval_temperature must be a finite number > 0 (None: off), got {self.eval_temperature}")
            if not self.eval_num_generations:
                raise ValueError("eval_temperature is set but eval_num_generations is 0: set eval_num_generations >= 1")
        if self.eval_generation_steps < 0 or (self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1):
            raise ValueError("eval_generation_steps must be >= 0 and eval_max_new_tokens >= 1")


def options_from_args(args, options_cls):
    """The method's options from training arguments: own fields (standalone) or `sd_options` (Axolotl)."""
    if getattr(args, "sd_options", None) is not None:
        options = options_cls(**args.sd_options)
    else:
        options = options_cls(**{f.name: getattr(args, f.name) for f in fields(options_cls)})
    options.check()
    return options


def check_completion_batches(args, num_generations: int, evaluates: bool) -> None:
    """per_device_train_batch_size counts completions, as in TRL's GRPO / SDPO: a micro-batch holds
    per_device_train_batch_size / num_generations prompts, each sampled num_generations times. Whole groups
    per micro-batch (the advantages and the sibling solutions are per group), so it must be a multiple."""
    sizes = [("per_device_train_batch_size", args.per_device_train_batch_size)]
    if evaluates:
        sizes.append(("per_device_eval_batch_size", args.per_device_eval_batch_size))
    for key, size in sizes:
        if size % num_generations:
            raise ValueError(
                f"{key} ({size}) counts completions (TRL's meaning; Axolotl: micro_batch_size / eval_batch_size) and "
                f"must be a multiple of num_generations ({num_generations}): each micro-batch holds whole groups. "
                f"Before this release it counted prompts: {key}: {size * num_generations} gives the batch it gave then")


class _TeacherUpdate(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        teacher = self.trainer.teacher
        teacher.step(model, state.global_step)
        if teacher.factors:
            self.trainer._metrics["train"]["teacher_ema_truncation_error"].append(teacher.truncation_error)


class SelfDistillationTrainer(NonFiniteStepGuard, Trainer):
    """Base trainer; subclasses set `options_class` and fill in the step's hooks (module doc) and `prepare_dataset`."""

    options_class = SelfDistillationOptions
    # True where the host picked the checkpoint to resume from itself (Axolotl's auto_resume_from_checkpoints; the
    # plugin sets it): an incomplete one then falls back to the previous complete one instead of failing.
    auto_resume = False
    # Metric names of the previous release this method still logs beside the new ones (deprecated.RENAMED_METRICS).
    deprecated_metrics: frozenset[str] = frozenset()

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
        check_completion_batches(args, self.options.num_generations, eval_dataset is not None)
        self.divergence_options = self.options.divergence_options()
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
        self.teacher = Teacher(self.model, self.options.teacher_model_kind, self.options.teacher_update_rate,
                               self.options.teacher_sync_steps, self.options.teacher_ema_rank)
        self.add_callback(_TeacherUpdate(self))
        # Loud failures (sd_plugin/watch.py): steps without a learning signal, and the collapse watch on the logs.
        self.signal_watch = SignalWatch(self.options.max_steps_without_signal)
        self.collapse_watch = CollapseWatch(self.options.stop_on_collapse)
        self.add_callback(self.collapse_watch)
        if self.options.eval_prompts or self.options.prior_prompts:
            from sd_plugin.evaluation import GenerationEvaluation

            self.add_callback(GenerationEvaluation(self))
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.eos_token_ids = end_of_turn_ids(processing_class, self.model)
        self.vllm_rollouts = None
        if self.options.use_vllm:
            from sd_plugin.vllm_rollout import make_vllm_rollouts

            self.vllm_rollouts = make_vllm_rollouts(self)
        self.completions_log = CompletionsLog(self.options.num_completions_to_print) if self.options.log_completions else None

    # ------------------------------------------------------------------ data
    @contextmanager
    def prompt_batches(self):
        """The dataloaders' batches are prompts: per_device_*_batch_size (completions, TRL's meaning) divided by
        num_generations while a dataloader is built (checked to divide in `check_completion_batches`)."""
        group, args = self.options.num_generations, self.args
        saved = (self._train_batch_size, args.per_device_train_batch_size, args.per_device_eval_batch_size)
        self._train_batch_size //= group
        args.per_device_train_batch_size //= group
        args.per_device_eval_batch_size = max(1, args.per_device_eval_batch_size // group)
        try:
            yield
        finally:
            self._train_batch_size, args.per_device_train_batch_size, args.per_device_eval_batch_size = saved

    def get_train_dataloader(self):
        with self.prompt_batches():
            return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset=None):
        with self.prompt_batches():
            return super().get_eval_dataloader(eval_dataset)

    # ------------------------------------------------------------------ hooks for the methods
    def prepare_dataset(self, dataset, tokenizer, args, split):
        """Turn raw records into rows with `input_ids` (+ method columns); rows already prepared pass."""
        return dataset

    def refuse_host_tokenized(self, dataset, split: str) -> None:
        """Rows tokenized by a strategy that is not ours (Axolotl's chat_template: input_ids and labels, none of
        the teacher's columns) can never train: say which strategy to use instead of failing row by row."""
        columns = set(dataset.column_names)
        if "input_ids" in columns and not columns & {"teacher_input_ids", "sd_record", "completion_ids"}:
            raise ValueError(
                f"the {split} rows are already tokenized (columns {sorted(columns)}) by a dataset strategy that is not "
                "sd-plugin's, e.g. Axolotl's type: chat_template: use type: sd_plugin.axolotl.strategies.trace for chat "
                "rows (SDFT), sd_plugin.axolotl.strategies.sdft for prompt + demonstration rows, "
                "sd_plugin.axolotl.strategies.prompts for SDPO / SD-Zero prompts (README \"Use your own data\")")

    def invalid_rows_path(self, args, split: str) -> str:
        """Where `skip_invalid` writes the rows it drops (`sd_plugin.rows.invalid_rows_path`)."""
        return invalid_rows_path(self.options, args.output_dir, split)

    @property
    def mode(self) -> str:
        """"train" or "eval": the `_metrics` the step's hooks and `log` write to and read."""
        return "train" if self.model.training else "eval"

    def make_rollouts(self, model, inputs) -> StepBatch:
        """Step 1: sample completions for every prompt of the batch (subclasses may add off-policy rows)."""
        prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
        rollouts = self.sample(model, prompt_ids, prompt_mask)
        index = rollouts.prompt_index
        return StepBatch(prompt_ids[index], prompt_mask[index], rollouts,
                         torch.zeros(len(index), dtype=torch.bool, device=prompt_ids.device))

    def score_rollouts(self, inputs, batch: StepBatch) -> None:
        """Step 2: judge the rollouts (methods with a verifier call `verify_rollouts`); SDFT scores nothing."""

    def teacher_prompts(self, inputs, batch: StepBatch) -> list[list[int] | None]:
        """Step 3: each row's teacher prompt ids (None: no teacher signal for that row)."""
        raise NotImplementedError

    def signal_rows(self, batch: StepBatch, loss_mask: torch.Tensor) -> int:
        """How many rows of a prepared micro-batch can teach: rows with a token in the loss (`loss_mask`, after
        `num_loss_tokens_to_skip`); SDPO adds the rows its GRPO term learns from."""
        return int((loss_mask.sum(-1) > 0).sum())

    def no_signal_advice(self) -> str:
        """What to change when no row of a step gets a loss (the warning of `SignalWatch`)."""
        return (f"every completion is at most num_loss_tokens_to_skip={self.options.num_loss_tokens_to_skip} tokens "
                "long; lower num_loss_tokens_to_skip or look at the samples (log_completions)")

    def total_loss(self, model, batch: StepBatch, student_hidden: torch.Tensor, out) -> torch.Tensor:
        """Step 5: the loss to optimize from the distillation output (SDPO adds its GRPO term here)."""
        return out.loss

    def verify_rollouts(self, inputs, batch: StepBatch, verifier, success_reward_threshold: float) -> None:
        """Decode, verify and judge every rollout (`verify_completion`) against its prompt record (`sd_record`)."""
        batch.records = [json.loads(r) for r in inputs["sd_record"]]
        rollouts, batch.verdicts = batch.rollouts, []
        for i, group in enumerate(rollouts.prompt_index.tolist()):
            ids = rollouts.completion_ids[i, : int(rollouts.completion_mask[i].sum())].tolist()
            record = batch.records[group]
            # Name the row for warnings: its `idx` column when it has one, else the start of its question.
            row = record.get("idx", repr(record["messages"][-1]["content"][:60]))
            batch.verdicts.append(verify_completion(verifier, self.processing_class, ids, record, row=row,
                                                    end_of_turn_ids=self.eos_token_ids, success_reward_threshold=success_reward_threshold))

    # ------------------------------------------------------------------ the step
    def sampling_options(self) -> SamplingOptions:
        o = self.options
        return SamplingOptions(o.max_completion_length, o.temperature, o.top_p, o.top_k,
                               o.num_generations, record_logprobs=self.importance_sampling_active(),
                               prefill_chunk_size=o.prefill_chunk_size)

    def importance_sampling_active(self) -> bool:
        """Whether rollouts carry the sampler's log-probs (importance_sampling_correction).

        None: with vLLM, when it samples the distribution the loss scores (same temperature, no truncation), so
        that the weight corrects vLLM's numerics only, as TRL's does; other sampling settings are the recipe's.
        """
        o = self.options
        if o.importance_sampling_correction is not None:
            return o.importance_sampling_correction
        return o.use_vllm and o.temperature == o.distillation_temperature and o.top_p == 1.0 and not o.top_k

    def sample(self, model, prompt_ids, prompt_mask) -> Rollouts:
        unwrapped = self.accelerator.unwrap_model(model)
        if self.vllm_rollouts is not None:
            # Weights reach vLLM once per optimizer step, before that step's first rollout (TRL's rule).
            self.vllm_rollouts.sync_weights(self.state.global_step)
            rollouts = self.vllm_rollouts(unwrapped, prompt_ids, prompt_mask, self.sampling_options(),
                                          self.eos_token_ids, self.processing_class.pad_token_id)
        else:
            rollouts = generate_rollouts(unwrapped, prompt_ids, prompt_mask, self.sampling_options(),
                                         self.eos_token_ids, self.processing_class.pad_token_id)
        if not self.importance_sampling_active():
            rollouts.old_logprobs = None
        return rollouts

    def check_against_model(self) -> None:
        vocab = output_head(self.model)[0].shape[0]  # also refuses LoRA on lm_head
        self.divergence_options.check_vocab(vocab)
        if self.options.prefill_chunk_size is not None:
            check_chunked_prefill(self.model, self.options.prefill_chunk_size)

    def prepare_step(self, model, inputs) -> StepBatch:
        """Steps 1-3 of one micro-batch: everything before the forwards."""
        batch = self.make_rollouts(model, inputs)
        self.score_rollouts(inputs, batch)
        batch.teacher_prompts = self.teacher_prompts(inputs, batch)
        for row, length in enumerate(batch.scored_lengths or []):
            if length is not None:  # the teacher holds y[:L] only: the student scores the same tokens
                batch.rollouts.completion_mask[row, length:] = 0
        if self.completions_log is not None and self.mode == "train" and self.accelerator.is_main_process:
            self.completions_log.record(self.state.global_step, batch, inputs)
        return batch

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's micro-batches of one optimizer step, tied together so that the first one prepares them all.

        All rollouts of a step come from the same weights either way (the optimizer steps after the last
        micro-batch); preparing them together lets the loss divide by the step's number of loss tokens (or
        sequences) over every micro-batch and process, so 1 x 8, 8 micro-batches x 1 and 2 processes x 4 give
        the same gradient. The sampling itself waits for the first `compute_loss`: on resume the Trainer
        restores the RNG state only after this call, and the rollouts must be drawn from the restored state.
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        group = StepGroup(batch_samples)
        for index, inputs in enumerate(batch_samples):
            inputs["sd_step_group"], inputs["sd_micro_batch"] = group, index
        return batch_samples, num_items_in_batch

    def prepare_step_group(self, model, group: "StepGroup") -> None:
        """Prepare every micro-batch of the step and set their common loss normalizers.

        The Trainer divides each micro-batch's loss by the number of micro-batches and data parallelism
        averages over processes: a normalizer is the step's global count of loss units divided by both. Two
        counts: the distillation loss's units, and every completion's (SDPO's GRPO term trains all rollouts).
        """
        steps, units, policy_units, signal_rows, rows, sampled, truncated = [], 0, 0, 0, 0, 0, 0
        for inputs in group.batches:
            own = {k: v for k, v in inputs.items() if k not in ("sd_step_group", "sd_micro_batch")}
            step = self.prepare_step(model, self._prepare_inputs(own))
            mask = loss_token_mask(step.loss_mask(), num_loss_tokens_to_skip=self.options.num_loss_tokens_to_skip, unskipped_rows=step.ce_rows)
            units += loss_units(mask, self.options.loss_reduction)
            policy_units += loss_units(step.rollouts.completion_mask, self.options.loss_reduction)
            signal_rows += self.signal_rows(step, mask)
            on_policy = ~step.ce_rows
            rows += len(on_policy)
            sampled += int(on_policy.sum())
            truncated += int((step.rollouts.truncated & on_policy).sum())
            steps.append(step)
        # One reduction for both normalizers and the signal counts (SignalWatch judges the whole step, all processes).
        totals = torch.tensor([float(units), float(policy_units), float(signal_rows), float(rows), float(sampled),
                               float(truncated)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        units, policy_units, signal_rows, rows, sampled, truncated = totals.tolist()
        group.signal = {"signal_rows": int(signal_rows), "rows": int(rows), "sampled": int(sampled),
                        "truncated": int(truncated)}
        share = len(steps) * self.accelerator.num_processes
        normalizer, policy_normalizer = max(units, 1.0) / share, max(policy_units, 1.0) / share
        for step in steps:
            step.loss_normalizer, step.policy_loss_normalizer = normalizer, policy_normalizer
        group.steps = steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = self.mode
        # Training micro-batches come as a step group (get_batch_samples); evaluation prepares its own.
        group = inputs.get("sd_step_group")
        if group is None:
            batch = self.prepare_step(model, inputs)
        else:
            if group.steps is None:
                self.prepare_step_group(model, group)
            batch = group.steps[inputs["sd_micro_batch"]]
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
        student_hidden = completion_hidden_states(
            self.accelerator.unwrap_model(model), model, batch.prompt_ids, batch.prompt_mask,
            rollouts.completion_ids, rollouts.completion_mask, sequence_tile_size=self.options.sequence_tile_size,
            sequence_tile_offload=self.options.sequence_tile_offload)

        head_weight, head_bias = output_head(self.accelerator.unwrap_model(model))
        teacher_weight, teacher_bias = teacher_head if teacher_head is not None else (None, None)
        if teacher_hidden is not None:
            loss_mask = self.filter_loss_mask(batch, loss_mask, student_hidden, teacher_hidden, (head_weight, head_bias),
                                              (teacher_weight, teacher_bias))
        o = self.options
        ce_mask = batch.ce_rows.unsqueeze(-1).expand_as(loss_mask)
        # Both losses take the options under their own names; the rest is this step's tensors.
        shape = dict(loss_chunk_size=o.loss_chunk_size, loss_reduction=o.loss_reduction,
                     num_loss_tokens_to_skip=o.num_loss_tokens_to_skip)
        heads = dict(lm_head_bias=head_bias, teacher_lm_head_weight=teacher_weight, teacher_lm_head_bias=teacher_bias,
                     normalizer=batch.loss_normalizer)
        if distilled.any() and self.use_liger_loss(student_hidden, batch):
            out = liger_distillation_loss(student_hidden, teacher_hidden, head_weight, loss_mask, self.divergence_options,
                                          **shape, **heads)
        else:
            out = chunked_distillation_loss(
                student_hidden, teacher_hidden, head_weight, loss_mask, self.divergence_options, **shape, **heads,
                sampled_ids=rollouts.completion_ids, old_logprobs=rollouts.old_logprobs,
                distillation_is_clip=o.distillation_is_clip, ce_mask=ce_mask if batch.ce_rows.any() else None,
            )
        if self.options.debug_numerics and mode == "train":
            self.check_divergence_values(out)
        loss = self.total_loss(model, batch, student_hidden, out)
        self.record_step_metrics(mode, batch, out, loss_mask, ce_mask)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's micro-batch step (with the non-finite guard); after the step's last micro-batch, SignalWatch."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        group = inputs.get("sd_step_group")
        if group is not None:
            group.loss_sum += abs(float(loss.detach()))
            if self.accelerator.sync_gradients and group.signal is not None:
                self.check_learning_signal(group)
        return loss

    def check_learning_signal(self, group: StepGroup) -> None:
        """Warn about (and, after max_steps_without_signal in a row, stop on) a step that cannot teach."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
        # Squared norm and |loss| summed over processes (FSDP / ZeRO-2 shard gradients); None: no gradient to
        # read here (a skipped step, or DeepSpeed, which keeps its own).
        squared = torch.nn.utils.get_total_norm(grads).float() ** 2 if grads else torch.tensor(-1.0)
        values = torch.stack([squared.to(self.accelerator.device), torch.tensor(group.loss_sum, device=self.accelerator.device)])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        grad_norm = None if not grads else float(values[0]) ** 0.5
        self.signal_watch.end_step(self.state.global_step + 1, loss=float(values[1]), grad_norm=grad_norm,
                                   no_signal_advice=self.no_signal_advice(),
                                   max_completion_length=self.options.max_completion_length, **group.signal)

    def filter_loss_mask(self, batch: StepBatch, loss_mask, student_hidden, teacher_hidden, student_head, teacher_head):
        """Hook: the [N, C] mask of the tokens that get a loss, after both forwards (default: unchanged)."""
        return loss_mask

    def use_liger_loss(self, student_hidden: torch.Tensor, batch: StepBatch) -> bool:
        """Liger's fused loss covers full-vocabulary distillation without cross-entropy rows or importance weights."""
        o = self.options
        if o.liger_loss is False or o.distillation_mode != "full_logits":
            return False
        if o.distillation_divergence == "mixed" and 0.0 < o.distillation_alpha < 1.0:
            return False
        if batch.ce_rows.any() or batch.rollouts.old_logprobs is not None:
            return False
        return bool(o.liger_loss) or (student_hidden.is_cuda and liger_available())

    def record_step_metrics(self, mode, batch: StepBatch, out, loss_mask, ce_mask) -> None:
        metrics = self._metrics[mode]
        rollouts = batch.rollouts
        on_policy = ~batch.ce_rows
        # The distillation loss is logged as `loss`: a method whose loss has other terms logs the parts (SDPO hybrid).
        lengths = rollouts.completion_mask.sum(-1).float()
        if on_policy.any():  # TRL's names
            metrics["completions/mean_length"].append(lengths[on_policy].mean().item())
            metrics["completions/clipped_ratio"].append(rollouts.truncated[on_policy].float().mean().item())
        metrics["on_policy_fraction"].append(on_policy.float().mean().item())
        # Diagnostics come back for the tokens in the loss, in row-major order.
        in_loss = loss_token_mask(loss_mask, num_loss_tokens_to_skip=self.options.num_loss_tokens_to_skip, unskipped_rows=batch.ce_rows)
        if out.per_token_divergence is None:  # the Liger path: distilled rows only, loss only
            return
        # `kl` and `ce_loss` split the loss by kind of row. Only SDFT with lambda_on_policy < 1 mixes both
        # kinds; in every other run one of them would be the loss again under another name.
        split = getattr(self.options, "lambda_on_policy", 1.0) < 1.0
        ce_tokens = ce_mask[in_loss]
        per_token = out.per_token_divergence
        if rollouts.old_logprobs is not None and out.student_token_logprobs is not None and (~ce_tokens).any():
            self.record_importance_weights(metrics, out.student_token_logprobs[~ce_tokens],
                                           rollouts.old_logprobs[in_loss][~ce_tokens])
        if (~ce_tokens).any():
            if split:
                metrics["kl"].append(per_token[~ce_tokens].mean().item())
            if out.student_token_logprobs is not None:
                # -log p(y) of the sampled tokens: a one-sample estimate of the student's token entropy (exact in
                # expectation when rollouts are drawn at distillation_temperature without top-p / top-k)
                metrics["sampled_token_entropy"].append(-out.student_token_logprobs[~ce_tokens].mean().item())
            if out.teacher_token_logprobs is not None:
                gap = (out.teacher_token_logprobs - out.student_token_logprobs)[~ce_tokens]
                metrics["teacher_student_logprob_gap"].append(gap.mean().item())
        if ce_tokens.any() and split:
            metrics["ce_loss"].append(per_token[ce_tokens].mean().item())

    def record_importance_weights(self, metrics, student_token_logprobs, old_logprobs) -> None:
        """Mean of the applied weight min(w, c), max of the raw weight w = exp(s_y - s_old_y), share clipped at c."""
        raw = importance_weights(student_token_logprobs, old_logprobs, float("inf"))
        clip = self.options.distillation_is_clip
        metrics["importance_weight_mean"].append(raw.clamp(max=clip).mean().item())
        metrics["importance_weight_max"].append(raw.max().item())
        metrics["importance_weight_clipped_fraction"].append((raw > clip).float().mean().item())

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
        mode = self.mode
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
        super().log(with_deprecated_metrics({**logs, **averaged}, self.deprecated_metrics), start_time)
        self._metrics[mode].clear()
        if self.completions_log is not None and mode == "train" and self.accelerator.is_main_process:
            self.completions_log.write(self.processing_class, self.state.global_step, self.args.report_to)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Saves the model (adapter) and, on the final save, `training_config.json` and `trainer_state.json`
        beside it: what `sd-plugin merge` puts in the model card (hyperparameters and metrics)."""
        super().save_model(output_dir, _internal_call)
        if _internal_call or not self.args.should_save:
            return
        from sd_plugin.model_card import write_training_record

        write_training_record(output_dir or self.args.output_dir, {**self.args.to_dict(), **self.extra_training_record()}, self.state)

    def extra_training_record(self) -> dict:
        """Keys a method adds to training_config.json beside the arguments (SDFT: its teacher check)."""
        return {}

    # ------------------------------------------------------------------ checkpoints (sd_plugin/checkpoints.py)
    def checkpoint_state(self) -> dict:
        """The trainer's state that a resumed run needs beyond the host's files, by name. Each value has
        `state_dict()` and `load_state_dict()` (`sd_plugin.checkpoints.StateHooks` makes one of two functions; the
        state holds what `torch.load(weights_only=True)` reads: tensors, numbers, strings, lists, dicts). Every
        checkpoint holds one `sd_<name>_state.pt` per entry, written before the host marks the checkpoint
        complete, and a resume requires all of them: a new entry is one line here.

        Not here because a resume needs no saved state for them: the rollouts' and on-policy draws' randomness
        (the host's `rng_state*.pth`; SDFT's `lambda_on_policy` draw is seeded by seed, step and micro-batch) and
        vLLM's weights (pushed again before the first rollout of the resumed run)."""
        return {"teacher": self.teacher, "numerics": self.numerics_state(), "signal_watch": self.signal_watch,
                "collapse_watch": self.collapse_watch}

    def save_checkpoint_state(self, folder: str) -> None:
        save_checkpoint_state(folder, self.checkpoint_state())

    def _save_checkpoint(self, model, trial):
        # The trainer's files first: the host writes trainer_state.json last, and that marks the checkpoint complete.
        if self.args.should_save:
            self.save_checkpoint_state(os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}"))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Trainer's `train`; a resume checks first that the checkpoint is complete (`sd_plugin.checkpoints`)
        and loads the trainer's state from it (also under DeepSpeed, where Trainer skips `_load_from_checkpoint`)."""
        states = self.checkpoint_state()
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir, states,
                                                auto=self.auto_resume)
        if resume_from_checkpoint is not None:
            load_checkpoint_state(resume_from_checkpoint, states)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
