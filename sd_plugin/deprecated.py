"""Option names of the previous release, accepted for one more release with a FutureWarning.

The options now use the names of TRL's experimental SDFT / SDPO trainers where TRL has the same setting
(`temperature`, `teacher_model_kind`, `distillation_mode: topk_logits`, ...). An old key or value still works,
in Python (`SDFTConfig(rollout_temperature=0.7)`) and in the YAML block, and warns with the new name; an old
key given together with its new name is an error. Misspelt keys are still refused: only the keys below are
translated.
"""

from __future__ import annotations

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


def _warn(message: str) -> None:
    warnings.warn(f"{message}; the old name is removed in the next release", FutureWarning, stacklevel=4)


def translate_deprecated(options: dict, prefix: str = "") -> dict:
    """`options` with old keys and `distillation_mode` values replaced by the current ones (a FutureWarning each).

    prefix: put before key names in messages (the YAML block, e.g. "sdft."). Old and new key together: ValueError.
    """
    options = dict(options)
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

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **translate_deprecated(kwargs))

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
