"""Checks every options dataclass shares: each field holds a value of its declared type, numbers are finite.

Python does not enforce a dataclass's annotations: `SDPOConfig(temperature="0.7")`, `num_generations=True` or
`epsilon=float("inf")` would otherwise be accepted and fail (or silently misbehave) steps later. `check_option_types`
runs first in each options class's `check()` and raises a ValueError naming the key. A `str` field also takes a
`Path`; verifier fields (a name or a callable) are left to `load_verifier`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any


def type_problem(value: Any, hint: Any) -> str | None:
    """None when `value` fits the annotation `hint`, else what was expected ("an integer", ...). Annotations this
    function does not know (a callable, a class) are not checked. A bool is not an integer or a number here."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        problems = [type_problem(value, option) for option in options if option is not type(None)]
        if any(problem is None for problem in problems):
            return None
        return " or ".join(problems) + (" or null" if type(None) in options else "")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else "one of " + ", ".join(map(repr, allowed))
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if hint is str:  # a file setting may be a Path
        return None if isinstance(value, (str, os.PathLike)) else "a string"
    if hint is dict or origin is dict:
        return None if isinstance(value, dict) else "a mapping"
    if hint is list or origin is list:
        return None if isinstance(value, (list, tuple)) else "a list"
    return None


def check_option_types(options: Any, options_class: type | None = None) -> None:
    """Raise ValueError naming the first field of `options_class` (default: the type of `options`) whose value does
    not fit its annotation (`type_problem`): "temperature must be a number, got '0.7' (str)"."""
    options_class = options_class or type(options)
    hints = typing.get_type_hints(options_class)
    for field in dataclasses.fields(options_class):
        if field.name.endswith("verifier"):
            continue  # a name or, in Python, a callable: `load_verifier` checks it and names what is wrong
        value = getattr(options, field.name)
        problem = type_problem(value, hints.get(field.name, Any))
        if problem is not None:
            raise ValueError(f"{field.name} must be {problem}, got {value!r} ({type(value).__name__})")


def check_reward_threshold(value: float, key: str = "success_reward_threshold") -> None:
    """A reward threshold is compared with verifier rewards, which lie in [0, 1]: outside it nothing (or
    everything) would count as a success and learning would silently stop."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be a number in [0, 1] (verifier rewards lie there), got {value!r}")


def check_learning_rate(value: Any, key: str = "learning_rate") -> None:
    """A learning rate that is not a finite number > 0 trains nothing (0), ascends the loss (< 0) or diverges."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
