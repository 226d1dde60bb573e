"""The GPU-only paths in one command, for the first single H100/H200-class GPU that appears: one table.

    python benchmarks/gpu_check.py                  # installs into .gpu-check-venv (PyPI), then every check
    python benchmarks/gpu_check.py --no-install     # with this Python's packages
    python benchmarks/gpu_check.py --install-only   # only create and fill the venv (then run with --venv's python)
    python benchmarks/gpu_check.py --dry-run        # CPU: no install; each check's code at tiny sizes on the CPU,
                                                    # each GPU check reported as skipped with its exact reason
    python benchmarks/gpu_check.py --only tiled_64k_step,liger_loss --json results.json

Checks (each in its own subprocess, so that a crash or an out-of-memory error costs one row, not the table):

- tiled_64k_step      one SDFTTrainer step (rollout, teacher forward, student forward + backward, optimizer) of a
                      Qwen3.5-9B-shaped model (random bf16 weights, the 9B's layer shapes, 4 layers: 3 Gated
                      DeltaNet + 1 full attention), LoRA r16, a 64K-token row, sequence_tile_size 4096 and
                      prefill_chunk_size 4096: the step's
                      peak (torch.cuda.max_memory_allocated) against `sd_plugin.planner.plan` for the same shape
- tiled_sdpa_backend  which scaled_dot_product_attention kernel runs inside the tiles (torch profiler op names);
                      expected a fused one (flash / memory-efficient / cuDNN), not the math kernel (issue 24 item 6)
- tiled_equals_untiled  tiled == untiled hidden states and LoRA gradients on a short padded batch (bf16 tolerance)
- fla_initial_state_grad  the delta rule the model dispatches to (fla's kernel once installed) vs transformers' torch
                      reference: output, final state, and the gradient with respect to the carried initial state
- liger_loss          Liger's fused linear JSD vs the built-in chunked loss on the same batch: loss, gradients, peak
- qlora_4bit          bitsandbytes NF4 base + LoRA, base teacher: one SDFTTrainer step, loss finite, adapter
                      changed, peak vs the planner (weight_format nf4)
- vllm_colocate, vllm_colocate_sleep  vLLM colocate (without / with sleep mode): one optimizer step, then rollouts
                      from vLLM; their sampled tokens' log-probs against the student's after the step (and before
                      it: they must match the pushed weights); tokens/s of vLLM vs HF generate on the same prompts
- axolotl_train       `axolotl train` of example_configs/quickstart-tiny.yml on the GPU (bf16, Axolotl's LoRA kernels)

Without --no-install the script creates a virtual environment (--venv, default .gpu-check-venv beside the repository,
with the system's packages visible so a preinstalled CUDA torch is reused where it fits) and installs the project and
the pinned packages below into it, one pip call each, then re-runs itself there. A package that cannot be installed
is reported in the table and the checks that need it are skipped with that reason; nothing else stops.
The checks run in priority order within --budget seconds (default 450); a check that would start after it is skipped.
Numbers marked "planned" come from the planner; pass/fail thresholds are printed in each row.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_QWEN3 = REPO / "example_configs" / "assets" / "tiny-qwen3"
QUICKSTART_TINY = REPO / "example_configs" / "quickstart-tiny.yml"
RESULT_PREFIX = "GPU_CHECK_RESULT "
GiB = 2**30
# vLLM 0.25.1 is the newest that TRL 1.9's `trl[vllm]` accepts; it pins torch 2.11.0, inside Axolotl 0.19's torch range
# (2.11-2.13). Axolotl: 0.19.0 on Python 3.11, 0.21.0 on 3.12+ (README "Supported versions").
TORCH_PIN = "torch==2.11.0"
AXOLOTL_PIN = "axolotl==0.19.0" if sys.version_info < (3, 12) else "axolotl==0.21.0"
# (what the table calls it, the pip arguments): installed in this order, each on its own, the torch pin kept.
INSTALLS = [
    ("sd-plugin + torch", [TORCH_PIN, "-e", str(REPO)]),
    ("vllm", ["vllm==0.25.1"]),
    ("flash-linear-attention", ["flash-linear-attention"]),
    ("bitsandbytes", ["bitsandbytes"]),
    ("liger-kernel", ["liger-kernel>=0.6"]),
    ("axolotl", [AXOLOTL_PIN]),
]


@dataclass
class Result:
    """One row of the table."""

    check: str
    status: str                    # pass | fail | skipped
    measured: str = ""
    expected: str = ""
    note: str = ""
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)


class Skip(Exception):
    """A check cannot run here; the message is the exact reason."""


# ------------------------------------------------------------------------------------------------ helpers
def missing_module(name: str) -> str | None:
    """Why `import name` fails here (None: it imports)."""
    try:
        importlib.import_module(name)
    except Exception as error:  # an installed package that fails to import (e.g. a CUDA library) is missing too
        return f"{name} does not import ({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''})"
    return None


def cuda_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


def requirements(*modules: str) -> list[str]:
    """Every reason the GPU version of a check cannot run here (empty: it can)."""
    reasons = [reason for reason in [cuda_missing()] if reason]
    reasons += [reason for module in modules if (reason := missing_module(module))]
    return reasons


class Context:
    """What a check runs on: the GPU at full size, or (dry run) the CPU at tiny sizes."""

    def __init__(self, dry_run: bool):
        import torch

        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtype = torch.float32 if dry_run else torch.bfloat16

    def reset_peak(self) -> int:
        import torch

        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_since(self, before: int) -> int | None:
        """Peak allocated bytes above `before` since `reset_peak` (None on the CPU: not measured there)."""
        import torch

        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before


def gib(value: int | None) -> str:
    return "n/a (CPU)" if value is None else f"{value / GiB:.2f} GiB"


def fmt(value) -> str:
    return "none" if value is None else f"{value:.4g}"


def relative_error(actual, reference) -> float:
    """||actual - reference|| / ||reference|| (Frobenius); dicts of tensors count as one concatenated tensor."""
    import torch

    if isinstance(reference, dict):
        actual = torch.cat([actual[name].detach().float().flatten() for name in reference])
        reference = torch.cat([value.detach().float().flatten() for value in reference.values()])
    actual, reference = actual.detach().float(), reference.detach().float()
    return ((actual - reference).norm() / reference.norm().clamp_min(1e-12)).item()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_QWEN3)


def qwen3_5_model(ctx: Context, *, layers: int, vocab: int | None = None):
    """Random Qwen3.5 text decoder: the 9B's layer shapes (GPU) or the tests' tiny shapes (dry run)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    from sd_plugin.model_shapes import QWEN3_5_9B
    from sd_plugin.testing import tiny_config

    if ctx.dry_run:
        config = tiny_config("qwen3_5", vocab or 1024, num_layers=layers)
    else:
        s = QWEN3_5_9B
        config = Qwen3_5TextConfig(
            vocab_size=vocab or s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
            num_hidden_layers=layers, num_attention_heads=s.num_attention_heads,
            num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, linear_num_key_heads=s.linear_num_key_heads,
            linear_num_value_heads=s.linear_num_value_heads, linear_key_head_dim=s.linear_key_head_dim,
            linear_value_head_dim=s.linear_value_head_dim, linear_conv_kernel_dim=s.linear_conv_kernel_dim,
            full_attention_interval=min(layers, s.num_layers // s.full_attention_layers), max_position_embeddings=131072,
            tie_word_embeddings=False)
    torch.manual_seed(0)
    with ctx.device:
        return AutoModelForCausalLM.from_config(config, dtype=ctx.dtype)


def model_shape(model):
    from sd_plugin.model_shapes import ModelShape

    return ModelShape.from_hf_config(model.config.to_dict(), name="checked model")


def sdft_trainer(ctx: Context, model, output_dir: str, prompt_length: int, completion_length: int, rows: int = 1,
                 **options):
    """An SDFTTrainer on pre-tokenized random rows (prompt == teacher prompt: the step's cost, not its meaning)."""
    import torch
    from datasets import Dataset

    from sd_plugin import SDFTConfig, SDFTTrainer

    generator = torch.Generator().manual_seed(0)
    high = min(model.config.vocab_size, 1000)  # ids the tiny-qwen3 tokenizer knows
    data = [{"input_ids": torch.randint(10, high, (prompt_length,), generator=generator).tolist(),
             "teacher_input_ids": torch.randint(10, high, (prompt_length,), generator=generator).tolist(),
             "demonstration_ids": [11] * 8} for _ in range(rows)]
    settings = dict(output_dir=output_dir, per_device_train_batch_size=rows, max_steps=1, logging_steps=1,
                    report_to="none", save_strategy="no", learning_rate=1e-3, seed=0, use_cpu=ctx.dry_run,
                    bf16=not ctx.dry_run, max_prompt_length=prompt_length, max_teacher_prompt_length=prompt_length,
                    max_completion_length=completion_length, num_loss_tokens_to_skip=0, dataloader_num_workers=0)
    settings.update(options)
    return SDFTTrainer(model=model, args=SDFTConfig(**settings), train_dataset=Dataset.from_list(data),
                       processing_class=tokenizer())


def adapter_snapshot(model) -> dict:
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ the checks
def check_tiled_64k_step(ctx: Context) -> Result:
    import torch
    from peft import LoraConfig, get_peft_model

    from sd_plugin.planner import TrainingSetup, plan

    length, completion, tile = (512, 16, 128) if ctx.dry_run else (65536, 64, 4096)
    targets = ["q_proj", "v_proj", "in_proj_qkv", "out_proj"]
    model = get_peft_model(qwen3_5_model(ctx, layers=4), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    with tempfile.TemporaryDirectory() as out:
        # The rollout's 64K prefill in chunks too (the long-context recipes' setting): one pass would hand the
        # attention a 64K x 64K problem whose kernel choice is not what this check is about.
        trainer = sdft_trainer(ctx, model, out, length - completion, completion, sequence_tile_size=tile,
                               prefill_chunk_size=tile)
        before_weights = adapter_snapshot(model)
        start = ctx.reset_peak()
        trainer.train()
        peak = ctx.peak_since(start)
    changed = any(not torch.equal(before_weights[n], p) for n, p in adapter_snapshot(model).items())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    setup = TrainingSetup(shape=model_shape(model), weight_format="bf16" if not ctx.dry_run else "fp32",
                          compute_bytes=2 if not ctx.dry_run else 4, adapter="lora", lora_r=16, lora_targets=targets,
                          gradient_checkpointing="full", attention="sdpa", prompt_length=length - completion,
                          teacher_prompt_length=length - completion, completion_length=completion,
                          sequence_tile_size=tile, prefill_chunk_size=tile, device=ctx.device.type)
    planned = plan(setup, suggest=False)
    # The allocator's view: the planner's peak without what max_memory_allocated cannot see (CUDA context, margin).
    planned_tensors = planned.peak - planned.framework_overhead - planned.allocator_margin
    numbers = {"peak_allocated": peak, "planned_tensors": planned_tensors, "planned_peak": planned.peak,
               "planned_phase": planned.peak_phase, "loss": losses[-1] if losses else None}
    ok = bool(losses) and all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and changed
    note = f"T={length}, tile {tile}, planner's peak phase: {planned.peak_phase}; pass: loss finite, adapter changed"
    if peak is not None:
        ratio = peak / planned_tensors
        numbers["ratio"] = ratio
        ok = ok and 0.5 <= ratio <= 1.3
        note += f", measured/planned {ratio:.2f} in [0.5, 1.3]"
    return Result("tiled_64k_step", "pass" if ok else "fail", f"peak {gib(peak)}, loss {fmt(numbers['loss'])}",
                  f"planned {gib(planned_tensors)} (+{gib(planned.framework_overhead + planned.allocator_margin)} "
                  "context/margin)", note, numbers=numbers)


SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
    "flex_attention": "flex",
}


def check_tiled_sdpa_backend(ctx: Context) -> Result:
    """Which SDPA kernel runs inside the tiles, read from the profiler's op names around `tiled_hidden_states`
    (the public tiling entry point: a change of the attention call inside tiling.py is what this observes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sd_plugin.tiling import tiled_hidden_states

    length, tile = (256, 64) if ctx.dry_run else (16384, 4096)
    model = qwen3_5_model(ctx, layers=2 if ctx.dry_run else 4)
    decoder = model.get_decoder()
    ids = torch.randint(10, 1000, (1, length), device=ctx.device)
    mask = torch.ones_like(ids)
    mask[:, :7] = 0  # left padding, as rollouts have: the tiles' mask then has real work to do
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=activities) as prof, torch.no_grad():
        tiled_hidden_states(decoder, input_ids=ids, attention_mask=mask, tile_size=tile, keep=slice(length - 8, length))
    names = {event.key for event in prof.key_averages()}
    found = sorted({label for op, label in SDPA_OPS.items() if any(op == name or (op == "flex_attention" and op in name)
                                                                  for name in names)})
    fused = bool(found) and "math" not in found
    return Result("tiled_sdpa_backend", "pass" if fused else "fail", ", ".join(found) or "no SDPA op seen",
                  "a fused kernel (flash / memory-efficient / cuDNN / flex), not math",
                  f"T={length}, tile {tile}, padded rows; math materializes [heads, tile, T] scores",
                  numbers={"kernels": found})


def check_tiled_equals_untiled(ctx: Context) -> Result:
    import torch
    from peft import LoraConfig, get_peft_model

    from sd_plugin.trainers.step import completion_hidden_states

    length, completion, tile = (192, 16, 64) if ctx.dry_run else (2048, 128, 512)
    tolerance = 1e-4 if ctx.dry_run else 3e-2
    targets = ["q_proj", "v_proj", "in_proj_qkv", "out_proj"]
    results = {}
    for tile_size in (0, tile):
        model = get_peft_model(qwen3_5_model(ctx, layers=4, vocab=32000), LoraConfig(r=8, target_modules=targets,
                                                                                     init_lora_weights=False))
        if tile_size == 0:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(10, 1000, (2, length - completion), generator=generator).to(ctx.device)
        prompt_mask = torch.ones_like(prompt)
        prompt_mask[0, : length // 3] = 0  # one left-padded row
        answer = torch.randint(10, 1000, (2, completion), generator=generator).to(ctx.device)
        hidden = completion_hidden_states(model, model, prompt, prompt_mask, answer, torch.ones_like(answer),
                                          sequence_tile_size=tile_size)
        hidden.float().pow(2).mean().backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[tile_size] = (hidden.detach().float(), grads)
    hidden_error = relative_error(results[tile][0], results[0][0])
    grad_error = relative_error(results[tile][1], results[0][1])  # all LoRA gradients as one vector
    ok = hidden_error <= tolerance and grad_error <= tolerance
    return Result("tiled_equals_untiled", "pass" if ok else "fail",
                  f"rel. error hidden {hidden_error:.1e}, grads {grad_error:.1e}", f"<= {tolerance:g}",
                  f"T={length}, tile {tile}, 2 rows (one left-padded), LoRA r8, {ctx.dtype}".replace("torch.", ""),
                  numbers={"hidden": hidden_error, "grads": grad_error})


def torch_function(dispatcher, module):
    """transformers' own torch implementation under its kernel dispatch (`use_kernel_func_from_hub_with_fallback`
    wraps it with functools.wraps; with the `kernels` package installed, inside an nn.Module whose forward closes
    over that wrapper)."""
    import inspect

    import torch

    function = dispatcher
    for _ in range(4):
        if isinstance(function, torch.nn.Module):
            function = inspect.getclosurevars(type(function).forward).nonlocals.get("func", function.forward)
        elif hasattr(function, "__wrapped__"):
            function = function.__wrapped__
        else:
            break
    if getattr(function, "__module__", None) != module.__name__:
        raise RuntimeError(f"cannot find transformers' torch implementation under {dispatcher!r} (got {function!r})")
    return function


def check_fla_initial_state_grad(ctx: Context) -> Result:
    """The delta rule as the model calls it (fla once installed: transformers dispatches to it) against the torch
    reference, from a random initial state that requires grad, as a tile after the first one starts."""
    import torch
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    dispatched = modeling.torch_chunk_gated_delta_rule
    reference_fn = torch_function(dispatched, modeling)
    if ctx.dry_run:  # fla needs a GPU: check the plumbing against the torch recurrent form instead
        dispatched = torch_function(modeling.torch_recurrent_gated_delta_rule, modeling)
    batch, length, heads, dim = (1, 96, 2, 16) if ctx.dry_run else (1, 1024, 8, 128)
    generator = torch.Generator().manual_seed(2)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(ctx.device)

    q, k, v = rand(batch, length, heads, dim), rand(batch, length, heads, dim), rand(batch, length, heads, dim)
    g = -torch.rand(batch, length, heads, generator=generator).to(ctx.device)
    beta = torch.rand(batch, length, heads, generator=generator).to(ctx.device)
    state0 = rand(batch, heads, dim, dim, scale=0.1)
    outputs = {}
    for name, fn, dtype in (("kernel", dispatched, ctx.dtype), ("reference", reference_fn, torch.float32)):
        state = state0.clone().requires_grad_(True)
        out, final = fn(q.to(dtype), k.to(dtype), v.to(dtype), g=g.float(), beta=beta.to(dtype), initial_state=state,
                        output_final_state=True, use_qk_l2norm_in_kernel=True)
        (out.float().square().mean() + final.float().square().mean()).backward()
        outputs[name] = (out.detach().float(), final.detach().float(), state.grad.detach().float())
    errors = {part: relative_error(outputs["kernel"][i], outputs["reference"][i])
              for i, part in enumerate(("output", "final_state", "initial_state_grad"))}
    tolerance = 1e-4 if ctx.dry_run else 2e-2
    ok = max(errors.values()) <= tolerance
    kernel = "transformers' torch code" if dispatched is reference_fn or ctx.dry_run else "fla (installed)"
    return Result("fla_initial_state_grad", "pass" if ok else "fail",
                  ", ".join(f"{part} {error:.1e}" for part, error in errors.items()), f"rel. error <= {tolerance:g}",
                  f"T={length}, {heads} heads x {dim}; dispatched from {kernel}", numbers=errors)


def check_liger_loss(ctx: Context) -> Result:
    import torch

    from sd_plugin.liger import liger_distillation_loss
    from sd_plugin.losses import DivergenceOptions, chunked_distillation_loss

    rows, length, hidden_size, vocab = (2, 24, 32, 1000) if ctx.dry_run else (4, 512, 4096, 151936)
    generator = torch.Generator().manual_seed(3)
    student = (torch.randn(rows, length, hidden_size, generator=generator) * 0.5).to(ctx.device, ctx.dtype)
    teacher = (torch.randn(rows, length, hidden_size, generator=generator) * 0.5).to(ctx.device, ctx.dtype)
    head = (torch.randn(vocab, hidden_size, generator=generator) * hidden_size**-0.5).to(ctx.device, ctx.dtype)
    mask = torch.ones(rows, length, dtype=torch.long, device=ctx.device)
    mask[0, length // 2:] = 0
    options = DivergenceOptions(distillation_alpha=0.5)
    shape = dict(loss_chunk_size=64, loss_reduction="sequence", num_loss_tokens_to_skip=3)
    results, peaks, seconds = {}, {}, {}
    for name, fn in (("liger", liger_distillation_loss), ("built-in", chunked_distillation_loss)):
        s = student.clone().requires_grad_(True)
        w = head.clone().requires_grad_(True)
        before = ctx.reset_peak()
        start = time.perf_counter()
        loss = fn(s, teacher, w, mask, options, **shape).loss
        loss.backward()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
        peaks[name] = ctx.peak_since(before)
        results[name] = (loss.detach().float(), s.grad.float(), w.grad.float())
    loss_error = relative_error(results["liger"][0], results["built-in"][0])
    grad_error = max(relative_error(results["liger"][i], results["built-in"][i]) for i in (1, 2))
    tolerance = 1e-4 if ctx.dry_run else 2e-2
    ok = loss_error <= tolerance and grad_error <= tolerance
    return Result("liger_loss", "pass" if ok else "fail",
                  f"rel. error loss {loss_error:.1e}, grads {grad_error:.1e}; peak liger {gib(peaks['liger'])} vs "
                  f"{gib(peaks['built-in'])}", f"<= {tolerance:g}",
                  f"{rows}x{length} tokens, V={vocab}, JSD alpha 0.5 (first call includes compilation: "
                  f"{seconds['liger']:.1f} s vs {seconds['built-in']:.1f} s)",
                  numbers={"loss": loss_error, "grads": grad_error, "peaks": peaks, "seconds": seconds})


def check_qlora_4bit(ctx: Context) -> Result:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sd_plugin.planner import TrainingSetup, plan
    from sd_plugin.testing import tiny_config

    layers, hidden_size, length, completion = (2, 64, 96, 16) if ctx.dry_run else (4, 4096, 8192, 64)
    config = tiny_config("qwen3", 32000, hidden_size=hidden_size, num_layers=layers,
                         intermediate_size=hidden_size * 3, num_attention_heads=max(4, hidden_size // 128),
                         num_key_value_heads=max(2, hidden_size // 512), head_dim=max(16, 128 if not ctx.dry_run else 16))
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        with ctx.device:  # random init on the GPU: seconds, where the CPU takes minutes at these sizes
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
        quantization = None if ctx.dry_run else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=ctx.dtype, quantization_config=quantization,
                                                     device_map={"": ctx.device.index or 0} if not ctx.dry_run else None)
    if not ctx.dry_run:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    before_weights = adapter_snapshot(model)
    with tempfile.TemporaryDirectory() as out:
        trainer = sdft_trainer(ctx, model, out, length - completion, completion, teacher_model_kind="base",
                               gradient_checkpointing=not ctx.dry_run)
        start = ctx.reset_peak()
        trainer.train()
        peak = ctx.peak_since(start)
    changed = any(not torch.equal(before_weights[n], p) for n, p in adapter_snapshot(model).items())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    finite = bool(losses) and all(abs(x) < float("inf") and x == x for x in losses)
    setup = TrainingSetup(shape=model_shape(model.get_base_model()), weight_format="fp32" if ctx.dry_run else "nf4",
                          compute_bytes=4 if ctx.dry_run else 2, adapter="lora" if ctx.dry_run else "qlora", lora_r=16,
                          lora_targets=targets, gradient_checkpointing="none" if ctx.dry_run else "full",
                          attention="sdpa", prompt_length=length - completion, teacher_prompt_length=length - completion,
                          completion_length=completion, device=ctx.device.type)
    planned = plan(setup, suggest=False)
    planned_tensors = planned.peak - planned.framework_overhead - planned.allocator_margin
    ok = finite and changed
    note = f"{layers} layers, hidden {hidden_size}, T={length}; pass: loss finite, adapter changed"
    numbers = {"peak_allocated": peak, "planned_tensors": planned_tensors, "losses": losses, "adapter_changed": changed}
    if peak is not None:
        numbers["ratio"] = peak / planned_tensors
        ok = ok and 0.5 <= numbers["ratio"] <= 1.3
        note += f", measured/planned {numbers['ratio']:.2f} in [0.5, 1.3]"
    return Result("qlora_4bit", "pass" if ok else "fail", f"peak {gib(peak)}, loss {fmt(losses[-1] if losses else None)}, "
                  f"adapter changed: {changed}", f"planned {gib(planned_tensors)}", note, numbers=numbers)


def vllm_check(ctx: Context, sleep: bool) -> Result:
    """One optimizer step, then one batch of rollouts from vLLM (the pushed weights); the sampled tokens' log-probs
    from vLLM against the student's after the step (must match) and before it (must not match better)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sd_plugin.rollout import generate_rollouts
    from sd_plugin.testing import tiny_config
    from sd_plugin.trainers.step import completion_hidden_states

    name = "vllm_colocate_sleep" if sleep else "vllm_colocate"
    prompts, completion = (4, 16) if ctx.dry_run else (32, 128)
    options = dict(learning_rate=5e-2, temperature=1.0, importance_sampling_correction=True)
    if not ctx.dry_run:  # the dry run samples with HF generate through the same code
        options.update(use_vllm=True, vllm_gpu_memory_utilization=0.2, vllm_enable_sleep_mode=sleep)
    with tempfile.TemporaryDirectory() as out:
        # A small random Qwen3 saved to disk (vLLM loads the model from its path; head_dim 64, which vLLM's
        # attention kernels take, where the tests' tiny model has 16), with the tiny tokenizer's 1,024 ids.
        torch.manual_seed(0)
        config = tiny_config("qwen3", 1024, hidden_size=64 if ctx.dry_run else 256,
                             head_dim=16 if ctx.dry_run else 64)
        AutoModelForCausalLM.from_config(config, dtype=ctx.dtype).save_pretrained(f"{out}/model")
        tokenizer().save_pretrained(f"{out}/model")
        model = AutoModelForCausalLM.from_pretrained(f"{out}/model", dtype=ctx.dtype).to(ctx.device)
        trainer = sdft_trainer(ctx, model, out, 24, completion, rows=prompts, **options)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(prompts)])
        ids, mask = batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device)
        model.eval()
        trainer.state.global_step += 1  # a new step: the backend pushes the weights after the optimizer step
        start = time.perf_counter()
        rollouts = trainer.sample(model, ids, mask)
        engine_seconds = time.perf_counter() - start
        start = time.perf_counter()
        generate_rollouts(model, ids, mask, trainer.sampling_options(), trainer.eos_token_ids, trainer.processing_class.pad_token_id)
        generate_seconds = time.perf_counter() - start

    def student_logprobs():
        with torch.no_grad():
            hidden = completion_hidden_states(model, model, ids[rollouts.prompt_index], mask[rollouts.prompt_index],
                                              rollouts.completion_ids, rollouts.completion_mask)
            logits = hidden.float() @ model.get_output_embeddings().weight.float().T
            chosen = logits.log_softmax(-1).gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)
        keep = rollouts.completion_mask.bool()
        return chosen[keep], rollouts.old_logprobs[keep].float()

    after, sampler = student_logprobs()
    after_error = (after - sampler).abs().mean().item()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    before_logprobs, _ = student_logprobs()
    before_error = (before_logprobs - sampler).abs().mean().item()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(trained[n])
    tokens = int(rollouts.completion_mask.sum())
    tolerance = 1e-3 if ctx.dry_run else 5e-2
    ok = after_error <= tolerance and after_error < 0.5 * before_error
    backend = "HF generate (dry run)" if ctx.dry_run else "vLLM"
    return Result(name, "pass" if ok else "fail",
                  f"mean |log p_student - log p_sampler| {after_error:.1e} (before the step {before_error:.1e}); "
                  f"{backend} {tokens / engine_seconds:.0f} tok/s vs generate {tokens / generate_seconds:.0f} tok/s",
                  f"<= {tolerance:g} and < half the pre-step gap",
                  f"{prompts} prompts x {completion} tokens, temperature 1, sleep mode {'on' if sleep else 'off'}",
                  numbers={"after": after_error, "before": before_error, "engine_tokens_per_s": tokens / engine_seconds,
                           "generate_tokens_per_s": tokens / generate_seconds})


def check_vllm_colocate(ctx: Context) -> Result:
    return vllm_check(ctx, sleep=False)


def check_vllm_colocate_sleep(ctx: Context) -> Result:
    if ctx.dry_run:  # without vLLM sleep mode changes nothing: vllm_colocate's dry run ran this code already
        return Result("vllm_colocate_sleep", "pass", "", "", "the code of vllm_colocate's dry run (sleep mode is vLLM's)")
    return vllm_check(ctx, sleep=True)


def check_axolotl_train(ctx: Context) -> Result:
    import yaml

    config = yaml.safe_load(QUICKSTART_TINY.read_text())
    with tempfile.TemporaryDirectory() as folder:
        config.update(base_model=str(TINY_QWEN3), output_dir=f"{folder}/out", dataset_prepared_path=f"{folder}/prepared",
                      max_steps=4, bf16=True, fp32=False, lora_mlp_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True)
        config["datasets"][0]["path"] = str(REPO / config["datasets"][0]["path"])
        path = Path(folder) / "quickstart-gpu.yml"
        path.write_text(yaml.safe_dump(config))
        command = [str(Path(sys.executable).parent / "axolotl"), "train", str(path)]
        if ctx.dry_run:
            if not Path(command[0]).exists():
                raise FileNotFoundError(f"no axolotl command at {command[0]}")
            return Result("axolotl_train", "pass", "config written", "", "would run: " + " ".join(command))
        env = dict(os.environ, HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false")
        start = time.perf_counter()
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
        output = run.stdout + run.stderr
        trained = (Path(folder) / "out" / "adapter_model.safetensors").exists()
    ok = run.returncode == 0 and trained and "sd-plugin: training with trainer_type=sdft" in output
    tail = "" if ok else " | " + " ".join(output.strip().splitlines()[-3:])[-300:]
    return Result("axolotl_train", "pass" if ok else "fail", f"exit {run.returncode} in {seconds:.0f} s, adapter saved: {trained}",
                  "exit 0, adapter saved", f"quickstart-tiny, 4 steps, bf16, LoRA kernels on{tail}")


@dataclass(frozen=True)
class Check:
    name: str
    function: object
    modules: tuple[str, ...]   # what the GPU version imports besides torch (its skip reasons)
    timeout: int               # seconds, for the subprocess (estimate on an H100 x ~2)


CHECKS = [  # priority order: what the budget cuts first is last
    Check("tiled_64k_step", check_tiled_64k_step, ("fla",), 150),
    Check("tiled_sdpa_backend", check_tiled_sdpa_backend, (), 60),
    Check("tiled_equals_untiled", check_tiled_equals_untiled, ("fla",), 60),
    Check("fla_initial_state_grad", check_fla_initial_state_grad, ("fla",), 60),
    Check("liger_loss", check_liger_loss, ("liger_kernel",), 150),
    Check("qlora_4bit", check_qlora_4bit, ("bitsandbytes",), 90),
    Check("vllm_colocate", check_vllm_colocate, ("vllm",), 150),
    Check("vllm_colocate_sleep", check_vllm_colocate_sleep, ("vllm",), 150),
    Check("axolotl_train", check_axolotl_train, ("axolotl", "axolotl.kernels.lora"), 300),
]


# ------------------------------------------------------------------------------------------------ worker
def worker(name: str, dry_run: bool) -> Result:
    """Run one check in this process; returns its row (a dry run: the tiny CPU version, reported as skipped)."""
    check = next(c for c in CHECKS if c.name == name)
    start = time.perf_counter()
    missing = requirements(*check.modules)
    if not dry_run and missing:
        return Result(name, "skipped", note="; ".join(missing), seconds=time.perf_counter() - start)
    try:
        result = check.function(Context(dry_run))
    except Exception as error:  # a check that raises is a failed row, with the error, not a crashed table
        text = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()[-1]
        traceback.print_exc()
        result = Result(name, "fail", note=f"raised {text[:400]}")
    if dry_run and result.status != "fail":
        # The plumbing ran on the CPU; the GPU check itself did not: skipped, with what is missing for it here.
        reason = "; ".join(missing) if missing else "nothing missing here: run without --dry-run"
        result = Result(name, "skipped", result.measured, result.expected,
                        f"--dry-run: code ran on CPU at tiny sizes; GPU check not run: {reason}", numbers=result.numbers)
    result.seconds = time.perf_counter() - start
    return result


def run_worker(name: str, dry_run: bool, timeout: float) -> Result:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name] + (["--dry-run"] if dry_run else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    try:
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        tail = (error.stderr or b"")[-300:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return Result(name, "fail", note=f"timed out after {timeout:.0f} s: {tail.strip()}", seconds=timeout)
    for line in run.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return Result(**json.loads(line[len(RESULT_PREFIX):]))
    tail = " ".join((run.stdout + run.stderr).strip().splitlines()[-4:])[-400:]
    return Result(name, "fail", note=f"the worker exited {run.returncode} without a result: {tail}",
                  seconds=time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ install
def install(venv: Path, log) -> list[Result]:
    """Create `venv` and pip install INSTALLS into it, each on its own; one row per package."""
    rows = []
    python = venv / "bin" / "python"
    if not python.exists():
        # The stdlib venv needs ensurepip (Debian: python3-venv); otherwise virtualenv from PyPI does the same.
        made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            log.write(f"python -m venv failed:\n{made.stderr}\n")
            subprocess.run([sys.executable, "-m", "pip", "install", "--user", "virtualenv"], capture_output=True)
            made = subprocess.run([sys.executable, "-m", "virtualenv", "--system-site-packages", str(venv)],
                                  capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"cannot create a virtual environment at {venv}: {made.stderr.strip()[-300:]}; "
                               "install python3-venv, or run with --no-install in an environment you prepared")
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    for label, arguments in INSTALLS:
        start = time.perf_counter()
        run = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints),
                              *arguments], capture_output=True, text=True)
        log.write(f"$ pip install {' '.join(arguments)}\n{run.stdout}{run.stderr}\n")
        seconds = time.perf_counter() - start
        if run.returncode == 0:
            rows.append(Result(f"install {label}", "pass", f"{seconds:.0f} s", "", " ".join(arguments), seconds=seconds))
        else:
            reason = " ".join(line for line in run.stderr.strip().splitlines() if "ERROR" in line)[-300:]
            rows.append(Result(f"install {label}", "fail", f"{seconds:.0f} s", "",
                               f"pip install {' '.join(arguments)} failed: {reason or run.stderr[-300:]}", seconds=seconds))
    return rows


# ------------------------------------------------------------------------------------------------ main
def table(rows: list[Result], header: str) -> str:
    lines = [header, "", "| check | result | measured | planned / expected | note | s |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row.check, row.status, row.measured, row.expected, row.note, f"{row.seconds:.0f}"]
        lines.append("| " + " | ".join(str(cell).replace("|", "/").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines)


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        return f"no CUDA device, torch {torch.__version__}"
    except Exception as error:
        return f"torch does not import ({error})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, no install: run every check's code at tiny sizes")
    parser.add_argument("--no-install", action="store_true", help="use this Python's packages")
    parser.add_argument("--install-only", action="store_true", help="create and fill the venv, print its rows, stop")
    parser.add_argument("--venv", default=str(REPO / ".gpu-check-venv"))
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all checks, install not counted (default 450; --dry-run 1800)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--install-rows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [c.name for c in CHECKS]
    selected = names if args.only is None else [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(names))
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(unknown)}; the checks are {', '.join(names)}")
    if args.worker:
        result = worker(args.worker, args.dry_run)
        print(RESULT_PREFIX + json.dumps(asdict(result), default=str), flush=True)
        return 0

    rows: list[Result] = []
    if not args.dry_run and not args.no_install:
        venv = Path(args.venv)
        started = time.perf_counter()
        with open(str(venv) + ".install.log", "a") as log:
            rows = install(venv, log)
        print(f"install: {time.perf_counter() - started:.0f} s (log: {venv}.install.log)", flush=True)
        rows_file = str(venv) + ".install.json"
        Path(rows_file).write_text(json.dumps([asdict(row) for row in rows]))
        if args.install_only:
            print(table(rows, f"gpu_check.py, install into {venv}"))
            return 1 if any(row.status == "fail" for row in rows) else 0
        forwarded = list(argv if argv is not None else sys.argv[1:])
        return subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).resolve()), "--no-install",
                               "--install-rows", rows_file, *forwarded]).returncode
    # Inside the venv (after --install-only, or re-run by the install): its install rows head the table.
    install_rows = args.install_rows or (sys.prefix + ".install.json" if os.path.exists(sys.prefix + ".install.json") else None)
    if install_rows and not args.dry_run:
        rows = [Result(**row) for row in json.loads(Path(install_rows).read_text())]

    if args.budget is None:
        args.budget = 1800.0 if args.dry_run else 450.0
    deadline = time.monotonic() + args.budget
    for check in CHECKS:
        if check.name not in selected:
            continue
        left = deadline - time.monotonic()
        if left < 20:
            rows.append(Result(check.name, "skipped", note=f"the --budget of {args.budget:.0f} s was spent before it"))
            continue
        timeout = check.timeout * (4 if args.dry_run else 1)  # the CPU at tiny sizes: imports dominate
        row = run_worker(check.name, args.dry_run, min(timeout, left))
        print(f"{row.check}: {row.status} ({row.seconds:.0f} s)", flush=True)
        rows.append(row)
    mode = "dry run (CPU, tiny sizes)" if args.dry_run else "GPU run"
    print(table(rows, f"gpu_check.py, {mode}: {device_name()}, Python {sys.version.split()[0]}"))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=1, default=str))
    return 1 if any(row.status == "fail" for row in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
