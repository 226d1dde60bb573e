"""The Liger-Kernel adapter: full-vocabulary distillation through Liger's fused linear JSD (the GPU fast path).

It computes what `sd_plugin.losses.chunked_distillation_loss` computes for `distillation_mode: full_logits`
with the generalized JSD family, without cross-entropy rows or importance weights (the trainer uses it only
then, see `SelfDistillationTrainer.use_liger_loss`), and returns the loss only (no per-token diagnostics).
"""

from __future__ import annotations

import torch

from sd_plugin.losses import DistillationOutput, DivergenceOptions, loss_token_weights, loss_units


def liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss.jsd_loss  # noqa: F401
    except ImportError:
        return False
    return True


def liger_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor,
    options: DivergenceOptions = DivergenceOptions(),
    *,
    loss_chunk_size: int = 1024,
    loss_reduction: str = "token",
    num_loss_tokens_to_skip: int = 0,
    lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> DistillationOutput:
    """`chunked_distillation_loss` for full-vocabulary steps, through `LigerFusedLinearJSDFunction`.

    Liger's generalized JSD uses the same convention as `alpha_divergence` (beta 0 = forward KL, 1 = reverse
    KL) and averages over the tokens it is given, so only the tokens in the loss are passed: once for
    loss_reduction "token", once per sequence for "sequence". torch.compile is used on CUDA; on CPU it runs
    eagerly (tests compare it with the reference there).
    """
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    alpha = options.distillation_alpha
    if options.distillation_mode != "full_logits" or (options.distillation_divergence == "mixed" and 0.0 < alpha < 1.0):
        raise ValueError("Liger's fused loss computes distillation_mode: full_logits with the generalized JSD only, "
                         f"got {options.distillation_mode} / {options.distillation_divergence}")
    weights = loss_token_weights(mask, loss_reduction=loss_reduction, num_loss_tokens_to_skip=num_loss_tokens_to_skip)
    in_loss = weights != 0
    hidden_size = student_hidden.shape[-1]
    student_rows = student_hidden.reshape(-1, hidden_size)
    teacher_rows = teacher_hidden.detach().reshape(-1, hidden_size)
    if teacher_lm_head_weight is None:
        teacher_lm_head_weight, teacher_lm_head_bias = lm_head_weight, lm_head_bias
    if loss_reduction == "token":
        groups = [in_loss.reshape(-1)]
    else:
        # One call per sequence: a flat mask selecting that row's tokens.
        rows = torch.arange(in_loss.shape[0], device=in_loss.device).unsqueeze(-1).expand_as(in_loss).reshape(-1)
        groups = [in_loss.reshape(-1) & (rows == row) for row in range(in_loss.shape[0])]
    groups = [g for g in groups if g.any()]
    total = student_rows.new_zeros((), dtype=torch.float32)
    for selected in groups:
        student = student_rows[selected]
        labels = torch.zeros(student.shape[0], dtype=torch.long, device=student.device)  # hard-loss weight is 0
        total = total + LigerFusedLinearJSDFunction.apply(
            student, lm_head_weight, teacher_rows[selected], teacher_lm_head_weight.detach(), labels, lm_head_bias,
            None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach(),
            0.0, 1.0, alpha, -100, options.distillation_temperature, student.is_cuda, loss_chunk_size, False,
        )
    loss = total / max(len(groups), 1)
    if normalizer is not None:  # Liger averages over this batch: rescale to the step's count
        loss = loss * (loss_units(in_loss, loss_reduction) / normalizer)
    return DistillationOutput(loss=loss, per_token_divergence=None, student_token_logprobs=None, teacher_token_logprobs=None)
