"""Per-token divergences between a student and a teacher, and their chunked form from hidden states.

Notation (per completion position t): s = log_softmax(student_logits / T), q = log_softmax(teacher_logits / T).

- alpha = 0: forward KL(teacher || student) = sum_v e^q (q - s)   (the SDFT paper's results)
- alpha = 1: reverse KL(student || teacher) = sum_v e^s (s - q)
- otherwise, family "jsd": generalized JSD with mixture m = log((1 - alpha) e^s + alpha e^q):
  (1 - alpha) KL(student || m) + alpha KL(teacher || m)   (SDPO)
  family "mixed": (1 - alpha) forward KL + alpha reverse KL   (SD-Zero; NeMo-RL kl_type=mixed)

Modes (`distillation_mode`, TRL's names): "full_logits" (the whole vocabulary); "topk_logits" (K indices from
the student's or the teacher's logits, both distributions renormalized over them, or kept unnormalized plus one
tail bucket holding the rest of the mass); "sampled_token" (only the sampled token's log-probs: the
REINFORCE-style reverse-KL estimator stopgrad(s_y - q_y) * s_y, valid for alpha = 1 only).

`divergence` is the readable reference on logits. `chunked_distillation_loss` computes the same weighted
sum from final hidden states chunk by chunk: each chunk's logits exist only while that chunk is processed,
and its gradients (with respect to the hidden states and the lm_head weight) are computed right there, so
no [tokens, vocab] tensor ever exists for the whole sequence and the lm_head is multiplied four times per
chunk (student, teacher, two gradient products), as with materialized logits. The gradient with respect to
a chunk's logits is written in closed form (see `_chunk_loss_and_logit_grad`), so a chunk needs 3-4 fp32
[chunk, vocab] buffers instead of the ~8 that autograd through `divergence` would keep. Each divergence is one
small function, picked by name from `DIVERGENCES` (reference) and `FULL_VOCABULARY_TERMS` (closed form).
The GRPO term is in `sd_plugin.grpo`, the Liger-Kernel adapter in `sd_plugin.liger`.
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
    """What the per-token divergence is: the method's `distillation_*` options under the same names (built once
    by the trainer from its options, validated on construction; the messages name the option)."""

    distillation_alpha: float = 0.0
    distillation_mode: str = "full_logits"
    distillation_topk: int | None = None
    distillation_support: str = "student"
    distillation_add_tail: bool = False
    distillation_temperature: float = 1.0
    distillation_divergence: str = "jsd"

    def __post_init__(self):
        alpha, mode, topk = self.distillation_alpha, self.distillation_mode, self.distillation_topk
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation_alpha must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {alpha}")
        if mode not in MODES:
            raise ValueError(f"distillation_mode must be one of {MODES}, got {mode!r}")
        if self.distillation_support not in SUPPORTS:
            raise ValueError(f"distillation_support must be one of {SUPPORTS}, got {self.distillation_support!r}")
        if self.distillation_divergence not in FAMILIES:
            raise ValueError(f"distillation_divergence must be one of {FAMILIES}, got {self.distillation_divergence!r}")
        if not self.distillation_temperature > 0:
            raise ValueError(f"distillation_temperature must be > 0, got {self.distillation_temperature}")
        if mode == "topk_logits" and (topk is None or topk < 1):
            raise ValueError(f"distillation_mode: topk_logits needs distillation_topk >= 1, got {topk}")
        if mode == "sampled_token" and alpha != 1.0:
            raise ValueError(f"distillation_mode: sampled_token estimates the reverse KL only: it needs "
                             f"distillation_alpha=1.0, got distillation_alpha={alpha}")

    def check_vocab(self, vocab_size: int) -> None:
        if self.distillation_mode == "topk_logits" and self.distillation_topk > vocab_size:
            raise ValueError(f"distillation_topk={self.distillation_topk} is larger than the vocabulary ({vocab_size} tokens)")

    @property
    def divergence_name(self) -> str:
        """The key of `DIVERGENCES` (and of the closed-form `FULL_VOCABULARY_TERMS`) these options pick."""
        return divergence_name(self.distillation_alpha, self.distillation_divergence)


# ------------------------------------------------------------------ the divergences, one function each
def forward_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(teacher || student) = sum_v e^q (q - s) (alpha = 0, the SDFT paper's results)."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)


def reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(student || teacher) = sum_v e^s (s - q) (alpha = 1)."""
    return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)


def mixed_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) forward KL + alpha reverse KL (SD-Zero; NeMo-RL kl_type=mixed)."""
    return ((1.0 - alpha) * forward_kl(student_logprobs, teacher_logprobs, alpha)
            + alpha * reverse_kl(student_logprobs, teacher_logprobs, alpha))


def generalized_jsd(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) KL(student || m) + alpha KL(teacher || m), m = (1 - alpha) e^s + alpha e^q (SDPO)."""
    mixture = torch.logaddexp(student_logprobs + math.log(1.0 - alpha), teacher_logprobs + math.log(alpha))
    kl_student = (student_logprobs.exp() * (student_logprobs - mixture)).sum(-1)
    kl_teacher = (teacher_logprobs.exp() * (teacher_logprobs - mixture)).sum(-1)
    return (1.0 - alpha) * kl_student + alpha * kl_teacher


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "mixed": mixed_kl, "jsd": generalized_jsd}


def divergence_name(alpha: float, family: str = "jsd") -> str:
    """alpha 0 and 1 are the two KLs in either family; in between the family (`distillation_divergence`) decides."""
    if alpha == 0.0:
        return "forward_kl"
    if alpha == 1.0:
        return "reverse_kl"
    return family


def alpha_divergence(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float,
                     family: str = "jsd") -> torch.Tensor:
    """D_alpha summed over the last dimension; both inputs are log-probabilities over the same support."""
    return DIVERGENCES[divergence_name(alpha, family)](student_logprobs, teacher_logprobs, alpha)


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


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    options: DivergenceOptions = DivergenceOptions(),
    *,
    sampled_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token divergence D_alpha(student || teacher) on logits of shape [..., V]; returns [...].

    The readable reference of `chunked_distillation_loss`. options: `DivergenceOptions` (alpha, mode, top-K and
    whose, tail bucket, temperature, family; see the module docstring). sampled_ids: the completion token ids
    [...], needed for distillation_mode "sampled_token".
    """
    options.check_vocab(student_logits.shape[-1])
    temperature = options.distillation_temperature
    student_logprobs = torch.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)
    teacher_logprobs = torch.log_softmax(_at_least_fp32(teacher_logits) / temperature, dim=-1)
    alpha, family = options.distillation_alpha, options.distillation_divergence
    if options.distillation_mode == "full_logits":
        return alpha_divergence(student_logprobs, teacher_logprobs, alpha, family)
    if options.distillation_mode == "topk_logits":
        source = student_logits if options.distillation_support == "student" else teacher_logits
        index = source.detach().topk(options.distillation_topk, dim=-1).indices
        student_k, teacher_k = topk_distributions(student_logprobs.gather(-1, index), teacher_logprobs.gather(-1, index),
                                                  options.distillation_add_tail)
        return alpha_divergence(student_k, teacher_k, alpha, family)
    if sampled_ids is None:
        raise ValueError("distillation_mode: sampled_token needs sampled_ids (the completion token ids)")
    student_token = student_logprobs.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)
    teacher_token = teacher_logprobs.gather(-1, sampled_ids.unsqueeze(-1)).squeeze(-1)
    return (student_token - teacher_token).detach() * student_token


def loss_token_weights(mask: torch.Tensor, *, loss_reduction: str = "token", num_loss_tokens_to_skip: int = 0,
                       unskipped_rows: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
    """Weights w so that sum(w * per_token_loss) is the requested reduction of the loss over `mask`.

    mask: [B, T] (1 = completion token in the loss). The first `num_loss_tokens_to_skip` valid tokens of each row are
    dropped (SDFT masks 3 to suppress "Based on the example..." openings), except in `unskipped_rows` ([B]
    bool): cross-entropy rows train every demonstration token, as plain SFT does.
    loss_reduction: "token" = mean over every valid token of the batch; "sequence" = mean per sequence, then
    mean over the sequences that have at least one valid token.
    normalizer: what the mean divides by instead of this batch's token (or sequence) count: the trainer
    passes the optimizer step's count over all micro-batches and processes, so that gradient accumulation
    and data parallelism give the same mean as one big batch.
    """
    if loss_reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
    mask = loss_token_mask(mask, num_loss_tokens_to_skip=num_loss_tokens_to_skip, unskipped_rows=unskipped_rows).float()
    if loss_reduction == "token":
        return mask / (normalizer if normalizer is not None else mask.sum().clamp(min=1.0))
    per_sequence = mask.sum(-1, keepdim=True)
    sequences = normalizer if normalizer is not None else (per_sequence > 0).sum().clamp(min=1)
    return mask / per_sequence.clamp(min=1.0) / sequences


def loss_units(mask: torch.Tensor, loss_reduction: str) -> int:
    """What `loss_token_weights` divides by for an already skip-masked [B, T] mask: tokens or sequences."""
    return int(mask.sum()) if loss_reduction == "token" else int((mask.sum(-1) > 0).sum())


def loss_token_mask(mask: torch.Tensor, *, num_loss_tokens_to_skip: int = 0,
                    unskipped_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] bool: the tokens of `mask` that are in the loss once the first `num_loss_tokens_to_skip` of each row
    are dropped (rows in `unskipped_rows` keep all theirs). Diagnostics come back in this mask's row-major order."""
    mask = mask.bool()
    if num_loss_tokens_to_skip <= 0:
        return mask
    kept = mask.long().cumsum(-1) > num_loss_tokens_to_skip
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


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) in at least fp32 (the input is a temporary and may be overwritten)."""
    logits = _at_least_fp32(logits)
    if temperature != 1.0:
        logits = logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1)


# ------------------------------------------------------------------ closed forms over the full vocabulary
# Each takes the chunk's student and teacher log-probs [N, V] (both overwritten: they are the chunk's buffers)
# and returns (divergence [N], direction [N, V], p = e^s [N, V], scale) with d(divergence)/d(logits) =
# scale * direction / T. The reference formulas are `forward_kl`, `reverse_kl`, `mixed_kl`, `generalized_jsd`.
def _forward_kl_term(student_logprobs, teacher_logprobs, alpha):
    gap = teacher_logprobs - student_logprobs  # q - s
    teacher_probs = teacher_logprobs.exp_()
    value = _rowdot(teacher_probs, gap)
    del gap
    probs = student_logprobs.exp_()
    return value, teacher_probs.neg_().add_(probs), probs, 1.0  # direction p - e^q


def _reverse_kl_term(student_logprobs, teacher_logprobs, alpha):
    gap = teacher_logprobs.sub_(student_logprobs).neg_()  # s - q
    probs = student_logprobs.exp_()
    value = _rowdot(probs, gap)
    return value, gap.sub_(value.unsqueeze(-1)).mul_(probs), probs, 1.0  # direction p (s - q - D)


def _mixed_kl_term(student_logprobs, teacher_logprobs, alpha):
    gap = student_logprobs - teacher_logprobs  # s - q
    teacher_probs = teacher_logprobs.exp_()
    forward = -_rowdot(teacher_probs, gap)
    probs = student_logprobs.exp_()
    reverse = _rowdot(probs, gap)
    # (1 - alpha) (p - e^q) + alpha p (s - q - reverse)
    direction = gap.sub_(reverse.unsqueeze(-1)).mul_(probs).mul_(alpha)
    direction.add_(probs, alpha=1.0 - alpha).sub_(teacher_probs, alpha=1.0 - alpha)
    return (1.0 - alpha) * forward + alpha * reverse, direction, probs, 1.0


def _generalized_jsd_term(student_logprobs, teacher_logprobs, alpha):
    mixture = student_logprobs + math.log(1.0 - alpha)
    torch.logaddexp(mixture, teacher_logprobs + math.log(alpha), out=mixture)
    student_gap = student_logprobs - mixture  # s - m
    teacher_gap = mixture.neg_().add_(teacher_logprobs)  # q - m
    kl_teacher = _rowdot(teacher_logprobs.exp_(), teacher_gap)
    del teacher_gap, mixture
    probs = student_logprobs.exp_()
    kl_student = _rowdot(probs, student_gap)
    direction = student_gap.sub_(kl_student.unsqueeze(-1)).mul_(probs)  # p (s - m - KL(p || m))
    return (1.0 - alpha) * kl_student + alpha * kl_teacher, direction, probs, 1.0 - alpha


FULL_VOCABULARY_TERMS = {"forward_kl": _forward_kl_term, "reverse_kl": _reverse_kl_term, "mixed": _mixed_kl_term,
                         "jsd": _generalized_jsd_term}


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
    (autograd through `divergence` keeps about eight).
    Returns (loss, per_token, student_token, teacher_token, grad_logits or None).
    """
    temperature = options.distillation_temperature
    student_logits = F.linear(student_hidden, weight, bias)
    teacher_logits = None
    if teacher_hidden is not None:
        teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    topk_index = None
    if options.distillation_mode == "topk_logits" and teacher_logits is not None:
        source = student_logits if options.distillation_support == "student" else teacher_logits
        topk_index = source.topk(options.distillation_topk, dim=-1).indices
    student_logprobs = log_probs(student_logits, temperature)
    del student_logits
    teacher_logprobs = None
    if teacher_logits is not None:
        teacher_logprobs = log_probs(teacher_logits, temperature)
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
    elif options.distillation_mode == "full_logits":
        term = FULL_VOCABULARY_TERMS[options.divergence_name]
        value, direction, probs, divergence_scale = term(student_logprobs, teacher_logprobs, options.distillation_alpha)
        per_token = leaves["divergence"] = value.requires_grad_(need_grad)
    elif options.distillation_mode == "topk_logits":
        student_k = student_logprobs.gather(-1, topk_index).requires_grad_(need_grad)
        teacher_k = teacher_logprobs.gather(-1, topk_index)
        leaves["topk"] = student_k
        probs = student_logprobs.exp_()
        with torch.enable_grad():
            student_side, teacher_side = topk_distributions(student_k, teacher_k, options.distillation_add_tail)
            per_token = alpha_divergence(student_side, teacher_side, options.distillation_alpha,
                                         options.distillation_divergence)
    else:  # sampled_token
        if sampled_ids is None:
            raise ValueError("distillation_mode: sampled_token needs sampled_ids (the completion token ids)")
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
    options: DivergenceOptions = DivergenceOptions(),
    *,
    loss_chunk_size: int = 1024,
    loss_reduction: str = "token",
    num_loss_tokens_to_skip: int = 0,
    sampled_ids: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    distillation_is_clip: float = 2.0,
    ce_mask: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_weight: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> DistillationOutput:
    """The reduced distillation loss computed from final hidden states, `loss_chunk_size` tokens at a time.

    student_hidden / teacher_hidden: [B, T, H] hidden states at the positions that predict the completion
    tokens (teacher_hidden is used without gradient; None means cross-entropy only). mask: [B, T]. options:
    the divergence, as in `divergence`. Keyword arguments are named as the trainer options they come from.
    sampled_ids: [B, T] completion token ids (distillation_mode "sampled_token", cross-entropy rows, importance
    sampling and the logged log-prob gap need them). old_logprobs: [B, T] log-probs of the sampling policy;
    when given, each token's loss is multiplied by min(exp(s_y - old_y), distillation_is_clip). ce_mask: [B, T]
    bool, tokens that get next-token cross-entropy (-s_y) instead of the divergence. loss_reduction,
    num_loss_tokens_to_skip and normalizer as in `loss_token_weights`.

    Equals (weights * divergence(student_hidden @ W.T, teacher_hidden @ W_t.T, options)).sum() in value and
    gradient; only the tokens with a non-zero weight are projected.
    """
    options.check_vocab(lm_head_weight.shape[0])
    if loss_chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be >= 1, got {loss_chunk_size}")
    needs_ids = options.distillation_mode == "sampled_token" or old_logprobs is not None or ce_mask is not None
    if needs_ids and sampled_ids is None:
        raise ValueError("sampled_ids are needed for distillation_mode: sampled_token, old_logprobs and ce_mask")

    # Cross-entropy rows are plain SFT: every token, temperature 1, no importance weight (the skip and the
    # temperature belong to the distillation term only).
    ce_rows = None if ce_mask is None else ce_mask.any(-1)
    weights = loss_token_weights(mask, loss_reduction=loss_reduction, num_loss_tokens_to_skip=num_loss_tokens_to_skip,
                                 unskipped_rows=ce_rows, normalizer=normalizer)
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
            distillation_is_clip, loss_chunk_size, selected.nonzero().squeeze(-1),
        )

    distilled, cross_entropy = in_loss & ~is_ce, in_loss & is_ce
    # The distillation call always runs (possibly on no token): a zero loss still reaches every parameter.
    total, per_token, student_token, teacher_token = run(distilled, options, teacher_rows, flat_old, False)
    if cross_entropy.any():
        ce_total, ce_per_token, ce_student_token, _ = run(cross_entropy, replace(options, distillation_temperature=1.0), None, None, True)
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
