"""The data of one self-distillation step and the forward both models run.

`StepBatch` is what steps 1-3 of `SelfDistillationTrainer.prepare_step` fill in and `compute_loss` reads;
`StepGroup` ties the micro-batches of one optimizer step together; `completion_hidden_states` is the forward
(student or teacher) that returns hidden states at the completion positions only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from sd_plugin.rollout import Rollouts
from sd_plugin.verifiers import Verdict


@dataclass
class StepBatch:
    """Everything one loss computation needs: filled in by steps 1-3 (`prepare_step`), read by `compute_loss`."""

    prompt_ids: torch.Tensor          # [N, P] left-padded student prompts
    prompt_mask: torch.Tensor
    rollouts: Rollouts                # completions y (shared by student and teacher)
    ce_rows: torch.Tensor             # [N] bool: rows trained with cross-entropy on y instead of distillation
    # Step 2 (methods with a verifier): the prompt records (by prompt) and the verdict on each rollout.
    records: list[dict] | None = None
    verdicts: list[Verdict] | None = None
    # Step 3: per row the teacher's prompt (None: no teacher signal for that row), and, where the teacher input
    # holds only y[:L] (SD-Zero), L per row (None: all of y): prepare_step cuts y to it for both models.
    teacher_prompts: list[list[int] | None] = field(default_factory=list)
    scored_lengths: list[int | None] | None = None
    loss_normalizer: float | None = None  # set by prepare_step_group: the step's loss tokens (or sequences) per micro-batch
    # The same for every completion token (or sequence) of the step: the normalizer of SDPO's GRPO term, which
    # trains every rollout, with or without a teacher signal.
    policy_loss_normalizer: float | None = None
    # For log_completions, per rollout: what the teacher sees that the student does not (SDFT: read from the
    # batch's demonstrations instead).
    teacher_contexts: list[str] = field(default_factory=list)

    @property
    def rewards(self) -> list[float] | None:
        """The verifier's reward per rollout (methods with a verifier)."""
        return None if self.verdicts is None else [verdict.reward for verdict in self.verdicts]

    def loss_mask(self) -> torch.Tensor:
        """[N, C]: completion tokens of the rows that get a loss (a teacher signal, or cross-entropy rows)."""
        has_teacher = torch.tensor([p is not None for p in self.teacher_prompts], device=self.prompt_ids.device)
        return self.rollouts.completion_mask * (has_teacher | self.ce_rows).unsqueeze(-1)


@dataclass
class StepGroup:
    """The micro-batches of one optimizer step (as collated), prepared together by the first of them."""

    batches: list[dict]
    steps: list[StepBatch] | None = None
    # Set by prepare_step_group / training_step for SignalWatch: the step's row counts (all processes) and the
    # sum of its micro-batches' |loss|.
    signal: dict[str, int] | None = None
    loss_sum: float = 0.0



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
