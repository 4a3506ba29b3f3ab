"""Fill `{labels.NAME}` and `{annotations.NAME}` placeholders from an alert, safely.

A value enters an action only after it passes, in this order:

1. it exists (a missing label or annotation is an error, never an empty string);
2. it is at most MAX_VALUE_LENGTH (1024) characters long;
3. it contains no ASCII control character (NUL, newline, carriage return, escape, ...);
4. it fully matches the allowlist pattern of `params.label_pattern(KEY)`, where KEY is the label
   name for a label (`allow_labels: {service: '^[a-z0-9-]+$'}`) and `annotations.NAME` for an
   annotation (`allow_labels: {annotations.summary: '^[ -~]+$'}`), so a label and an annotation
   with the same name never share a pattern. Without an entry the conservative
   DEFAULT_LABEL_PATTERN applies.

Checks 2 and 3 hold whatever the pattern says, so even `.*` cannot let a 100 kB value or a
newline through.

Three ways to substitute:

* `render`: for argv elements, environment values, header values and systemd units, which config
  validation guarantees are either a literal or exactly one whole placeholder. The checked value
  replaces the placeholder verbatim; it is never seen by a shell.
* `render_url`: placeholders anywhere in a URL, each value percent-encoded with
  `urllib.parse.quote(value, safe="")`, so it stays inside one path segment or query value; the
  values `.` and `..` are refused because URL normalisation would turn them into path traversal.
* `render_body`: placeholders anywhere in an HTTP body, each value JSON-string escaped
  (`json.dumps(value)[1:-1]`), so the body is meant to be JSON with placeholders inside strings.

Each also fills `{secret.NAME}` (anywhere in the string, encoded the same way) when the runner
passes the secrets' values, which it does only to run, never to plan: a plan keeps the
placeholder. Labels and secrets are substituted in one pass, so a label value that reads
`{secret.X}` stays that text and never pulls a secret in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from urllib.parse import quote

from healer.config.secrets import SECRET_PLACEHOLDER, fill
from healer.config.strategy_params import PLACEHOLDER, StrategyParams
from healer.strategies.runner import AlertContext, UnsafeLabelError

Secrets = Mapping[str, str] | None
_ANY_PLACEHOLDER = re.compile(f"{PLACEHOLDER.pattern}|{SECRET_PLACEHOLDER.pattern}")

MAX_VALUE_LENGTH = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHOWN = 80


def allow_key(kind: str, name: str) -> str:
    """The `allow_labels` key that governs a placeholder: `NAME` for labels, `annotations.NAME`."""
    return name if kind == "labels" else f"annotations.{name}"


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def lookup(kind: str, name: str, params: StrategyParams, alert: AlertContext) -> str:
    """Return the value of `labels.NAME` or `annotations.NAME` after every safety check."""
    key = allow_key(kind, name)
    noun = "label" if kind == "labels" else "annotation"
    source = alert.labels if kind == "labels" else alert.annotations
    value = source.get(name)

    def unsafe(reason: str) -> UnsafeLabelError:
        return UnsafeLabelError(key, reason, noun=noun, name=name)

    if value is None:
        raise unsafe("is missing from the alert")
    if len(value) > MAX_VALUE_LENGTH:
        raise unsafe(f"value is {len(value)} characters long; at most {MAX_VALUE_LENGTH} are allowed")
    if _CONTROL.search(value):
        raise unsafe(f"value {_shown(value)} contains a control character such as NUL or newline")
    pattern = params.label_pattern(key)
    if not pattern.fullmatch(value):
        raise unsafe(f"value {_shown(value)} does not match {pattern.pattern}")
    return value


def render(value: str, params: StrategyParams, alert: AlertContext, secrets: Secrets = None) -> str:
    """Return a literal (its `{secret.X}` filled in when `secrets` is given), or the checked value
    of a whole `{labels.X}` placeholder.

    Raises UnsafeLabelError for a missing or disallowed value and ValueError for a string that
    mixes a placeholder with other text (config validation refuses those already).
    """
    match = PLACEHOLDER.fullmatch(value)
    if match is not None:
        return lookup(match.group(1), match.group(2), params, alert)
    if PLACEHOLDER.search(value):
        raise ValueError(f"{value!r}: a template must be exactly one whole placeholder")
    return value if secrets is None else fill(value, secrets)


def _one_pass(text: str, label: Callable[[str, str], str], secrets: Secrets, encode: Callable[[str], str]) -> str:
    """Substitute label placeholders through `label`, and secrets (when given) through `encode`."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return label(match.group(1), match.group(2))
        if secrets is None:
            return match.group(0)
        return encode(secrets[match.group(3)])

    return _ANY_PLACEHOLDER.sub(substitute, text)


def render_url(url: str, params: StrategyParams, alert: AlertContext, secrets: Secrets = None) -> str:
    """Substitute every placeholder in a URL with its checked, percent-encoded value."""

    def substitute(kind: str, name: str) -> str:
        value = lookup(kind, name, params, alert)
        if value in (".", ".."):
            raise UnsafeLabelError(
                allow_key(kind, name),
                f"value {value!r} would be a relative path segment in the URL",
                noun="label" if kind == "labels" else "annotation",
                name=name,
            )
        return quote(value, safe="")

    return _one_pass(url, substitute, secrets, lambda value: quote(value, safe=""))


def _json_string(value: str) -> str:
    return json.dumps(value)[1:-1]


def render_body(body: str, params: StrategyParams, alert: AlertContext, secrets: Secrets = None) -> str:
    """Substitute every placeholder in a body with its checked, JSON-string-escaped value."""
    return _one_pass(body, lambda kind, name: _json_string(lookup(kind, name, params, alert)), secrets, _json_string)
