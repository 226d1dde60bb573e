"""Benchmark: TRL's lm_head forward + backward over the `logits_to_keep` slice, in isolation (CPU).

benchmarks/README.md once attributed ~130 s of TRL's SDFT step (batch 1, 1,024-token prompt, 256-token rollout,
V = 151,936, reverse KL) to one op, `aten::bmm [1, 257, 151936] x [1, 151936, 256]`. This script runs that op
with the layout TRL produces and checks the suspects one by one:

  - layout: Qwen3ForCausalLM applies lm_head to `hidden_states[:, -(C+1):, :]`, a [B, C+1, H] view of the
    [B, T, H] decoder output whose batch stride is T*H, not (C+1)*H; `torch.matmul` cannot fold it into one
    [B*(C+1), H] matrix (and the frozen LoRA lm_head does not require grad), so the forward is a bmm against the
    expanded weight and the backward is bmm([B, C+1, V], [B, V, H]). Compared with the folded mm on a copy.
  - gradient values: the gradient of TRL's reverse-KL loss (alpha 1, 3 skipped tokens, per-sequence mean) with
    respect to those logits, from a real forward of the benchmark's random Qwen3 (student = base + LoRA,
    teacher = base with the demonstration in context), against a random gradient of the same size; its
    denormal count; `torch.set_flush_denormal(True)`.
  - precision: TRL's default `bf16=True` runs the forwards under CPU bf16 autocast.
  - batch 4 (the side-by-side setup of issue 29) against batch 1.

    python benchmarks/bench_lm_head_backward.py
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_sdft_vs_trl import LORA_TARGETS, QWEN_VOCAB, TOKENIZER_DIR, build_random_model  # noqa: E402

PROMPT, DEMONSTRATION, COMPLETION, HIDDEN = 1024, 258, 256, 256


def reverse_kl_logit_gradient(tokenizer):
    """TRL's reverse-KL loss gradient with respect to the student's kept logits [1, C+1, V], and lm_head's weight."""
    import torch
    from peft import LoraConfig, get_peft_model
    from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

    model = build_random_model(tokenizer, QWEN_VOCAB, HIDDEN, 4)
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, len(tokenizer), (1, PROMPT), generator=generator)
    demonstration = torch.randint(0, len(tokenizer), (1, DEMONSTRATION), generator=generator)
    completion = torch.randint(0, QWEN_VOCAB, (1, COMPLETION), generator=generator)

    def kept_logits(ids):  # TRL's _forward_logits
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                     logits_to_keep=COMPLETION + 1).logits

    with torch.no_grad():
        with model.disable_adapter():
            teacher = kept_logits(torch.cat([prompt, demonstration, completion], 1))[:, :-1][:, -COMPLETION:]
        student = kept_logits(torch.cat([prompt, completion], 1))
    leaf = student.detach().requires_grad_()
    per_token = compute_full_logit_self_distillation_loss(leaf[:, :-1][:, -COMPLETION:], teacher, distillation_alpha=1.0)
    mask = (torch.arange(COMPLETION) >= 3).long()[None]
    ((per_token * mask).sum(-1) / mask.sum(-1)).mean().backward()
    return leaf.grad, model.base_model.model.lm_head.weight.detach()


def time_head(weight, gradient, batch: int, layout: str, bf16: bool, flush_denormal: bool) -> tuple[float, float]:
    """Seconds of lm_head forward and backward on a [batch, C+1, H] input laid out as TRL's (or copied)."""
    import torch
    import torch.nn.functional as F

    torch.set_flush_denormal(flush_denormal)
    decoder_out = torch.randn(batch, PROMPT + COMPLETION, HIDDEN, requires_grad=True)
    hidden = decoder_out[:, -(COMPLETION + 1):, :]  # TRL / transformers: lm_head(hidden_states[:, slice, :])
    if layout == "folded":
        hidden = hidden.reshape(batch * (COMPLETION + 1), HIDDEN)  # a copy: one [B*(C+1), H] x [H, V] mm
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        logits = F.linear(hidden, weight)
    forward = time.perf_counter() - start
    grad = gradient.expand(batch, -1, -1).reshape(logits.shape).to(logits.dtype)
    start = time.perf_counter()
    logits.backward(grad)
    backward = time.perf_counter() - start
    torch.set_flush_denormal(False)
    return forward, backward


def main() -> int:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    gradient, weight = reverse_kl_logit_gradient(tokenizer)
    tiny = torch.finfo(torch.float32).tiny
    denormals = int(((gradient.abs() < tiny) & (gradient != 0)).sum())
    print(f"reverse-KL gradient w.r.t. the kept logits: {tuple(gradient.shape)}, {denormals} denormals of "
          f"{gradient.numel():,}, {int((gradient == 0).sum()):,} zeros (the unused last row and the skipped tokens), |g| max "
          f"{gradient.abs().max().item():.2e}")
    random_gradient = torch.randn_like(gradient) * gradient.abs().mean()
    cases = [
        ("TRL layout (bmm), random gradient, fp32", random_gradient, 1, "trl", False, False),
        ("TRL layout (bmm), reverse-KL gradient, fp32", gradient, 1, "trl", False, False),
        ("TRL layout (bmm), reverse-KL gradient, fp32, flush denormals", gradient, 1, "trl", False, True),
        ("TRL layout (bmm), reverse-KL gradient, bf16 autocast (TRL's default)", gradient, 1, "trl", True, False),
        ("folded (one mm on a copy), reverse-KL gradient, fp32", gradient, 1, "folded", False, False),
        ("TRL layout (bmm), batch 4, reverse-KL gradient, fp32", gradient, 4, "trl", False, False),
    ]
    time_head(weight, gradient, 1, "trl", False, False)  # warm-up (thread pool, first allocation)
    load = os.getloadavg()
    print(f"\nlm_head [{PROMPT + COMPLETION}-token decoder output -> {COMPLETION + 1} kept rows] x [{QWEN_VOCAB:,}, "
          f"{HIDDEN}], {torch.get_num_threads()} threads, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("| case | forward | backward | backward per batch row |")
    print("|---|---|---|---|")
    for name, grad, batch, layout, bf16, flush in cases:
        forward, backward = time_head(weight, grad, batch, layout, bf16, flush)
        print(f"| {name} | {forward:.2f} s | {backward:.2f} s | {backward / batch:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
