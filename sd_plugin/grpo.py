"""SDPO's GRPO term (`sdpo_mode: policy | hybrid`): group advantages, the PPO-clipped policy loss, and the
sampled tokens' log-probs from hidden states, chunk by chunk."""

from __future__ import annotations

import torch

from sd_plugin.losses import log_probs, loss_token_weights


def _token_logprobs_chunk(hidden, weight, bias, token_ids, temperature: float) -> torch.Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return log_probs(logits, temperature).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_chunk_size: int = 64,
    temperature: float = 1.0,
    lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(token_ids) from hidden states [B, T, H] -> [B, T] (0 where mask is 0), with gradient.

    Each chunk's [chunk, V] logits are recomputed in the backward (activation checkpointing), so only the
    [B, T] result is kept between forward and backward: the memory of the policy-gradient term does not
    grow with the vocabulary.
    """
    from torch.utils.checkpoint import checkpoint

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = token_ids.reshape(-1)
    index = mask.reshape(-1).nonzero().squeeze(-1)
    parts = []
    for start in range(0, index.numel(), loss_chunk_size):
        rows = index[start: start + loss_chunk_size]
        parts.append(checkpoint(_token_logprobs_chunk, flat_hidden.index_select(0, rows), lm_head_weight, lm_head_bias,
                                flat_ids.index_select(0, rows), temperature, use_reentrant=False))
    values = torch.cat(parts) if parts else flat_hidden.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(flat_ids.shape, dtype=values.dtype, device=hidden.device)
    return out.index_put((index,), values).reshape(token_ids.shape)


def group_advantages(rewards: torch.Tensor, group_size: int, epsilon: float = 1e-4) -> torch.Tensor:
    """GRPO advantages (r - group mean) / (group std + epsilon), groups of `group_size` consecutive rows.

    The std is the unbiased sample std, as in TRL's GRPOTrainer and verl.
    """
    groups = rewards.reshape(-1, group_size)
    advantages = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + epsilon)
    return advantages.reshape(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    loss_reduction: str = "token",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clipped policy-gradient loss with per-sequence advantages; returns (loss, clipped-token fraction).

    per token: -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A), ratio = exp(logp - old_logp);
    reduced with `loss_token_weights` (token mean over the batch, or per-sequence then batch mean; `normalizer`:
    the optimizer step's count instead of this batch's, for gradient-accumulation / multi-process invariance).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages.unsqueeze(-1)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    weights = loss_token_weights(mask.to(per_token.dtype), loss_reduction=loss_reduction, normalizer=normalizer)
    is_clipped = (clipped < unclipped).to(per_token.dtype)
    clip_fraction = (is_clipped * mask).sum() / mask.sum().clamp(min=1)
    return (per_token * weights).sum(), clip_fraction.detach()
