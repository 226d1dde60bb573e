"""Checks on a merged model: saved dtypes from the safetensors headers, and logits against base + adapter.

The logits check (`check_merged_logits`) runs float32 forwards over a few prompts, one model in memory at a
time, and measures (max |logit difference| over prompts, positions and vocabulary; `scale` = max |logit| of
base + adapter, computed by PEFT from the base and the adapter):
  1. merge math: the base with the merge's own float32 updates applied in memory vs base + adapter: <= 2^-10 * scale
     (the LoRA products, scalings and tensor names are right);
  2. save/reload: that model rounded to the saved dtype vs the model read back from disk: <= 1e-5 * scale (no
     tensor lost, renamed or mis-tied in the shards);
  3. the artifact: the model read back from disk vs base + adapter (the number reported), within the rounding
     tolerance 16 * unit roundoff * scale (bf16: scale / 16), or a given tolerance.
`layers` limits the check to the first decoder layers (with the embeddings and the head) for models whose float32
copy does not fit in memory.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from sd_plugin.adapter_weights import (
    TensorChanges,
    changes_by_tensor,
    load_adapter_tensors,
    merged_tensor,
    model_class_for,
)
from sd_plugin.hub import PublishError, list_folder_files

SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
SAFETENSORS_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"}
# Unit roundoff of the saved dtype: round-to-nearest changes a weight by at most this relative amount.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
ROUNDING_TOLERANCE_FACTOR = 16.0   # check 3: 16 * unit roundoff * scale (bf16: scale / 16)
FLOAT32_MERGE_TOLERANCE = 2.0**-10  # check 1, relative to scale
SAVE_RELOAD_TOLERANCE = 1e-5        # check 2, relative to scale
ABSOLUTE_FLOOR = 1e-6               # added to every tolerance so an all-zero logit scale still passes exact matches
DEFAULT_PROMPTS = (
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "Write a Python function that reverses a string, then explain it."}],
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published",
)
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------ saved weights
def safetensors_dtypes(folder: str | os.PathLike) -> tuple[Counter, dict[str, str]]:
    """Count of tensors per dtype over every *.safetensors file in `folder` (headers only), and key -> dtype."""
    from safetensors import safe_open

    counts, dtype_of = Counter(), {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                counts[dtype] += 1
                dtype_of[key] = dtype
    return counts, dtype_of


def weight_problems(folder: str | os.PathLike, dtype: torch.dtype) -> tuple[Counter, list[str]]:
    """Tensor dtype counts and problems: floating tensors not in `dtype`, leftover LoRA tensors, no weights."""
    counts, dtype_of = safetensors_dtypes(folder)
    wanted = SAFETENSORS_DTYPE[dtype]
    problems = []
    if not dtype_of:
        problems.append(f"no *.safetensors weights in {folder}")
    wrong = [f"{key} ({kind})" for key, kind in dtype_of.items() if kind in SAFETENSORS_FLOAT_DTYPES and kind != wanted]
    if wrong:
        problems.append(f"{len(wrong)} floating tensors are not {wanted}: {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    leftovers = [key for key in dtype_of if "lora_" in key or ".base_layer." in key]
    if leftovers:
        problems.append(f"{len(leftovers)} LoRA tensors left in the merged weights: {', '.join(leftovers[:5])}")
    return counts, problems


def cast_saved_weights(folder: str | os.PathLike, dtype: torch.dtype) -> int:
    """Cast every 16/32/64-bit floating tensor in `folder`'s safetensors to `dtype`, shard by shard, in place.

    Quantized dtypes (fp8, packed 4-bit) are left alone (they need a dequantizing merge). Updates the shard
    index's total size and config.json's dtype. Returns how many tensors were cast.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    cast = 0
    for path in sorted(folder.glob("*.safetensors")):
        tensors, changed = {}, False
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16) and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                    cast += 1
                    changed = True
                tensors[key] = tensor
        if changed:
            save_file(tensors, str(path), metadata=metadata)
    index_path = folder / "model.safetensors.index.json"
    if cast and index_path.is_file():
        index = read_json(index_path)
        index.setdefault("metadata", {})["total_size"] = sum(
            size for name, size in list_folder_files(folder) if name.endswith(".safetensors"))
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config_path = folder / "config.json"
    if cast and config_path.is_file():
        config = read_json(config_path)
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype_name(dtype)
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return cast


# ------------------------------------------------------------------------------------ models and logits

def truncate_layers_(config, layers: int) -> None:
    """Keep the first `layers` decoder layers in `config` (and its per-layer lists), in place."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = text.layer_types[:layers]


def num_layers(model_dir_or_id: str) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir_or_id))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def load_model_float32(model_dir_or_id: str, device: str = "cpu", layers: int | None = None):
    """Load a checkpoint with float32 weights (bf16 values upcast exactly), in eval mode; only the first `layers`
    decoder layers when given (the checkpoint's other layers are not read)."""
    from transformers import AutoConfig

    kwargs = {}
    if layers is not None:
        kwargs["config"] = AutoConfig.from_pretrained(str(model_dir_or_id))
        truncate_layers_(kwargs["config"], layers)
    model = model_class_for(str(model_dir_or_id)).from_pretrained(str(model_dir_or_id), dtype=torch.float32, **kwargs)
    return model.to(device).eval()


def within_layers(name: str, layers: int | None) -> bool:
    match = LAYER_INDEX.search(name)
    return layers is None or match is None or int(match[1]) < layers


@contextmanager
def exact_float32_matmul():
    """float32 matmuls in full precision (no TF32) while the check runs."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def verification_inputs(tokenizer, prompts, device: str = "cpu") -> list[torch.Tensor]:
    """Token ids per prompt: chat prompts through the chat template (with generation prompt), strings as they are."""
    inputs = []
    for prompt in prompts:
        if isinstance(prompt, str):
            text = prompt
        elif tokenizer.chat_template:
            text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(message["content"] for message in prompt)
        inputs.append(tokenizer(text, return_tensors="pt")["input_ids"].to(device))
    return inputs


def float32_logits(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of each prompt in float32 on the CPU (one prompt at a time: no padding involved)."""
    outputs = []
    with torch.no_grad(), exact_float32_matmul():
        for input_ids in inputs:
            outputs.append(model(input_ids=input_ids, use_cache=False).logits.float().cpu())
    return outputs


def cast_weights_(model, dtype: torch.dtype) -> None:
    """Cast parameters and saved (persistent) floating buffers to `dtype`, in place.

    Non-persistent buffers such as rotary `inv_freq` keep their float32 values, as in a model loaded from disk
    (`model.to(bfloat16)` would round them too and change every position's phase).
    """
    saved_names = set(model.state_dict().keys())
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    for name, buffer in model.named_buffers():
        if name in saved_names and buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)


def max_abs_diff(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second))


def check_adapter_applied(peft_model, adapter_dir: Path, layers: int | None = None) -> None:
    """Every tensor of the adapter file (of the first `layers` layers) is in the model with its saved value
    (catches architecture mismatches)."""
    from peft.utils import get_peft_model_state_dict

    saved = {key: value for key, value in load_adapter_tensors(adapter_dir).items() if within_layers(key, layers)}
    loaded = get_peft_model_state_dict(peft_model)
    missing = [key for key in saved if key not in loaded]
    differing = [key for key in saved if key in loaded and not torch.equal(loaded[key].cpu().to(saved[key].dtype), saved[key])]
    if missing or differing:
        raise PublishError(
            f"the adapter does not fit this base: {len(missing)} adapter tensors have no place in the model "
            f"({', '.join(missing[:3])}) and {len(differing)} differ after loading ({', '.join(differing[:3])}); "
            "is --base the checkpoint (and model class) the adapter was trained on?")


def rounding_tolerance(dtype: torch.dtype, scale: float, tolerance: float | None) -> tuple[float, str]:
    if tolerance is not None:
        return float(tolerance), "tolerance given"
    rule = f"{ROUNDING_TOLERANCE_FACTOR:g} x {dtype_name(dtype)} unit roundoff {UNIT_ROUNDOFF[dtype]:.3g} x max|logit|"
    return ROUNDING_TOLERANCE_FACTOR * UNIT_ROUNDOFF[dtype] * scale + ABSOLUTE_FLOOR, rule


def check_merged_logits(report, *, base: str, adapter_dir: Path, merged_dir: Path, tokenizer, prepare_base=None,
                        changes: TensorChanges | None = None, dtype: torch.dtype = torch.bfloat16, prompts=None,
                        device: str = "cpu", layers: int | None = None, tolerance: float | None = None) -> list[str]:
    """Checks 1-3 (module docstring) on `merged_dir`; fills `report`'s numbers and returns the problems found.

    `prepare_base(model)` turns the loaded base into the weights the adapter was merged into (4-bit round trip);
    without `changes` (a merge done elsewhere, e.g. by Axolotl) only check 3 runs. One model in memory at a time.
    """
    from peft import PeftModel

    token_ids = verification_inputs(tokenizer, prompts or DEFAULT_PROMPTS, device)
    report.prompts, report.positions = len(token_ids), sum(ids.shape[1] for ids in token_ids)
    model = load_model_float32(base, device, layers)
    if prepare_base is not None:
        prepare_base(model)
    base_logits = float32_logits(model, token_ids)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    check_adapter_applied(model, adapter_dir, layers)
    reference = float32_logits(model, token_ids)
    scale = max(float(logits.abs().max()) for logits in reference)
    report.logit_scale, report.adapter_effect = scale, max_abs_diff(reference, base_logits)
    model = model.unload()  # the base weights again, without the LoRA layers
    problems = []
    rounded = None
    if changes is not None:
        parameters = dict(model.named_parameters())
        kept = TensorChanges(low_rank={k: v for k, v in changes.low_rank.items() if within_layers(k + ".", layers)},
                             bias={k: v for k, v in changes.bias.items() if within_layers(k + ".", layers)},
                             replaced={k: v for k, v in changes.replaced.items() if within_layers(k, layers)})
        for name, change in changes_by_tensor(kept, parameters).items():
            parameters[name].data = merged_tensor(name, parameters[name].data, change).to(device)
        report.float32_merge_diff = max_abs_diff(float32_logits(model, token_ids), reference)
        cast_weights_(model, dtype)
        cast_weights_(model, torch.float32)
        rounded = float32_logits(model, token_ids)
        if report.float32_merge_diff > FLOAT32_MERGE_TOLERANCE * scale + ABSOLUTE_FLOOR:
            problems.append(f"the float32 merge differs from base + adapter by {report.float32_merge_diff:.3g} "
                            f"(limit {FLOAT32_MERGE_TOLERANCE * scale + ABSOLUTE_FLOOR:.3g}): the merge itself is wrong")
    del model
    gc.collect()
    merged = load_model_float32(str(merged_dir), device, layers)
    from_disk = float32_logits(merged, token_ids)
    del merged
    gc.collect()
    report.max_abs_logit_diff = max_abs_diff(from_disk, reference)
    report.tolerance, report.tolerance_rule = rounding_tolerance(dtype, scale, tolerance)
    if rounded is not None:
        report.save_reload_diff = max_abs_diff(from_disk, rounded)
        if report.save_reload_diff > SAVE_RELOAD_TOLERANCE * scale + ABSOLUTE_FLOOR:
            problems.append(f"the model read back from {merged_dir} differs from the one merged in memory by "
                            f"{report.save_reload_diff:.3g}: tensors were lost or renamed on save")
    if not math.isfinite(report.max_abs_logit_diff) or report.max_abs_logit_diff > report.tolerance:
        problems.append(f"max |logit difference| vs base + adapter is {report.max_abs_logit_diff:.4g}, above the tolerance "
                        f"{report.tolerance:.4g} ({report.tolerance_rule})")
    return problems
