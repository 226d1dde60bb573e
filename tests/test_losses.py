"""Divergences against a naive float64 implementation written here, and against TRL's helpers."""

import itertools
import math

import pytest
import torch

from sd_plugin.losses import DivergenceOptions, chunked_distillation_loss, divergence, loss_token_weights


# ---------------------------------------------------------------- naive reference (loops over positions)
def naive_per_token(student_logits, teacher_logits, *, distillation_alpha, distillation_mode="full_logits",
                    distillation_topk=None, distillation_support="student", distillation_add_tail=False,
                    distillation_temperature=1.0, sampled_ids=None, distillation_divergence="jsd"):
    alpha, mode, topk, support = distillation_alpha, distillation_mode, distillation_topk, distillation_support
    add_tail, temperature, family = distillation_add_tail, distillation_temperature, distillation_divergence
    student_logits = student_logits.double() / temperature
    teacher_logits = teacher_logits.double() / temperature
    flat_s = student_logits.reshape(-1, student_logits.shape[-1])
    flat_t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    ids = None if sampled_ids is None else sampled_ids.reshape(-1)
    out = []
    for row in range(flat_s.shape[0]):
        p_s = torch.softmax(flat_s[row], -1)
        p_t = torch.softmax(flat_t[row], -1)
        if mode == "sampled_token":
            log_s, log_t = p_s[ids[row]].log(), p_t[ids[row]].log()
            out.append((log_s - log_t).detach() * log_s)
            continue
        if mode == "topk_logits":
            source = flat_s[row] if support == "student" else flat_t[row]
            index = torch.argsort(source.detach(), descending=True)[:topk]
            if add_tail:
                p_s = torch.cat([p_s[index], (1 - p_s[index].sum()).reshape(1)])
                p_t = torch.cat([p_t[index], (1 - p_t[index].sum()).reshape(1)])
            else:
                p_s = p_s[index] / p_s[index].sum()
                p_t = p_t[index] / p_t[index].sum()
        kl = lambda p, r: (p * (p.log() - r.log())).sum()  # noqa: E731
        if alpha == 0:
            out.append(kl(p_t, p_s))
        elif alpha == 1:
            out.append(kl(p_s, p_t))
        elif family == "mixed":
            out.append((1 - alpha) * kl(p_t, p_s) + alpha * kl(p_s, p_t))
        else:
            m = (1 - alpha) * p_s + alpha * p_t
            out.append((1 - alpha) * kl(p_s, m) + alpha * kl(p_t, m))
    return torch.stack(out).reshape(student_logits.shape[:-1])


def naive_reduced(per_token, mask, reduction, skip_first=0):
    mask = mask.double().clone()
    for b in range(mask.shape[0]):
        seen = 0
        for t in range(mask.shape[1]):
            if mask[b, t]:
                seen += 1
                if seen <= skip_first:
                    mask[b, t] = 0
    if reduction == "token":
        return (per_token * mask).sum() / mask.sum()
    rows = [(per_token[b] * mask[b]).sum() / mask[b].sum() for b in range(mask.shape[0]) if mask[b].sum() > 0]
    return torch.stack(rows).mean()


CASES = [
    dict(distillation_alpha=0.0, distillation_mode="full_logits"),
    dict(distillation_alpha=1.0, distillation_mode="full_logits"),
    dict(distillation_alpha=0.5, distillation_mode="full_logits"),
    dict(distillation_alpha=0.3, distillation_mode="full_logits", distillation_temperature=0.7),
    dict(distillation_alpha=0.0, distillation_mode="topk_logits", distillation_topk=5, distillation_support="student"),
    dict(distillation_alpha=1.0, distillation_mode="topk_logits", distillation_topk=5, distillation_support="teacher"),
    dict(distillation_alpha=0.5, distillation_mode="topk_logits", distillation_topk=7, distillation_support="student", distillation_add_tail=True),
    dict(distillation_alpha=0.5, distillation_mode="topk_logits", distillation_topk=7, distillation_support="teacher", distillation_add_tail=True),
    dict(distillation_alpha=0.5, distillation_mode="full_logits", distillation_divergence="mixed"),
    dict(distillation_alpha=0.3, distillation_mode="topk_logits", distillation_topk=7, distillation_support="teacher", distillation_divergence="mixed"),
    dict(distillation_alpha=1.0, distillation_mode="sampled_token"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_divergence_matches_naive_value_and_gradient(case):
    torch.manual_seed(0)
    student = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 5, 40, dtype=torch.float64)
    ids = torch.randint(0, 40, (2, 5))
    ours = divergence(student, teacher, DivergenceOptions(**case), sampled_ids=ids)
    ref_student = student.detach().clone().requires_grad_(True)
    ref = naive_per_token(ref_student, teacher, sampled_ids=ids, **case)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(student.grad, ref_student.grad, atol=1e-10, rtol=1e-8)


def test_divergences_are_nonnegative_and_zero_when_equal():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    for case in CASES[:-1]:
        assert divergence(logits, logits, DivergenceOptions(**case)).abs().max() < 1e-5
        assert (divergence(logits, torch.randn(3, 50), DivergenceOptions(**case)) > -1e-6).all()


@pytest.mark.parametrize("reduction,skip_first", [("token", 0), ("sequence", 0), ("token", 3), ("sequence", 2)])
def test_token_weights_match_naive_reduction(reduction, skip_first):
    torch.manual_seed(2)
    per_token = torch.rand(3, 9, dtype=torch.float64)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [0, 0, 1, 1, 1, 1, 0, 0, 0]])
    weights = loss_token_weights(mask, loss_reduction=reduction, num_loss_tokens_to_skip=skip_first).double()
    torch.testing.assert_close((weights * per_token).sum(), naive_reduced(per_token, mask, reduction, skip_first))


CHUNK_CASES = [
    dict(distillation_alpha=0.0, distillation_mode="full_logits", loss_reduction="token"),
    dict(distillation_alpha=1.0, distillation_mode="full_logits", loss_reduction="sequence", num_loss_tokens_to_skip=3),
    dict(distillation_alpha=0.5, distillation_mode="topk_logits", distillation_topk=6, distillation_support="student", distillation_add_tail=True),
    dict(distillation_alpha=0.5, distillation_mode="topk_logits", distillation_topk=6, distillation_support="teacher", distillation_temperature=1.3),
    dict(distillation_alpha=0.3, distillation_mode="full_logits", distillation_divergence="mixed", distillation_temperature=1.3),
    dict(distillation_alpha=0.5, distillation_mode="topk_logits", distillation_topk=64 // 8, distillation_support="teacher", distillation_divergence="mixed"),
    dict(distillation_alpha=1.0, distillation_mode="sampled_token"),
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_matches_naive_loss_and_gradients(case, chunk_size):
    torch.manual_seed(3)
    batch, length, hidden, vocab = 2, 11, 16, 50
    student_hidden = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, hidden, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(batch, length)
    mask[1, 8:] = 0
    ids = torch.randint(0, vocab, (batch, length))
    reduction = case.pop("loss_reduction", "token")
    skip_first = case.pop("num_loss_tokens_to_skip", 0)

    out = chunked_distillation_loss(student_hidden, teacher_hidden, weight, mask, DivergenceOptions(**case),
                                    loss_chunk_size=chunk_size, sampled_ids=ids, loss_reduction=reduction,
                                    num_loss_tokens_to_skip=skip_first)
    out.loss.backward()

    ref_hidden = student_hidden.detach().clone().requires_grad_(True)
    ref_weight = weight.detach().clone().requires_grad_(True)
    per_token = naive_per_token(ref_hidden @ ref_weight.T, teacher_hidden @ ref_weight.detach().T,
                                sampled_ids=ids, **case)
    ref = naive_reduced(per_token, mask, reduction, skip_first)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(student_hidden.grad, ref_hidden.grad, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(weight.grad, ref_weight.grad, atol=1e-9, rtol=1e-7)


def test_chunked_importance_clip_and_cross_entropy_rows():
    torch.manual_seed(4)
    student_hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    weight = torch.randn(30, 8, dtype=torch.float64)
    ids = torch.randint(0, 30, (2, 6))
    mask = torch.ones(2, 6)
    old = torch.randn(2, 6, dtype=torch.float64) - 3
    ce_mask = torch.zeros(2, 6, dtype=torch.bool)
    ce_mask[1] = True
    out = chunked_distillation_loss(student_hidden, teacher_hidden, weight, mask, DivergenceOptions(distillation_alpha=0.0), loss_chunk_size=5,
                                    sampled_ids=ids, old_logprobs=old, distillation_is_clip=2.0,
                                    ce_mask=ce_mask)
    out.loss.backward()

    ref_hidden = student_hidden.detach().clone().requires_grad_(True)
    logits = ref_hidden @ weight.T
    student_logprobs = torch.log_softmax(logits, -1)
    sampled = student_logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(sampled.detach() - old).clamp(max=2.0)
    per_token = naive_per_token(logits, teacher_hidden @ weight.T, distillation_alpha=0.0) * ratio
    per_token = torch.where(ce_mask, -sampled, per_token)
    ref = per_token.mean()
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref)
    torch.testing.assert_close(student_hidden.grad, ref_hidden.grad)


def test_chunked_full_vocab_at_long_length_matches_naive():
    """T=2048, V=32000 as in the issue: fp32 chunked vs a float64 materialized reference."""
    torch.manual_seed(5)
    length, hidden, vocab = 2048, 32, 32000
    student_hidden = torch.randn(1, length, hidden, requires_grad=True)
    teacher_hidden = torch.randn(1, length, hidden)
    weight = (torch.randn(vocab, hidden) * 0.1).requires_grad_(True)
    mask = torch.ones(1, length)
    out = chunked_distillation_loss(student_hidden, teacher_hidden, weight, mask, DivergenceOptions(distillation_alpha=0.5),
                                    loss_chunk_size=256)
    out.loss.backward()

    ref_hidden = student_hidden.detach().double().requires_grad_(True)
    ref_weight = weight.detach().double().requires_grad_(True)
    s = torch.log_softmax(ref_hidden @ ref_weight.T, -1)
    q = torch.log_softmax(teacher_hidden.double() @ ref_weight.detach().T, -1)
    m = torch.logaddexp(s + math.log(0.5), q + math.log(0.5))
    ref = (0.5 * (s.exp() * (s - m)).sum(-1) + 0.5 * (q.exp() * (q - m)).sum(-1)).mean()
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student_hidden.grad.double(), ref_hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), ref_weight.grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- TRL's own helpers where definitions overlap
@pytest.mark.parametrize("alpha,topk,add_tail", list(itertools.product([0.0, 0.5, 1.0], [None, 4], [False, True])))
def test_matches_trl_sdft_helpers(alpha, topk, add_tail):
    loss_utils = pytest.importorskip("trl.experimental.sdft.loss_utils")
    torch.manual_seed(6)
    student = torch.randn(2, 3, 25)
    teacher = torch.randn(2, 3, 25)
    if topk is None:
        if add_tail:
            pytest.skip("the tail bucket only exists for top-K")
        trl = loss_utils.compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=alpha)
        ours = divergence(student, teacher, DivergenceOptions(distillation_alpha=alpha))
    else:
        trl = loss_utils.compute_topk_self_distillation_loss(
            student, teacher, distillation_topk=topk, distillation_alpha=alpha, distillation_add_tail=add_tail)
        options = DivergenceOptions(distillation_alpha=alpha, distillation_mode="topk_logits", distillation_topk=topk,
                                    distillation_add_tail=add_tail)
        ours = divergence(student, teacher, options)
    torch.testing.assert_close(ours, trl, atol=1e-5, rtol=1e-5)


def test_matches_trl_sampled_token_helper():
    loss_utils = pytest.importorskip("trl.experimental.sdft.loss_utils")
    torch.manual_seed(7)
    student = torch.randn(2, 3, 25, requires_grad=True)
    teacher = torch.randn(2, 3, 25)
    ids = torch.randint(0, 25, (2, 3))
    trl = loss_utils.compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=1.0)
    ours = divergence(student, teacher, DivergenceOptions(distillation_alpha=1.0, distillation_mode="sampled_token"), sampled_ids=ids)
    torch.testing.assert_close(ours, trl)
    (trl_grad,) = torch.autograd.grad(trl.sum(), student)
    (our_grad,) = torch.autograd.grad(ours.sum(), student)
    torch.testing.assert_close(our_grad, trl_grad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(distillation_alpha=1.5), "distillation_alpha must be in"),
        (dict(distillation_alpha=0.5, distillation_mode="sampled_token"), "needs distillation_alpha=1.0"),
        (dict(distillation_alpha=0.0, distillation_mode="topk_logits", distillation_topk=99), "distillation_topk=99 is larger than the vocabulary"),
        (dict(distillation_alpha=0.0, distillation_mode="topk_logits"), "needs distillation_topk >= 1"),
        (dict(distillation_alpha=0.0, distillation_mode="nope"), "distillation_mode must be one of"),
    ],
)
def test_bad_options_are_rejected_with_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        divergence(torch.randn(2, 10), torch.randn(2, 10), DivergenceOptions(**kwargs), sampled_ids=torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------ Liger-Kernel's fused loss (GPU fast path)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_liger_fused_loss_matches_the_reference(alpha, reduction, temperature):
    from sd_plugin.liger import liger_distillation_loss

    torch.manual_seed(0)
    student = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, 16, dtype=torch.float64)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    mask[2] = 0
    options = DivergenceOptions(distillation_alpha=alpha, distillation_temperature=temperature)
    shape = dict(loss_reduction=reduction, num_loss_tokens_to_skip=1, loss_chunk_size=4)
    reference = chunked_distillation_loss(student, teacher, weight, mask, options, **shape).loss
    fused = liger_distillation_loss(student, teacher, weight, mask, options, **shape).loss
    torch.testing.assert_close(fused.double(), reference, rtol=1e-6, atol=1e-7)
    for ours, theirs in zip(torch.autograd.grad(fused, (student, weight)), torch.autograd.grad(reference, (student, weight))):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_cross_entropy_rows_are_plain_sft_every_token_at_temperature_one(reduction):
    """lambda_on_policy < 1 rows: -log p(y_t) at temperature 1 over every demonstration token; the skip and
    the distillation temperature apply to the distilled rows only."""
    torch.manual_seed(5)
    batch, length, hidden, vocab, skip, temperature = 3, 7, 8, 40, 3, 2.0
    student_hidden = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, hidden, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones(batch, length)
    mask[2, 5:] = 0
    ce_mask = torch.zeros(batch, length, dtype=torch.bool)
    ce_mask[1:] = True  # rows 1 and 2 are SFT rows
    options = DivergenceOptions(distillation_alpha=0.0, distillation_temperature=temperature)
    out = chunked_distillation_loss(student_hidden, teacher_hidden, weight, mask, options, loss_chunk_size=4,
                                    sampled_ids=ids, ce_mask=ce_mask, num_loss_tokens_to_skip=skip, loss_reduction=reduction)
    out.loss.backward()

    ref_hidden = student_hidden.detach().clone().requires_grad_(True)
    ref_weight = weight.detach().clone().requires_grad_(True)
    logits = ref_hidden @ ref_weight.T
    cross_entropy = -torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # temperature 1
    distilled = naive_per_token(logits, teacher_hidden @ ref_weight.detach().T, distillation_alpha=0.0, distillation_temperature=temperature)
    row_losses = [
        naive_reduced(distilled[:1], mask[:1], "token", skip),           # row 0: distilled, first 3 skipped
        (cross_entropy[1] * mask[1]).sum() / mask[1].sum(),               # SFT rows: every token
        (cross_entropy[2] * mask[2]).sum() / mask[2].sum(),
    ]
    if reduction == "sequence":
        ref = torch.stack(row_losses).mean()
    else:
        counts = [mask[0].sum() - skip, mask[1].sum(), mask[2].sum()]
        ref = sum(loss * count for loss, count in zip(row_losses, counts)) / sum(counts)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref)
    torch.testing.assert_close(student_hidden.grad, ref_hidden.grad)
    torch.testing.assert_close(weight.grad, ref_weight.grad)
    # Diagnostics: one value per token in the loss, row-major; SFT tokens report their cross-entropy.
    in_loss = torch.ones(batch, length, dtype=torch.bool)
    in_loss[0, :skip] = False
    in_loss[2, 5:] = False
    torch.testing.assert_close(out.per_token_divergence.double(), torch.where(ce_mask, cross_entropy, distilled)[in_loss].detach())
