"""What `sd-plugin merge` is asked to do (`MergeRequest`), and everything checked about it before any work.

`resolve_inputs` reads only small files (adapter_config.json, config.json, the training config, trainer_state.json,
eval stats): paths, the adapter's base, whether it was trained in 4-bit, the tokenizer source, the card's inputs
and the output folder (never one that holds an input). The output is built in a sibling folder and renamed into
place (`staging_dir`, `move_into_place`), so `--overwrite` replaces the old output only once the new one is complete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from sd_plugin.files import (
    TEMPORARY_MARK,
    existing_ancestors,
    file_identity,
    glob_escape,
    process_alive,
    remove_stale_temporaries,
    temporary_prefix,
)
from sd_plugin.hub import PublishError
from sd_plugin.model_card import (
    METHODS,
    as_plain_dict,
    base_model_license,
    datasets_from_config,
    find_eval_results,
    find_trainer_state,
    find_training_config,
    infer_method,
    is_hub_id,
    load_training_config,
    read_eval_stats,
)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
LOG = logging.getLogger("sd_plugin")
FOUR_BIT_DEFAULTS = {"quant_type": "nf4", "double_quant": True, "blocksize": 64}


@dataclass
class MergeRequest:
    """One `sd-plugin merge` run: what to merge, how to check it, what the card says and where it is pushed.

    Args:
        adapter: the PEFT LoRA adapter folder.
        out: the output folder (the merged model, or the packaged adapter with `adapter_only`).
        base: the 16/32-bit base checkpoint (path or Hub id); None: adapter_config.json's base_model_name_or_path.
            For a QLoRA adapter pass the original 16-bit checkpoint, not a pre-quantized one.
        dtype: dtype of the saved weights ("bfloat16", "float16", "float32").
        adapter_only: publish the adapter (+ card) instead of a merged model.
        max_shard_size: the largest safetensors file written ("5GB", or bytes).
        dequantize_4bit: merge a QLoRA adapter into the 4-bit quantize -> dequantize round trip of the base (the
            weights it was trained against) instead of the original 16-bit weights; or dequantize a 4-bit base.
        tolerance: absolute limit on max |logit difference| of the saved model vs base + adapter; default
            16 * unit roundoff of `dtype` * max |logit| (bf16: max |logit| / 16).
        verify_layers: decoder layers the logits check loads (float32, with the embeddings and the head): None
            for all when their float32 copy fits in the memory available, else the first 2; 0 skips the check.
        prompts: verification prompts (strings or chat message lists); default: three short ones.
        tokenizer_dir, method, training_config, metrics, eval_stats, datasets, base_model_id: model card inputs
            (see `sd_plugin.model_card.write_model_card`); the config and trainer_state.json are looked up next to
            the adapter when not given.
        push_to_hub: repository id to upload the folder to (one commit); the token is checked before merging.
        api: an `HfApi`-like object (tests); default `HfApi(token=...)`.
    """

    adapter: str | os.PathLike
    out: str | os.PathLike
    base: str | None = None
    dtype: str = "bfloat16"
    adapter_only: bool = False
    max_shard_size: str | int = "5GB"
    dequantize_4bit: bool = False
    tolerance: float | None = None
    verify_layers: int | None = None
    prompts: list | None = None
    device: str = "cpu"
    tokenizer_dir: str | None = None
    method: str | None = None
    training_config: object = None
    metrics: object = None
    eval_stats: object = None
    datasets: list | None = None
    base_model_id: str | None = None
    push_to_hub: str | None = None
    private: bool = False
    token: str | None = None
    commit_message: str | None = None
    overwrite: bool = False
    api: object = None
    retries: int = 3
    backoff_seconds: float = 2.0
    log: object = print


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


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


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


def resolve_inputs(request: MergeRequest, *, need_method: bool, check_out: bool = True) -> ResolvedInputs:
    """Check everything that can be checked without loading a model; raise PublishError on any problem."""
    adapter_dir = Path(request.adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PublishError(f"{adapter_dir} has no adapter_config.json: --adapter must be a PEFT adapter folder")
    if not any((adapter_dir / name).is_file() for name in ADAPTER_FILES[1:]):
        raise PublishError(f"{adapter_dir} has no adapter_model.safetensors (or .bin)")
    adapter_config = read_json(adapter_dir / "adapter_config.json")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise PublishError(f"only LoRA adapters can be merged here, got peft_type {adapter_config.get('peft_type')}")
    base = request.base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise PublishError("no --base given and adapter_config.json names no base_model_name_or_path")
    base = str(base)
    base_dir = local_model_dir(base)

    out_dir = Path(request.out)
    if check_out:
        check_out_dir(out_dir, request.overwrite, {
            "--adapter": adapter_dir, "--base": base_dir, "--tokenizer": request.tokenizer_dir,
            "--config": request.training_config, "--trainer-state": request.metrics, "--eval-stats": request.eval_stats})

    # Card inputs, read now so a bad file fails before the merge.
    training_config = request.training_config
    try:
        if isinstance(training_config, (str, os.PathLike)):
            training_config = load_training_config(training_config)
        elif training_config is None:
            training_config, _ = find_training_config(adapter_dir)
        eval_stats = read_eval_stats(request.eval_stats)
    except (ValueError, OSError, yaml.YAMLError) as error:
        raise PublishError(f"reading the training config or eval stats: {error}") from error
    config = as_plain_dict(training_config)
    method = request.method or infer_method(config)
    if method is None and need_method:
        raise PublishError("the training method is not recorded in the training config: pass --method sdft|sdpo|sdzero "
                           "(the model card names it)")
    if method is not None and method not in METHODS:
        raise PublishError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    metrics = request.metrics if request.metrics is not None else find_trainer_state(adapter_dir)
    base_model_id = request.base_model_id
    if base_model_id is None:
        candidates = [base, str(adapter_config.get("base_model_name_or_path") or ""), str(config.get("base_model") or "")]
        base_model_id = next((name for name in candidates if is_hub_id(name)), base)

    base_quant = base_quantization(base_dir)
    trained_4bit, evidence = adapter_trained_in_4bit(adapter_dir, config, adapter_config, base_quant)
    if request.tokenizer_dir is not None:
        tokenizer_source = str(request.tokenizer_dir)
    elif has_tokenizer(adapter_dir):
        tokenizer_source = str(adapter_dir)
    else:
        tokenizer_source = str(base_dir or base)
    datasets = list(request.datasets) if request.datasets else datasets_from_config(config)
    card = dict(method=method, base_model=base_model_id, training_config=config, metrics=metrics, eval_stats=eval_stats,
                datasets=datasets, adapter_only=request.adapter_only, adapter_config=adapter_config,
                eval_results=find_eval_results(adapter_dir), base_license=base_model_license(base_dir))
    return ResolvedInputs(adapter_dir, adapter_config, base, base_dir, base_quant, out_dir, trained_4bit, evidence,
                          four_bit_settings(adapter_dir, config, base_quant), tokenizer_source, card)


def check_out_dir(out_dir: Path, overwrite: bool, inputs: dict) -> None:
    """Refuse an output folder that holds or is held by an input, or that is not empty without `overwrite`, or
    whose folder cannot be created. `inputs` maps an option name to a path, or to something that is not one.

    Compared by (device, inode) of every existing folder above the path as well as by resolved path, so
    symlinks, hard links and bind mounts cannot hide an input."""
    local = {option: value for option, value in inputs.items()
             if isinstance(value, (str, os.PathLike)) and os.path.exists(value)}
    out_identities = {file_identity(folder) for folder in [*existing_ancestors(out_dir), *existing_ancestors(out_dir.resolve())]}
    resolved_out = out_dir.resolve()
    for option, value in local.items():
        resolved = Path(value).resolve()
        if resolved == resolved_out or resolved_out in resolved.parents or (
                out_dir.exists() and file_identity(out_dir) in {file_identity(f) for f in existing_ancestors(value)}):
            raise PublishError(f"{option} {value} is inside --out {out_dir}: the output folder is replaced as a whole, "
                               "so it must not hold an input; choose another --out")
        if os.path.isdir(value) and file_identity(value) in out_identities:
            raise PublishError(f"--out {out_dir} is inside the input folder {option} {value}: writing there could "
                               "replace its files; choose an --out outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise PublishError(f"--out {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise PublishError(f"--out {out_dir} exists and is not empty (pass --overwrite to replace it)")
    nearest = next(iter(existing_ancestors(resolved_out.parent)), None)
    if nearest is None or not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise PublishError(f"--out {out_dir}: cannot create it ({nearest} is not a writable folder)")


def staging_dir(out_dir: Path) -> Path:
    """A new empty folder next to `out_dir` (next to its target when `out_dir` is a symlink) to build the output in,
    so that `out_dir` is only replaced once the new output is complete (see `move_into_place`).

    First the leftovers of killed runs next to it are dealt with (`recover_interrupted_output`)."""
    target = out_dir.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_output(target)
    staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(target) + "partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the mode a plain mkdir would give it
    return staging


def recover_interrupted_output(target: Path) -> None:
    """Undo what a killed `move_into_place` left: without the atomic exchange a kill between its two renames leaves
    the old output in `.NAME.sd-tmp-PID-old-*` and no `target`: put it back. Then remove the temporary folders of
    writers that are gone (a half-built output, an old output already replaced)."""
    if not target.exists() and not target.is_symlink():
        for aside in sorted(target.parent.glob(f".{glob_escape(target.name)}{TEMPORARY_MARK}*-old-*")):
            pid = aside.name[len(f".{target.name}{TEMPORARY_MARK}"):].split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)):
                os.rename(aside, target)
                LOG.warning("%s: restored the previous output, which an interrupted run had moved aside", target)
                break
    remove_stale_temporaries(target)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE, macOS renamex_np RENAME_SWAP);
    False where the system or the file system cannot (the caller falls back to two renames)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            function, arguments = libc.renameat2, (at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second),
                                                    rename_exchange)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rename_swap = 2
            function, arguments = libc.renamex_np, (os.fsencode(first), os.fsencode(second), rename_swap)
        else:
            return False
    except OSError:
        return False
    if function(*arguments) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # this file system cannot exchange: fall back
    raise OSError(error, f"cannot exchange {first} and {second}: {os.strerror(error)}")


def move_into_place(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` (or, for a symlink, the folder it points to) by the complete output in `staging`, so that
    `out_dir` always holds a complete output, the old or the new one.

    An existing output is swapped with `staging` in one atomic step (`exchange_paths`), then deleted. Where the
    file system cannot swap, the old output is renamed aside and the new one renamed in: a kill between these two
    renames leaves no `out_dir` for a moment, and the next run puts the old output back
    (`recover_interrupted_output`)."""
    target = out_dir.resolve()
    if not target.exists():
        os.replace(staging, target)
        return
    if exchange_paths(staging, target):
        shutil.rmtree(staging)  # now the old output
        return
    previous = Path(tempfile.mkdtemp(prefix=temporary_prefix(target) + "old-", dir=target.parent))
    previous.rmdir()
    os.rename(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous)


def check_base_mergeable(inputs: ResolvedInputs, dequantize_4bit: bool) -> None:
    """Refuse a quantized base unless it is bitsandbytes 4-bit and `dequantize_4bit` says to dequantize it."""
    quantization = inputs.base_quantization
    if quantization and not (is_4bit_quantization(quantization) and dequantize_4bit):
        raise PublishError(
            f"the base {inputs.base} is a quantized checkpoint ({quantization.get('quant_method', '?')}): merge into the "
            "original 16-bit checkpoint instead (e.g. Qwen/Qwen3-8B, not a -bnb-4bit copy)"
            + ("; or pass --dequantize-4bit to dequantize this 4-bit base first" if is_4bit_quantization(quantization) else ""))


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


