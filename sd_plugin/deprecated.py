"""Option names of the previous release, accepted for one more release with a FutureWarning.

The options now use the names of TRL's experimental SDFT / SDPO trainers where TRL has the same setting
(`temperature`, `teacher_model_kind`, `distillation_mode: topk_logits`, ...). An old key or value still works,
in Python (`SDFTConfig(rollout_temperature=0.7)`) and in the YAML block, and warns with the new name; an old
key given together with its new name is an error. Misspelt keys are still refused: only the keys below are
translated.

TRL's own spellings of a setting we name differently (`max_reprompt_len`, `teacher_prompt_template`) are
accepted without a warning: a config written for TRL's trainers runs unchanged where the concept is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

# old key -> (new key, how the old value becomes the new one)
RENAMED_KEYS = {
    "rollout_temperature": ("temperature", None),
    "rollout_top_p": ("top_p", None),
    "rollout_top_k": ("top_k", None),
    "teacher": ("teacher_model_kind", None),
    "teacher_ema_rate": ("teacher_update_rate", None),
    "importance_sampling_clip": ("distillation_is_clip", None),
    "success_threshold": ("success_reward_threshold", None),
    "use_feedback": ("include_environment_feedback", None),
    "feedback_only_without_solution": ("environment_feedback_only_without_solution", None),
    "grpo_epsilon": ("epsilon", None),
    # TRL asks the opposite question: whether a successful rollout may NOT be its own teacher's solution.
    "include_own_solution": ("dont_reprompt_on_self_success", lambda include: not include),
}
# distillation_mode: old value -> TRL's value
RENAMED_MODES = {"full": "full_logits", "topk": "topk_logits", "sampled": "sampled_token"}


def trl_teacher_template(template: str) -> str:
    """TRL's `teacher_prompt_template` ({prompt}, {privileged_context}) as our `teacher_template` ({question},
    {demonstration}): both fill the last user message with the question and the demonstration."""
    if "{prompt}" not in template or "{privileged_context}" not in template:
        raise ValueError("teacher_prompt_template (TRL's name) must contain both {prompt} and {privileged_context}")
    return template.replace("{prompt}", "{question}").replace("{privileged_context}", "{demonstration}")


# TRL's key -> (our key, how TRL's value becomes ours); accepted silently, since both name the same setting.
TRL_SPELLINGS = {
    # SDPO's teacher prompt cap. TRL keeps the last N tokens of a longer reprompt; we never cut the question
    # and train that rollout without a teacher signal instead (counted in self_distillation/teacher_prompt_overflow).
    "max_reprompt_len": ("max_teacher_prompt_length", None),
    # SDFT's teacher prompt.
    "teacher_prompt_template": ("teacher_template", trl_teacher_template),
}
# The previous release's teacher_sync_steps default (0: never hard-copy) is TRL's default now (1: EMA every step).
OLD_TEACHER_SYNC_OFF = 0


# Logged metric: old name -> (new name, the old value from the new one). Both are logged until the next release,
# so dashboards keyed on the old name keep working; the new names follow one scheme: method metrics under
# `self_distillation/`, TRL's name where TRL logs the same quantity.
RENAMED_METRICS = {
    "success_fraction": ("self_distillation/success_fraction", None),  # SDPO
    "correct_fraction": ("self_distillation/success_fraction", None),  # SD-Zero: the same idea, one name
    # TRL's share of rollouts whose teacher is reprompted with a signal: the complement of the old metric.
    "no_teacher_signal_fraction": ("self_distillation/reprompt_sample_fraction", lambda value: 1.0 - value),
    "clip_fraction": ("clip_ratio/region_mean", None),  # TRL's GRPO: tokens clipped in the direction that counts
    "teacher_prompt_overflow": ("self_distillation/teacher_prompt_overflow", None),
}


def with_deprecated_metrics(logs: dict[str, float], old_names: set[str]) -> dict[str, float]:
    """`logs` plus, for each name in `old_names` (the method's), its old name (see RENAMED_METRICS), also under
    the `eval_` prefix."""
    added = {}
    for old in old_names:
        new, convert = RENAMED_METRICS[old]
        for prefix in ("", "eval_"):
            if f"{prefix}{new}" in logs:
                value = logs[f"{prefix}{new}"]
                added[f"{prefix}{old}"] = convert(value) if convert is not None else value
    return {**logs, **added}


def _warn(message: str) -> None:
    warnings.warn(f"{message}; the old name is removed in the next release", FutureWarning, stacklevel=4)


def translate_deprecated(options: dict, prefix: str = "", fields: set[str] | None = None) -> dict:
    """`options` with old keys and `distillation_mode` values replaced by the current ones (a FutureWarning each),
    and TRL's spellings by ours (silently).

    prefix: put before key names in messages (the YAML block, e.g. "sdft."). Old and new key together: ValueError.
    fields: the options class's field names: a TRL spelling whose counterpart the class lacks is a ValueError.
    """
    options = dict(options)
    for trl_key, (ours, convert) in TRL_SPELLINGS.items():
        if trl_key not in options:
            continue
        if fields is not None and ours not in fields:
            raise ValueError(f"{prefix}{trl_key} is TRL's name of {ours}, which this trainer does not have")
        if ours in options:
            raise ValueError(f"{prefix}{trl_key} and {prefix}{ours} are both set: {trl_key} is TRL's name of {ours}; keep one")
        value = options.pop(trl_key)
        options[ours] = convert(value) if convert is not None else value
    if options.get("teacher_sync_steps") == OLD_TEACHER_SYNC_OFF and not isinstance(options["teacher_sync_steps"], bool):
        options.pop("teacher_sync_steps")
        warnings.warn(f"{prefix}teacher_sync_steps: 0 is the previous release's default ('never copy the student into "
                      f"the teacher'); {prefix}teacher_sync_steps now has TRL's meaning (how often the EMA teacher "
                      "updates, default 1): remove the key (0 is refused in the next release)", FutureWarning, stacklevel=3)
    for old, (new, convert) in RENAMED_KEYS.items():
        if old not in options:
            continue
        if new in options:
            raise ValueError(f"{prefix}{old} and {prefix}{new} are both set: {old} is the deprecated name of {new}; "
                             f"keep {new} only")
        value = options.pop(old)
        options[new] = convert(value) if convert is not None else value
        how = f" (= not {old})" if convert is not None else ""
        _warn(f"{prefix}{old} is deprecated: use {prefix}{new}{how}, TRL's name")
    mode = options.get("distillation_mode")
    if isinstance(mode, str) and mode in RENAMED_MODES:
        options["distillation_mode"] = RENAMED_MODES[mode]
        _warn(f"{prefix}distillation_mode: {mode} is deprecated: use distillation_mode: {RENAMED_MODES[mode]}, TRL's name")
    return options


def accepts_deprecated_names(cls):
    """Class decorator for an options dataclass: its constructor translates old keyword names and mode values."""
    init = cls.__init__

    names = {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **translate_deprecated(kwargs, fields=names))

    cls.__init__ = __init__
    return cls


def resolve_deprecated_flag(args, old_flag: str, new_flag: str, default):
    """A command's value of `new_flag`, else of its deprecated alias `old_flag` (a FutureWarning), else `default`.

    Both flags are declared with default None (the old one hidden from --help); both given: ValueError.
    """
    old, new = (getattr(args, flag.lstrip("-").replace("-", "_")) for flag in (old_flag, new_flag))
    if old is None:
        return default if new is None else new
    if new is not None:
        raise ValueError(f"{old_flag} and {new_flag} are both set: {old_flag} is the deprecated name of {new_flag}; "
                         f"keep {new_flag} only")
    _warn(f"{old_flag} is deprecated: use {new_flag}")
    return old
