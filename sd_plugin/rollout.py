"""On-policy sampling: the student generates its own completions.

`generate_rollouts` uses transformers' `generate` (KV cache on) and returns token ids plus a mask that
covers each completion through its first end-of-turn token. A backend for another engine (vLLM) only has
to return the same `Rollouts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SamplingOptions:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    num_generations: int = 1


@dataclass
class Rollouts:
    completion_ids: torch.Tensor     # [N, C], right-padded with pad_token_id
    completion_mask: torch.Tensor    # [N, C], 1 through the first eos
    prompt_index: torch.Tensor       # [N], which prompt of the batch each completion answers
    truncated: torch.Tensor          # [N] bool, hit max_new_tokens without an eos
    old_logprobs: torch.Tensor | None = None  # [N, C] log-probs of the sampling engine, when it reports them


class RolloutBackend(Protocol):
    def __call__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options: SamplingOptions,
                 eos_token_ids: list[int], pad_token_id: int) -> Rollouts: ...


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask through the first eos (inclusive) and whether each row ended without one."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~seen_before).long(), ~is_eos.any(-1)


@torch.no_grad()
def generate_rollouts(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, options: SamplingOptions,
                      eos_token_ids: list[int], pad_token_id: int) -> Rollouts:
    """Sample `num_generations` completions per left-padded prompt with transformers' generate."""
    was_training = model.training
    model.eval()  # also turns gradient checkpointing off, so the KV cache is used
    try:
        prompt_ids = prompt_ids.repeat_interleave(options.num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(options.num_generations, dim=0)
        sequences = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k or 0,  # 0 turns off generate()'s default top-50
            max_new_tokens=options.max_new_tokens,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
            use_cache=True,
        )
    finally:
        model.train(was_training)
    completion_ids = sequences[:, prompt_ids.shape[1]:]
    mask, truncated = completion_mask_from_ids(completion_ids, eos_token_ids)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_token_id)
    prompt_index = torch.arange(prompt_ids.shape[0] // options.num_generations).repeat_interleave(options.num_generations)
    return Rollouts(completion_ids, mask, prompt_index.to(completion_ids.device), truncated)
