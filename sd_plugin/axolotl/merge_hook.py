"""After `axolotl merge-lora` (Axolotl 0.21+ calls the plugin's `post_lora_merge(cfg, adapter_path, output_path)`):
check the dtypes Axolotl wrote, optionally the logits, write the model card, optionally push. No Axolotl import."""

from __future__ import annotations

import os
from pathlib import Path

from sd_plugin.hub import list_folder_files, push_folder, require_push_ready
from sd_plugin.merge import MergeReport, MergeVerificationError, base_storage_dtype, parse_dtype, round_trip_model_
from sd_plugin.merge_check import cast_saved_weights, check_merged_logits, dtype_name, weight_problems
from sd_plugin.merge_inputs import MergeRequest, resolve_inputs
from sd_plugin.model_card import as_plain_dict, write_model_card


def post_lora_merge(cfg, adapter_path: str | os.PathLike, output_path: str | os.PathLike, *, cast: bool = True,
                    verify: bool = False, **options) -> MergeReport:
    """Re-check the merged tensors' dtypes (casting 16/32-bit floats to `dtype` when `cast`, refusing quantized ones),
    optionally compare logits with base + adapter (`verify`), write the model card into `output_path`, and push it
    when `push_to_hub` is given (the token is checked first). `options` are `MergeRequest` fields (dtype, tolerance,
    eval_stats, push_to_hub, private, token, api, log)."""
    config = as_plain_dict(cfg)
    request = MergeRequest(adapter=adapter_path, out=output_path, base=config.get("base_model"), training_config=config,
                           tokenizer_dir=str(output_path), **options)
    dtype = parse_dtype(request.dtype)
    inputs = resolve_inputs(request, need_method=True, check_out=False)
    token = request.token
    if request.push_to_hub:
        token = require_push_ready(request.push_to_hub, token, request.api)
    trained_4bit = inputs.trained_in_4bit or bool(config.get("_original_load_in_4bit") or config.get("_original_adapter") == "qlora")
    efficient = str(config.get("merge_method") or "memory_efficient") != "legacy"
    report = MergeReport(base_model=inputs.base, adapter=str(inputs.adapter_dir), output_dir=str(output_path),
                         dtype=dtype_name(dtype), trained_in_4bit=trained_4bit,
                         trained_in_4bit_evidence=inputs.trained_in_4bit_evidence or ("Axolotl config" if trained_4bit else ""),
                         tokenizer_source=str(output_path), repo_id=request.push_to_hub)
    if trained_4bit and efficient:
        report.base_weights = ("the NF4 round trip of the 16-bit base (Axolotl's memory-efficient merge simulates the "
                               "QLoRA quantization)")
    elif trained_4bit:
        report.base_weights = "the original 16-bit base (Axolotl's legacy merge loads it unquantized)"
    else:
        report.base_weights = "the base checkpoint (Axolotl merge-lora: delta added in float32, cast to the checkpoint's dtype)"

    counts, problems = weight_problems(output_path, dtype)
    if problems and cast:
        casted = cast_saved_weights(output_path, dtype)
        if casted:
            report.notes.append(f"cast {casted} floating tensors to {dtype_name(dtype)}")
        counts, problems = weight_problems(output_path, dtype)
    report.tensor_dtypes = dict(counts)
    if verify and not problems:
        from transformers import AutoTokenizer

        prepare = round_trip_model_(inputs, base_storage_dtype(inputs)) if trained_4bit and efficient else None
        problems += check_merged_logits(report, base=inputs.base, adapter_dir=inputs.adapter_dir, merged_dir=Path(output_path),
                                        tokenizer=AutoTokenizer.from_pretrained(str(output_path)), prepare_base=prepare,
                                        dtype=dtype, prompts=request.prompts, device=request.device,
                                        tolerance=request.tolerance)
    report.files = list_folder_files(output_path)
    if problems:
        raise MergeVerificationError("merged model check failed:\n  - " + "\n  - ".join(problems)
                                     + "\n(for quantized tensors re-run `axolotl merge-lora` with --dequant); nothing was pushed",
                                     report)
    report.card = str(write_model_card(output_path, **inputs.card, merge_details=report.card_details(),
                                       repo_id=request.push_to_hub))
    report.files = list_folder_files(output_path)
    if request.push_to_hub:
        message = f"Upload {inputs.card['method'].upper()} model merged with axolotl merge-lora"
        commit = push_folder(output_path, request.push_to_hub, token=token, private=request.private,
                             commit_message=message, api=request.api, log=request.log)
        report.commit_url = str(getattr(commit, "commit_url", commit))
    return report
