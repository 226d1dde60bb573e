"""Masking secrets and local paths in configuration that the project writes or prints.

`redact_secrets` replaces string values whose key looks like a credential (`api_key`, `hf_token`,
`password`, `Authorization`, ...) by "***", at any depth, so that `verifier_kwargs` with a judge's API key
can go into training_config.json, the logged training arguments and a published model card. Keys are
compared word by word, so `max_tokens`, `num_loss_tokens_to_skip`, `tokenizer` or `pad_token` stay visible.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MASK = "***"
SECRET_WORDS = frozenset({"token", "key", "apikey", "secret", "password", "passwd", "auth", "authorization",
                          "credential", "credentials"})
# `pad_token: <|endoftext|>` is a tokenizer setting, not a credential; nor is anything that ends in an id.
SPECIAL_TOKEN_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "image", "audio", "video"})
WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def key_words(key: str) -> list[str]:
    """`openaiApiKey` -> [openai, api, key]; `HF_TOKEN` -> [hf, token]; `x-api-key` -> [x, api, key]."""
    return [word.lower() for word in WORD.findall(str(key))]


def is_secret_key(key: str) -> bool:
    words = key_words(key)
    if not words or not SECRET_WORDS.intersection(words):
        return False
    if words[-1] in ("id", "ids"):
        return False
    if words[-1] == "token" and len(words) > 1 and words[-2] in SPECIAL_TOKEN_WORDS:
        return False
    return True


def redact_secrets(value):
    """A copy of `value` (dicts, lists, tuples nested in any way) with the string values of secret-looking keys
    replaced by "***". Only strings are masked: `use_auth_token: true` says nothing secret."""
    if isinstance(value, dict):
        return {key: (MASK if isinstance(item, str) and item and is_secret_key(key) else redact_secrets(item))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(item) for item in value)
    return value


def display_name(name) -> str:
    """What identifies a model or data file in a published card: a Hub id or relative path as given, an absolute
    (or `~`) path by its last component, so the card does not show the user's directory layout."""
    text = str(name)
    if os.path.isabs(os.path.expanduser(text)):
        return Path(text.rstrip("/\\")).name or text
    return text
