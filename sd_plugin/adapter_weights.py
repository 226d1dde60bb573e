"""A LoRA adapter as changes to individual base tensors, so that a merge can go one tensor (and shard) at a time.

`read_adapter` turns adapter_model.safetensors + adapter_config.json into `TensorChanges`: for each module, the
low-rank product to add (`lora_A`/`lora_B` of a Linear, `lora_embedding_A`/`_B` of an Embedding, scaled by
alpha / r, or alpha / sqrt(r) with rsLoRA, with `rank_pattern` / `alpha_pattern`), the `lora_B` bias, and tensors
that replace the base's (`modules_to_save`, a saved `base_layer`, `bias: lora_only|all`). `changes_by_tensor`
names the base tensor each change applies to; `merged_tensor` applies them in float32, as PEFT's
`merge_and_unload` does. Adapter kinds this does not know (DoRA, trainable tokens, LoRA on raw parameters,
layer replication) are refused with a PublishError.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd_plugin.hub import PublishError

PEFT_PREFIX = "base_model.model."
UNSUPPORTED_SETTINGS = {"use_dora": "DoRA", "layer_replication": "layer_replication", "target_parameters": "target_parameters",
                        "trainable_token_indices": "trainable_token_indices", "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA"}


@dataclass
class LowRank:
    """delta W = scaling * B @ A (Linear; transposed for fan_in_fan_out) or scaling * (B @ A)^T (Embedding)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    embedding: bool = False
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        product = self.b.float() @ self.a.float()
        if self.embedding or self.fan_in_fan_out:
            product = product.T
        return product * self.scaling


@dataclass
class TensorChanges:
    """Per module (`model.layers.0.self_attn.q_proj`) the low-rank update and bias to add; per tensor name the
    tensors that replace the base's."""

    low_rank: dict[str, LowRank] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: a key matches the module name or a dotted suffix of it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def load_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    if (adapter_dir / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(adapter_dir / "adapter_model.safetensors"))
    return torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)


def read_adapter(adapter_dir: Path, adapter_config: dict) -> TensorChanges:
    """The adapter's tensors as `TensorChanges`; PublishError for adapter kinds this merge does not handle."""
    for key, name in UNSUPPORTED_SETTINGS.items():
        if adapter_config.get(key):
            raise PublishError(f"{adapter_dir}: {name} adapters are not supported by `sd-plugin merge` (adapter_config.json "
                               f"{key}: {adapter_config[key]}); merge with peft's merge_and_unload instead")
    tensors = {key.removeprefix(PEFT_PREFIX): value for key, value in load_adapter_tensors(adapter_dir).items()}
    changes = TensorChanges()
    pairs: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if match := re.fullmatch(r"(.+)\.lora_(A|B)\.weight", key):
            pairs.setdefault((match[1], False), {})[match[2]] = tensor
        elif match := re.fullmatch(r"(.+)\.lora_embedding_(A|B)", key):
            pairs.setdefault((match[1], True), {})[match[2]] = tensor
        elif match := re.fullmatch(r"(.+)\.lora_B\.bias", key):
            changes.bias[match[1]] = tensor
        elif ".lora_" in key:
            raise PublishError(f"{adapter_dir}: adapter tensor {key} is of a kind `sd-plugin merge` does not know "
                               "(DoRA magnitude, ...); merge with peft's merge_and_unload instead")
        else:  # modules_to_save, a saved (resized) base layer, trained biases: they replace the base tensor
            changes.replaced[key.replace(".base_layer.", ".")] = tensor
    rank, alpha = adapter_config.get("r", 8), adapter_config.get("lora_alpha", 8)
    for (module, embedding), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise PublishError(f"{adapter_dir}: {module} has lora_{''.join(pair)} but not its partner")
        module_rank = pattern_value(adapter_config.get("rank_pattern"), module, rank)
        module_alpha = pattern_value(adapter_config.get("alpha_pattern"), module, alpha)
        scaling = module_alpha / (math.sqrt(module_rank) if adapter_config.get("use_rslora") else module_rank)
        changes.low_rank[module] = LowRank(pair["A"], pair["B"], scaling, embedding,
                                           bool(adapter_config.get("fan_in_fan_out")) and not embedding)
    for module in changes.bias:
        if module not in changes.low_rank:
            raise PublishError(f"{adapter_dir}: {module} has a lora_B bias but no LoRA weights")
    return changes


def checkpoint_name(name: str, names: set[str]) -> str | None:
    """`name` in the checkpoint's tensor names, or the one checkpoint name that ends with its longest dotted
    suffix (at least three parts; e.g. a model that nests `language_model` where the checkpoint does not)."""
    if name in names:
        return name
    parts = name.split(".")
    for start in range(1, len(parts) - 2):
        suffix = ".".join(parts[start:])
        found = [candidate for candidate in names if candidate == suffix or candidate.endswith("." + suffix)]
        if len(found) == 1:
            return found[0]
        if found:
            return None
    return None


@dataclass
class Change:
    """What happens to one base tensor: replaced, then (plus) a low-rank delta or a bias."""

    replace: torch.Tensor | None = None
    low_rank: LowRank | None = None
    bias: torch.Tensor | None = None
    bias_scaling: float = 1.0


def changes_by_tensor(changes: TensorChanges, names) -> dict[str, Change]:
    """Base tensor name -> Change. PublishError naming the adapter tensors that fit no tensor of the base."""
    names = set(names)
    by_tensor: dict[str, Change] = {}
    unplaced = []

    def place(wanted: str) -> Change | None:
        found = checkpoint_name(wanted, names)
        if found is None:
            unplaced.append(wanted)
            return None
        return by_tensor.setdefault(found, Change())

    for name, tensor in changes.replaced.items():
        if (change := place(name)) is not None:
            change.replace = tensor
    for module, low_rank in changes.low_rank.items():
        if (change := place(f"{module}.weight")) is not None:
            change.low_rank = low_rank
    for module, bias in changes.bias.items():
        if (change := place(f"{module}.bias")) is not None:
            change.bias, change.bias_scaling = bias, changes.low_rank[module].scaling
    if unplaced:
        raise PublishError(f"the adapter does not fit this base: {len(unplaced)} adapter tensors have no place in it "
                           f"({', '.join(unplaced[:3])}); is --base the checkpoint the adapter was trained on?")
    return by_tensor


def merged_tensor(name: str, base: torch.Tensor, change: Change | None) -> torch.Tensor:
    """The base tensor with its change applied, in float32 (floating tensors) or unchanged (integer buffers)."""
    if change is None:
        return base.float() if base.is_floating_point() else base
    tensor = (change.replace if change.replace is not None else base).float()
    if change.low_rank is not None:
        delta = change.low_rank.delta()
        if delta.shape != tensor.shape:
            raise PublishError(f"the adapter does not fit this base: {name} is {tuple(tensor.shape)}, the LoRA update "
                               f"{tuple(delta.shape)}")
        tensor = tensor + delta
    if change.bias is not None:
        tensor = tensor + change.bias.float() * change.bias_scaling
    return tensor


def model_class_for(model_dir_or_id: str):
    """The transformers class named in the checkpoint's config (keeps e.g. a vision tower), else AutoModelForCausalLM.

    Here, not in merge_check (which loads models with it), so that the two modules do not import each other."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir_or_id)
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


def linear_weight_names(model_dir_or_id: str, skip_modules=()) -> set[str]:
    """Weights of the `nn.Linear` modules bitsandbytes would quantize (all but the output head and `skip_modules`),
    read from the model built on the meta device: nothing is loaded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir_or_id)
    with torch.device("meta"):
        model = model_class_for(model_dir_or_id)(config)
    head = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head and not any(skip in name for skip in skip_modules)}


def round_trip_4bit(weight: torch.Tensor, settings: dict, storage_dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit quantize -> dequantize round trip QLoRA trained against, from the checkpoint's dtype."""
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(weight.to(storage_dtype), blocksize=settings["blocksize"],
                                                 compress_statistics=settings["double_quant"],
                                                 quant_type=settings["quant_type"])
    return bnb_functional.dequantize_4bit(packed, state, quant_type=settings["quant_type"]).to(weight.dtype)
