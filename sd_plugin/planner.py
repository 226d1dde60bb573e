"""Peak-memory planner for self-distillation training configs: `sd-plugin plan CONFIG.yml [--gpus N] [--gpu-mem 80GB]`.

Predicts the peak memory per GPU of one self-distillation step from an Axolotl-style config, term by term and
phase by phase (rollout, teacher forward, loss, backward, optimizer step), so that a long-context recipe can be
sized before a GPU is rented. Model shapes: sd_plugin/model_shapes.py; the config: sd_plugin/training_setup.py;
per-layer activations, sequence tiling and vLLM: sd_plugin/memory_terms.py. Error bar ~10-20%, not a guarantee.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace

from sd_plugin.cli import UsageError, argument_parser
from sd_plugin.files import read_config_file
from sd_plugin.memory_terms import (
    BACKWARD_TRANSIENT_FACTOR,
    forward_working_bytes_per_token,
    layer_kinds,
    saved_bytes_per_token,
    tiled_terms,
    vllm_terms,
)
from sd_plugin.model_shapes import (
    KNOWN_SHAPES,
    QWEN3_4B,
    QWEN3_5_9B,
    QWEN3_8B,
    ModelShape,
    count_parameters,
    linear_modules,
    lora_parameters,
    other_parameters,
    resolve_shape,
)
from sd_plugin.training_setup import (
    GiB,
    TrainingSetup,
    load_config,
    parse_bytes,
    setup_from_config,
)

# The planner's public names, wherever they are defined.
__all__ = [
    "KNOWN_SHAPES", "QWEN3_4B", "QWEN3_5_9B", "QWEN3_8B", "GiB", "MemoryPlan", "ModelShape", "TrainingSetup",
    "count_parameters", "linear_modules", "load_config", "lora_parameters", "main", "parse_bytes", "plan",
    "plan_memory", "read_config_file", "resolve_shape", "saved_bytes_per_token", "setup_from_config", "suggestions",
]

# ------------------------------------------------------------------------------------------- calibration
# fp32 [loss_chunk_size, vocab] buffers alive at the loss's peak (measured on CPU at V=151,936: 3.06-3.18 full,
# 4.05-4.21 top-K; see benchmarks/README.md). Sampled-token mode keeps log-probs and probabilities.
LOSS_CHUNK_BUFFERS = {"full_logits": 3.2, "topk_logits": 4.2, "sampled_token": 2.2}
# Fixed per-GPU cost: CUDA context (~0.5 GiB), cuBLAS / cuDNN workspaces, NCCL buffers, kernels.
GPU_FRAMEWORK_OVERHEAD = int(1.5 * GiB)
# On CPU: what the first training step allocates besides tensors (thread pools, autograd and optimizer
# bookkeeping, dataloader); measured as the intercept of step memory vs length in tests/test_planner.py.
CPU_FRAMEWORK_OVERHEAD = 32 * 2**20
# Caching-allocator fragmentation on a GPU, as a fraction of all other terms.
GPU_ALLOCATOR_MARGIN = 0.05
# bitsandbytes NF4: 4 bits per weight + absmax per 64-weight block (1 byte with double quantization, else fp32).
NF4_BYTES_PER_WEIGHT = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Predicted peak memory per GPU, term by term (bytes); `fits` compares `peak` with `gpu_memory`.

    weights               bf16 / fp32, or NF4 (0.5 byte per quantized weight + quantization state) for QLoRA;
                          embeddings, lm_head, norms and convolutions stay in the compute dtype
    lora_params/grads     the adapter in fp32 (peft's default), its gradients
    optimizer_states      AdamW: two fp32 states per trainable parameter (8-bit optimizers: two bytes)
    teacher_state         none for a LoRA base/live teacher (adapter disabled), fp32 Delta W per LoRA layer for a
                          LoRA EMA/sync teacher (or rank-k factors: teacher_ema_rank), a full copy without LoRA
    rollout_kv_cache      generate's KV cache at prompt + completion length (full-attention layers; linear-attention
                          layers keep a fixed-size convolution + recurrent state)
    rollout_working_set   one layer's prefill temporaries (the prompt, or one prefill_chunk_size chunk), or a decode
                          step's logits and cache copy
    student_activations   saved for backward: every layer's tensors without checkpointing, one hidden state per
                          layer with it, ~nothing with offload (tiled: sd_plugin/memory_terms.py)
    backward_working_set  one layer's recomputed activations (checkpointing) + gradients
    teacher_forward       one layer's forward temporaries of the teacher forward (no grad)
    hidden_states         final hidden states of the student and teacher forwards (+ the final norm's input)
    loss_chunks           `loss_chunk_size` x vocab fp32 buffers of the chunked loss x a measured factor
    framework_overhead    CUDA context, cuBLAS workspaces, NCCL buffers (on CPU the step's runtime bookkeeping)
    allocator_margin      fragmentation of the caching allocator (a fraction of everything else)

    The phases do not overlap in time, so the peak is the largest phase's sum (the teacher runs before the student
    forward: no saved tensors are alive then). Context parallelism divides the training terms, not the rollout.
    """

    setup: TrainingSetup
    weights: int
    lora_params: int
    lora_grads: int
    optimizer_states: int
    teacher_state: int
    rollout_kv_cache: int
    rollout_working_set: int
    student_activations: int
    backward_working_set: int
    teacher_forward: int
    hidden_states: int
    loss_chunks: int
    framework_overhead: int
    allocator_margin: int
    phases: dict[str, int]
    peak_phase: str
    peak: int
    gpu_memory: int
    fits: bool
    host_offloaded: int = 0
    vllm_engine: int = 0  # colocate: vLLM's reserved share (its weights + KV cache), beside PyTorch's allocations
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    TERMS = ("weights", "lora_params", "lora_grads", "optimizer_states", "teacher_state", "rollout_kv_cache",
             "rollout_working_set", "vllm_engine", "student_activations", "backward_working_set", "teacher_forward",
             "hidden_states", "loss_chunks", "framework_overhead", "allocator_margin")

    def terms(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.TERMS}

    @property
    def step_bytes(self) -> int:
        """What a training step adds on top of the loaded model and adapter (comparable to a measured RSS delta)."""
        return self.peak - self.weights - self.lora_params

    def summary(self) -> str:
        s = self.setup
        lines = [
            f"model: {s.shape.name}  ({count_parameters(s.shape) / 1e9:.2f}B parameters, "
            f"{s.shape.full_attention_layers} full-attention + {s.shape.linear_attention_layers} linear-attention layers)",
            f"weights: {s.weight_format}, adapter: {s.adapter or 'none (full fine-tuning)'}"
            + (f" r={s.lora_r} on {','.join(s.lora_targets)}" if s.adapter else "")
            + f", gradient checkpointing: {s.gradient_checkpointing}, attention: {s.attention}",
            f"tokens per row: student {s.prompt_length}+{s.completion_length}, teacher "
            f"{s.teacher_prompt_length}+{s.completion_length}, micro-batch {s.micro_batch_size} x "
            f"{s.num_generations} rollout(s), context parallel {s.context_parallel}, {s.gpus} GPU(s)",
            "",
            f"{'term':24s} {'GiB per GPU':>12s}",
        ]
        for name, value in self.terms().items():
            lines.append(f"{name:24s} {value / GiB:12.2f}")
        lines.append("")
        lines.append("phase peaks: " + ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.phases.items()) + " GiB")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines.append(f"peak {self.peak / GiB:.1f} GiB in phase '{self.peak_phase}' of {self.gpu_memory / GiB:.0f} GiB "
                     f"per GPU: {verdict} (headroom {(self.gpu_memory - self.peak) / GiB:+.1f} GiB)")
        if self.host_offloaded:
            lines.append(f"host memory for offloaded activations: {self.host_offloaded / GiB:.1f} GiB per GPU")
        for note in self.notes:
            lines.append(f"note: {note}")
        for suggestion in self.suggestions:
            lines.append(f"try: {suggestion}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = {name: value for name, value in self.terms().items()}
        data.update(phases=self.phases, peak_phase=self.peak_phase, peak=self.peak, gpu_memory=self.gpu_memory,
                    fits=self.fits, host_offloaded=self.host_offloaded, suggestions=self.suggestions,
                    notes=self.notes, setup={k: v for k, v in asdict(self.setup).items() if k != "shape"},
                    shape=asdict(self.setup.shape))
        return data


def _weights_bytes(setup: TrainingSetup) -> int:
    shape = setup.shape
    linear = sum(i * o * n for _, i, o, n in linear_modules(shape))
    other = other_parameters(shape)
    if setup.weight_format == "nf4":
        per_weight = NF4_BYTES_PER_WEIGHT[setup.double_quant]
        return int(linear * per_weight + other * 2)
    if setup.weight_format == "int8":
        return int(linear * (1 + 4 / 4096) + other * 2)
    element = 4 if setup.weight_format == "fp32" else 2
    return (linear + other) * element


def plan(setup: TrainingSetup, gpu_memory: int = 80 * GiB, *, suggest: bool = True) -> MemoryPlan:
    """Predict the peak memory per GPU of one training step of `setup`."""
    shape, b = setup.shape, setup.compute_bytes
    cp = max(1, setup.context_parallel)
    rows = setup.micro_batch_size * setup.num_generations
    student_tokens = rows * (setup.prompt_length + setup.completion_length)
    teacher_tokens = rows * (setup.teacher_prompt_length + setup.completion_length)
    completion_tokens = rows * setup.completion_length
    notes: list[str] = []

    weights = _weights_bytes(setup)
    if setup.adapter:
        trainable = lora_parameters(shape, setup.lora_targets, setup.lora_r)
        lora_params = trainable * setup.lora_bytes
        lora_grads = trainable * setup.lora_bytes
    else:
        trainable = count_parameters(shape)
        lora_params = 0
        lora_grads = trainable * (4 if setup.weight_format == "fp32" else 2)
    optimizer_states = int(trainable * setup.optimizer_state_bytes)
    # AdamW's foreach step keeps about one parameter-sized temporary.
    optimizer_temp = trainable * 4

    if setup.teacher == "live" or (setup.adapter and setup.teacher == "base"):
        teacher_state = 0
    elif setup.adapter and setup.teacher_ema_rank:
        # Factors [out, k] and [k, in] per adapted layer, plus the [out, k + r] / [k + r, in] sum during an update.
        rank = setup.teacher_ema_rank + setup.lora_r
        teacher_state = sum(rank * (i + o) * n for name, i, o, n in linear_modules(shape) if name in setup.lora_targets) * 4
    elif setup.adapter:
        teacher_state = sum(i * o * n for name, i, o, n in linear_modules(shape) if name in setup.lora_targets) * 4
        notes.append("the LoRA EMA/sync teacher keeps a dense fp32 Delta W per adapted layer (teacher_state); "
                     "teacher_ema_rank: 2-4x lora_r keeps it as low-rank factors instead")
    else:
        teacher_state = weights

    # Rollout: the KV cache of full-attention layers grows with length; linear-attention layers keep fixed states.
    rollout_tokens = student_tokens
    kv_per_token = shape.full_attention_layers * 2 * shape.kv_dim * b
    linear_state = shape.linear_attention_layers * rows * (
        shape.linear_conv_dim * (shape.linear_conv_kernel_dim - 1) * b
        + shape.linear_num_value_heads * shape.linear_key_head_dim * shape.linear_value_head_dim * 4
    )
    rollout_kv_cache = int(kv_per_token * rollout_tokens + linear_state)
    # Prefill: one forward over the prompt, or over one chunk at a time (the cache holds the earlier chunks).
    prefill_tokens = rows * min(setup.prompt_length, setup.prefill_chunk_size or setup.prompt_length)
    # Each cached forward (a decode step, a prefill chunk) concatenates a layer's keys/values into new tensors:
    # for a moment one full-attention layer's K/V exist twice.
    cache_copy = kv_per_token // max(1, shape.full_attention_layers) * rollout_tokens
    decode_extras = rows * shape.vocab_size * 4 * 4 + cache_copy  # last-token logits, softmax, sampling buffers
    # A chunk attends to the cached earlier chunks: the cache copies one layer's K/V, and without flash-attention
    # the [chunk, T] mask is materialized (bool, converted for the SDPA kernel), as in the tiled forward.
    chunk_attention = 0
    if setup.prefill_chunk_size and shape.full_attention_layers:
        chunk_attention = cache_copy
        if setup.attention != "flash":
            chunk_attention += (1 + b) * prefill_tokens * setup.prompt_length
    rollout_working_set = int(max(forward_working_bytes_per_token(setup) * prefill_tokens + chunk_attention
                                  + rows * shape.vocab_size * 4, decode_extras))
    if setup.prefill_chunk_size and setup.vllm_mode is None:
        chunks = math.ceil(setup.prompt_length / setup.prefill_chunk_size)
        notes.append(f"prefill_chunk_size {setup.prefill_chunk_size}: the rollout's prefill runs in {chunks} chunk(s); "
                     f"its working set is one chunk's")

    # Student forward (with grad): what stays saved for backward until the backward reaches each layer.
    saved = {kind: saved_bytes_per_token(setup, kind) for kind, _ in layer_kinds(shape)}
    all_layers_saved = sum(saved[kind] * n for kind, n in layer_kinds(shape))
    checkpoint_per_token = shape.num_layers * b * shape.hidden_size
    shard_tokens = math.ceil(student_tokens / cp)
    host_offloaded = 0
    if setup.gradient_checkpointing == "none":
        student_activations = int(all_layers_saved * shard_tokens)
    elif setup.gradient_checkpointing == "full":
        student_activations = int(checkpoint_per_token * shard_tokens)
    else:  # offload: layer inputs go to pinned host memory; about two layers are in flight on the GPU
        student_activations = int(2 * b * shape.hidden_size * shard_tokens)
        host_offloaded = int(checkpoint_per_token * shard_tokens)
    transient = BACKWARD_TRANSIENT_FACTOR * forward_working_bytes_per_token(setup) * shard_tokens
    recompute = 0 if setup.gradient_checkpointing == "none" else max(saved.values()) * shard_tokens
    backward_working_set = int(recompute + transient)

    teacher_forward = int(forward_working_bytes_per_token(setup) * math.ceil(teacher_tokens / cp))
    # Decoder outputs kept by the completion slices (student + teacher), plus the final norm's fp32 input.
    final_norm_bytes = b if setup.liger_rms_norm else 4
    hidden_states = int((b * shape.hidden_size * (student_tokens + teacher_tokens)
                         + final_norm_bytes * shape.hidden_size * student_tokens) / cp)
    buffers = LOSS_CHUNK_BUFFERS.get(setup.distillation_mode, LOSS_CHUNK_BUFFERS["full_logits"])
    chunk = min(setup.loss_chunk_size, max(1, math.ceil(completion_tokens / cp)))
    loss_chunks = int(buffers * chunk * shape.vocab_size * 4 + 2 * b * shape.hidden_size * completion_tokens / cp)

    if setup.sequence_tile_size:
        tiled = tiled_terms(setup, saved)
        student_activations, backward_working_set = tiled["student_activations"], tiled["backward_working_set"]
        teacher_forward, hidden_states, host_offloaded = tiled["teacher_forward"], tiled["hidden_states"], tiled["host_offloaded"]
        notes.append(f"sequence_tile_size {setup.sequence_tile_size}: activations per tile; kept for backward: "
                     f"{'host-offloaded' if setup.sequence_tile_offload else 'one'} [T, hidden] per layer, K/V of the "
                     f"full-attention layers, the Gated DeltaNet state at each tile border")

    persistent = weights + lora_params + optimizer_states + teacher_state
    phases = {
        "rollout": persistent + rollout_kv_cache + rollout_working_set,
        # The teacher runs before the student forward: none of the student's activations exist yet.
        "teacher_forward": persistent + teacher_forward + hidden_states // 2,
        "loss": persistent + student_activations + hidden_states + loss_chunks,
        "backward": persistent + student_activations + backward_working_set + lora_grads + hidden_states // 2,
        "optimizer": persistent + lora_grads + optimizer_temp,
    }
    on_gpu = setup.device != "cpu"
    vllm_engine = vllm_terms(setup, gpu_memory, persistent, rollout_kv_cache, phases, notes)
    if setup.vllm_mode is not None:
        rollout_kv_cache = rollout_working_set = 0  # vLLM samples: the trainer runs no generate
    framework_overhead = GPU_FRAMEWORK_OVERHEAD if on_gpu else CPU_FRAMEWORK_OVERHEAD
    peak_phase = max(phases, key=phases.get)
    # vLLM's share is a fixed reservation: the allocator margin covers PyTorch's own allocations only.
    in_allocator = phases[peak_phase] - (vllm_engine if peak_phase == "rollout" or not setup.vllm_sleep_mode else 0)
    allocator_margin = int(GPU_ALLOCATOR_MARGIN * in_allocator) if on_gpu else 0
    peak = phases[peak_phase] + framework_overhead + allocator_margin

    if setup.attention == "eager" and student_tokens > 8192:
        notes.append("eager attention keeps [heads, T, T] scores (not counted): use flash_attention: true")
    if cp > 1:
        notes.append(f"context parallel {cp}: training activations are split; each rank still generates over the "
                     f"whole prompt (rollout terms are not split). The plugin's trainers do not support context "
                     f"parallelism yet (the Axolotl schema rejects it): this is what it would take")
    plan_result = MemoryPlan(
        setup=setup, weights=weights, lora_params=lora_params, lora_grads=lora_grads,
        optimizer_states=optimizer_states, teacher_state=teacher_state, rollout_kv_cache=rollout_kv_cache,
        rollout_working_set=rollout_working_set, student_activations=student_activations,
        backward_working_set=backward_working_set, teacher_forward=teacher_forward, hidden_states=hidden_states,
        loss_chunks=loss_chunks, framework_overhead=framework_overhead, allocator_margin=allocator_margin,
        phases=phases, peak_phase=peak_phase, peak=peak, gpu_memory=gpu_memory, fits=peak <= gpu_memory,
        host_offloaded=host_offloaded, vllm_engine=vllm_engine, notes=notes,
    )
    if suggest and not plan_result.fits:
        plan_result.suggestions = suggestions(setup, gpu_memory)
    return plan_result


def suggestions(setup: TrainingSetup, gpu_memory: int) -> list[str]:
    """Single changes that make `setup` fit, each with its predicted peak (empty if none does)."""
    candidates: list[tuple[str, TrainingSetup]] = []
    if setup.gradient_checkpointing == "none":
        candidates.append(("gradient_checkpointing: true", replace(setup, gradient_checkpointing="full")))
    if setup.gradient_checkpointing != "offload":
        candidates.append(("gradient_checkpointing: offload (activation offloading)",
                           replace(setup, gradient_checkpointing="offload")))
    if setup.loss_chunk_size > 32:
        candidates.append((f"loss_chunk_size: {setup.loss_chunk_size // 4}",
                           replace(setup, loss_chunk_size=setup.loss_chunk_size // 4)))
    if setup.weight_format in ("bf16", "fp16", "fp32") and setup.adapter:
        candidates.append(("adapter: qlora + load_in_4bit: true", replace(setup, adapter="qlora", weight_format="nf4")))
    if setup.optimizer_state_bytes > 2:
        candidates.append(("optimizer: adamw_bnb_8bit", replace(setup, optimizer_state_bytes=2.0)))
    if setup.adapter and setup.teacher == "ema" and not setup.teacher_ema_rank:
        candidates.append((f"teacher_ema_rank: {4 * setup.lora_r}", replace(setup, teacher_ema_rank=4 * setup.lora_r)))
    if not (setup.liger_rms_norm and setup.liger_glu):
        candidates.append(("Axolotl's Liger plugin with liger_rms_norm + liger_glu_activation",
                           replace(setup, liger_rms_norm=True, liger_glu=True)))
        if setup.optimizer_state_bytes > 2:
            candidates.append(("Liger (liger_rms_norm + liger_glu_activation) + optimizer: adamw_bnb_8bit",
                               replace(setup, liger_rms_norm=True, liger_glu=True, optimizer_state_bytes=2.0)))
    if setup.gradient_checkpointing != "offload":
        both = replace(setup, gradient_checkpointing="offload")
        if setup.weight_format in ("bf16", "fp16") and setup.adapter:
            candidates.append(("qlora + gradient_checkpointing: offload",
                               replace(both, adapter="qlora", weight_format="nf4")))
    if setup.vllm_mode == "colocate" and not setup.vllm_sleep_mode:
        candidates.append(("vllm_enable_sleep_mode: true", replace(setup, vllm_sleep_mode=True)))
    if setup.vllm_mode == "colocate":
        candidates.append(("vllm_mode: server (vLLM on another GPU)", replace(setup, vllm_mode="server")))
    if not setup.sequence_tile_size and setup.prompt_length + setup.completion_length > 8192:
        candidates.append(("sequence_tile_size: 4096 + sequence_tile_offload: true (Qwen3 / Qwen3.5)",
                           replace(setup, sequence_tile_size=4096, sequence_tile_offload=True)))
    if setup.vllm_mode is None and not setup.prefill_chunk_size and setup.prompt_length > 8192:
        candidates.append(("prefill_chunk_size: 4096", replace(setup, prefill_chunk_size=4096)))
    shorter = max(1024, setup.prompt_length // 2)
    if shorter < setup.prompt_length:
        candidates.append((f"max_prompt_length / max_teacher_prompt_length: {shorter}",
                           replace(setup, prompt_length=shorter, teacher_prompt_length=min(setup.teacher_prompt_length, shorter))))
    found = []
    for label, candidate in candidates:
        result = plan(candidate, gpu_memory, suggest=False)
        if result.fits:
            found.append(f"{label} -> peak {result.peak / GiB:.1f} GiB")
    if not found:
        found.append("no single change fits: combine QLoRA, activation offloading and Liger, "
                     "or shorten prompts / rollouts")
    return found


def plan_memory(config: dict | str, *, gpus: int | None = None, gpu_memory: int | str = "80GB",
                device: str | None = None) -> MemoryPlan:
    """Plan a config (a parsed YAML dict or a path to one): peak memory per GPU and whether it fits.

    device: "cuda" (default; adds the CUDA context and allocator margin) or "cpu" (a config's `device:` key
    is used when not given).
    """
    cfg = load_config(config) if isinstance(config, (str, os.PathLike)) else dict(config)
    if device:
        cfg["device"] = device
    setup = setup_from_config(cfg, gpus=gpus)
    return plan(setup, parse_bytes(gpu_memory))


def main(argv: list[str] | None = None) -> int:
    """`sd-plugin plan CONFIG.yml [--gpus N] [--gpu-mem 80GB] [--device cuda|cpu] [--json]`; exit 0 if it fits, 1 if
    not, 2 on bad input."""
    parser = argument_parser("plan", "Predict the peak GPU memory of a config (exit 0: fits, 1: does not fit).")
    parser.add_argument("config", help="Axolotl YAML config with the plugin's sdft/sdpo/sdzero block")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (default: the context-parallel size)")
    parser.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 80GB or 24GB (GB = GiB)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: the config's device:, else cuda")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    config = read_config_file(args.config)
    try:
        result = plan_memory(config, gpus=args.gpus, gpu_memory=args.gpu_mem, device=args.device)
    except ValueError as error:  # an unknown model, a bad size or option value
        raise UsageError(f"{args.config}: {error}") from None
    if args.gpus and args.gpus > 1 and result.setup.context_parallel == 1:
        result.notes.append(f"{args.gpus} GPUs, data parallel: each GPU holds whole sequences")
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
