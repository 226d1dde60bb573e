"""Peak-memory planner for self-distillation training configs: `sd-plugin plan CONFIG.yml [--gpus N] [--gpu-mem 80GB]`.

It reads an Axolotl-style YAML config (the model, adapter, quantization, gradient checkpointing, batch, optimizer,
context parallelism and the plugin's `sdft:` / `sdpo:` / `sdzero:` block) and predicts the peak memory per GPU of
one self-distillation step, term by term:

    weights               bf16 / fp32, or NF4 (0.5 byte per quantized weight + quantization state) for QLoRA;
                          embeddings, lm_head, norms and convolutions stay in the compute dtype
    lora_params/grads     the adapter in fp32 (peft's default), its gradients
    optimizer_states      AdamW: two fp32 states per trainable parameter (8-bit optimizers: two bytes)
    teacher_state         the teacher's own weights: none for a LoRA base/live teacher (adapter disabled),
                          fp32 Delta W per LoRA layer for a LoRA EMA/sync teacher (or its rank-k factors with
                          teacher_ema_rank), a full copy without LoRA
    rollout_kv_cache      generation's KV cache at prompt + completion length (full-attention layers only;
                          linear-attention layers keep a fixed-size convolution + recurrent state)
    rollout_working_set   one layer's forward temporaries during the prompt prefill (no grad; with
                          prefill_chunk_size one chunk's), or a decode step's logits and cache copy
    student_activations   tensors saved for backward by the student forward: every layer's saved tensors
                          without checkpointing, one hidden state per layer with it, ~nothing with offload
    backward_working_set  during backward: one layer's recomputed activations (checkpointing) + gradients
    teacher_forward       one layer's forward temporaries of the teacher forward (no grad)
    hidden_states         final hidden states of the student and teacher forwards (+ the final norm's input)
    loss_chunks           `loss_chunk_size` x vocab fp32 buffers of the chunked loss x a measured factor
    framework_overhead    CUDA context, cuBLAS workspaces, NCCL buffers (fixed; on CPU the step's runtime bookkeeping)
    allocator_margin      fragmentation of the caching allocator (a fraction of everything else)

Sequence-proportional training terms (student activations, backward working set, teacher forward, hidden
states) are divided by the context-parallel size. The rollout is NOT divided: each rank generates its own
completion over the whole prompt (conservative). The step's phases do not overlap in time, so the peak is
the largest phase: rollout, teacher forward (runs before the student forward, so no saved tensors are alive),
loss, backward, optimizer step.

Calibration: the per-layer saved-tensor counts follow the modules' code (transformers' Qwen3 / Qwen3.5,
peft LoRA, eager RMSNorm that keeps an fp32 copy of its input); the loss factor (3.2 fp32 [chunk, V] buffers
in full-vocabulary mode, 4.2 in top-K mode) and the backward transient were measured on CPU with tiny models
(tests/test_planner.py checks the predicted step memory against measured peak RSS within 25%). GPU kernels
(flash-attention, fla's gated delta rule) save about what is counted here; allocator behaviour on a GPU is
covered by `allocator_margin`. Treat the result as a plan with a ~10-20% error bar, not a guarantee.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace

from sd_plugin.cli import UsageError, argument_parser

GiB = 2**30

# ------------------------------------------------------------------------------------------- calibration
# fp32 [loss_chunk_size, vocab] buffers alive at the loss's peak (measured on CPU at V=151,936: 3.06-3.18 full,
# 4.05-4.21 top-K; see benchmarks/README.md). Sampled-token mode keeps log-probs and probabilities.
LOSS_CHUNK_BUFFERS = {"full": 3.2, "topk": 4.2, "sampled": 2.2}
# Backward through one layer: gradients alive at once beyond the tensors it frees, as a fraction of the layer's
# no-grad forward working set. Fitted on CPU with and without gradient checkpointing (tests/test_planner.py:
# 0.2-0.3 fit both within 15%; 0.3 is the conservative end).
BACKWARD_TRANSIENT_FACTOR = 0.3
# Fixed per-GPU cost: CUDA context (~0.5 GiB), cuBLAS / cuDNN workspaces, NCCL buffers, kernels.
GPU_FRAMEWORK_OVERHEAD = int(1.5 * GiB)
# On CPU: what the first training step allocates besides tensors (thread pools, autograd and optimizer
# bookkeeping, dataloader); measured as the intercept of step memory vs length in tests/test_planner.py.
CPU_FRAMEWORK_OVERHEAD = 32 * 2**20
# Caching-allocator fragmentation on a GPU, as a fraction of all other terms.
GPU_ALLOCATOR_MARGIN = 0.05
# bitsandbytes NF4: 4 bits per weight + absmax per 64-weight block (1 byte with double quantization, else fp32).
NF4_BYTES_PER_WEIGHT = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}


# ------------------------------------------------------------------------------------------- model shapes
@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the planner needs (text trunk of a Qwen3 / Qwen3.5-style decoder)."""

    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    full_attention_layers: int
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    attn_output_gate: bool = False
    tie_word_embeddings: bool = False

    @property
    def linear_attention_layers(self) -> int:
        return self.num_layers - self.full_attention_layers

    @property
    def query_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    @classmethod
    def from_hf_config(cls, config: dict, name: str = "model") -> "ModelShape":
        """From a transformers config dict (config.json; a multimodal config's `text_config` is used)."""
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"]
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        layers = config["num_hidden_layers"]
        layer_types = config.get("layer_types")
        if layer_types:
            full_layers = sum(1 for t in layer_types if t != "linear_attention")
        elif config.get("full_attention_interval"):
            full_layers = layers // int(config["full_attention_interval"])
        else:
            full_layers = layers
        model_type = str(config.get("model_type", ""))
        return cls(
            name=name,
            hidden_size=hidden,
            num_layers=layers,
            vocab_size=config["vocab_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            full_attention_layers=full_layers,
            linear_num_key_heads=config.get("linear_num_key_heads", 0) or 0,
            linear_num_value_heads=config.get("linear_num_value_heads", 0) or 0,
            linear_key_head_dim=config.get("linear_key_head_dim", 0) or 0,
            linear_value_head_dim=config.get("linear_value_head_dim", 0) or 0,
            linear_conv_kernel_dim=config.get("linear_conv_kernel_dim", 4) or 4,
            attn_output_gate=bool(config.get("attn_output_gate", model_type.startswith("qwen3_5"))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


QWEN3_5_9B = ModelShape(
    name="Qwen3.5-9B (text trunk)", hidden_size=4096, num_layers=32, vocab_size=248320, intermediate_size=12288,
    num_attention_heads=16, num_key_value_heads=4, head_dim=256, full_attention_layers=8,
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, attn_output_gate=True, tie_word_embeddings=False,
)
QWEN3_8B = ModelShape(
    name="Qwen3-8B", hidden_size=4096, num_layers=36, vocab_size=151936, intermediate_size=12288,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, full_attention_layers=36, tie_word_embeddings=False,
)
QWEN3_4B = ModelShape(
    name="Qwen3-4B", hidden_size=2560, num_layers=36, vocab_size=151936, intermediate_size=9728,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, full_attention_layers=36, tie_word_embeddings=True,
)
# Lower-cased hub names (any owner) -> shape, for configs whose model is not on this machine.
KNOWN_SHAPES = {
    "qwen3.5-9b": QWEN3_5_9B,
    "qwen3.5-9b-base": QWEN3_5_9B,
    "qwen3-8b": QWEN3_8B,
    "qwen3-8b-base": QWEN3_8B,
    "qwen3-4b": QWEN3_4B,
    "qwen3-4b-base": QWEN3_4B,
    "qwen3-4b-instruct-2507": QWEN3_4B,
}


def resolve_shape(cfg: dict) -> ModelShape:
    """`model_config:` inline dict > local `base_model` directory with config.json > the built-in table."""
    base_model = str(cfg.get("base_model") or "")
    if cfg.get("model_config"):
        return ModelShape.from_hf_config(dict(cfg["model_config"]), name=base_model or "model_config")
    config_path = os.path.join(base_model, "config.json")
    if base_model and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            return ModelShape.from_hf_config(json.load(handle), name=base_model)
    key = base_model.rstrip("/").split("/")[-1].lower()
    if key in KNOWN_SHAPES:
        return KNOWN_SHAPES[key]
    raise ValueError(
        f"unknown model {base_model!r}: give a local base_model directory with config.json, a `model_config:` "
        f"block with the architecture (hidden_size, num_hidden_layers, ...), or one of {sorted(KNOWN_SHAPES)}"
    )


# ------------------------------------------------------------------------------------------- parameters
def linear_modules(shape: ModelShape) -> list[tuple[str, int, int, int]]:
    """Every decoder linear layer as (name, in_features, out_features, how many in the model)."""
    full, linear, layers = shape.full_attention_layers, shape.linear_attention_layers, shape.num_layers
    hidden, inter = shape.hidden_size, shape.intermediate_size
    query_out = shape.query_dim * (2 if shape.attn_output_gate else 1)
    modules = [
        ("q_proj", hidden, query_out, full),
        ("k_proj", hidden, shape.kv_dim, full),
        ("v_proj", hidden, shape.kv_dim, full),
        ("o_proj", shape.query_dim, hidden, full),
        ("gate_proj", hidden, inter, layers),
        ("up_proj", hidden, inter, layers),
        ("down_proj", inter, hidden, layers),
    ]
    if linear:
        modules += [
            ("in_proj_qkv", hidden, shape.linear_conv_dim, linear),
            ("in_proj_z", hidden, shape.linear_value_dim, linear),
            ("in_proj_b", hidden, shape.linear_num_value_heads, linear),
            ("in_proj_a", hidden, shape.linear_num_value_heads, linear),
            ("out_proj", shape.linear_value_dim, hidden, linear),
        ]
    return [m for m in modules if m[3] > 0]


def other_parameters(shape: ModelShape) -> int:
    """Parameters outside the decoder linears: embeddings, lm_head, norms, convolutions, gates' scalars."""
    embeddings = shape.vocab_size * shape.hidden_size
    lm_head = 0 if shape.tie_word_embeddings else embeddings
    norms = 2 * shape.hidden_size * shape.num_layers + shape.hidden_size
    norms += 2 * shape.head_dim * shape.full_attention_layers  # q_norm, k_norm
    linear = shape.linear_attention_layers * (
        shape.linear_conv_dim * shape.linear_conv_kernel_dim  # depthwise conv1d
        + 2 * shape.linear_num_value_heads  # dt_bias, A_log
        + shape.linear_value_head_dim  # gated RMSNorm
    )
    return embeddings + lm_head + norms + linear


def count_parameters(shape: ModelShape) -> int:
    return sum(i * o * n for _, i, o, n in linear_modules(shape)) + other_parameters(shape)


def lora_parameters(shape: ModelShape, targets: list[str], rank: int) -> int:
    return sum(rank * (i + o) * n for name, i, o, n in linear_modules(shape) if name in targets)


# ------------------------------------------------------------------------------------------- the config
@dataclass
class TrainingSetup:
    """What the planner reads from a config (all lengths in tokens, per micro-batch row)."""

    shape: ModelShape
    weight_format: str = "bf16"          # bf16 | fp16 | fp32 | nf4 | int8
    compute_bytes: int = 2               # activations: 2 (bf16/fp16) or 4 (fp32)
    double_quant: bool = True
    adapter: str | None = "lora"         # lora | qlora | None (full fine-tuning)
    lora_r: int = 16
    lora_targets: list[str] = field(default_factory=list)
    lora_bytes: int = 4                  # peft keeps adapters in fp32 (peft_autocast_adapter_dtype: false -> compute dtype)
    liger_rms_norm: bool = False         # Liger RMSNorm keeps its input in the compute dtype (no fp32 copy)
    liger_glu: bool = False              # Liger SwiGLU keeps gate and up only (silu(gate) is recomputed)
    gradient_checkpointing: str = "none"  # none | full | offload
    attention: str = "flash"             # flash | sdpa | eager
    micro_batch_size: int = 1
    num_generations: int = 1
    optimizer_state_bytes: float = 8.0   # per trainable parameter
    prompt_length: int = 4096
    teacher_prompt_length: int = 4096
    completion_length: int = 256
    loss_chunk_size: int = 64
    distillation_mode: str = "full"
    teacher: str = "base"
    teacher_sync: bool = False
    teacher_ema_rank: int = 0             # LoRA EMA/sync teacher as rank-k factors (0: dense fp32 Delta W)
    context_parallel: int = 1
    gpus: int = 1
    device: str = "cuda"                 # cuda | cpu (cpu: no framework overhead / allocator margin)
    vllm_mode: str | None = None         # None: rollouts with HF generate | colocate | server (use_vllm)
    vllm_gpu_memory_utilization: float = 0.3  # colocate: the GPU share vLLM reserves (TRL's default)
    vllm_sleep_mode: bool = False        # colocate: vLLM releases its share outside the rollout
    sequence_tile_size: int = 0           # the method block's sequence_tile_size (0: layers run over the whole sequence)
    sequence_tile_offload: bool = False   # sequence_tile_offload: layer inputs in host memory
    prefill_chunk_size: int | None = None  # the method block's prefill_chunk_size (None: the prompt in one prefill pass)


def parse_bytes(text: str | int | float) -> int:
    """'80GB' / '24GiB' / '80' (GiB) / 1e9 -> bytes. GB and GiB both mean 2**30 (as GPU cards are labelled)."""
    if isinstance(text, (int, float)):
        return int(text * GiB) if text < 10_000 else int(text)
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]i?b?)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r} (use e.g. 80GB)")
    number, unit = float(match.group(1)), (match.group(2) or "g")[0]
    return int(number * {"k": 2**10, "m": 2**20, "g": GiB, "t": 2**40}[unit])


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def method_defaults(trainer_type: str, given: dict) -> dict:
    """The method's option defaults, read from its options dataclass (SDPO plans 8 rollouts, SD-Zero 4,096 tokens)."""
    from dataclasses import MISSING, fields

    from sd_plugin.trainers.sdft import SDFTOptions
    from sd_plugin.trainers.sdpo import SDPOOptions
    from sd_plugin.trainers.sdzero import SDZeroOptions

    options = {"sdft": SDFTOptions, "sdpo": SDPOOptions, "sdzero": SDZeroOptions}.get(trainer_type)
    if options is None:
        raise ValueError(f"trainer_type must be sdft, sdpo or sdzero, got {trainer_type!r}")
    defaults = {f.name: f.default for f in fields(options) if f.default is not MISSING}
    if trainer_type == "sdzero" and defaults["teacher"] is None:  # resolved by phase, as SDZeroOptions does
        defaults["teacher"] = "live" if given.get("phase") == "srt" else "base"
    return defaults


def setup_from_config(cfg: dict, gpus: int | None = None) -> TrainingSetup:
    """Read a parsed Axolotl YAML config into a `TrainingSetup`."""
    shape = resolve_shape(cfg)
    adapter = cfg.get("adapter") or None
    load_4bit = _truthy(cfg.get("load_in_4bit")) or adapter == "qlora"
    if _truthy(cfg.get("fp32")) or (cfg.get("bf16") is False and not _truthy(cfg.get("fp16"))):
        compute_bytes, weight_format = 4, "fp32"
    else:
        compute_bytes, weight_format = 2, "bf16"
    if load_4bit:
        weight_format = "nf4"
    elif _truthy(cfg.get("load_in_8bit")):
        weight_format = "int8"

    all_linear = [name for name, *_ in linear_modules(shape)]
    targets = cfg.get("lora_target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if _truthy(cfg.get("lora_target_linear")):
        targets = all_linear
    targets = [t.split(".")[-1] for t in targets]

    checkpointing = cfg.get("gradient_checkpointing")
    if checkpointing in ("offload", "offload_disk") or (checkpointing and cfg.get("activation_offloading")):
        checkpointing = "offload"
    elif checkpointing:
        checkpointing = "full"
    else:
        checkpointing = "none"

    if _truthy(cfg.get("flash_attention")) or str(cfg.get("attn_implementation", "")).startswith("flash"):
        attention = "flash"
    elif _truthy(cfg.get("sdp_attention")) or cfg.get("attn_implementation") == "sdpa":
        attention = "sdpa"
    else:
        attention = "eager"

    optimizer = str(cfg.get("optimizer") or "adamw_torch")
    if "8bit" in optimizer:
        state_bytes = 2.0
    elif optimizer in ("sgd", "lion_pytorch") or "lion" in optimizer:
        state_bytes = 4.0
    else:
        state_bytes = 8.0

    trainer_type = str(cfg.get("trainer_type") or "sdft")
    given = cfg.get(trainer_type) or {}
    block = {**method_defaults(trainer_type, given), **given}
    sequence_len = int(cfg.get("sequence_len") or 4096)
    completion = int(block["max_completion_length"])
    # The caps' defaults are limits, not lengths: plan for what sequence_len allows unless a cap is set.
    prompt = int(given.get("max_prompt_length", max(1, sequence_len - completion)))
    teacher_prompt = int(given.get("max_teacher_prompt_length", prompt))
    teacher = str(block["teacher"])

    context_parallel = int(cfg.get("context_parallel_size") or 1)
    if isinstance(cfg.get("context_parallel"), dict):
        context_parallel = int(cfg["context_parallel"].get("size") or context_parallel)
    return TrainingSetup(
        shape=shape,
        weight_format=weight_format,
        compute_bytes=compute_bytes,
        double_quant=cfg.get("bnb_4bit_use_double_quant", True) is not False,
        adapter=adapter,
        lora_r=int(cfg.get("lora_r") or 16),
        lora_targets=targets if adapter else [],
        lora_bytes=compute_bytes if cfg.get("peft_autocast_adapter_dtype") is False else 4,
        liger_rms_norm=_truthy(cfg.get("liger_rms_norm")),
        liger_glu=_truthy(cfg.get("liger_glu_activation")) or _truthy(cfg.get("liger_swiglu")),
        gradient_checkpointing=checkpointing,
        attention=attention,
        micro_batch_size=int(cfg.get("micro_batch_size") or 1),
        num_generations=int(block["num_generations"]),
        optimizer_state_bytes=state_bytes,
        prompt_length=prompt,
        teacher_prompt_length=teacher_prompt,
        completion_length=completion,
        loss_chunk_size=int(block["loss_chunk_size"]),
        distillation_mode=str(block["distillation_mode"]),
        teacher=teacher,
        teacher_sync=int(block["teacher_sync_steps"] or 0) > 0,
        teacher_ema_rank=int(block["teacher_ema_rank"] or 0),
        context_parallel=context_parallel,
        gpus=int(gpus or max(context_parallel, 1)),
        device=str(cfg.get("device", "cuda")),
        **vllm_setup(block),
        sequence_tile_size=int(block.get("sequence_tile_size") or 0),
        sequence_tile_offload=_truthy(block.get("sequence_tile_offload")),
        prefill_chunk_size=int(block["prefill_chunk_size"]) if block.get("prefill_chunk_size") else None,
    )


def vllm_setup(block: dict) -> dict:
    """The vLLM fields of `TrainingSetup` from the method's block (defaults: SelfDistillationOptions')."""
    if not _truthy(block.get("use_vllm", False)):
        return {}
    return dict(vllm_mode=str(block.get("vllm_mode", "colocate")),
                vllm_gpu_memory_utilization=float(block.get("vllm_gpu_memory_utilization", 0.3)),
                vllm_sleep_mode=_truthy(block.get("vllm_enable_sleep_mode", False)))


# ------------------------------------------------------------------------------------------- activations
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


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Predicted peak memory per GPU, term by term (bytes); `fits` compares `peak` with `gpu_memory`."""

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

    if setup.teacher == "live" or (setup.adapter and setup.teacher == "base" and not setup.teacher_sync):
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
    # A chunk attends to the cached earlier chunks: without flash-attention the [chunk, T] mask is materialized
    # (bool, converted for the SDPA kernel), as in the tiled forward.
    chunk_mask = 0
    if setup.prefill_chunk_size and setup.attention != "flash" and shape.full_attention_layers:
        chunk_mask = (1 + b) * prefill_tokens * setup.prompt_length
    rollout_working_set = int(max(forward_working_bytes_per_token(setup) * prefill_tokens + chunk_mask
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
    buffers = LOSS_CHUNK_BUFFERS.get(setup.distillation_mode, LOSS_CHUNK_BUFFERS["full"])
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
    working = forward_working_bytes_per_token(setup)
    backward = (max(saved.values()) + BACKWARD_TRANSIENT_FACTOR * working) * tile_tokens + mask
    backward += 2 * row * student_tokens + (kv * student_tokens if shape.full_attention_layers else 0)
    teacher_tile = rows * min(setup.sequence_tile_size, teacher_length)
    teacher = (working * teacher_tile + (1 + b) * teacher_tile * teacher_length + 3 * row * teacher_tokens
               + (kv * teacher_tokens if shape.full_attention_layers else 0))
    completion_tokens = rows * setup.completion_length
    hidden_states = 2 * row * completion_tokens + (b if setup.liger_rms_norm else 4) * shape.hidden_size * completion_tokens
    return {"student_activations": int(student_activations), "backward_working_set": int(backward),
            "teacher_forward": int(teacher), "hidden_states": int(hidden_states), "host_offloaded": int(host_offloaded)}


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
    if setup.adapter and (setup.teacher == "ema" or setup.teacher_sync) and not setup.teacher_ema_rank:
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


def load_config(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


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


def read_config_file(path: str) -> dict:
    """The YAML config at `path` for the CLI; a missing file, invalid YAML or a non-mapping raises UsageError."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text (byte {error.start + 1})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise UsageError(f"{where}: invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a YAML mapping of config keys, got {type(config).__name__}")
    return config


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
