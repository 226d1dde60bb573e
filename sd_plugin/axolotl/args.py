"""The YAML schema: one pydantic model mixed into Axolotl's config.

    plugins: [sd_plugin.SelfDistillationPlugin]
    trainer_type: sdft            # sdft | sdpo | sdzero
    sdft:                         # the method's block: the fields of SDFTOptions (SDPOOptions, SDZeroOptions)
      distillation_alpha: 0.0
      teacher_model_kind: ema

Each block is generated from the method's options dataclass, so the YAML and the Python API cannot drift.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import typing
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from sd_plugin.deprecated import RENAMED_KEYS, translate_deprecated
from sd_plugin.option_checks import check_learning_rate, type_problem

# trainer_type -> (options dataclass, module); sdpo / sdzero resolve only when their trainers exist.
METHODS = {
    "sdft": ("sd_plugin.trainers.sdft", "SDFTOptions"),
    "sdpo": ("sd_plugin.trainers.sdpo", "SDPOOptions"),
    "sdzero": ("sd_plugin.trainers.sdzero", "SDZeroOptions"),
}


def options_class(method: str):
    module, name = METHODS[method]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ValueError(f"trainer_type: {method} is not available in this version of sd-plugin") from None


def block_model(method: str) -> type[BaseModel]:
    """A pydantic model with the options dataclass's fields, defaults and help; unknown keys are errors."""
    cls = options_class(method)
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: (hints[f.name], Field(default=f.default, description=f.metadata.get("help")))
        for f in dataclasses.fields(cls)
    }
    return create_model(f"{cls.__name__}Block", __config__=ConfigDict(extra="forbid"), **fields)


def _validated_block(method: str, block: dict | None) -> BaseModel:
    if block is not None and not isinstance(block, dict):
        raise ValueError(f"{method}: must be a mapping of {method} options, got {type(block).__name__}")
    names = {f.name for f in dataclasses.fields(options_class(method))}
    block = translate_deprecated(block or {}, prefix=f"{method}.", fields=names)
    hints = typing.get_type_hints(options_class(method))
    for key, value in block.items():
        # pydantic turns `true` into 1 for an int: a bool where no bool belongs is a mistake, not a number
        if isinstance(value, bool) and key in hints and type_problem(value, hints[key]) is not None:
            raise ValueError(f"{method}.{key} must be {type_problem(value, hints[key])}, got {value}")
    model = block_model(method).model_validate(block)
    options = options_class(method)(**model.model_dump())
    try:
        options.check()
    except ValueError as error:
        raise ValueError(f"{method}: {error}") from None
    if options.teacher_model_kind != "ema" and "teacher_update_rate" in model.model_fields_set:
        raise ValueError(f"{method}.teacher_update_rate is set but {method}.teacher_model_kind is {options.teacher_model_kind!r}: set teacher_model_kind: ema")
    return model


@functools.lru_cache(maxsize=1)
def host_config_keys() -> frozenset:
    """The keys of Axolotl's own config class. Axolotl validates the config with a class that mixes in this
    schema, so `cls.model_fields` has them already; this also covers a host that validates the plugin's keys
    on their own."""
    try:
        from axolotl.utils.schemas.config import AxolotlInputConfig
    except ImportError:
        return frozenset()
    return frozenset(AxolotlInputConfig.model_fields)


def refuse_misplaced_keys(data: dict, method: str, known: set[str]) -> None:
    """A key of a plugin block written at the top level (`sdpo_mode: policy` beside `sdpo:`) is not a key of the
    host's config, which would drop it silently: refuse it, naming the block it belongs in. `known`: the keys the
    host's config (with every plugin's) declares; those are the host's, never misplaced."""
    from sd_plugin.mixer import MixConfig

    owners: dict[str, list[str]] = {}
    for name in METHODS:
        try:
            names = [f.name for f in dataclasses.fields(options_class(name))]
        except ValueError:
            continue
        for key in names:
            owners.setdefault(key, []).append(name)
    for f in dataclasses.fields(MixConfig):
        owners.setdefault(f.name, []).append("round2_mixer")
    for old, (new, _) in RENAMED_KEYS.items():  # a deprecated name belongs where its new name does
        if new in owners:
            owners.setdefault(old, owners[new])
    for key in data:
        if key in known or key not in owners:
            continue
        block = method if method in owners[key] else owners[key][0]
        raise ValueError(f"{key} is a key of the {block}: block, not of the top level, where it would be ignored: "
                         f"move it into {block}:")


# Axolotl's own row formats that are not modules of axolotl.prompt_strategies.
HOST_TYPES = ("alpaca", "sharegpt", "completion", "pretrain", "explainchoice", "concisechoice", "summarizetldr",
              "gpteacher", "reflection", "jeopardy", "oasst", "input_output")


def is_host_strategy(kind) -> bool:
    """Whether a `datasets:` entry's `type` is one of Axolotl's own strategies (rows the plugin's trainers cannot
    read: they lack the teacher's prompt or the verifier's record). A user's module path is not refused."""
    if kind is None or isinstance(kind, dict):
        return True  # Axolotl's default / user_defined formats
    head = str(kind).split(":")[0].split(".")[0]
    if str(kind).startswith("sd_plugin."):
        return False
    if head in HOST_TYPES:
        return True
    import importlib.util

    try:
        return importlib.util.find_spec(f"axolotl.prompt_strategies.{head}") is not None
    except (ImportError, ValueError):
        return False


def strategy_advice(method: str, phase: str | None, entry: dict) -> str:
    """Which of our strategies reads the rows of a host-typed `datasets:` entry, by method."""
    field = entry.get("field_messages")
    messages = f", field_messages: {field}" if field and field != "messages" else ""
    if method == "sdft":
        return ("for chat rows ({'messages': [...]}) use type: sd_plugin.axolotl.strategies.trace" + messages +
                " (one SDFT row per assistant turn: the turn is the demonstration); for prompt + demonstration columns "
                "use type: sd_plugin.axolotl.strategies.sdft")
    if method == "sdzero" and phase == "srt":
        return "phase: srt trains on collected revisions: use type: sd_plugin.axolotl.strategies.sdzero"
    return ("use type: sd_plugin.axolotl.strategies.prompts with rows {'prompt': str | messages, <the fields the "
            "verifier reads>}; a chat column works as the prompt with field_human: <column> if it ends with the user's turn")


def check_dataset_types(method: str, block: BaseModel, data: dict) -> None:
    """Refuse, before the model loads, `datasets:` entries that use Axolotl's own strategies (chat_template,
    alpaca, ...): their rows reach the trainer without the teacher's prompt, and every row would be invalid."""
    for key in ("datasets", "test_datasets"):
        for index, entry in enumerate(data.get(key) or []):
            if not isinstance(entry, dict) or not is_host_strategy(entry.get("type")):
                continue
            kind = entry.get("type")
            shown = "no type (Axolotl's default format)" if kind is None else f"type: {kind}"
            raise ValueError(
                f"{key}[{index}] ({entry.get('path', '?')}) has {shown}, one of Axolotl's own strategies: trainer_type: "
                f"{method} needs rows prepared by sd-plugin's strategies; {strategy_advice(method, getattr(block, 'phase', None), entry)}. "
                "See README \"Use your own data\"")


class SelfDistillationArgs(BaseModel):
    """Keys the plugin adds to Axolotl's config."""

    trainer_type: Optional[Literal["sdft", "sdpo", "sdzero"]] = Field(
        default=None, description="Self-distillation method; unset = the plugin does nothing."
    )
    sdft: Optional[dict[str, Any]] = Field(default=None, description="SDFT options (fields of sd_plugin.trainers.sdft.SDFTOptions).")
    sdpo: Optional[dict[str, Any]] = Field(default=None, description="SDPO options (fields of SDPOOptions).")
    sdzero: Optional[dict[str, Any]] = Field(default=None, description="SD-Zero options (fields of SDZeroOptions).")
    round2_mixer: Optional[dict[str, Any]] = Field(
        default=None, description="Diversity-preserving mixer whose output becomes the training data (see sd_plugin.mixer)."
    )

    @model_validator(mode="before")
    @classmethod
    def check_self_distillation(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        method = data.get("trainer_type")
        blocks = [m for m in METHODS if data.get(m) is not None]
        if method is None:
            if blocks:
                raise ValueError(f"the {blocks[0]}: block is set but trainer_type is not: add trainer_type: {blocks[0]}")
            return data
        if not isinstance(method, str):
            raise ValueError(f"trainer_type must be one of {', '.join(METHODS)} (a single name), got {method!r}")
        if method not in METHODS:
            return data  # the Literal reports it with the allowed values
        refuse_misplaced_keys(data, method, set(cls.model_fields) | host_config_keys())
        if data.get("rl"):
            raise ValueError(f"rl: {data['rl']} and trainer_type: {method} cannot be combined: remove rl (the plugin runs its own trainer)")
        for other in blocks:
            if other != method:
                raise ValueError(f"the {other}: block is set but trainer_type is {method}")
        if data.get("sample_packing"):
            raise ValueError(f"sample_packing cannot be used with trainer_type: {method}: rollouts are sampled during training, so they cannot be packed ahead of time")
        context_parallel = data.get("context_parallel_size") or 1
        if isinstance(data.get("context_parallel"), dict):
            context_parallel = data["context_parallel"].get("size") or context_parallel
        if int(context_parallel) > 1:
            raise ValueError(
                f"context parallelism (context_parallel_size: {context_parallel}) is not supported with trainer_type: "
                f"{method}: Axolotl's context-parallel hooks split every forward of the model, including the rollouts' "
                "generate() calls, and do not gather the hidden states the loss reads; use one GPU per sequence"
            )
        block = _validated_block(method, data.get(method))
        check_dataset_types(method, block, data)
        for key in ("micro_batch_size", "eval_batch_size"):
            size = data.get(key)
            if size is not None and int(size) % block.num_generations:
                raise ValueError(
                    f"{key} ({size}) counts completions (TRL's meaning) and must be a multiple of {method}.num_generations "
                    f"({block.num_generations}): each micro-batch holds whole groups. Before this release it counted "
                    f"prompts: {key}: {int(size) * block.num_generations} gives the batch it gave then")
        sequence_len = data.get("sequence_len")
        if sequence_len is not None and (isinstance(sequence_len, bool) or not isinstance(sequence_len, int)):
            raise ValueError(f"sequence_len must be an integer (tokens), got {sequence_len!r} ({type(sequence_len).__name__})")
        learning_rate = data.get("learning_rate")
        if isinstance(learning_rate, str):  # YAML reads `2e-5` as a string; Axolotl converts it, so do we
            try:
                learning_rate = float(learning_rate)
            except ValueError:
                pass
        if learning_rate is not None:
            check_learning_rate(learning_rate)
        needed = block.max_prompt_length + block.max_completion_length
        if sequence_len is not None and sequence_len < needed:
            raise ValueError(
                f"sequence_len ({sequence_len}) is below {method}.max_prompt_length + {method}.max_completion_length ({needed})"
            )
        return {**data, method: block.model_dump()}  # a new dict: the caller's config is not changed


@dataclasses.dataclass
class SelfDistillationTrainingArgs:
    """Training-arguments mixin: the method's options travel to the trainer as one dict."""

    sd_options: Optional[dict] = None

    def to_dict(self) -> dict:
        """TrainingArguments.to_dict (what W&B and TensorBoard log) with secrets in `sd_options` masked."""
        from sd_plugin.redact import redact_secrets

        return redact_secrets(super().to_dict())
