"""The one rule for "is this a secret": a name (a record's field, an environment variable, a
command-line flag) that names a credential, and a value that looks like one.

Every layer asks this module, so they cannot disagree: the planner drops such flags from
extra_args, a backend refuses them in argv and masks such variables in its command line, and the
audit log redacts such fields and values. It lives in `hardware` because that is the package every
other may import (appliance -> inference, sandbox, blueprints -> hardware) and the planner is one
of its users. Standard library only: the egress proxy's audit writer imports it.

A name is split into lowercase words at separators and camelCase humps (`x-api-key`, `apiKey`,
`VLLM_API_KEY`, `accessToken`). It is a secret's name when
- any word is always a credential: secret, password, authorization, cookie... (`secret_sha256`);
- or its last word is `key` or `auth`, or ends in `token`, `apikey` or `secret`: the name holds
  the credential itself (`api_key`, `HF_TOKEN`, `--hf-token`). A word after it names something
  else about it (`key_id`, `key_file`, `HF_TOKEN_PATH`), and a count is not a token
  (`prompt_tokens`, `--max-num-batched-tokens`, `--tokenizer`, `TOKENIZERS_PARALLELISM`).
"""

from __future__ import annotations

import re

_ALWAYS = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "apikey",
        "bearer",
    }
)
_LAST = frozenset({"key", "auth"})
_LAST_SUFFIXES = ("token", "apikey", "secret")  # glued words: accesstoken, xapikey
_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")  # apiKey, APIKey
_SEPARATORS = re.compile(r"[^a-z0-9]+")

# What a credential's value looks like wherever it appears: our keys and tokens (`sk-app-...`,
# `sk-op-...`, and the upstream's `sk-...`), and an HTTP bearer credential.
SECRET_VALUE = re.compile(r"sk-[A-Za-z0-9_-]{16,}|(?i:bearer)\s+[A-Za-z0-9._~+/=-]+")


def name_words(name: str) -> list[str]:
    """`x-api-key` -> [x, api, key]; `accessToken` -> [access, token]; `HF_TOKEN` -> [hf, token]."""
    return [w for w in _SEPARATORS.split(_HUMP.sub("_", name).lower()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a field, variable or flag of this name holds a credential (see the module doc)."""
    words = name_words(name)
    if not words:
        return False
    last = words[-1]
    return last in _LAST or last.endswith(_LAST_SUFFIXES) or any(w in _ALWAYS for w in words)


def is_secret_flag(arg: str) -> bool:
    """`--api-key`, `--hf-token=x`: a flag whose name is a secret's. A value is not a flag."""
    if not arg.startswith("-"):
        return False
    return is_secret_name(arg.split("=", 1)[0])


def has_secret_value(text: str) -> bool:
    return SECRET_VALUE.search(text) is not None


def redact_secret_values(text: str, marker: str) -> str:
    """The text with every credential-looking value replaced by marker."""
    return SECRET_VALUE.sub(marker, text)
