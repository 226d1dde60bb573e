"""What the memory planner reads from an Axolotl-style YAML config: `TrainingSetup`, and the config readers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sd_plugin.deprecated import translate_deprecated
from sd_plugin.model_shapes import ModelShape, linear_modules, resolve_shape

GiB = 2**30


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
    micro_batch_size: int = 1            # prompts per micro-batch (the config's micro_batch_size / num_generations)
    num_generations: int = 1
    optimizer_state_bytes: float = 8.0   # per trainable parameter
    prompt_length: int = 4096
    teacher_prompt_length: int = 4096
    completion_length: int = 256
    loss_chunk_size: int = 64
    distillation_mode: str = "full_logits"
    teacher: str = "base"
    teacher_ema_rank: int = 0             # LoRA EMA teacher as rank-k factors (0: dense fp32 Delta W)
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
    if trainer_type == "sdzero" and defaults["teacher_model_kind"] is None:  # resolved by phase, as SDZeroOptions does
        defaults["teacher_model_kind"] = "live" if given.get("phase") == "srt" else "base"
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
    given = translate_deprecated(cfg.get(trainer_type) or {}, prefix=f"{trainer_type}.")
    block = {**method_defaults(trainer_type, given), **given}
    sequence_len = int(cfg.get("sequence_len") or 4096)
    completion = int(block["max_completion_length"])
    # The caps' defaults are limits, not lengths: plan for what sequence_len allows unless a cap is set.
    prompt = int(given.get("max_prompt_length", max(1, sequence_len - completion)))
    teacher_prompt = int(given.get("max_teacher_prompt_length", prompt))
    teacher = str(block["teacher_model_kind"])

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
        # The config's micro_batch_size counts completions (TRL's meaning); the planner counts prompts x rollouts.
        micro_batch_size=max(1, int(cfg.get("micro_batch_size") or 1) // int(block["num_generations"])),
        num_generations=int(block["num_generations"]),
        optimizer_state_bytes=state_bytes,
        prompt_length=prompt,
        teacher_prompt_length=teacher_prompt,
        completion_length=completion,
        loss_chunk_size=int(block["loss_chunk_size"]),
        distillation_mode=str(block["distillation_mode"]),
        teacher=teacher,
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


def load_config(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}
