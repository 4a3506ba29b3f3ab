"""The credentials healer accepts, loaded once at start, and checking a presented credential against them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

from healer.auth.roles import CredentialKind, Identity, Role
from healer.auth.webconfig import TLSServerConfig, WebConfig, WebConfigError, load_web_config
from healer.config import TOKEN_ENV, HealerConfig

# The name the audit trail records for the deprecated shared token.
LEGACY_TOKEN_NAME = "legacy-token"  # noqa: S105 - a name, not a secret
# Checked against when a user name is unknown, so that a wrong name costs as long as a wrong password and
# response times do not tell which user names exist (the toolkit does the same). Cost 10, of no password.
_DUMMY_HASH = b"$2b$10$PSNF6HCDbFmJGakdu4xQ9OI4CpaiRros5kYBDnfl69wiby/dQvgia"
# Verified logins are remembered (as digests) so that each request does not pay bcrypt's ~70 ms; bounded.
_CACHE_LIMIT = 1024


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def loose_permissions(path: Path, what: str) -> str | None:
    """A warning when a credential file can be read or written by group or others, else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # reading it reports the fault
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"{what}: {path} is readable or writable by group or others (mode {stat.S_IMODE(mode):04o});"
            " make it readable by healer's user only (chmod 600)"
        )
    return None


def read_secret_file(path: Path) -> tuple[str | None, str | None]:
    """The stripped content of a credential file, or why it cannot serve as one (never the content)."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    except UnicodeDecodeError:
        return None, f"{path} is not UTF-8 text"
    if not value:
        # Silently meaning "no authentication" would open every endpoint; an empty file is a mistake.
        return None, f"{path} is empty; put the credential in it, or remove the key"
    return value, None


@dataclass(frozen=True)
class _Token:
    digest: bytes  # sha256 of the token: equal lengths make compare_digest's time independent of the value
    identity: Identity


@dataclass
class Access:
    """Every credential healer accepts, with its identity; built by `load_access`."""

    tokens: tuple[_Token, ...] = ()
    users: Mapping[str, tuple[bytes, Identity]] = field(default_factory=dict)
    web_config: WebConfig | None = None
    # /metrics without a credential (server.auth.metrics_open).
    metrics_open: bool = False
    warnings: list[str] = field(default_factory=list)
    _verified: dict[bytes, Identity] = field(default_factory=dict)
    # Digests of passwords seen to be valid, to refuse them in a URL (only their hashes are configured).
    _passwords: set[bytes] = field(default_factory=set)

    @property
    def no_credentials(self) -> bool:
        """No credential at all: every caller may do everything, so healer listens on loopback only."""
        return not self.tokens and not self.users

    @property
    def reads_closed(self) -> bool:
        """Reads need a viewer once any credential exists, the deprecated shared token included: a token that
        guards approvals guards nothing if the audit trail it protects (plans, outputs) is open to anyone."""
        return not self.no_credentials

    @property
    def names_people(self) -> bool:
        """Tell whether credentials tell people apart: any of the web config's. With only the deprecated shared
        token (or none) every caller looks alike, so the audit name a caller states is kept (see `actor`)."""
        return any(token.identity.kind is not CredentialKind.LEGACY_TOKEN for token in self.tokens) or bool(self.users)

    @property
    def tls(self) -> TLSServerConfig | None:
        """The parsed `tls_server_config`, for serving HTTPS."""
        return self.web_config.tls_server_config if self.web_config is not None else None

    def token_identity(self, presented: str) -> Identity | None:
        """The identity of a bearer token, compared in constant time against every token."""
        digest = _digest(presented)
        found = None
        for token in self.tokens:  # no early exit: the time taken does not tell which token matched
            if hmac.compare_digest(digest, token.digest):
                found = token.identity
        return found

    def credential_of(self, user: str) -> bytes:
        """A digest of the user's password hash as configured now (empty for no such user): a session keeps
        the one it was opened with, so that a changed password ends it."""
        entry = self.users.get(user)
        return hashlib.sha256(entry[0]).digest() if entry is not None else b""

    async def basic_identity(self, user: str, password: str) -> Identity | None:
        """The identity of a user whose password matches its bcrypt hash; bcrypt runs off the event loop."""
        entry = self.users.get(user)
        hashed = entry[0] if entry is not None else _DUMMY_HASH
        key = _digest(user, password, hashed.decode())
        if entry is not None and key in self._verified:
            return entry[1]
        valid = await asyncio.to_thread(_check_password, password, hashed)
        if entry is None or not valid:
            return None
        if len(self._verified) >= _CACHE_LIMIT:
            self._verified.clear()
            self._passwords.clear()
        self._verified[key] = entry[1]
        self._passwords.add(_digest(password))
        return entry[1]

    def is_credential(self, value: str) -> bool:
        """Tell whether a string is a configured token or a password that has logged in since start."""
        return self.token_identity(value) is not None or _digest(value) in self._passwords


def _check_password(password: str, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password.encode(), hashed)
    except ValueError:  # longer than bcrypt's 72 bytes: no hash can match it
        return False


def load_access(
    config: HealerConfig,
    config_source: Path | str = "<config>",
    web_config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Access:
    """Read the web config file (`web_config_file` overrides server.web_config_file), its token files and the
    deprecated shared token; raise WebConfigError with every fault, naming the file and the key."""
    env = os.environ if environ is None else environ
    web_path = web_config_file or config.server.web_config_file
    web = load_web_config(web_path) if web_path is not None else None
    errors: list[str] = []
    warnings: list[str] = []
    tokens: list[tuple[str, _Token]] = []  # (key path, token)
    users: dict[str, tuple[bytes, Identity]] = {}
    if web is not None and web_path is not None:
        if warning := loose_permissions(web_path, "web config file"):
            warnings.append(warning)
        for user, hashed in web.basic_auth_users.items():
            users[user] = (
                hashed.get_secret_value().encode(),
                Identity(user, frozenset({web.role_of(user)}), CredentialKind.BASIC),
            )
        for index, spec in enumerate(web.healer_tokens):
            where = f"{web_path}: healer_tokens[{index}].file"
            path = spec.file if spec.file.is_absolute() else web_path.parent / spec.file
            value, problem = read_secret_file(path)
            if problem is not None:
                errors.append(f"{where}: {problem}")
                continue
            assert value is not None
            if warning := loose_permissions(path, f"healer_tokens[{index}].file"):
                warnings.append(warning)
            identity = Identity(spec.name, frozenset({spec.role}), CredentialKind.TOKEN)
            tokens.append((where, _Token(_digest(value), identity)))
    legacy = _legacy_token(config, config_source, env, errors, warnings)
    if legacy is not None:
        tokens.append(legacy)
    errors += _shared_values(tokens)
    if errors:
        raise WebConfigError(errors)
    return Access(
        tuple(token for _, token in tokens),
        users,
        web,
        metrics_open=config.server.auth.metrics_open,
        warnings=warnings,
    )


def _legacy_token(
    config: HealerConfig, source: Path | str, env: Mapping[str, str], errors: list[str], warnings: list[str]
) -> tuple[str, _Token] | None:
    """The deprecated shared token (HEALER_TOKEN first, then server.auth.bearer_token_file), with the
    alertmanager and operator roles it always had."""
    value = env.get(TOKEN_ENV, "").strip()  # a blank variable is unset, as shells leave it
    where = f"the environment variable {TOKEN_ENV}"
    path = config.server.auth.bearer_token_file
    if not value and path is not None:
        where = f"{source}: server.auth.bearer_token_file"
        read, problem = read_secret_file(path)
        if problem is not None:
            errors.append(f"{where}: {problem}")
            return None
        assert read is not None
        value = read
        if warning := loose_permissions(path, "server.auth.bearer_token_file"):
            warnings.append(warning)
    if not value:
        return None
    warnings.append(
        "server.auth.bearer_token_file and HEALER_TOKEN are deprecated: the one shared token has the alertmanager"
        " and operator roles and cannot tell people apart; give each person a user and Alertmanager a token of"
        " its own in a web config file (docs/access-control.md)"
    )
    roles = frozenset({Role.ALERTMANAGER, Role.OPERATOR})
    return where, _Token(_digest(value), Identity(LEGACY_TOKEN_NAME, roles, CredentialKind.LEGACY_TOKEN))


def _shared_values(tokens: list[tuple[str, _Token]]) -> list[str]:
    """Two credentials with one value would make the audit trail name the wrong one: an error."""
    first: dict[bytes, str] = {}
    errors = []
    for where, token in tokens:
        if token.digest in first:
            errors.append(f"{where}: holds the same token as {first[token.digest]}; each credential needs its own")
        else:
            first[token.digest] = where
    return errors
