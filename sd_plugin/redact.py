"""Masking secrets and local paths in configuration that the project writes or prints.

`redact_secrets` masks secrets by key and by value, at any depth, so that `verifier_kwargs` with a judge's API key
can go into training_config.json, the logged training arguments and a published model card:

- by key: every string under a key of the credential family (`api_key`, `api_keys`, `hf_token`, `password`,
  `passphrase`, `credentials`, `Authorization`, ...), also inside lists and dicts. Keys are compared word by word,
  so `max_tokens`, `num_loss_tokens_to_skip`, `tokenizer` or `pad_token` stay visible;
- by value, under any key: the shapes of known tokens (hf_, sk-, ghp_, github_pat_, glpat-, xox?-, AKIA, AIza,
  JWTs), URL credentials (`https://user:pass@host` -> `https://***@host`) and `Bearer` header values.

`redact_card_text` applies this to a Markdown model card (its YAML blocks). What cannot be masked: a secret under
an ordinary key with no recognisable shape (`note: my password is hunter2`, a 40-hex W&B key under `extra`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MASK = "***"
# A key is secret when one of its words is in this family (singular and plural), e.g. `api_keys`, `hub_token`,
# `db_password`, `ssh_passphrase`, `aws_credentials`, `client_secret`.
SECRET_WORDS = frozenset({
    "token", "key", "apikey", "apikeys", "secret", "secrets", "password", "passwords", "passwd", "passwds",
    "passphrase", "passphrases", "pwd", "auth", "authorization", "credential", "credentials", "cookie", "cookies",
    "bearer", "dsn", "sas",
})
# `tokens` and `keys` alone count things (`max_tokens`, `keys`); after a credential's qualifier they are secrets
# (`api_keys`, `hf_tokens`, `access_tokens`).
PLURAL_WORDS = frozenset({"tokens", "keys"})
CREDENTIAL_QUALIFIERS = frozenset({"api", "access", "auth", "secret", "private", "hf", "hub", "bearer", "session",
                                   "refresh", "client", "openai", "anthropic", "github", "gitlab", "wandb", "aws",
                                   "ssh", "signing", "encryption", "service", "app", "bot", "user"})
# `pad_token: <|endoftext|>` is a tokenizer setting, not a credential; nor is anything that ends in an id.
SPECIAL_TOKEN_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "image", "audio", "video"})
WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Values that are credentials whatever their key: the published shapes of common tokens, and the user:password
# part of a URL. A match is replaced in place, so the rest of the string (a URL, a command line) stays readable.
TOKEN_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"hf_[A-Za-z0-9]{20,}"                          # Hugging Face
    r"|sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}"        # OpenAI, Anthropic
    r"|gh[pousr]_[A-Za-z0-9]{20,}"                  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{20,}"                # GitHub fine-grained tokens
    r"|glpat-[A-Za-z0-9_-]{20,}"                    # GitLab
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"               # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"                   # AWS access key ids
    r"|AIza[0-9A-Za-z_-]{35}"                       # Google API keys
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"  # JWTs
    r")"
)
URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@]+)@")
# An HTTP Authorization value: "Bearer" and a token-like word (16+ characters with a digit), not "bearer of news".
BEARER = re.compile(r"(?i)\b(bearer)\s+(?=[A-Za-z._~+/=-]*[0-9])[A-Za-z0-9._~+/=-]{16,}")


def key_words(key: str) -> list[str]:
    """`openaiApiKey` -> [openai, api, key]; `HF_TOKEN` -> [hf, token]; `x-api-key` -> [x, api, key]."""
    return [word.lower() for word in WORD.findall(str(key))]


def is_secret_key(key: str) -> bool:
    words = key_words(key)
    if not words:
        return False
    if words[-1] in ("id", "ids"):
        return False
    if words[-1] == "token" and len(words) > 1 and words[-2] in SPECIAL_TOKEN_WORDS:
        return False
    if SECRET_WORDS.intersection(words):
        return True
    return any(word in PLURAL_WORDS and index > 0 and words[index - 1] in CREDENTIAL_QUALIFIERS
               for index, word in enumerate(words))


def redact_text(text: str) -> str:
    """`text` with token-shaped substrings, URL credentials (`https://user:pass@host` -> `https://***@host`) and
    `Bearer ...` / `Basic ...` header values replaced by "***"."""
    if not isinstance(text, str) or not text:
        return text
    text = TOKEN_SHAPES.sub(MASK, text)
    text = URL_CREDENTIALS.sub(lambda match: f"{match['scheme']}{MASK}@", text)
    return BEARER.sub(lambda match: f"{match[1]} {MASK}", text)


def mask_all(value):
    """Every string in `value` (nested lists, tuples, dicts) replaced by "***"; numbers, booleans and None kept."""
    if isinstance(value, str):
        return MASK if value else value
    if isinstance(value, dict):
        return {key: mask_all(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_all(item) for item in value)
    return value


def redact_secrets(value):
    """A copy of `value` (dicts, lists, tuples nested in any way) with secrets masked:

    - under a secret-looking key (`is_secret_key`), every string, also inside lists and dicts (`api_keys: [..]`);
    - anywhere, strings shaped like a known token (hf_..., sk-..., ghp_..., AKIA...) and URL credentials.
    Only strings are masked: `use_auth_token: true` says nothing secret. The caller's value is not changed."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: (mask_all(item) if is_secret_key(key) else redact_secrets(item)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(item) for item in value)
    return value


YAML_BLOCK = re.compile(r"(```ya?ml[^\n]*\n)(.*?)(\n?```)", re.DOTALL)


def redact_yaml_text(text: str) -> str:
    """A YAML document with its secrets masked (`redact_secrets` of the parsed value, dumped back: comments and
    layout are lost). Text that does not parse is replaced by a note: it cannot be checked for secrets."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return "# (configuration omitted: it is not valid YAML, so it could not be checked for secrets)"
    if redact_secrets(value) == value and redact_text(text) == text:
        return text  # nothing to mask: keep the user's layout and comments
    return yaml.safe_dump(redact_secrets(value), sort_keys=False, allow_unicode=True).rstrip("\n")


def redact_card_text(text: str) -> str:
    """A model card (Markdown) with secrets masked: each fenced YAML block (Axolotl pastes the training config
    into its card verbatim, `hub_token` included) by `redact_yaml_text`, then the whole text by `redact_text`."""
    text = YAML_BLOCK.sub(lambda match: match[1] + redact_yaml_text(match[2]) + match[3], text)
    return redact_text(text)


JSON_KEY_LINE = re.compile(r'^(?P<indent>\s*)"(?P<key>[^"]+)":\s*(?P<rest>.*)$')
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def redact_log_text(text: str) -> str:
    """A log with secrets masked in the indented JSON it prints (Axolotl logs its whole validated config, one key per
    line, into output_dir/debug.log): the strings of a secret key's line, and of every line nested under it, become
    "***"; then `redact_text` masks token shapes and URL credentials anywhere."""
    lines, nested_under = [], None  # the indent of the secret key whose list or mapping is open
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip())
        if nested_under is not None and indent > nested_under and line.strip():
            lines.append(QUOTED.sub(f'"{MASK}"', line))
            continue
        nested_under = None
        match = JSON_KEY_LINE.match(line)
        if match and is_secret_key(match["key"]):
            if match["rest"].rstrip().rstrip(",") in ("[", "{"):
                nested_under = indent
            line = line[:match.start("rest")] + QUOTED.sub(f'"{MASK}"', match["rest"])
        lines.append(line)
    return redact_text("\n".join(lines))


def display_name(name) -> str:
    """What identifies a model or data file in a published card: a Hub id or relative path as given, an absolute
    (or `~`) path by its last component, so the card does not show the user's directory layout."""
    text = redact_text(str(name))  # a dataset URL may carry credentials
    if os.path.isabs(os.path.expanduser(text)):
        return Path(text.rstrip("/\\")).name or text
    return text
