"""Per-token divergences between a student and a teacher, and their chunked form from hidden states.

Notation (per completion position t): s = log_softmax(student_logits / T), q = log_softmax(teacher_logits / T).

- alpha = 0: forward KL(teacher || student) = sum_v e^q (q - s)   (the SDFT paper's results)
- alpha = 1: reverse KL(student || teacher) = sum_v e^s (s - q)
- otherwise, family "jsd": generalized JSD with mixture m = log((1 - alpha) e^s + alpha e^q):
  (1 - alpha) KL(student || m) + alpha KL(teacher || m)   (SDPO)
  family "mixed": (1 - alpha) forward KL + alpha reverse KL   (SD-Zero; NeMo-RL kl_type=mixed)

Supports ("modes"): "full_logits" (the whole vocabulary); "topk_logits" (K indices from the student's or the teacher's logits, both
distributions renormalized over them, or kept unnormalized plus one tail bucket holding the rest of the
mass); "sampled_token" (only the sampled token's log-probs: the REINFORCE-style reverse-KL estimator
stopgrad(s_y - q_y) * s_y, valid for alpha = 1 only).

`divergence` is the readable reference on logits. `chunked_distillation_loss` computes the same weighted
sum from final hidden states chunk by chunk: each chunk's logits exist only while that chunk is processed,
and its gradients (with respect to the hidden states and the lm_head weight) are computed right there, so
no [tokens, vocab] tensor ever exists for the whole sequence and the lm_head is multiplied four times per
chunk (student, teacher, two gradient products), as with materialized logits. The gradient with respect to
a chunk's logits is written in closed form (see `_chunk_loss_and_logit_grad`), so a chunk needs 3-4 fp32
[chunk, vocab] buffers instead of the ~8 that autograd through `_token_terms` would keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

MODES = ("full_logits", "topk_logits", "sampled_token")
SUPPORTS = ("student", "teacher")
REDUCTIONS = ("token", "sequence")
FAMILIES = ("jsd", "mixed")


@dataclass(frozen=True)
class DivergenceOptions:
    """The options shared by `divergence` and `chunked_distillation_loss` (validated on construction)."""

    alpha: float = 0.0
    mode: str = "full_logits"
    topk: int | None = None
    support: str = "student"
    add_tail: bool = False
    temperature: float = 1.0
    family: str = "jsd"

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.alpha}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"support must be one of {SUPPORTS}, got {self.support!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"divergence must be one of {FAMILIES}, got {self.family!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mode == "topk_logits" and (self.topk is None or self.topk < 1):
            raise ValueError(f"mode='topk_logits' needs topk >= 1, got {self.topk}")
        if self.mode == "sampled_token" and self.alpha != 1.0:
            raise ValueError(
                f"mode='sampled_token' estimates the reverse KL only: it needs alpha=1.0, got alpha={self.alpha}"
            )

    def check_vocab(self, vocab_size: int) -> None:
        if self.mode == "topk_logits" and self.topk > vocab_size:
            raise ValueError(f"topk={self.topk} is larger than the vocabulary ({vocab_size} tokens)")


def alpha_divergence(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float,
                     family: str = "jsd") -> torch.Tensor:
    """D_alpha summed over the last dimension; both inputs are log-probabilities over the same support."""
    if alpha == 0.0:
        return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
    if alpha == 1.0:
        return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)
    if family == "mixed":
        forward = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
        reverse = (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)
        return (1.0 - alpha) * forward + alpha * reverse
    mixture = torch.logaddexp(student_logprobs + math.log(1.0 - alpha), teacher_logprobs + math.log(alpha))
    kl_student = (student_logprobs.exp() * (student_logprobs - mixture)).sum(-1)
    kl_teacher = (teacher_logprobs.exp() * (teacher_logprobs - mixture)).sum(-1)
    return (1.0 - alpha) * kl_student + alpha * kl_teacher


def with_tail_bucket(logprobs: torch.Tensor) -> torch.Tensor:
    """Append log(1 - sum(exp(logprobs))) so a top-K support keeps the whole probability mass."""
    captured = torch.logsumexp(logprobs, dim=-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logprobs, torch.log(-torch.expm1(captured))], dim=-1)


def topk_distributions(student_k: torch.Tensor, teacher_k: torch.Tensor, add_tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both top-K log-probabilities as distributions: plus a tail bucket, or renormalized over the K."""
    if add_tail:
        return with_tail_bucket(student_k), with_tail_bucket(teacher_k)
    return (student_k - torch.logsumexp(student_k, dim=-1, keepdim=True),
            teacher_k - torch.logsumexp(teacher_k, dim=-1, keepdim=True))


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    # Softmax statistics in bf16 lose several digits; float64 inputs (tests) stay float64.
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    options: DivergenceOptions,
    sampled_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token divergence plus the sampled tokens' student and teacher log-probs (None without ids)."""
    student_logprobs = torch.log_softmax(_at_least_fp32(student_logits) / options.temperature, dim=-1)
    student_token = teacher_token = None
    if sampled_ids is not None:
        student_token = student_logprobs.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)
    if teacher_logits is None:
        return torch.zeros_like(student_logprobs[..., 0]), student_token, None
    teacher_logprobs = torch.log_softmax(_at_least_fp32(teacher_logits) / options.temperature, dim=-1)
    if sampled_ids is not None:
        teacher_token = teacher_logprobs.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)

    if options.mode == "full_logits":
        per_token = alpha_divergence(student_logprobs, teacher_logprobs, options.alpha, options.family)
    elif options.mode == "topk_logits":
        source = student_logits if options.support == "student" else teacher_logits
        index = source.detach().topk(options.topk, dim=-1).indices
        student_k, teacher_k = topk_distributions(student_logprobs.gather(-1, index), teacher_logprobs.gather(-1, index),
                                                  options.add_tail)
        per_token = alpha_divergence(student_k, teacher_k, options.alpha, options.family)
    else:  # sampled
        if sampled_ids is None:
            raise ValueError("mode='sampled_token' needs sampled_ids (the completion token ids)")
        per_token = (student_token - teacher_token).detach() * student_token
    return per_token, student_token, teacher_token


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float,
    mode: str = "full_logits",
    topk: int | None = None,
    support: str = "student",
    add_tail: bool = False,
    temperature: float = 1.0,
    sampled_ids: torch.Tensor | None = None,
    family: str = "jsd",
) -> torch.Tensor:
    """Per-token divergence D_alpha(student || teacher) on logits of shape [..., V]; returns [...].

    Args:
        alpha: 0 forward KL, 1 reverse KL, in between generalized JSD.
        mode: "full_logits", "topk_logits" or "sampled_token" (see the module docstring).
        topk: size of the top-K support (mode "topk_logits").
        support: whose top-K indices are used, "student" (TRL, SDPO) or "teacher" (Tinker, SD-Zero).
        add_tail: keep the mass outside the top-K as one extra bucket instead of renormalizing.
        temperature: both logits are divided by it before the softmax.
        sampled_ids: the completion token ids [...], needed for mode "sampled_token".
        family: for 0 < alpha < 1, "jsd" (generalized JSD) or "mixed" ((1 - alpha) forward + alpha reverse KL).
    """
    options = DivergenceOptions(alpha, mode, topk, support, add_tail, temperature, family)
    options.check_vocab(student_logits.shape[-1])
    return _token_terms(student_logits, teacher_logits, options, sampled_ids)[0]


def loss_token_weights(mask: torch.Tensor, *, reduction: str = "token", skip_first: int = 0,
                       unskipped_rows: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
    """Weights w so that sum(w * per_token_loss) is the requested reduction of the loss over `mask`.

    mask: [B, T] (1 = completion token in the loss). The first `skip_first` valid tokens of each row are
    dropped (SDFT masks 3 to suppress "Based on the example..." openings), except in `unskipped_rows` ([B]
    bool): cross-entropy rows train every demonstration token, as plain SFT does.
    reduction: "token" = mean over every valid token of the batch; "sequence" = mean per sequence, then
    mean over the sequences that have at least one valid token.
    normalizer: what the mean divides by instead of this batch's token (or sequence) count: the trainer
    passes the optimizer step's count over all micro-batches and processes, so that gradient accumulation
    and data parallelism give the same mean as one big batch.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    mask = loss_token_mask(mask, skip_first=skip_first, unskipped_rows=unskipped_rows).float()
    if reduction == "token":
        return mask / (normalizer if normalizer is not None else mask.sum().clamp(min=1.0))
    per_sequence = mask.sum(-1, keepdim=True)
    sequences = normalizer if normalizer is not None else (per_sequence > 0).sum().clamp(min=1)
    return mask / per_sequence.clamp(min=1.0) / sequences


def loss_units(mask: torch.Tensor, reduction: str) -> int:
    """What `loss_token_weights` divides by for an already skip-masked [B, T] mask: tokens or sequences."""
    return int(mask.sum()) if reduction == "token" else int((mask.sum(-1) > 0).sum())


def loss_token_mask(mask: torch.Tensor, *, skip_first: int = 0, unskipped_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the tokens of `mask` that are in the loss once the first `skip_first` of each row are
    dropped (rows in `unskipped_rows` keep all theirs). Diagnostics come back in this mask's row-major order."""
    mask = mask.bool()
    if skip_first <= 0:
        return mask
    kept = mask.long().cumsum(-1) > skip_first
    if unskipped_rows is not None:
        kept = kept | unskipped_rows.bool().unsqueeze(-1)
    return mask & kept


def importance_weights(student_token_logprobs: torch.Tensor, old_token_logprobs: torch.Tensor, clip: float) -> torch.Tensor:
    """min(exp(s_y - s_old_y), clip), detached: corrects for rollouts sampled by an older policy or engine."""
    log_ratio = (student_token_logprobs - old_token_logprobs).detach().clamp(-20.0, 20.0)
    return log_ratio.exp().clamp(max=clip)


@dataclass
class DistillationOutput:
    """Result of `chunked_distillation_loss`: the scalar loss and detached per-token diagnostics."""

    loss: torch.Tensor
    per_token_divergence: torch.Tensor | None  # None from the Liger path, which returns the loss only
    student_token_logprobs: torch.Tensor | None
    teacher_token_logprobs: torch.Tensor | None


def _rowdot(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """sum(left * right, -1) for two [N, V] tensors, without an [N, V] temporary."""
    return torch.bmm(left.unsqueeze(1), right.unsqueeze(2)).reshape(-1)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) in at least fp32 (the input is a temporary and may be overwritten)."""
    logits = _at_least_fp32(logits)
    if temperature != 1.0:
        logits = logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def _chunk_loss_and_logit_grad(
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
    token_weights, sampled_ids, old_logprobs, ce_mask, options, is_clip, need_grad,
):
    """One chunk: weighted loss, per-token diagnostics and d(loss)/d(student logits), without autograd over [N, V].

    The gradient with respect to the logits is written out in closed form (s = log_softmax(z / T), p = e^s):
      forward KL  sum e^q (q - s):           (p - e^q) / T
      reverse KL  sum p (s - q):             p (s - q - D) / T
      JSD(alpha)  mixture m:                 (1 - alpha) p (s - m - KL(p || m)) / T
      mixed(alpha):                          ((1 - alpha) (p - e^q) + alpha p (s - q - D_reverse)) / T
      top-K (any divergence of s[I], q[I]):  (scatter_I(g) - p sum(g)) / T, g = d loss / d s[I]
      sampled-token log-prob s_y:            (onehot(y) - p) / T
    Only the per-token part (importance weights, cross-entropy rows, token weights, the top-K renormalization)
    goes through autograd, on [N] and [N, K] tensors. So at most four [N, V] fp32 buffers exist at a time
    (autograd through `_token_terms` keeps about eight).
    Returns (loss, per_token, student_token, teacher_token, grad_logits or None).
    """
    temperature = options.temperature
    student_logits = F.linear(student_hidden, weight, bias)
    teacher_logits = None
    if teacher_hidden is not None:
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    topk_index = None
    if options.mode == "topk_logits" and teacher_logits is not None:
        source = student_logits if options.support == "student" else teacher_logits
        topk_index = source.topk(options.topk, dim=-1).indices
    student_logprobs = _log_probs(student_logits, temperature)
    del student_logits
    teacher_logprobs = None
    if teacher_logits is not None:
        teacher_logprobs = _log_probs(teacher_logits, temperature)
        del teacher_logits

    def token_logprob(logprobs):
        return logprobs.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)

    student_token = None if sampled_ids is None else token_logprob(student_logprobs)
    teacher_token = None if sampled_ids is None or teacher_logprobs is None else token_logprob(teacher_logprobs)

    # Per-token divergence as a function of small leaves; `direction` is d(divergence)/d(s) pulled back to the
    # logits (times T), for the full-vocabulary modes. `student_logprobs` ends up holding the probabilities p.
    leaves = {}
    direction = None
    divergence_scale = 1.0
    if teacher_logprobs is None:
        per_token = torch.zeros_like(student_logprobs[..., 0])
        probs = student_logprobs.exp_()
    elif options.mode == "full_logits" and options.alpha == 1.0:
        gap = teacher_logprobs.sub_(student_logprobs).neg_()  # s - q
        probs = student_logprobs.exp_()
        value = _rowdot(probs, gap)
        direction = gap.sub_(value.unsqueeze(-1)).mul_(probs)
        per_token = leaves["divergence"] = value.requires_grad_(need_grad)
    elif options.mode == "full_logits" and options.alpha == 0.0:
        gap = teacher_logprobs - student_logprobs  # q - s
        teacher_probs = teacher_logprobs.exp_()
        value = _rowdot(teacher_probs, gap)
        del gap
        probs = student_logprobs.exp_()
        direction = teacher_probs.neg_().add_(probs)  # p - e^q
        per_token = leaves["divergence"] = value.requires_grad_(need_grad)
    elif options.mode == "full_logits" and options.family == "mixed":
        alpha = options.alpha
        gap = student_logprobs - teacher_logprobs  # s - q
        teacher_probs = teacher_logprobs.exp_()
        forward = -_rowdot(teacher_probs, gap)
        probs = student_logprobs.exp_()
        reverse = _rowdot(probs, gap)
        # (1 - alpha) (p - e^q) + alpha p (s - q - reverse)
        direction = gap.sub_(reverse.unsqueeze(-1)).mul_(probs).mul_(alpha)
        direction.add_(probs, alpha=1.0 - alpha).sub_(teacher_probs, alpha=1.0 - alpha)
        del teacher_probs
        value = (1.0 - alpha) * forward + alpha * reverse
        per_token = leaves["divergence"] = value.requires_grad_(need_grad)
    elif options.mode == "full_logits":
        alpha = options.alpha
        mixture = student_logprobs + math.log(1.0 - alpha)
        torch.logaddexp(mixture, teacher_logprobs + math.log(alpha), out=mixture)
        student_gap = student_logprobs - mixture  # s - m
        teacher_gap = mixture.neg_().add_(teacher_logprobs)  # q - m
        kl_teacher = _rowdot(teacher_logprobs.exp_(), teacher_gap)
        del teacher_gap, mixture
        probs = student_logprobs.exp_()
        kl_student = _rowdot(probs, student_gap)
        direction = student_gap.sub_(kl_student.unsqueeze(-1)).mul_(probs)
        divergence_scale = 1.0 - alpha
        value = (1.0 - alpha) * kl_student + alpha * kl_teacher
        per_token = leaves["divergence"] = value.requires_grad_(need_grad)
    elif options.mode == "topk_logits":
        student_k = student_logprobs.gather(-1, topk_index).requires_grad_(need_grad)
        teacher_k = teacher_logprobs.gather(-1, topk_index)
        leaves["topk"] = student_k
        probs = student_logprobs.exp_()
        with torch.enable_grad():
            student_side, teacher_side = topk_distributions(student_k, teacher_k, options.add_tail)
            per_token = alpha_divergence(student_side, teacher_side, options.alpha, options.family)
    else:  # sampled
        if sampled_ids is None:
            raise ValueError("mode='sampled_token' needs sampled_ids (the completion token ids)")
        probs = student_logprobs.exp_()
        per_token = None  # built below from the sampled-token leaf
    del teacher_logprobs

    with torch.enable_grad():
        if student_token is not None:
            student_token = leaves["token"] = student_token.requires_grad_(need_grad)
        if per_token is None:
            per_token = (student_token - teacher_token).detach() * student_token
        if old_logprobs is not None:
            per_token = per_token * importance_weights(student_token, old_logprobs, is_clip)
        if ce_mask is not None:
            # Rows trained off-policy (lambda_on_policy < 1, SFT phases): next-token cross-entropy instead.
            per_token = torch.where(ce_mask, -student_token, per_token)
        loss = (per_token * token_weights).sum()
        wanted = {name: leaf for name, leaf in leaves.items() if leaf.requires_grad}
        grads = {}
        if need_grad and wanted and loss.requires_grad:
            values = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
            grads = {name: g for name, g in zip(wanted, values) if g is not None}

    def detached(tensor):
        return None if tensor is None else tensor.detach()

    outputs = (loss.detach(), per_token.detach(), detached(student_token), detached(teacher_token))
    if not need_grad:
        return (*outputs, None)
    token_grad = grads.get("token")
    if direction is not None:
        divergence_grad = grads.get("divergence", torch.zeros_like(per_token.detach()))
        grad_logits = direction.mul_((divergence_grad * divergence_scale / temperature).unsqueeze(-1))
        if token_grad is not None:
            grad_logits.addcmul_(probs, (-token_grad / temperature).unsqueeze(-1))
    else:
        total_grad = torch.zeros_like(per_token.detach())
        topk_grad = grads.get("topk")
        if topk_grad is not None:
            total_grad = total_grad + topk_grad.sum(-1)
        if token_grad is not None:
            total_grad = total_grad + token_grad
        grad_logits = probs.mul_((-total_grad / temperature).unsqueeze(-1))
        if topk_grad is not None:
            grad_logits.scatter_add_(-1, topk_index, topk_grad / temperature)
    if token_grad is not None:
        grad_logits.scatter_add_(-1, sampled_ids.unsqueeze(-1), (token_grad / temperature).unsqueeze(-1))
    return (*outputs, grad_logits)


class _ChunkedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                token_weights, sampled_ids, old_logprobs, ce_mask, options, is_clip, chunk_size, row_index):
        # student_hidden / teacher_hidden: [all tokens, H]; row_index: the tokens in the loss (the other
        # per-token inputs are already restricted to them).
        need_hidden_grad = ctx.needs_input_grad[0]
        need_weight_grad = ctx.needs_input_grad[1]
        need_bias_grad = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.zeros_like(student_hidden) if need_hidden_grad else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight_grad else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias_grad else None
        total = torch.zeros((), dtype=torch.promote_types(student_hidden.dtype, torch.float32),
                            device=student_hidden.device)
        per_token_parts, student_parts, teacher_parts = [], [], []

        def pick(tensor, rows):
            return None if tensor is None else tensor[rows]

        need_grad = need_hidden_grad or need_weight_grad or need_bias_grad
        for start in range(0, row_index.numel(), chunk_size):
            rows = slice(start, start + chunk_size)
            index = row_index[rows]
            hidden = student_hidden.index_select(0, index)
            teacher = None if teacher_hidden is None else teacher_hidden.index_select(0, index)
            loss, per_token, student_token, teacher_token, grad_logits = _chunk_loss_and_logit_grad(
                hidden, weight, bias, teacher, teacher_weight, teacher_bias,
                token_weights[rows], pick(sampled_ids, rows), pick(old_logprobs, rows), pick(ce_mask, rows),
                options, is_clip, need_grad,
            )
            if grad_logits is not None:
                # The lm_head's backward, as autograd would run it (in the weight's dtype).
                grad_logits = grad_logits.to(weight.dtype)
                if need_hidden_grad:
                    grad_hidden.index_copy_(0, index, grad_logits @ weight)
                if need_weight_grad:
                    grad_weight += grad_logits.T @ hidden
                if need_bias_grad:
                    grad_bias += grad_logits.sum(0)
                del grad_logits
            total += loss
            per_token_parts.append(per_token.detach())
            if student_token is not None:
                student_parts.append(student_token.detach())
            if teacher_token is not None:
                teacher_parts.append(teacher_token.detach())

        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        # No token in the loss (e.g. no SDPO sample has a teacher signal): a zero loss with a zero gradient.
        per_token_all = torch.cat(per_token_parts) if per_token_parts else total.new_empty(0)
        student_all = torch.cat(student_parts) if student_parts else torch.empty(0)
        teacher_all = torch.cat(teacher_parts) if teacher_parts else torch.empty(0)
        ctx.mark_non_differentiable(per_token_all, student_all, teacher_all)
        return total, per_token_all, student_all, teacher_all

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total
        grad_hidden = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        grad_bias = None if grad_bias is None else grad_bias * scale
        return grad_hidden, grad_weight, grad_bias, *([None] * 11)


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int = 1024,
    alpha: float = 0.0,
    mode: str = "full_logits",
    topk: int | None = None,
    support: str = "student",
    add_tail: bool = False,
    temperature: float = 1.0,
    sampled_ids: torch.Tensor | None = None,
    reduction: str = "token",
    skip_first: int = 0,
    old_logprobs: torch.Tensor | None = None,
    distillation_is_clip: float = 2.0,
    ce_mask: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    family: str = "jsd",
    normalizer: float | None = None,
) -> DistillationOutput:
    """The reduced distillation loss computed from final hidden states, `chunk_size` tokens at a time.

    student_hidden / teacher_hidden: [B, T, H] hidden states at the positions that predict the completion
    tokens (teacher_hidden is used without gradient; None means cross-entropy only). mask: [B, T].
    sampled_ids: [B, T] completion token ids (mode "sampled_token", cross-entropy rows, importance sampling and
    the logged log-prob gap need them). old_logprobs: [B, T] log-probs of the sampling policy; when given,
    each token's loss is multiplied by min(exp(s_y - old_y), distillation_is_clip). ce_mask: [B, T] bool,
    tokens that get next-token cross-entropy (-s_y) instead of the divergence. Other options as in
    `divergence`; reduction, skip_first and normalizer as in `loss_token_weights`.

    Equals (weights * divergence(student_hidden @ W.T, teacher_hidden @ W_t.T, ...)).sum() in value and
    gradient; only the tokens with a non-zero weight are projected.
    """
    options = DivergenceOptions(alpha, mode, topk, support, add_tail, temperature, family)
    options.check_vocab(lm_head_weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    needs_ids = mode == "sampled_token" or old_logprobs is not None or ce_mask is not None
    if needs_ids and sampled_ids is None:
        raise ValueError("sampled_ids are needed for mode='sampled_token', old_logprobs and ce_mask")

    # Cross-entropy rows are plain SFT: every token, temperature 1, no importance weight (the skip and the
    # temperature belong to the distillation term only).
    ce_rows = None if ce_mask is None else ce_mask.any(-1)
    weights = loss_token_weights(mask, reduction=reduction, skip_first=skip_first, unskipped_rows=ce_rows,
                                 normalizer=normalizer)
    in_loss = weights.reshape(-1) != 0
    is_ce = torch.zeros_like(in_loss) if ce_mask is None else ce_mask.reshape(-1).bool()
    hidden_size = student_hidden.shape[-1]
    student_rows = student_hidden.reshape(-1, hidden_size)
    if teacher_lm_head_weight is None:
        teacher_lm_head_weight, teacher_lm_head_bias = lm_head_weight, lm_head_bias
    teacher_rows = None if teacher_hidden is None else teacher_hidden.detach().reshape(-1, hidden_size)
    teacher_bias = None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach()
    flat_weights = weights.reshape(-1)
    flat_ids = None if sampled_ids is None else sampled_ids.reshape(-1)
    flat_old = None if old_logprobs is None else old_logprobs.reshape(-1)

    def pick(tensor, selected):
        return None if tensor is None else tensor[selected]

    def run(selected, run_options, teacher, old, cross_entropy_rows):
        # The hidden states go in as [tokens, hidden] views plus the indices of the tokens in the loss; each
        # chunk gathers its own rows, so no [tokens in the loss, hidden] copy is made.
        ce = torch.ones_like(selected[selected]) if cross_entropy_rows else None
        return _ChunkedDistillation.apply(
            student_rows, lm_head_weight, lm_head_bias, teacher, teacher_lm_head_weight.detach(), teacher_bias,
            flat_weights[selected], pick(flat_ids, selected), pick(old, selected), ce, run_options,
            distillation_is_clip, chunk_size, selected.nonzero().squeeze(-1),
        )

    distilled, cross_entropy = in_loss & ~is_ce, in_loss & is_ce
    # The distillation call always runs (possibly on no token): a zero loss still reaches every parameter.
    total, per_token, student_token, teacher_token = run(distilled, options, teacher_rows, flat_old, False)
    if cross_entropy.any():
        ce_total, ce_per_token, ce_student_token, _ = run(cross_entropy, replace(options, temperature=1.0), None, None, True)
        total = total + ce_total
        # Diagnostics in the row-major order of the tokens in the loss; no teacher log-prob on SFT tokens.
        order = is_ce[in_loss]
        per_token = _interleave(per_token, ce_per_token, order)
        student_token = _interleave(student_token, ce_student_token, order)
        if teacher_token.numel():
            teacher_token = _interleave(teacher_token, torch.full_like(ce_student_token, float("nan")), order)
    return DistillationOutput(
        loss=total,
        per_token_divergence=per_token,
        student_token_logprobs=student_token if student_token.numel() else None,
        teacher_token_logprobs=teacher_token if teacher_token.numel() else None,
    )


def _interleave(first: torch.Tensor, second: torch.Tensor, take_second: torch.Tensor) -> torch.Tensor:
    """Values of `first` where `take_second` is False and of `second` where it is True, in that order."""
    out = second.new_empty(take_second.shape, dtype=torch.promote_types(first.dtype, second.dtype))
    out[~take_second] = first.to(out.dtype)
    out[take_second] = second.to(out.dtype)
    return out


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
    *,
    alpha: float = 0.0,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    reduction: str = "token",
    skip_first: int = 0,
    lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> DistillationOutput:
    """`chunked_distillation_loss(mode="full_logits")` through Liger-Kernel's fused linear JSD (the GPU fast path).

    Liger's generalized JSD uses the same convention as `alpha_divergence` (beta 0 = forward KL, 1 = reverse
    KL) and averages over the tokens it is given, so only the tokens in the loss are passed: once for
    reduction "token", once per sequence for "sequence". It returns the loss only (no per-token diagnostics).
    torch.compile is used on CUDA; on CPU it runs eagerly (tests compare it with the reference there).
    """
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    weights = loss_token_weights(mask, reduction=reduction, skip_first=skip_first)
    in_loss = weights != 0
    hidden_size = student_hidden.shape[-1]
    student_rows = student_hidden.reshape(-1, hidden_size)
    teacher_rows = teacher_hidden.detach().reshape(-1, hidden_size)
    if teacher_lm_head_weight is None:
        teacher_lm_head_weight, teacher_lm_head_bias = lm_head_weight, lm_head_bias
    if reduction == "token":
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
            0.0, 1.0, alpha, -100, temperature, student.is_cuda, chunk_size, False,
        )
    loss = total / max(len(groups), 1)
    if normalizer is not None:  # Liger averages over this batch: rescale to the step's count
        loss = loss * (loss_units(in_loss, reduction) / normalizer)
    return DistillationOutput(loss=loss, per_token_divergence=None, student_token_logprobs=None, teacher_token_logprobs=None)


def _token_logprobs_chunk(hidden, weight, bias, token_ids, temperature: float) -> torch.Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return _log_probs(logits, temperature).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int = 64,
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
    for start in range(0, index.numel(), chunk_size):
        rows = index[start: start + chunk_size]
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
    reduction: str = "token",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clipped policy-gradient loss with per-sequence advantages; returns (loss, clipped-token fraction).

    per token: -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon) * A), ratio = exp(logp - old_logp);
    reduced with `loss_token_weights` (token mean over the batch, or per-sequence then batch mean).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages.unsqueeze(-1)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    weights = loss_token_weights(mask.to(per_token.dtype), reduction=reduction)
    is_clipped = (clipped < unclipped).to(per_token.dtype)
    clip_fraction = (is_clipped * mask).sum() / mask.sum().clamp(min=1)
    return (per_token * weights).sum(), clip_fraction.detach()
