"""Merge a LoRA adapter into its base model one safetensors shard at a time, check it, write the card, push.

    sd-plugin merge --base B --adapter A --out DIR [--dtype bfloat16] [--push-to-hub REPO] [--private]
                    [--adapter-only] [--dry-run] [--eval-stats FILE] [--dequantize-4bit] [--tolerance X]
                    [--verify-layers N] [--max-shard-size 5GB] [--overwrite]

The merge reads the base's shards one at a time; each tensor is upcast to float32, gets its LoRA update
(`sd_plugin.adapter_weights`: the product B @ A times the scaling, modules_to_save, biases) added in float32, and
is cast once to the target dtype (bfloat16) into output shards of at most `--max-shard-size`. Peak memory is
about one base shard plus one output shard, not the model (`--dry-run` prints the estimate; benchmarks/bench_merge.py
measures it). The output is built in a folder next to `--out` with the base's config, generation config,
tokenizer and chat template, checked, and renamed into place. A QLoRA adapter is merged into the original 16-bit
checkpoint; only `--dequantize-4bit` merges it into the NF4 round trip it was trained against. The report says which.

Then the logits check (`sd_plugin.merge_check`): float32 forwards of base + adapter (PEFT), of the merge done in
memory, and of the saved model, over a few prompts; on the whole model when its float32 copy fits in the memory
available, else on its first 2 decoder layers, else not at all (`--verify-layers`; the card says which). Every
saved tensor's dtype is read back from the safetensors headers. A failed check exits 1, leaves `--out` as it was
and pushes nothing. Pushing (`sd_plugin.hub`) resolves the token before anything is merged and uploads the
folder in one commit.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd_plugin.adapter_weights import (
    TensorChanges,
    changes_by_tensor,
    linear_weight_names,
    merged_tensor,
    read_adapter,
    round_trip_4bit,
)
from sd_plugin.cli import argument_parser
from sd_plugin.hub import (  # noqa: F401  (push_folder, resolve_hub_token: public names of sd_plugin.merge)
    PublishError,
    PushError,
    format_size,
    list_folder_files,
    push_folder,
    require_push_ready,
    resolve_hub_token,
)
from sd_plugin.merge_check import (  # noqa: F401  (model_class_for: public name of sd_plugin.merge)
    ABSOLUTE_FLOOR,
    FLOAT32_MERGE_TOLERANCE,
    SAVE_RELOAD_TOLERANCE,
    check_merged_logits,
    dtype_name,
    model_class_for,
    num_layers,
    safetensors_dtypes,
    weight_problems,
)
from sd_plugin.merge_inputs import (
    TOKENIZER_FILES,
    MergeRequest,
    ResolvedInputs,
    check_base_mergeable,
    copy_tokenizer_files,
    is_4bit_quantization,
    local_model_dir,
    move_into_place,
    read_json,
    resolve_inputs,
    staging_dir,
)
from sd_plugin.model_card import METHODS, is_hub_id, render_model_card, write_model_card
from sd_plugin.shards import ShardPlan, adapter_weight_bytes, peak_rss, plan_shards, verification_plan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise PublishError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[str(dtype)]


class MergeVerificationError(Exception):
    """A check on the merged model failed; `report` holds the measured numbers."""

    def __init__(self, message: str, report: "MergeReport"):
        super().__init__(message)
        self.report = report


@dataclass
class MergeReport:
    """What was merged, into which weights, how it was checked, what was written and where it was pushed."""

    base_model: str
    adapter: str
    output_dir: str
    dtype: str
    adapter_only: bool = False
    trained_in_4bit: bool = False
    trained_in_4bit_evidence: str = ""
    base_weights: str = ""            # which base weights the adapter was merged into
    tokenizer_source: str = ""
    prompts: int = 0
    positions: int = 0
    logit_scale: float | None = None      # max |logit| of base + adapter
    adapter_effect: float | None = None   # max |base + adapter - base|
    float32_merge_diff: float | None = None
    save_reload_diff: float | None = None
    max_abs_logit_diff: float | None = None  # merged model read from disk vs base + adapter, both float32
    tolerance: float | None = None
    tolerance_rule: str = ""
    checked_layers: str = ""  # ", first N of L layers" when the logits check loaded part of the model
    check_skipped: str = ""   # why the logits check did not run
    peak_memory: str = ""
    tensor_dtypes: dict = field(default_factory=dict)
    files: list = field(default_factory=list)  # (path in folder, bytes)
    card: str | None = None
    repo_id: str | None = None
    commit_url: str | None = None
    notes: list = field(default_factory=list)

    def card_details(self) -> list[str]:
        """Lines for the model card's "Model details" section."""
        if self.adapter_only:
            dtypes = ", ".join(f"{count} {name}" for name, count in sorted(self.tensor_dtypes.items()))
            return [f"Adapter tensors: {dtypes}" if dtypes else "Adapter weights: see adapter_model.safetensors"]
        shards = sum(1 for name, _ in self.files if name.endswith(".safetensors"))
        lines = [f"Weights: {self.dtype} safetensors ({shards} shard{'s' if shards != 1 else ''})",
                 f"Merged into: {self.base_weights}"]
        if self.check_skipped:
            lines.append(f"Merge check: not run: {self.check_skipped}")
        if self.max_abs_logit_diff is not None:
            lines.append(
                f"Merge check: max |logit difference| between this model (read from disk, computed in float32) and "
                f"base + adapter (float32) over {self.prompts} prompts / {self.positions} positions{self.checked_layers}: "
                f"{self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:.3g} for {self.dtype} rounding; "
                f"max |logit| {self.logit_scale:.3g}; the adapter itself moves logits by up to {self.adapter_effect:.3g})")
        return lines

    def summary(self) -> str:
        """Human-readable report for the command line."""
        if self.adapter_only:
            lines = [f"packaged adapter {self.adapter} -> {self.output_dir} (base {self.base_model})"]
        else:
            lines = [f"merged {self.adapter} into {self.base_model} -> {self.output_dir}",
                     f"  base weights: {self.base_weights}"]
            if self.trained_in_4bit:
                lines.append(f"  adapter trained in 4-bit: {self.trained_in_4bit_evidence}")
        dtypes = ", ".join(f"{name} x{count}" for name, count in sorted(self.tensor_dtypes.items()))
        lines.append(f"  saved tensors: {dtypes}")
        lines.append(f"  tokenizer and chat template from: {self.tokenizer_source}")
        if self.max_abs_logit_diff is not None:
            lines.append(f"  check (float32 forwards, {self.prompts} prompts, {self.positions} positions{self.checked_layers}, "
                         f"max |logit| {self.logit_scale:.4g}):")
            lines.append(f"    adapter effect  max|base+adapter - base|                  = {self.adapter_effect:.3e}")
            if self.float32_merge_diff is not None:
                lines += [f"    merge math      max|merged fp32 - base+adapter|           = {self.float32_merge_diff:.3e}"
                          f" (limit {FLOAT32_MERGE_TOLERANCE * self.logit_scale + ABSOLUTE_FLOOR:.1e})",
                          f"    save/reload     max|from disk - merged {self.dtype} in memory| = {self.save_reload_diff:.3e}"
                          f" (limit {SAVE_RELOAD_TOLERANCE * self.logit_scale + ABSOLUTE_FLOOR:.1e})"]
            lines.append(f"    artifact        max|from disk - base+adapter|             = {self.max_abs_logit_diff:.3e}"
                         f" (tolerance {self.tolerance:.3e}: {self.tolerance_rule})")
        lines += [f"  note: {note}" for note in self.notes]
        if self.peak_memory:
            lines.append(f"  peak memory (this process): {self.peak_memory}")
        total = sum(size for _, size in self.files)
        lines.append(f"  files: {len(self.files)} ({format_size(total)})")
        lines += [f"    {format_size(size):>10}  {name}" for name, size in self.files]
        if self.card:
            lines.append(f"  model card: {self.card}")
        if self.commit_url:
            lines.append(f"  pushed to {self.repo_id}: {self.commit_url}")
        return "\n".join(lines)


@dataclass
class PublishPlan:
    """What a run would write and push (`--dry-run`); sizes marked estimated are computed from the base."""

    repo_id: str | None
    private: bool
    output_dir: str
    adapter_only: bool
    files: list  # (path in folder, bytes or None, estimated: bool)
    token_source: str | None
    notes: list = field(default_factory=list)
    memory: list = field(default_factory=list)  # lines on the expected peak memory

    def format(self) -> str:
        known = sum(size for _, size, _ in self.files if size)
        estimated = any(is_estimate or size is None for _, size, is_estimate in self.files)
        what = "adapter + card" if self.adapter_only else "merged model + card"
        target = f"push to {self.repo_id} ({'private' if self.private else 'public'}) in one commit" if self.repo_id else "write"
        lines = [f"dry run: would {target}: {len(self.files)} files, {'~' if estimated else ''}{format_size(known)} ({what}), "
                 f"staged in {self.output_dir}"]
        for name, size, is_estimate in self.files:
            shown = "?" if size is None else ("~" if is_estimate else "") + format_size(size)
            lines.append(f"  {shown:>11}  {name}")
        if self.repo_id:
            lines.append(f"token: {self.token_source}" if self.token_source else
                         "token: none found; the push would fail (set HF_TOKEN or run `hf auth login`)")
        lines += self.memory
        lines += [f"note: {note}" for note in self.notes]
        lines.append("nothing was merged, written or sent.")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ the merge
def merged_config(base_dir: Path, dtype: torch.dtype, shards: ShardPlan, replaced: dict) -> dict:
    """The base's config.json for the merged weights: dtype, no quantization, the vocabulary of resized embeddings."""
    config = read_json(base_dir / "config.json")
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = dtype_name(dtype)
    config.pop("quantization_config", None)
    config["use_cache"] = True
    for entry in shards.entries:
        if entry.name in replaced and "embed_tokens" in entry.name:
            target = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
            target["vocab_size"] = entry.shape[0]
    return config


def merge_shards(inputs: ResolvedInputs, request: MergeRequest, out_dir: Path) -> tuple[TensorChanges, ShardPlan]:
    """Write the merged shards, index and config.json into `out_dir`, reading one base shard at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = parse_dtype(request.dtype)
    changes = read_adapter(inputs.adapter_dir, inputs.adapter_config)
    shards = plan_shards(inputs.base_dir, dtype, request.max_shard_size, changes.replaced)
    if shards is None:
        raise PublishError(f"the base {inputs.base} has no safetensors weights on this machine: `sd-plugin merge` reads "
                           "safetensors shards (download the checkpoint, or convert a .bin checkpoint first)")
    by_tensor = changes_by_tensor(changes, [entry.name for entry in shards.entries])
    for entry in shards.entries:
        change = by_tensor.get(entry.name)
        if change is not None and change.replace is not None and tuple(change.replace.shape) != entry.shape:
            raise PublishError(f"the adapter's {entry.name} is {tuple(change.replace.shape)}, the base's {entry.shape}")
    storage_dtype = base_storage_dtype(inputs)
    round_trip = set()
    if request.dequantize_4bit:
        skip = (inputs.base_quantization or {}).get("llm_int8_skip_modules") or ()
        round_trip = linear_weight_names(str(inputs.base_dir), skip)
    weight_map, buffer, handle, open_path = {}, {}, None, None
    try:
        for position, entry in enumerate(shards.entries):
            if entry.shard != open_path:  # one base shard mapped at a time
                handle = safe_open(str(entry.shard), framework="pt")
                open_path = entry.shard
            tensor = handle.get_tensor(entry.name)
            if entry.name in round_trip:
                tensor = round_trip_4bit(tensor.float(), inputs.four_bit_settings, storage_dtype)
            merged = merged_tensor(entry.name, tensor, by_tensor.get(entry.name))
            buffer[entry.name] = merged.to(dtype).contiguous() if merged.is_floating_point() else merged.contiguous()
            weight_map[entry.name] = shards.files[entry.out_file]
            del tensor, merged
            last_of_file = position + 1 == len(shards.entries) or shards.entries[position + 1].out_file != entry.out_file
            if last_of_file:
                save_file(buffer, str(out_dir / shards.files[entry.out_file]), metadata={"format": "pt"})
                buffer = {}
                gc.collect()
    finally:
        handle = None
    if len(shards.files) > 1:
        index = {"metadata": {"total_size": sum(shards.output_bytes())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config = merged_config(inputs.base_dir, dtype, shards, changes.replaced)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (inputs.base_dir / "generation_config.json").is_file():
        shutil.copy2(inputs.base_dir / "generation_config.json", out_dir / "generation_config.json")
    return changes, shards


def base_storage_dtype(inputs: ResolvedInputs) -> torch.dtype:
    """The dtype the base checkpoint stores (what bitsandbytes quantized from during QLoRA training)."""
    config = read_json(inputs.base_dir / "config.json") if inputs.base_dir else {}
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), torch.bfloat16)


def describe_base_weights(inputs: ResolvedInputs, request: MergeRequest, report) -> None:
    base_config = read_json(inputs.base_dir / "config.json") if inputs.base_dir else {}
    storage = str(base_config.get("dtype") or base_config.get("torch_dtype") or "bfloat16")
    report.base_weights = f"the original {storage} checkpoint (merged shard by shard, LoRA updates added in float32)"
    if request.dequantize_4bit:
        settings = inputs.four_bit_settings
        report.base_weights = (
            f"the 4-bit round trip of the {storage} checkpoint (--dequantize-4bit: every Linear weight but the output "
            f"head quantized to {settings['quant_type']} with bitsandbytes, blocksize {settings['blocksize']}, double "
            f"quant {settings['double_quant']}, then dequantized: the weights QLoRA trained against)")
        if not inputs.trained_in_4bit:
            report.notes.append("--dequantize-4bit was given but nothing recorded says the adapter was trained in 4-bit")
    elif inputs.trained_in_4bit:
        report.notes.append("the adapter was trained against 4-bit weights and is merged into the 16-bit original "
                            "(the usual choice); --dequantize-4bit merges into the dequantized 4-bit weights instead")


def round_trip_model_(inputs: ResolvedInputs, storage_dtype: torch.dtype):
    """For the logits check: the loaded base's Linear weights replaced by their 4-bit round trip (as in the merge)."""
    def prepare(model):
        skip = (inputs.base_quantization or {}).get("llm_int8_skip_modules") or ()
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not head and not any(part in name for part in skip):
                module.weight.data = round_trip_4bit(module.weight.data, inputs.four_bit_settings, storage_dtype)
    return prepare


def merge_into(inputs: ResolvedInputs, request: MergeRequest, staging: Path, report) -> list[str]:
    """Merge into `staging`, copy tokenizer files, run the checks; returns the problems found."""
    from transformers import AutoTokenizer

    dtype = parse_dtype(request.dtype)
    check_base_mergeable(inputs, request.dequantize_4bit)
    if is_4bit_quantization(inputs.base_quantization):
        raise PublishError(f"the base {inputs.base} is a 4-bit checkpoint: `sd-plugin merge` reads 16/32-bit shards; merge "
                           "into the original 16-bit checkpoint (with --dequantize-4bit for the weights QLoRA saw)")
    if inputs.base_dir is None and is_hub_id(inputs.base):  # not in the local cache: fetch its shards and configs
        from huggingface_hub import snapshot_download

        inputs.base_dir = Path(snapshot_download(inputs.base, allow_patterns=["*.safetensors", "*.json", *TOKENIZER_FILES]))
    describe_base_weights(inputs, request, report)
    changes, shards = merge_shards(inputs, request, staging)
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer_source)
    copy_tokenizer_files(inputs.tokenizer_source, staging, tokenizer)
    counts, problems = weight_problems(staging, dtype)
    report.tensor_dtypes = dict(counts)
    saved_tokenizer = AutoTokenizer.from_pretrained(str(staging))
    if saved_tokenizer.chat_template != tokenizer.chat_template:
        problems.append("the saved tokenizer's chat template differs from the source's")
    layers, _, why = verification_plan(request, inputs, shards)
    if layers == 0:
        report.notes.append(why)
        report.check_skipped = why
        return problems
    if layers is not None:
        report.checked_layers = f", first {layers} of {num_layers(str(inputs.base_dir))} layers"
        report.notes.append(why)
    prepare = round_trip_model_(inputs, base_storage_dtype(inputs)) if request.dequantize_4bit else None
    problems += check_merged_logits(report, base=str(inputs.base_dir), adapter_dir=inputs.adapter_dir, merged_dir=staging,
                                    tokenizer=saved_tokenizer, prepare_base=prepare, changes=changes, dtype=dtype,
                                    prompts=request.prompts, device=request.device, layers=layers,
                                    tolerance=request.tolerance)
    if request.tolerance is not None:
        report.tolerance_rule = "--tolerance"
    return problems


def package_into(inputs: ResolvedInputs, request: MergeRequest, staging: Path, report) -> list[str]:
    """Copy the adapter (weights, adapter_config.json) and tokenizer files into `staging`; training leftovers
    (optimizer state, training_args.bin, checkpoints) stay behind."""
    for name in adapter_file_names(inputs.adapter_dir):
        shutil.copy2(inputs.adapter_dir / name, staging / name)
    source_dir = local_model_dir(inputs.tokenizer_source)
    for name in TOKENIZER_FILES:
        if source_dir is not None and (source_dir / name).is_file():
            shutil.copy2(source_dir / name, staging / name)
    hub_base = inputs.card["base_model"]
    if is_hub_id(hub_base) and inputs.adapter_config.get("base_model_name_or_path") != hub_base:
        config = dict(inputs.adapter_config, base_model_name_or_path=hub_base)
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        report.notes.append(f"adapter_config.json base_model_name_or_path set to {hub_base} "
                            f"(was {inputs.adapter_config.get('base_model_name_or_path')})")
    counts, _ = safetensors_dtypes(staging)
    report.tensor_dtypes = dict(counts)
    return []


def adapter_file_names(adapter_dir: Path) -> list[str]:
    """adapter_config.json and the weights (safetensors preferred over .bin)."""
    names = ["adapter_config.json"]
    names.append("adapter_model.safetensors" if (adapter_dir / "adapter_model.safetensors").is_file() else "adapter_model.bin")
    return names


def publish(request: MergeRequest) -> MergeReport:
    """Merge (or, with `adapter_only`, package) the adapter into `request.out`, check it, write README.md, push.

    Raises:
        PublishError: bad inputs or no token, before anything is written.
        MergeVerificationError: a check failed; the output stays in a folder next to `out` (named in the message),
            `out` is unchanged and nothing is pushed.
        PushError: the upload failed; the files are in `out`.
    """
    parse_dtype(request.dtype)
    inputs = resolve_inputs(request, need_method=request.push_to_hub is not None)
    token = request.token
    if request.push_to_hub:
        token = require_push_ready(request.push_to_hub, token, request.api)
    report = MergeReport(base_model=inputs.base, adapter=str(inputs.adapter_dir), output_dir=str(inputs.out_dir),
                         dtype="" if request.adapter_only else dtype_name(parse_dtype(request.dtype)),
                         adapter_only=request.adapter_only, trained_in_4bit=inputs.trained_in_4bit,
                         trained_in_4bit_evidence=inputs.trained_in_4bit_evidence,
                         tokenizer_source=inputs.tokenizer_source, repo_id=request.push_to_hub)
    staging = staging_dir(inputs.out_dir)
    try:
        build = package_into if request.adapter_only else merge_into
        problems = build(inputs, request, staging, report)
        report.peak_memory = format_size(peak_rss())
        report.files = list_folder_files(staging)
        if problems:
            raise MergeVerificationError(
                "merge check failed:\n  - " + "\n  - ".join(problems) + f"\nthe merged files are in {staging} for "
                f"inspection; --out {inputs.out_dir} is unchanged; nothing was pushed", report)
        if inputs.card["method"] is None:
            report.notes.append("no model card written: the training method is unknown (pass --method)")
        else:
            write_model_card(staging, **inputs.card, merge_details=report.card_details(), repo_id=request.push_to_hub)
            report.card = str(inputs.out_dir / "README.md")
        move_into_place(staging, inputs.out_dir)
    except BaseException as error:
        if not isinstance(error, MergeVerificationError):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    report.files = list_folder_files(inputs.out_dir)
    if request.push_to_hub:
        what = "LoRA adapter trained" if request.adapter_only else f"model merged ({report.dtype})"
        message = request.commit_message or f"Upload {inputs.card['method'].upper()} {what} with sd-plugin"
        commit = push_folder(inputs.out_dir, request.push_to_hub, token=token, private=request.private,
                             commit_message=message, api=request.api, retries=request.retries,
                             backoff_seconds=request.backoff_seconds, log=request.log)
        report.commit_url = str(getattr(commit, "commit_url", commit))
    return report


def plan(request: MergeRequest) -> PublishPlan:
    """What `publish(request)` would write and push, with the expected peak memory; touches nothing.

    Reads only small files and safetensors headers; no model is loaded, no folder created, no network used.
    """
    dtype = parse_dtype(request.dtype)
    if request.push_to_hub is not None:
        # Everything the real push checks before merging (repository id, token, offline mode): a dry run that
        # passes is a run that will push.
        require_push_ready(request.push_to_hub, request.token, request.api)
    inputs = resolve_inputs(request, need_method=request.push_to_hub is not None)
    _, token_source = resolve_hub_token(request.token)
    result = PublishPlan(repo_id=request.push_to_hub, private=request.private, output_dir=str(inputs.out_dir),
                         adapter_only=request.adapter_only, files=[], token_source=token_source)
    tokenizer_dir = local_model_dir(inputs.tokenizer_source)
    tokenizer_files = [(name, (tokenizer_dir / name).stat().st_size, False) for name in TOKENIZER_FILES
                       if tokenizer_dir is not None and (tokenizer_dir / name).is_file()]
    if request.adapter_only:
        result.files += [(name, (inputs.adapter_dir / name).stat().st_size, False)
                         for name in adapter_file_names(inputs.adapter_dir)]
    else:
        check_base_mergeable(inputs, request.dequantize_4bit)
        shards = plan_shards(inputs.base_dir, dtype, request.max_shard_size)
        if shards is None:
            result.files.append(("model*.safetensors (size unknown: the base is not a local safetensors checkpoint)", None, True))
        else:
            result.files += [(name, size, True) for name, size in zip(shards.files, shards.output_bytes())]
            if len(shards.files) > 1:
                result.files.append(("model.safetensors.index.json", None, True))
            merge_peak, parts = shards.expected_peak(adapter_weight_bytes(inputs.adapter_dir))
            _, check_bytes, why = verification_plan(request, inputs, shards)
            result.memory = [f"expected peak memory: merge ~{format_size(merge_peak)} ({parts}); logits check "
                             f"~{format_size(check_bytes)}; plus ~550 MB for Python, torch and transformers", f"note: {why}"]
        config_size = (inputs.base_dir / "config.json").stat().st_size if inputs.base_dir else None
        result.files.append(("config.json", config_size, True))
        if inputs.base_dir is not None and (inputs.base_dir / "generation_config.json").is_file():
            result.files.append(("generation_config.json", (inputs.base_dir / "generation_config.json").stat().st_size, False))
        if inputs.trained_in_4bit or request.dequantize_4bit:
            result.notes.append(f"adapter trained in 4-bit: {inputs.trained_in_4bit_evidence or 'not recorded'}; merging into "
                                + ("the dequantized 4-bit weights (--dequantize-4bit)" if request.dequantize_4bit
                                   else "the original 16-bit weights"))
    result.files += tokenizer_files
    if inputs.card["method"] is not None:
        card_text = render_model_card(**inputs.card, repo_id=request.push_to_hub)
        result.files.append(("README.md", len(card_text.encode("utf-8")), True))
    else:
        result.notes.append("no model card: the training method is unknown (pass --method)")
    result.notes.append(f"tokenizer and chat template from {inputs.tokenizer_source}")
    return result


# ------------------------------------------------------------------------------------ the Python API of earlier releases
def merge_adapter(base: str | None, adapter, out, dtype="bfloat16", **options) -> MergeReport:
    """`publish(MergeRequest(...))` for a merged model; `options` are MergeRequest's fields."""
    return publish(MergeRequest(adapter=adapter, out=out, base=base, dtype=dtype_name(dtype) if isinstance(dtype, torch.dtype)
                                else dtype, **options))


def package_adapter(adapter, out, **options) -> MergeReport:
    """`publish(MergeRequest(..., adapter_only=True))`: the adapter and its card, nothing merged."""
    return publish(MergeRequest(adapter=adapter, out=out, adapter_only=True, **options))


def plan_publish(base: str | None, adapter, out, dtype="bfloat16", **options) -> PublishPlan:
    """`plan(MergeRequest(...))`: what `merge_adapter` / `package_adapter` with these arguments would do."""
    return plan(MergeRequest(adapter=adapter, out=out, base=base, dtype=dtype_name(dtype) if isinstance(dtype, torch.dtype)
                             else dtype, **options))


# ------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argument_parser(
        "merge", "Merge a LoRA adapter into its base (bf16 safetensors), check it, write the model card, push.")
    parser.add_argument("--base", default=None, help="16/32-bit base checkpoint, path or Hub id "
                        "(default: adapter_config.json's base_model_name_or_path); for QLoRA the original 16-bit one")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
    parser.add_argument("--out", required=True, help="output folder (the merged model, or the packaged adapter)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload --out to this model repository")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--adapter-only", action="store_true", help="publish the adapter (+ card) instead of a merged model")
    parser.add_argument("--dry-run", action="store_true", help="list the files and repository, then stop")
    parser.add_argument("--eval-stats", metavar="FILE", default=None, help="`sd-plugin eval-stats --json` output for the card")
    parser.add_argument("--dequantize-4bit", action="store_true",
                        help="QLoRA: merge into the 4-bit-dequantized base weights instead of the original 16-bit ones")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max |logit difference| allowed (default: max|logit| / 16 for bf16)")
    parser.add_argument("--verify-layers", type=int, default=None, metavar="N",
                        help="decoder layers the logits check loads in float32 (default: all when they fit in the memory "
                             "available, else 2, else none; 0 skips the check)")
    parser.add_argument("--method", choices=list(METHODS), default=None, help="training method (default: from the config)")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="training config used (Axolotl YAML or trainer-arguments JSON); default: found next to the adapter")
    parser.add_argument("--trainer-state", metavar="FILE", default=None, help="trainer_state.json (default: next to the adapter)")
    parser.add_argument("--dataset", action="append", default=None, help="dataset name for the card (repeatable)")
    parser.add_argument("--base-model-id", default=None, help="Hub id of the base for the card when --base is a local path")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer / chat template source (default: the adapter folder if it has one, else the base)")
    parser.add_argument("--device", default="cpu", help="device for the merge and the check (default cpu)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (the new output is built next to it and renamed into place)")
    parser.add_argument("--commit-message", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`sd-plugin merge ...`: exit 0 on success, 1 when a check on the merged model fails, 2 on bad inputs
    (nothing done), 3 when the push failed (the files are on disk)."""
    args = build_parser().parse_args(argv)
    request = MergeRequest(
        adapter=args.adapter, out=args.out, base=args.base, dtype=args.dtype, adapter_only=args.adapter_only,
        max_shard_size=args.max_shard_size, dequantize_4bit=args.dequantize_4bit, tolerance=args.tolerance,
        verify_layers=args.verify_layers, device=args.device, tokenizer_dir=args.tokenizer, method=args.method,
        training_config=args.config, metrics=args.trainer_state, eval_stats=args.eval_stats, datasets=args.dataset,
        base_model_id=args.base_model_id, push_to_hub=args.push_to_hub, private=args.private,
        commit_message=args.commit_message, overwrite=args.overwrite)
    if args.dry_run:
        print(plan(request).format())
        return 0
    try:
        report = publish(request)
    except MergeVerificationError as error:
        print(error.report.summary(), file=sys.stderr)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
