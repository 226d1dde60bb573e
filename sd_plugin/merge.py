"""Merge a LoRA adapter into its base model, check the result, write the model card, push to the Hub.

    sd-plugin merge --base B --adapter A --out DIR [--dtype bfloat16] [--push-to-hub REPO] [--private]
                    [--adapter-only] [--dry-run] [--eval-stats FILE] [--dequantize-4bit] [--tolerance X]

The merge loads the base in float32, attaches the adapter, folds it into the weights (`merge_and_unload`),
casts once to the target dtype (bfloat16) and saves safetensors shards next to the base's tokenizer, chat
template and generation config. A QLoRA adapter is merged into the original 16-bit base checkpoint; only
`--dequantize-4bit` merges it into the NF4-dequantized weights it was trained against. The report says which.

Then three checks, all on float32 forwards over a few prompts (max |logit difference|, max over prompts,
positions and vocabulary; `scale` = max |logit| of base + adapter):
  1. merge math: the merged float32 model in memory vs base + adapter: <= 2^-10 * scale;
  2. save/reload: the merged model rounded to bf16 in memory vs the same model read back from disk: <= 1e-5 * scale
     (missing, renamed or mis-tied tensors show up here, however weak the adapter);
  3. the artifact: the model read back from disk vs base + adapter (the number reported), within the bf16
     rounding tolerance 16 * 2^-8 * scale = scale / 16, or `--tolerance`.
Every saved tensor's dtype is read back from the safetensors headers. A failed check exits non-zero and
pushes nothing.

Pushing resolves the token (argument, HF_TOKEN, `huggingface_hub.get_token()`) before anything is merged and
uploads the output folder in a single commit (`HfApi.create_commit`), retrying transient errors with
exponential backoff. `--dry-run` prints the files (with sizes) and the repository, and does nothing else.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd_plugin.cli import UsageError
from sd_plugin.model_card import (
    METHODS,
    as_plain_dict,
    datasets_from_config,
    find_trainer_state,
    find_training_config,
    infer_method,
    is_hub_id,
    load_training_config,
    read_eval_stats,
    render_model_card,
    write_model_card,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
SAFETENSORS_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Unit roundoff of the saved dtype: round-to-nearest changes a weight by at most this relative amount.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
ROUNDING_TOLERANCE_FACTOR = 16.0   # check 3: 16 * unit roundoff * scale (bf16: scale / 16)
FLOAT32_MERGE_TOLERANCE = 2.0**-10  # check 1, relative to scale
SAVE_RELOAD_TOLERANCE = 1e-5        # check 2, relative to scale
ABSOLUTE_FLOOR = 1e-6               # added to every tolerance so an all-zero logit scale still passes exact matches

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
DEFAULT_PROMPTS = (
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "Write a Python function that reverses a string, then explain it."}],
    "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published",
)
FOUR_BIT_DEFAULTS = {"quant_type": "nf4", "double_quant": True, "blocksize": 64}


class PublishError(UsageError):
    """A problem found before anything is merged or written: bad inputs, no token, offline mode.
    `sd-plugin merge` prints it as one line on stderr and exits with status 2 (`sd_plugin.cli.main`)."""


class PushError(Exception):
    """The upload failed after its retries (or for good: bad token, no write access); the files are on disk."""


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
        if self.max_abs_logit_diff is not None:
            lines.append(
                f"Merge check: max |logit difference| between this model (read from disk, computed in float32) and "
                f"base + adapter (float32) over {self.prompts} prompts / {self.positions} positions: "
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
            lines += [
                f"  check (float32 forwards, {self.prompts} prompts, {self.positions} positions, max |logit| {self.logit_scale:.4g}):",
                f"    adapter effect  max|base+adapter - base|                  = {self.adapter_effect:.3e}",
                f"    merge math      max|merged fp32 - base+adapter|           = {self.float32_merge_diff:.3e}"
                f" (limit {FLOAT32_MERGE_TOLERANCE * self.logit_scale + ABSOLUTE_FLOOR:.1e})",
                f"    save/reload     max|from disk - merged {self.dtype} in memory| = {self.save_reload_diff:.3e}"
                f" (limit {SAVE_RELOAD_TOLERANCE * self.logit_scale + ABSOLUTE_FLOOR:.1e})",
                f"    artifact        max|from disk - base+adapter|             = {self.max_abs_logit_diff:.3e}"
                f" (tolerance {self.tolerance:.3e}: {self.tolerance_rule})",
            ]
        lines += [f"  note: {note}" for note in self.notes]
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
        lines += [f"note: {note}" for note in self.notes]
        lines.append("nothing was merged, written or sent.")
        return "\n".join(lines)


@dataclass
class ResolvedInputs:
    """Everything checked before any work: paths, adapter and base facts, 4-bit decision, card inputs."""

    adapter_dir: Path
    adapter_config: dict
    base: str
    base_dir: Path | None
    base_quantization: dict | None
    out_dir: Path
    trained_in_4bit: bool
    trained_in_4bit_evidence: str
    four_bit_settings: dict
    tokenizer_source: str
    card: dict  # keyword arguments for write_model_card


# ------------------------------------------------------------------------------------ small helpers
def format_size(size: int | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise PublishError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[str(dtype)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def list_folder_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Every file under `folder` (hidden folders such as .cache skipped), as (relative path, bytes)."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found.append((relative.as_posix(), path.stat().st_size))
    return found


def local_model_dir(name: str) -> Path | None:
    """A local directory for a model: the path itself, or a Hub id already in the local cache (no network)."""
    if os.path.isdir(name):
        return Path(name)
    if not is_hub_id(name):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


# ------------------------------------------------------------------------------------ 4-bit facts
def base_quantization(base_dir: Path | None) -> dict | None:
    """The base checkpoint's `quantization_config` (a pre-quantized base), or None for a 16/32-bit one."""
    if base_dir is None or not (base_dir / "config.json").is_file():
        return None
    return read_json(base_dir / "config.json").get("quantization_config")


def is_4bit_quantization(quantization: dict | None) -> bool:
    if not quantization:
        return False
    bitsandbytes_4bit = (quantization.get("quant_method") == "bitsandbytes" and bool(quantization.get("bnb_4bit_quant_type"))
                         and not quantization.get("load_in_8bit"))
    return bool(quantization.get("load_in_4bit") or quantization.get("_load_in_4bit") or bitsandbytes_4bit)


def adapter_trained_in_4bit(adapter_dir: Path, training_config: dict, adapter_config: dict,
                            base_quant: dict | None) -> tuple[bool, str]:
    """Whether the adapter was trained on a 4-bit base, and the evidence (training config first)."""
    if training_config.get("adapter") == "qlora":
        return True, "training config: adapter: qlora"
    if training_config.get("load_in_4bit"):
        return True, "training config: load_in_4bit: true"
    if (adapter_dir / "config.json").is_file():
        saved = read_json(adapter_dir / "config.json").get("quantization_config")
        if is_4bit_quantization(saved):
            return True, f"{adapter_dir / 'config.json'} (model config saved at training time) has a 4-bit quantization_config"
    trained_on = str(adapter_config.get("base_model_name_or_path") or "")
    if "4bit" in trained_on.lower() or "bnb" in trained_on.lower():
        return True, f"adapter_config.json: trained on {trained_on}"
    if is_4bit_quantization(base_quant):
        return True, "the base checkpoint itself is 4-bit quantized"
    return False, ""


def four_bit_settings(adapter_dir: Path, training_config: dict, base_quant: dict | None) -> dict:
    """Quant type, double quantization and block size of the QLoRA run (bitsandbytes defaults otherwise)."""
    settings = dict(FOUR_BIT_DEFAULTS)
    sources = [base_quant or {}]
    if (adapter_dir / "config.json").is_file():
        sources.append(read_json(adapter_dir / "config.json").get("quantization_config") or {})
    sources += [training_config, training_config.get("bnb_config_kwargs") or {}]
    for source in sources:
        if source.get("bnb_4bit_quant_type"):
            settings["quant_type"] = source["bnb_4bit_quant_type"]
        if source.get("bnb_4bit_use_double_quant") is not None:
            settings["double_quant"] = bool(source["bnb_4bit_use_double_quant"])
        if source.get("blocksize"):
            settings["blocksize"] = int(source["blocksize"])
    return settings


def round_trip_4bit_(model, settings: dict, storage_dtype: torch.dtype, skip_modules=()) -> int:
    """Replace every quantizable Linear weight by its 4-bit quantize -> dequantize round trip, in place.

    Mirrors what QLoRA training saw: bitsandbytes quantizes every `nn.Linear` but the output head (and
    `llm_int8_skip_modules`) from the checkpoint's dtype. Returns how many weights were replaced.
    """
    import bitsandbytes.functional as bnb_functional

    output_head = model.get_output_embeddings()
    replaced = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output_head or any(skip in name for skip in skip_modules):
            continue
        weight = module.weight.data
        packed, state = bnb_functional.quantize_4bit(weight.to(storage_dtype), blocksize=settings["blocksize"],
                                                     compress_statistics=settings["double_quant"],
                                                     quant_type=settings["quant_type"])
        module.weight.data = bnb_functional.dequantize_4bit(packed, state, quant_type=settings["quant_type"]).to(weight.dtype)
        replaced += 1
    return replaced


# ------------------------------------------------------------------------------------ Hub token and push
def resolve_hub_token(token: str | None = None) -> tuple[str | None, str | None]:
    """(token, where it came from): the argument, HF_TOKEN, then huggingface_hub's stored login."""
    if token:
        return token, "passed in"
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"], "HF_TOKEN"
    import huggingface_hub

    stored = huggingface_hub.get_token()
    return (stored, "huggingface_hub.get_token() (stored login)") if stored else (None, None)


def require_push_ready(repo_id: str, token: str | None = None, api=None) -> str:
    """The token to push with; raises PublishError (before any merging) when there is none or the Hub is off."""
    if not is_hub_id(repo_id):
        raise PublishError(f"--push-to-hub needs a repository id like 'your-name/model-name', got {repo_id!r}")
    token, _ = resolve_hub_token(token)
    if token is None:
        raise PublishError(
            f"pushing to {repo_id} needs a Hugging Face token with write access, and none was found: set HF_TOKEN "
            "or run `hf auth login` (or drop --push-to-hub). Nothing was merged or written.")
    if api is None:
        import huggingface_hub.constants

        if huggingface_hub.constants.is_offline_mode():
            raise PublishError(f"pushing to {repo_id} needs the network, but HF_HUB_OFFLINE is set: unset it to push. "
                               "Nothing was merged or written.")
    return token


def is_transient_hub_error(error: BaseException) -> bool:
    """Connection problems, timeouts, HTTP 408/429 and 5xx are worth retrying; anything else is not."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx

        if isinstance(error, httpx.TransportError):
            return True
    except ImportError:
        pass
    status = getattr(getattr(error, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status in (408, 429))


def with_retries(action, what: str, retries: int, backoff_seconds: float, log=print):
    """Run `action()`, retrying transient Hub errors `retries` times with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as error:
            if attempt == retries or not is_transient_hub_error(error):
                raise
            delay = backoff_seconds * 2**attempt
            log(f"{what} failed ({type(error).__name__}: {error}); retry {attempt + 1} of {retries} in {delay:.0f} s")
            time.sleep(delay)


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload model trained with sd-plugin", api=None, retries: int = 3,
                backoff_seconds: float = 2.0, log=print):
    """Upload every file of `folder` to `repo_id` in one commit; returns the CommitInfo.

    The repository is created if missing (`private` applies to a new repository only). Transient errors
    are retried around each call; the operations are reused, so files already uploaded are not sent again.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    token = require_push_ready(repo_id, token, api)
    api = api or HfApi(token=token)
    files = list_folder_files(folder)
    if not files:
        raise PublishError(f"{folder} has no files to push")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name)) for name, _ in files]
    try:
        with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                     f"creating {repo_id}", retries, backoff_seconds, log)
        log(f"pushing {len(files)} files ({format_size(sum(size for _, size in files))}) to {repo_id} in one commit")
        return with_retries(lambda: api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model"),
                            f"commit to {repo_id}", retries, backoff_seconds, log)
    except Exception as error:
        raise PushError(f"push to {repo_id} failed ({type(error).__name__}: {error}); the files are in {folder}: "
                        f"upload them with `hf upload {repo_id} {folder}`{' --private' if private else ''}") from error


# ------------------------------------------------------------------------------------ checking saved weights
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
def model_class_for(model_dir_or_id: str):
    """The transformers class named in the checkpoint's config (keeps e.g. a vision tower), else AutoModelForCausalLM."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir_or_id)
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


def load_model_float32(model_dir_or_id: str, device: str = "cpu"):
    """Load a checkpoint with float32 weights (bf16 values upcast exactly), in eval mode."""
    model = model_class_for(str(model_dir_or_id)).from_pretrained(str(model_dir_or_id), dtype=torch.float32)
    return model.to(device).eval()


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


def check_adapter_applied(peft_model, adapter_dir: Path) -> None:
    """Every tensor of the adapter file is in the model with its saved value (catches architecture mismatches)."""
    from peft.utils import get_peft_model_state_dict

    if (adapter_dir / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    else:
        saved = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    loaded = get_peft_model_state_dict(peft_model)
    missing = [key for key in saved if key not in loaded]
    differing = [key for key in saved if key in loaded and not torch.equal(loaded[key].cpu().to(saved[key].dtype), saved[key])]
    if missing or differing:
        raise PublishError(
            f"the adapter does not fit this base: {len(missing)} adapter tensors have no place in the model "
            f"({', '.join(missing[:3])}) and {len(differing)} differ after loading ({', '.join(differing[:3])}); "
            "is --base the checkpoint (and model class) the adapter was trained on?")


def copy_tokenizer_files(source: str, out_dir: Path, tokenizer) -> list[str]:
    """Copy the tokenizer / chat template / processor files verbatim; save the tokenizer when the source is not local."""
    source_dir = local_model_dir(source)
    copied = []
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, out_dir / name)
                copied.append(name)
    if not copied:
        tokenizer.save_pretrained(str(out_dir))
        copied = [name for name in TOKENIZER_FILES if (out_dir / name).is_file()]
    return copied


# ------------------------------------------------------------------------------------ resolving inputs
def resolve_inputs(*, base, adapter, out, adapter_only, method, training_config, metrics, eval_stats, datasets,
                   base_model_id, tokenizer_dir, overwrite, need_method, check_out=True) -> ResolvedInputs:
    """Check everything that can be checked without loading a model; raise PublishError on any problem."""
    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PublishError(f"{adapter_dir} has no adapter_config.json: --adapter must be a PEFT adapter folder")
    if not any((adapter_dir / name).is_file() for name in ADAPTER_FILES[1:]):
        raise PublishError(f"{adapter_dir} has no adapter_model.safetensors (or .bin)")
    adapter_config = read_json(adapter_dir / "adapter_config.json")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise PublishError(f"only LoRA adapters can be merged here, got peft_type {adapter_config.get('peft_type')}")
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise PublishError("no --base given and adapter_config.json names no base_model_name_or_path")
    base = str(base)
    base_dir = local_model_dir(base)

    out_dir = Path(out)
    if check_out:
        check_out_dir(out_dir, overwrite, {"--adapter": adapter_dir, "--base": base_dir, "--tokenizer": tokenizer_dir,
                                           "--config": training_config, "--trainer-state": metrics,
                                           "--eval-stats": eval_stats})

    # Card inputs, read now so a bad file fails before the merge.
    if isinstance(training_config, (str, os.PathLike)):
        training_config = load_training_config(training_config)
    elif training_config is None:
        training_config, _ = find_training_config(adapter_dir)
    config = as_plain_dict(training_config)
    method = method or infer_method(config)
    if method is None and need_method:
        raise PublishError("the training method is not recorded in the training config: pass --method sdft|sdpo|sdzero "
                           "(the model card names it)")
    if method is not None and method not in METHODS:
        raise PublishError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    metrics = metrics if metrics is not None else find_trainer_state(adapter_dir)
    try:
        eval_stats = read_eval_stats(eval_stats)
    except (ValueError, OSError) as error:
        raise PublishError(f"--eval-stats: {error}") from error
    if base_model_id is None:
        candidates = [base, str(adapter_config.get("base_model_name_or_path") or ""), str(config.get("base_model") or "")]
        base_model_id = next((name for name in candidates if is_hub_id(name)), base)

    base_quant = base_quantization(base_dir)
    trained_4bit, evidence = adapter_trained_in_4bit(adapter_dir, config, adapter_config, base_quant)
    if tokenizer_dir is not None:
        tokenizer_source = str(tokenizer_dir)
    elif has_tokenizer(adapter_dir):
        tokenizer_source = str(adapter_dir)
    else:
        tokenizer_source = str(base_dir or base)
    card = dict(method=method, base_model=base_model_id, training_config=config, metrics=metrics, eval_stats=eval_stats,
                datasets=list(datasets) if datasets else datasets_from_config(config), adapter_only=adapter_only,
                adapter_config=adapter_config)
    return ResolvedInputs(adapter_dir, adapter_config, base, base_dir, base_quant, out_dir, trained_4bit, evidence,
                          four_bit_settings(adapter_dir, config, base_quant), tokenizer_source, card)


def check_out_dir(out_dir: Path, overwrite: bool, inputs: dict) -> None:
    """Refuse an output folder that holds or is held by an input (resolved, so symlinks count), or that is
    not empty without `overwrite`. `inputs` maps an option name to a path, or to something that is not one."""
    resolved_out = out_dir.resolve()
    for option, value in inputs.items():
        if not isinstance(value, (str, os.PathLike)) or not os.path.exists(value):
            continue
        resolved = Path(value).resolve()
        if resolved == resolved_out or resolved_out in resolved.parents:
            raise PublishError(f"{option} {value} is inside --out {out_dir}: the output folder is replaced as a whole, "
                               "so it must not hold an input; choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise PublishError(f"--out {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PublishError(f"--out {out_dir} exists and is not empty (pass --overwrite to replace it)")


def staging_dir(out_dir: Path) -> Path:
    """A new empty folder next to `out_dir` (next to its target when `out_dir` is a symlink) to build the output in,
    so that `out_dir` is only replaced once the new output is complete (see `move_into_place`)."""
    target = out_dir.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the mode a plain mkdir would give it
    return staging


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` (or, for a symlink, the folder it points to) by `staging`: the old output is renamed aside
    and deleted only after the new one is in place."""
    target = out_dir.resolve()
    previous = None
    if target.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, previous / target.name)
    os.replace(staging, target)
    if previous is not None:
        shutil.rmtree(previous)


# ------------------------------------------------------------------------------------ the merge
def check_base_mergeable(inputs: ResolvedInputs, dequantize_4bit: bool) -> None:
    """Refuse a quantized base unless it is bitsandbytes 4-bit and `dequantize_4bit` says to dequantize it."""
    quantization = inputs.base_quantization
    if quantization and not (is_4bit_quantization(quantization) and dequantize_4bit):
        raise PublishError(
            f"the base {inputs.base} is a quantized checkpoint ({quantization.get('quant_method', '?')}): merge into the "
            "original 16-bit checkpoint instead (e.g. Qwen/Qwen3-8B, not a -bnb-4bit copy)"
            + ("; or pass --dequantize-4bit to dequantize this 4-bit base first" if is_4bit_quantization(quantization) else ""))


def load_base_for_merge(inputs: ResolvedInputs, dequantize_4bit: bool, device: str, report: MergeReport):
    """The base in float32: the original weights, or (`dequantize_4bit`) the 4-bit weights the adapter saw.

    Records the choice in `report.base_weights` (and `report.notes`).
    """
    base_config = read_json(inputs.base_dir / "config.json") if inputs.base_dir else {}
    storage_dtype = DTYPES.get(str(base_config.get("dtype") or base_config.get("torch_dtype")), torch.bfloat16)
    if is_4bit_quantization(inputs.base_quantization):
        model = model_class_for(inputs.base).from_pretrained(inputs.base, dtype=torch.float32)
        model = model.dequantize().to(torch.float32).to(device).eval()
        report.base_weights = f"the dequantized 4-bit checkpoint {inputs.base} (--dequantize-4bit), upcast to float32"
        return model
    model = load_model_float32(inputs.base, device)
    report.base_weights = f"the original {dtype_name(storage_dtype)} checkpoint, loaded in float32"
    if dequantize_4bit:
        settings = inputs.four_bit_settings
        skip = (inputs.base_quantization or {}).get("llm_int8_skip_modules") or ()
        replaced = round_trip_4bit_(model, settings, storage_dtype, skip)
        report.base_weights = (
            f"the 4-bit round trip of the {dtype_name(storage_dtype)} checkpoint (--dequantize-4bit: {replaced} Linear "
            f"weights quantized to {settings['quant_type']} with bitsandbytes, blocksize {settings['blocksize']}, "
            f"double quant {settings['double_quant']}, then dequantized: the weights QLoRA trained against)")
        if not inputs.trained_in_4bit:
            report.notes.append("--dequantize-4bit was given but nothing recorded says the adapter was trained in 4-bit")
    elif inputs.trained_in_4bit:
        report.notes.append("the adapter was trained against 4-bit weights and is merged into the 16-bit original "
                            "(the usual choice); --dequantize-4bit merges into the dequantized 4-bit weights instead")
    return model


def merge_adapter(
    base: str | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    max_shard_size: str | int = "5GB",
    dequantize_4bit: bool = False,
    tolerance: float | None = None,
    prompts=None,
    device: str = "cpu",
    tokenizer_dir: str | None = None,
    method: str | None = None,
    training_config=None,
    metrics=None,
    eval_stats=None,
    datasets: list[str] | None = None,
    base_model_id: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    api=None,
    commit_message: str | None = None,
    overwrite: bool = False,
    retries: int = 3,
    backoff_seconds: float = 2.0,
    log=print,
) -> MergeReport:
    """Merge `adapter` into `base`, save `dtype` safetensors to `out`, check it, write README.md, optionally push.

    Args:
        base: the 16/32-bit base checkpoint (path or Hub id); None: adapter_config.json's base_model_name_or_path.
            For a QLoRA adapter pass the original 16-bit checkpoint, not a pre-quantized one.
        dequantize_4bit: merge a QLoRA adapter into the 4-bit quantize -> dequantize round trip of the base (the
            weights it was trained against) instead of the original 16-bit weights; or, for a pre-quantized base,
            dequantize it.
        tolerance: absolute limit on max |logit difference| of the saved model vs base + adapter; default
            16 * unit roundoff of `dtype` * max |logit| (bf16: max |logit| / 16).
        prompts: verification prompts (strings or chat message lists); default: three short ones.
        method, training_config, metrics, eval_stats, datasets, base_model_id: model card inputs (see
            `sd_plugin.model_card.write_model_card`); the config and trainer_state.json are looked up next to
            the adapter when not given.
        push_to_hub: repository id to upload the folder to (one commit); the token is checked before merging.
        api: an `HfApi`-like object (tests); default `HfApi(token=...)`.
    Raises:
        PublishError: bad inputs or no token, before anything is written.
        MergeVerificationError: a check failed; the files stay in `out` for inspection and nothing is pushed.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    dtype = parse_dtype(dtype)
    inputs = resolve_inputs(base=base, adapter=adapter, out=out, adapter_only=False, method=method,
                            training_config=training_config, metrics=metrics, eval_stats=eval_stats, datasets=datasets,
                            base_model_id=base_model_id, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                            need_method=push_to_hub is not None)
    if push_to_hub:
        token = require_push_ready(push_to_hub, token, api)
    check_base_mergeable(inputs, dequantize_4bit)
    report = MergeReport(base_model=inputs.base, adapter=str(inputs.adapter_dir), output_dir=str(inputs.out_dir),
                         dtype=dtype_name(dtype), trained_in_4bit=inputs.trained_in_4bit,
                         trained_in_4bit_evidence=inputs.trained_in_4bit_evidence,
                         tokenizer_source=inputs.tokenizer_source, repo_id=push_to_hub)

    # ---- load the base in float32 (never into 4-bit weights unless asked) and the adapter
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer_source)
    model = load_base_for_merge(inputs, dequantize_4bit, device, report)
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:
        model.resize_token_embeddings(len(tokenizer))
        report.notes.append(f"resized the embeddings from {embeddings} to {len(tokenizer)} rows to match the tokenizer")

    token_ids = verification_inputs(tokenizer, prompts or DEFAULT_PROMPTS, device)
    report.prompts, report.positions = len(token_ids), sum(ids.shape[1] for ids in token_ids)
    base_logits = float32_logits(model, token_ids)
    model = PeftModel.from_pretrained(model, str(inputs.adapter_dir))
    check_adapter_applied(model, inputs.adapter_dir)
    reference = float32_logits(model, token_ids)
    report.adapter_effect = max_abs_diff(reference, base_logits)
    del base_logits

    # ---- merge, save once in the target dtype
    model = model.merge_and_unload()
    report.float32_merge_diff = max_abs_diff(float32_logits(model, token_ids), reference)
    staging = staging_dir(inputs.out_dir)
    cast_weights_(model, dtype)
    model.config.use_cache = True
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(staging), max_shard_size=max_shard_size)
    cast_weights_(model, torch.float32)
    rounded_in_memory = float32_logits(model, token_ids)
    del model
    gc.collect()
    if inputs.base_dir is not None and (inputs.base_dir / "generation_config.json").is_file():
        shutil.copy2(inputs.base_dir / "generation_config.json", staging / "generation_config.json")
    copy_tokenizer_files(inputs.tokenizer_source, staging, tokenizer)

    # ---- read back and check
    reloaded = load_model_float32(str(staging), device)
    from_disk = float32_logits(reloaded, token_ids)
    del reloaded
    gc.collect()
    scale = max(float(logits.abs().max()) for logits in reference)
    report.logit_scale = scale
    report.save_reload_diff = max_abs_diff(from_disk, rounded_in_memory)
    report.max_abs_logit_diff = max_abs_diff(from_disk, reference)
    if tolerance is None:
        report.tolerance = ROUNDING_TOLERANCE_FACTOR * UNIT_ROUNDOFF[dtype] * scale + ABSOLUTE_FLOOR
        report.tolerance_rule = f"{ROUNDING_TOLERANCE_FACTOR:g} x {dtype_name(dtype)} unit roundoff {UNIT_ROUNDOFF[dtype]:.3g} x max|logit|"
    else:
        report.tolerance, report.tolerance_rule = float(tolerance), "--tolerance"
    counts, problems = weight_problems(staging, dtype)
    report.tensor_dtypes = dict(counts)
    if report.float32_merge_diff > FLOAT32_MERGE_TOLERANCE * scale + ABSOLUTE_FLOOR:
        problems.append(f"the float32 merge differs from base + adapter by {report.float32_merge_diff:.3g} "
                        f"(limit {FLOAT32_MERGE_TOLERANCE * scale + ABSOLUTE_FLOOR:.3g}): the merge itself is wrong")
    if report.save_reload_diff > SAVE_RELOAD_TOLERANCE * scale + ABSOLUTE_FLOOR:
        problems.append(f"the model read back from {staging} differs from the one saved by {report.save_reload_diff:.3g}: "
                        "tensors were lost or renamed on save")
    if not math.isfinite(report.max_abs_logit_diff) or report.max_abs_logit_diff > report.tolerance:
        problems.append(f"max |logit difference| vs base + adapter is {report.max_abs_logit_diff:.4g}, above the tolerance "
                        f"{report.tolerance:.4g} ({report.tolerance_rule})")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(staging))
    if reloaded_tokenizer.chat_template != tokenizer.chat_template:
        problems.append("the saved tokenizer's chat template differs from the source's")
    report.files = list_folder_files(staging)
    if problems:
        raise MergeVerificationError(
            "merge check failed:\n  - " + "\n  - ".join(problems)
            + f"\nthe merged files are in {staging} for inspection; --out {inputs.out_dir} is unchanged; nothing was pushed",
            report)

    # ---- card and push
    if inputs.card["method"] is None:
        report.notes.append("no model card written: the training method is unknown (pass --method)")
    else:
        write_model_card(staging, **inputs.card, merge_details=report.card_details(), repo_id=push_to_hub)
        report.card = str(inputs.out_dir / "README.md")
    move_into_place(staging, inputs.out_dir)
    report.files = list_folder_files(inputs.out_dir)
    if push_to_hub:
        message = commit_message or f"Upload {inputs.card['method'].upper()} model merged with sd-plugin ({report.dtype})"
        commit = push_folder(inputs.out_dir, push_to_hub, token=token, private=private, commit_message=message, api=api,
                             retries=retries, backoff_seconds=backoff_seconds, log=log)
        report.commit_url = str(getattr(commit, "commit_url", commit))
    return report


# ------------------------------------------------------------------------------------ adapter only
def package_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    tokenizer_dir: str | None = None,
    method: str | None = None,
    training_config=None,
    metrics=None,
    eval_stats=None,
    datasets: list[str] | None = None,
    base_model_id: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    api=None,
    commit_message: str | None = None,
    overwrite: bool = False,
    retries: int = 3,
    backoff_seconds: float = 2.0,
    log=print,
) -> MergeReport:
    """Copy the adapter (weights, adapter_config.json, tokenizer, chat template) to `out` with a model card, and
    optionally push that folder. Training leftovers (optimizer state, training_args.bin, checkpoints) stay behind."""
    inputs = resolve_inputs(base=base, adapter=adapter, out=out, adapter_only=True, method=method,
                            training_config=training_config, metrics=metrics, eval_stats=eval_stats, datasets=datasets,
                            base_model_id=base_model_id, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                            need_method=push_to_hub is not None)
    if push_to_hub:
        token = require_push_ready(push_to_hub, token, api)
    report = MergeReport(base_model=inputs.base, adapter=str(inputs.adapter_dir), output_dir=str(inputs.out_dir),
                         dtype="", adapter_only=True, trained_in_4bit=inputs.trained_in_4bit,
                         trained_in_4bit_evidence=inputs.trained_in_4bit_evidence,
                         tokenizer_source=inputs.tokenizer_source, repo_id=push_to_hub)
    staging = staging_dir(inputs.out_dir)
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
    if inputs.card["method"] is None:
        report.notes.append("no model card written: the training method is unknown (pass --method)")
    else:
        write_model_card(staging, **inputs.card, merge_details=report.card_details(), repo_id=push_to_hub)
        report.card = str(inputs.out_dir / "README.md")
    move_into_place(staging, inputs.out_dir)
    report.files = list_folder_files(inputs.out_dir)
    if push_to_hub:
        message = commit_message or f"Upload {inputs.card['method'].upper()} LoRA adapter trained with sd-plugin"
        commit = push_folder(inputs.out_dir, push_to_hub, token=token, private=private, commit_message=message, api=api,
                             retries=retries, backoff_seconds=backoff_seconds, log=log)
        report.commit_url = str(getattr(commit, "commit_url", commit))
    return report


def adapter_file_names(adapter_dir: Path) -> list[str]:
    """adapter_config.json and the weights (safetensors preferred over .bin)."""
    names = ["adapter_config.json"]
    names.append("adapter_model.safetensors" if (adapter_dir / "adapter_model.safetensors").is_file() else "adapter_model.bin")
    return names


# ------------------------------------------------------------------------------------ dry run
def estimated_weight_files(base_dir: Path | None, dtype: torch.dtype, max_shard_size) -> list[tuple[str, int | None, bool]]:
    """The merged shards a save would write, sized from the base's safetensors headers (nothing is loaded)."""
    from safetensors import safe_open
    from transformers.utils.hub import convert_file_size_to_int

    paths = sorted(base_dir.glob("*.safetensors")) if base_dir is not None else []
    if not paths:
        return [("model*.safetensors (size unknown: the base is not a local safetensors checkpoint)", None, True)]
    total = 0
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                kind = view.get_dtype()
                itemsize = dtype.itemsize if kind in SAFETENSORS_FLOAT_DTYPES else SAFETENSORS_BYTES.get(kind, 1)
                total += math.prod(view.get_shape()) * itemsize
    shard_bytes = convert_file_size_to_int(max_shard_size)
    shards = max(1, math.ceil(total / shard_bytes))
    if shards == 1:
        return [("model.safetensors", total, True)]
    files = [(f"model-{index:05d}-of-{shards:05d}.safetensors", total // shards, True) for index in range(1, shards + 1)]
    return files + [("model.safetensors.index.json", None, True)]


def plan_publish(
    base: str | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    adapter_only: bool = False,
    max_shard_size: str | int = "5GB",
    dequantize_4bit: bool = False,
    tokenizer_dir: str | None = None,
    method: str | None = None,
    training_config=None,
    metrics=None,
    eval_stats=None,
    datasets: list[str] | None = None,
    base_model_id: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    overwrite: bool = False,
) -> PublishPlan:
    """What `merge_adapter` / `package_adapter` with the same arguments would write and push; touches nothing.

    Reads only small files and safetensors headers; no model is loaded, no folder created, no network used.
    """
    dtype = parse_dtype(dtype)
    inputs = resolve_inputs(base=base, adapter=adapter, out=out, adapter_only=adapter_only, method=method,
                            training_config=training_config, metrics=metrics, eval_stats=eval_stats, datasets=datasets,
                            base_model_id=base_model_id, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                            need_method=push_to_hub is not None)
    if push_to_hub is not None and not is_hub_id(push_to_hub):
        raise PublishError(f"--push-to-hub needs a repository id like 'your-name/model-name', got {push_to_hub!r}")
    _, token_source = resolve_hub_token(token)
    plan = PublishPlan(repo_id=push_to_hub, private=private, output_dir=str(inputs.out_dir), adapter_only=adapter_only,
                       files=[], token_source=token_source)
    tokenizer_dir_local = local_model_dir(inputs.tokenizer_source)
    tokenizer_files = [(name, (tokenizer_dir_local / name).stat().st_size, False) for name in TOKENIZER_FILES
                       if tokenizer_dir_local is not None and (tokenizer_dir_local / name).is_file()]
    if adapter_only:
        plan.files += [(name, (inputs.adapter_dir / name).stat().st_size, False) for name in adapter_file_names(inputs.adapter_dir)]
    else:
        check_base_mergeable(inputs, dequantize_4bit)
        plan.files += estimated_weight_files(inputs.base_dir, dtype, max_shard_size)
        config_size = (inputs.base_dir / "config.json").stat().st_size if inputs.base_dir else None
        plan.files.append(("config.json", config_size, True))
        if inputs.base_dir is not None and (inputs.base_dir / "generation_config.json").is_file():
            plan.files.append(("generation_config.json", (inputs.base_dir / "generation_config.json").stat().st_size, False))
        if inputs.trained_in_4bit or dequantize_4bit:
            plan.notes.append(f"adapter trained in 4-bit: {inputs.trained_in_4bit_evidence or 'not recorded'}; merging into "
                              + ("the dequantized 4-bit weights (--dequantize-4bit)" if dequantize_4bit else "the original 16-bit weights"))
    plan.files += tokenizer_files
    if inputs.card["method"] is not None:
        card_text = render_model_card(**inputs.card, repo_id=push_to_hub)
        plan.files.append(("README.md", len(card_text.encode("utf-8")), True))
    else:
        plan.notes.append("no model card: the training method is unknown (pass --method)")
    plan.notes.append(f"tokenizer and chat template from {inputs.tokenizer_source}")
    return plan


# ------------------------------------------------------------------------------------ after `axolotl merge-lora`
def verify_merged_model(inputs: ResolvedInputs, merged_dir: str | os.PathLike, report: MergeReport, *,
                        dtype: torch.dtype = torch.bfloat16, dequantize_4bit: bool = False, prompts=None,
                        device: str = "cpu", tolerance: float | None = None) -> list[str]:
    """Compare a merged checkpoint on disk with base + adapter (both float32); fills `report`, returns problems.

    Loads the base (and adapter) first, then frees it and loads the merged model: one model in memory at a time.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    model = load_base_for_merge(inputs, dequantize_4bit, device, report)
    token_ids = verification_inputs(tokenizer, prompts or DEFAULT_PROMPTS, device)
    report.prompts, report.positions = len(token_ids), sum(ids.shape[1] for ids in token_ids)
    base_logits = float32_logits(model, token_ids)
    model = PeftModel.from_pretrained(model, str(inputs.adapter_dir))
    check_adapter_applied(model, inputs.adapter_dir)
    reference = float32_logits(model, token_ids)
    del model
    gc.collect()
    merged = load_model_float32(str(merged_dir), device)
    from_disk = float32_logits(merged, token_ids)
    del merged
    gc.collect()
    scale = max(float(logits.abs().max()) for logits in reference)
    report.logit_scale = scale
    report.adapter_effect = max_abs_diff(reference, base_logits)
    report.max_abs_logit_diff = max_abs_diff(from_disk, reference)
    if tolerance is None:
        report.tolerance = ROUNDING_TOLERANCE_FACTOR * UNIT_ROUNDOFF[dtype] * scale + ABSOLUTE_FLOOR
        report.tolerance_rule = f"{ROUNDING_TOLERANCE_FACTOR:g} x {dtype_name(dtype)} unit roundoff {UNIT_ROUNDOFF[dtype]:.3g} x max|logit|"
    else:
        report.tolerance, report.tolerance_rule = float(tolerance), "tolerance given"
    if not math.isfinite(report.max_abs_logit_diff) or report.max_abs_logit_diff > report.tolerance:
        return [f"max |logit difference| vs base + adapter is {report.max_abs_logit_diff:.4g}, above the tolerance "
                f"{report.tolerance:.4g} ({report.tolerance_rule})"]
    return []


def post_lora_merge(
    cfg,
    adapter_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.bfloat16,
    cast: bool = True,
    verify: bool = False,
    tolerance: float | None = None,
    eval_stats=None,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    api=None,
    log=print,
) -> MergeReport:
    """After `axolotl merge-lora` (Axolotl 0.21 hook `post_lora_merge(cfg, adapter_path, output_path)`).

    Re-checks the merged tensors' dtypes (casting 16/32-bit floats to `dtype` when `cast`, refusing quantized
    ones), optionally compares logits with base + adapter (`verify`), writes the model card into
    `output_path` and optionally pushes it. The token is checked first.
    """
    dtype = parse_dtype(dtype)
    config = as_plain_dict(cfg)
    inputs = resolve_inputs(base=config.get("base_model"), adapter=adapter_path, out=output_path, adapter_only=False,
                            method=None, training_config=config, metrics=None, eval_stats=eval_stats, datasets=None,
                            base_model_id=None, tokenizer_dir=str(output_path), overwrite=False, need_method=True,
                            check_out=False)
    if push_to_hub:
        token = require_push_ready(push_to_hub, token, api)
    trained_4bit = inputs.trained_in_4bit or bool(config.get("_original_load_in_4bit") or config.get("_original_adapter") == "qlora")
    efficient = str(config.get("merge_method") or "memory_efficient") != "legacy"
    report = MergeReport(base_model=inputs.base, adapter=str(inputs.adapter_dir), output_dir=str(output_path),
                         dtype=dtype_name(dtype), trained_in_4bit=trained_4bit,
                         trained_in_4bit_evidence=inputs.trained_in_4bit_evidence or ("Axolotl config" if trained_4bit else ""),
                         tokenizer_source=str(output_path), repo_id=push_to_hub)
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
        problems += verify_merged_model(inputs, output_path, report, dtype=dtype, dequantize_4bit=trained_4bit and efficient,
                                        tolerance=tolerance)
    report.files = list_folder_files(output_path)
    if problems:
        raise MergeVerificationError("merged model check failed:\n  - " + "\n  - ".join(problems)
                                     + "\n(for quantized tensors re-run `axolotl merge-lora` with --dequant); nothing was pushed",
                                     report)
    report.card = str(write_model_card(output_path, **inputs.card, merge_details=report.card_details(), repo_id=push_to_hub))
    report.files = list_folder_files(output_path)
    if push_to_hub:
        message = f"Upload {inputs.card['method'].upper()} model merged with axolotl merge-lora"
        commit = push_folder(output_path, push_to_hub, token=token, private=private, commit_message=message, api=api, log=log)
        report.commit_url = str(getattr(commit, "commit_url", commit))
    return report


# ------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd-plugin merge",
        description="Merge a LoRA adapter into its base (bf16 safetensors), check it, write the model card, push.")
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
    parser.add_argument("--method", choices=list(METHODS), default=None, help="training method (default: from the config)")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="training config used (Axolotl YAML or trainer-arguments JSON); default: found next to the adapter")
    parser.add_argument("--trainer-state", metavar="FILE", default=None, help="trainer_state.json (default: next to the adapter)")
    parser.add_argument("--dataset", action="append", default=None, help="dataset name for the card (repeatable)")
    parser.add_argument("--base-model-id", default=None, help="Hub id of the base for the card when --base is a local path")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="tokenizer / chat template source (default: the adapter folder if it has one, else the base)")
    parser.add_argument("--device", default="cpu", help="device for the merge and the check (default cpu)")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first if it exists")
    parser.add_argument("--commit-message", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`sd-plugin merge ...`: exit 0 on success, 1 when a check on the merged model fails, 2 on bad inputs
    (nothing done), 3 when the push failed (the files are on disk)."""
    args = build_parser().parse_args(argv)
    common = dict(tokenizer_dir=args.tokenizer, method=args.method, training_config=args.config,
                  metrics=args.trainer_state, eval_stats=args.eval_stats, datasets=args.dataset,
                  base_model_id=args.base_model_id, push_to_hub=args.push_to_hub, private=args.private,
                  overwrite=args.overwrite)
    try:
        if args.dry_run:
            plan = plan_publish(args.base, args.adapter, args.out, args.dtype, adapter_only=args.adapter_only,
                                max_shard_size=args.max_shard_size, dequantize_4bit=args.dequantize_4bit, **common)
            print(plan.format())
            return 0
        if args.adapter_only:
            report = package_adapter(args.adapter, args.out, base=args.base, commit_message=args.commit_message, **common)
        else:
            report = merge_adapter(args.base, args.adapter, args.out, args.dtype, max_shard_size=args.max_shard_size,
                                   dequantize_4bit=args.dequantize_4bit, tolerance=args.tolerance, device=args.device,
                                   commit_message=args.commit_message, **common)
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
