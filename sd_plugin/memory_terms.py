"""Per-token activation bytes of one decoder layer, and the planner's terms for sequence tiling and vLLM.

Counted from the modules' code (transformers' Qwen3 / Qwen3.5, peft LoRA, sd_plugin/tiling.py); the one fitted
number, BACKWARD_TRANSIENT_FACTOR, comes from CPU measurements (tests/test_planner.py).
"""

from __future__ import annotations

import math

from sd_plugin.model_shapes import ModelShape, count_parameters, linear_modules
from sd_plugin.training_setup import GiB, TrainingSetup

# Backward through one layer: gradients alive at once beyond the tensors it frees, as a fraction of the layer's
# no-grad forward working set. Fitted on CPU with and without gradient checkpointing (tests/test_planner.py:
# 0.2-0.3 fit both within 15%; 0.3 is the conservative end).
BACKWARD_TRANSIENT_FACTOR = 0.3


def saved_bytes_per_token(setup: TrainingSetup, kind: str) -> float:
    """Bytes the autograd graph keeps per token for one decoder layer of `kind` ("full" / "linear").

    Counted from the modules' code (transformers' Qwen3 / Qwen3.5, peft LoRA): eager RMSNorm keeps an fp32 copy
    of its input (4 B per element; Liger's keeps the input itself); the attention kernel keeps q, k, v and its
    output; the SiLU MLP keeps gate, silu(gate), up and their product (Liger's SwiGLU: gate, up, product); each
    LoRA layer keeps its B input (rank values) and, in mixed precision (fp32 adapter, bf16 compute under
    autocast), its own bf16 copy of the layer input. tests/test_planner.py checks the fp32 case against
    saved-tensor hooks.
    """
    shape, b = setup.shape, setup.compute_bytes
    hidden, inter = shape.hidden_size, shape.intermediate_size
    targets = set(setup.lora_targets)
    mixed = setup.lora_bytes != b  # fp32 adapters, bf16 compute: autocast casts the input again for lora_A
    sizes = {name: (i, o) for name, i, o, _ in linear_modules(shape)}

    def lora(name: str) -> float:
        if name not in targets or name not in sizes:
            return 0.0
        if mixed:
            return setup.lora_r * b + b * sizes[name][0]
        return setup.lora_r * setup.lora_bytes

    def norm_input(width: int) -> float:
        """What an RMSNorm over `width` keeps: its input (fp32 copy unless Liger) and the rsqrt per row."""
        return (b if setup.liger_rms_norm else 4) * width + 4

    total = 2 * (norm_input(hidden) + b * hidden)  # input and post-attention RMSNorm: input, rstd, output
    total += (3 if setup.liger_glu else 4) * b * inter  # MLP: gate, [silu(gate)], up, product (down's input)
    total += sum(lora(n) for n in ("gate_proj", "up_proj", "down_proj"))
    if kind == "full":
        q, kv = shape.query_dim, shape.kv_dim
        # q_norm / k_norm inputs (in fp32 the query is a view of q_proj's [query, gate] output) + rsqrt per head.
        query_storage = 2 * q if shape.attn_output_gate and b == 4 and not setup.liger_rms_norm else q
        total += (b if setup.liger_rms_norm else 4) * (query_storage + kv)
        total += 4 * (shape.num_attention_heads + shape.num_key_value_heads)
        total += b * (2 * q + 2 * kv) + 4 * shape.num_attention_heads  # attention: q, k, v, out, logsumexp
        if setup.attention == "eager":
            total += b * q  # output transposed into a contiguous copy for o_proj (flash / sdpa: a view)
        if shape.attn_output_gate:
            total += 3 * b * q  # sigmoid(gate), gated output, its copy as o_proj's input
        total += sum(lora(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    else:
        # Gated DeltaNet with the fla / causal-conv1d kernels (GPU). transformers' CPU fallback for the delta rule
        # keeps per-chunk [64, 64] matrices and saves about 3.5x more (not modelled).
        conv, key, value = shape.linear_conv_dim, shape.linear_key_dim, shape.linear_value_dim
        heads_ratio = max(1, shape.linear_num_value_heads // max(1, shape.linear_num_key_heads))
        total += 2 * b * conv  # conv input (in_proj_qkv output) and output (q, k, v)
        if heads_ratio > 1:
            total += 2 * b * key * heads_ratio  # q and k repeated to the value heads
        total += 8 * shape.linear_num_value_heads  # beta, g (fp32)
        total += b * 64 * shape.linear_num_value_heads  # the kernel's intra-chunk matrix A (chunks of 64)
        total += b * value  # delta-rule output
        total += 12 * value + b * value  # gated RMSNorm: fp32 input, fp32 gate, silu(gate); normalized output
        total += b * value  # out_proj input
        total += sum(lora(n) for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"))
    return total


def forward_working_bytes_per_token(setup: TrainingSetup) -> float:
    """One layer's no-grad forward temporaries per token: the MLP's gate/up/product + residual and norm."""
    shape, b = setup.shape, setup.compute_bytes
    mlp = 3 * b * shape.intermediate_size
    attention = b * (2 * shape.query_dim * (2 if shape.attn_output_gate else 1) + 2 * shape.kv_dim)
    if shape.linear_attention_layers:
        attention = max(attention, b * (3 * shape.linear_conv_dim + 2 * shape.linear_value_dim))
    return max(mlp, attention) + 3 * b * shape.hidden_size + 4 * shape.hidden_size


def layer_kinds(shape: ModelShape) -> list[tuple[str, int]]:
    kinds = [("full", shape.full_attention_layers), ("linear", shape.linear_attention_layers)]
    return [(kind, n) for kind, n in kinds if n > 0]


def vllm_terms(setup: TrainingSetup, gpu_memory: int, persistent: int, rollout_kv_cache: int,
               phases: dict[str, int], notes: list[str]) -> int:
    """With vLLM, rewrite the phases in place and return vLLM's share on a training GPU.

    colocate: vLLM reserves `vllm_gpu_memory_utilization` of the GPU for its weights (bf16, adapter merged) and
    KV cache; the rollout phase holds it instead of generate's KV cache and working set, and every other phase
    holds it too unless sleep mode releases it (sleep level 2: weights and cache freed; the few hundred MiB it
    keeps, CUDA graphs and its context, are not counted). server: vLLM runs on its own GPU(s).
    """
    if setup.vllm_mode is None:
        return 0
    if setup.vllm_mode == "server":
        phases["rollout"] = persistent
        notes.append("vllm_mode: server: vLLM runs on its own GPU(s) (`trl vllm-serve`), not counted here")
        return 0
    share = int(setup.vllm_gpu_memory_utilization * gpu_memory)
    needed = count_parameters(setup.shape) * 2 + int(rollout_kv_cache * 2 / setup.compute_bytes)
    if share < needed:
        notes.append(f"vLLM's share ({share / GiB:.1f} GiB) is below its bf16 weights + one micro-batch's KV cache "
                     f"({needed / GiB:.1f} GiB): raise vllm_gpu_memory_utilization")
    phases["rollout"] = persistent + share
    for name in phases:
        if name != "rollout" and not setup.vllm_sleep_mode:
            phases[name] += share
    return share


def tiled_terms(setup: TrainingSetup, saved: dict[str, float]) -> dict[str, int]:
    """Training terms with `sequence_tile_size` (sd_plugin/tiling.py): what scales with T, what with the tile.

    Kept from the student forward to its backward: each layer's input [T, H] (in host memory with
    sequence_tile_offload; the embeddings stay on the device), the keys/values of every full-attention layer, and
    each Gated DeltaNet layer's recurrent state + (conv_kernel - 1) convolution columns at every tile border.
    Backward: one tile of one layer recomputed (its saved tensors + transient), the [tile, T] attention mask,
    the gradients of one layer's output and input [T, H] and of its keys/values. The teacher (no grad) keeps a
    layer's input and output [T, H], its keys/values and one tile's temporaries; only the completion
    positions' hidden states leave either forward.

    The attention core is CUDA's memory-efficient kernel (tiling.fused_attention_kernel): it keeps its output
    and log-sum-exp, never [heads, tile, T] scores. What it needs beyond the model's keys/values: the K/V heads
    repeated to the query heads ([T, query_dim] each, `tiling.expand_kv_heads`) and, in backward, their
    gradients before they are summed back to the K/V heads; the boolean [tile, T] mask and its additive copy in
    the compute dtype.
    """
    shape, b = setup.shape, setup.compute_bytes
    rows = setup.micro_batch_size * setup.num_generations
    student_length = setup.prompt_length + setup.completion_length
    teacher_length = setup.teacher_prompt_length + setup.completion_length
    student_tokens, teacher_tokens = rows * student_length, rows * teacher_length
    tile = min(setup.sequence_tile_size, student_length)
    tile_tokens = rows * tile
    row = b * shape.hidden_size  # one token of one [T, H] hidden state
    kv = 2 * shape.kv_dim * b    # one token of one layer's keys + values
    tiles = math.ceil(student_length / tile)
    carry = shape.linear_attention_layers * rows * tiles * (
        shape.linear_conv_dim * (shape.linear_conv_kernel_dim - 1) * b
        + shape.linear_num_value_heads * shape.linear_key_head_dim * shape.linear_value_head_dim * 4)
    layer_inputs = shape.num_layers * row * student_tokens
    kept_kv = shape.full_attention_layers * kv * student_tokens
    if setup.sequence_tile_offload:
        student_activations, host_offloaded = row * student_tokens + kept_kv + carry, layer_inputs
    else:
        student_activations, host_offloaded = layer_inputs + kept_kv + carry, 0
    mask = (1 + b) * tile_tokens * student_length  # bool [tile, T], converted for the attention kernel
    # K/V repeated to the query heads for the memory-efficient kernel (per token; 0 without grouped heads), and in
    # backward also their gradients; without grouping, the gradients of the K/V slices the tile reads.
    grouped = shape.num_attention_heads > shape.num_key_value_heads
    expanded = 2 * shape.query_dim * b if grouped else 0
    expanded_backward = 2 * expanded if grouped else kv
    working = forward_working_bytes_per_token(setup)
    backward = (max(saved.values()) + BACKWARD_TRANSIENT_FACTOR * working) * tile_tokens + mask
    backward += 2 * row * student_tokens
    if shape.full_attention_layers:
        backward += (kv + expanded_backward) * student_tokens
    teacher_tile = rows * min(setup.sequence_tile_size, teacher_length)
    teacher = (working * teacher_tile + (1 + b) * teacher_tile * teacher_length + 3 * row * teacher_tokens
               + ((kv + expanded) * teacher_tokens if shape.full_attention_layers else 0))
    completion_tokens = rows * setup.completion_length
    hidden_states = 2 * row * completion_tokens + (b if setup.liger_rms_norm else 4) * shape.hidden_size * completion_tokens
    return {"student_activations": int(student_activations), "backward_working_set": int(backward),
            "teacher_forward": int(teacher), "hidden_states": int(hidden_states), "host_offloaded": int(host_offloaded)}
