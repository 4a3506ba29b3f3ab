"""Secrets by reference: the top-level `secrets:` section and the `{secret.NAME}` placeholder.

    secrets:
      db_password: {file: /etc/healer/db_password}
      api_key: {env: HEALER_API_KEY}

A secret is read when config loads (an unreadable or empty source is a config error naming the
key) and read again each time a step runs, so a rotated file is picked up. Only the runners fill
`{secret.NAME}` in, at run time, in exec `command`/`env` and http `url`/`headers`/`body`; plans,
the audit trail, logs, the console and `test-alert` keep the placeholder. Every configured value
is masked (MASK) in a step's output and detail before it leaves the runner.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, model_validator

SECRET_PLACEHOLDER = re.compile(r"\{secret\.([A-Za-z_][A-Za-z0-9_]*)\}")
SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MASK = "***"

# Where each built-in type fills secrets in; a placeholder anywhere else would be sent verbatim.
SECRET_FIELDS: dict[str, tuple[str, ...]] = {"exec": ("command", "env"), "http": ("url", "headers", "body")}


class SecretError(ValueError):
    """A secret cannot be read; the message names its source, never its value."""


class SecretRef(BaseModel):
    """Where one secret is read from: exactly one of a file or an environment variable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Path | None = None
    env: str | None = None

    @model_validator(mode="after")
    def _one_readable_source(self) -> SecretRef:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")
        self.read()
        return self

    def source(self) -> str:
        """`file /path` or `env NAME`, for messages."""
        return f"file {self.file}" if self.file is not None else f"environment variable {self.env}"

    def read(self) -> str:
        """The value now, without its trailing newline; SecretError when unreadable or empty."""
        if self.file is not None:
            try:
                value = self.file.read_text()
            except OSError as exc:
                raise SecretError(f"cannot read {self.source()}: {exc.strerror or type(exc).__name__}") from None
            except UnicodeDecodeError:
                raise SecretError(f"{self.source()} is not UTF-8 text") from None
        else:
            assert self.env is not None
            value = os.environ.get(self.env, "")
        value = value.rstrip("\r\n")
        if not value.strip():
            raise SecretError(f"{self.source()} is empty or unset")
        return value


def check_names(secrets: Mapping[str, SecretRef]) -> Mapping[str, SecretRef]:
    """Refuse a secret name that a `{secret.NAME}` placeholder could not spell."""
    for name in secrets:
        if not SECRET_NAME.fullmatch(name):
            raise ValueError(f"secret name {name!r} must match {SECRET_NAME.pattern}")
    return secrets


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")


def reference_errors(strategies: Mapping[str, BaseModel], secrets: Mapping[str, SecretRef]) -> list[str]:
    """One line per `{secret.NAME}` that names no configured secret or sits where it is not filled in."""
    errors = []
    for name, params in strategies.items():
        kind = str(getattr(params, "type", ""))
        allowed = SECRET_FIELDS.get(kind, ())
        for field, value in params.model_dump(mode="json").items():
            for path, text in _strings(value, f"strategies.{name}.{field}"):
                for match in SECRET_PLACEHOLDER.finditer(text):
                    if match.group(1) not in secrets:
                        known = ", ".join(sorted(secrets)) or "none configured"
                        errors.append(f"{path}: unknown secret {match.group(1)!r} (secrets: {known})")
                    elif field not in allowed:
                        where = ", ".join(allowed) or "no field of this type"
                        errors.append(f"{path}: {{secret.NAME}} is filled in only in {where}")
    return errors


def read_all(secrets: Mapping[str, SecretRef]) -> dict[str, str]:
    """Every secret's value now, by name; raises SecretError naming the first unreadable one."""
    values = {}
    for name, ref in secrets.items():
        try:
            values[name] = ref.read()
        except SecretError as exc:
            raise SecretError(f"secret {name}: {exc}") from None
    return values


def fill(text: str, values: Mapping[str, str], encode: Any = None) -> str:
    """Replace each `{secret.NAME}` in `text` by its value (passed through `encode` when given)."""

    def substitute(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        return str(encode(value)) if encode is not None else value

    return SECRET_PLACEHOLDER.sub(substitute, text)


class Masker:
    """Masks every configured secret value, raw and as URL- or JSON-encoded, in a text."""

    def __init__(self, values: Iterable[str]) -> None:
        forms = set()
        for value in values:
            if value:
                forms.update({value, quote(value, safe=""), json.dumps(value)[1:-1]})
        # Longest first, so a secret containing another is masked whole.
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text
