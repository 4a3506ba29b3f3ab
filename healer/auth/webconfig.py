"""The exporter-toolkit web configuration file (`--web.config.file`), with healer's role extension.

The format is the one node_exporter, Prometheus and Alertmanager read, so an SRE writes one file the
same way for all of them: `tls_server_config` and `basic_auth_users` (bcrypt hashes). healer adds
two keys that the format lacks: `healer_roles` (a user's role; a user without one is a viewer) and
`healer_tokens` (bearer tokens read from files, each with a name and a role).
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from healer.auth.roles import Role
from healer.config.http_client import readable_file
from healer.config.loading import format_location

# bcrypt as htpasswd -B, Go's x/crypto/bcrypt and Python's bcrypt write it: version, cost 04..31, 53 characters.
_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
# A name that an audit line, a log line and an HTTP header can carry as is; no ':' (it ends a basic-auth user).
_NAME = r"^[A-Za-z0-9_.@-]{1,64}$"
# Keys of the toolkit's format that healer does not implement: refused by name rather than silently ignored,
# since an SRE who sets them expects them to hold.
_UNSUPPORTED = {
    "http_server_config": "healer does not implement http_server_config (HTTP/2, response headers); remove it",
    "rate_limit": "healer does not implement rate_limit; put a reverse proxy in front of healer to limit requests",
}


class WebConfigError(Exception):
    """The web configuration or a credential file cannot be used; `errors` holds one line per fault, each
    naming the file and the key path. No line carries a secret."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class ClientAuthType(enum.StrEnum):
    """Go's tls.ClientAuthType names, as the toolkit spells them."""

    NO_CLIENT_CERT = "NoClientCert"
    REQUEST_CLIENT_CERT = "RequestClientCert"
    REQUIRE_ANY_CLIENT_CERT = "RequireAnyClientCert"
    VERIFY_CLIENT_CERT_IF_GIVEN = "VerifyClientCertIfGiven"
    REQUIRE_AND_VERIFY_CLIENT_CERT = "RequireAndVerifyClientCert"


class TLSVersion(enum.StrEnum):
    """TLS protocol versions as the toolkit spells them; ordered oldest first."""

    TLS10 = "TLS10"
    TLS11 = "TLS11"
    TLS12 = "TLS12"
    TLS13 = "TLS13"


_VERIFYING = {ClientAuthType.VERIFY_CLIENT_CERT_IF_GIVEN, ClientAuthType.REQUIRE_AND_VERIFY_CLIENT_CERT}
_REQUIRING = {ClientAuthType.REQUIRE_ANY_CLIENT_CERT, ClientAuthType.REQUIRE_AND_VERIFY_CLIENT_CERT}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _readable_file(value: Path, info: ValidationInfo) -> Path:
    """A file that exists and can be read; relative to the web config file's folder, as the toolkit reads it."""
    base = (info.context or {}).get("base")
    return readable_file(value if value.is_absolute() or base is None else Path(base) / value)


ReadableFile = Annotated[Path, AfterValidator(_readable_file)]


def _bcrypt_hash(value: str) -> SecretStr:
    # The hash is a secret in the toolkit's format: the message describes it without repeating it.
    if not isinstance(value, str) or not _BCRYPT.match(value):
        raise ValueError("not a bcrypt hash ($2y$, $2b$ or $2a$, cost 04-31, 53 characters; htpasswd -nBC 10 USER)")
    return SecretStr(value)


BcryptHash = Annotated[SecretStr, BeforeValidator(_bcrypt_hash)]


class TLSServerConfig(_Strict):
    """`tls_server_config`, parsed and checked; what serving TLS needs, in the toolkit's names."""

    cert_file: ReadableFile | None = None
    key_file: ReadableFile | None = None
    cert: str | None = None
    key: SecretStr | None = None
    client_ca_file: ReadableFile | None = None
    client_ca: str | None = None
    client_auth_type: ClientAuthType = ClientAuthType.NO_CLIENT_CERT
    client_allowed_sans: list[str] = Field(default_factory=list)
    min_version: TLSVersion = TLSVersion.TLS12
    max_version: TLSVersion = TLSVersion.TLS13
    cipher_suites: list[str] = Field(default_factory=list)
    prefer_server_cipher_suites: bool = True
    curve_preferences: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for what, file, inline in (
            ("cert", self.cert_file, self.cert),
            ("key", self.key_file, self.key),
            ("client_ca", self.client_ca_file, self.client_ca),
        ):
            if file is not None and inline is not None:
                raise ValueError(f"{what}_file and {what} are exclusive; give one")
        if self.cert_file is None and self.cert is None:
            raise ValueError("a certificate is required: cert_file (or cert inline)")
        if self.key_file is None and self.key is None:
            raise ValueError("a private key is required: key_file (or key inline)")
        has_ca = self.client_ca_file is not None or self.client_ca is not None
        if self.client_auth_type in _VERIFYING and not has_ca:
            raise ValueError(
                f"client_auth_type {self.client_auth_type} verifies client certificates: set client_ca_file"
            )
        if has_ca and self.client_auth_type not in _VERIFYING:
            raise ValueError(
                "client_ca_file is set but client_auth_type does not verify client certificates;"
                " set client_auth_type: RequireAndVerifyClientCert"
            )
        if self.client_allowed_sans and self.client_auth_type not in _REQUIRING:
            raise ValueError(
                "client_allowed_sans needs client_auth_type RequireAnyClientCert or RequireAndVerifyClientCert"
            )
        versions = list(TLSVersion)
        if versions.index(self.min_version) > versions.index(self.max_version):
            raise ValueError(f"min_version {self.min_version} is newer than max_version {self.max_version}")
        return self


class TokenSpec(_Strict):
    """One of `healer_tokens`: a bearer token read from a file, with the name the audit trail records."""

    name: str = Field(pattern=_NAME)
    file: Path
    role: Role


class WebConfig(_Strict):
    """The whole web configuration file."""

    tls_server_config: TLSServerConfig | None = None
    basic_auth_users: dict[Annotated[str, Field(pattern=_NAME)], BcryptHash] = Field(default_factory=dict)
    healer_roles: dict[str, Role] = Field(default_factory=dict)
    healer_tokens: list[TokenSpec] = Field(default_factory=list)
    # Declared only to be refused with a reason (see _UNSUPPORTED); a default is never validated.
    http_server_config: Any = None
    rate_limit: Any = None

    @field_validator("http_server_config", "rate_limit")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        raise ValueError(_UNSUPPORTED[str(info.field_name)])

    @field_validator("healer_roles")
    @classmethod
    def _known_users(cls, value: dict[str, Role], info: ValidationInfo) -> dict[str, Role]:
        if "basic_auth_users" not in info.data:  # itself invalid, and reported as such
            return value
        users = info.data["basic_auth_users"]
        unknown = [name for name in value if name not in users]
        if unknown:
            raise ValueError(f"{', '.join(unknown)} not in basic_auth_users; a role is given to a user defined there")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        seen = set(self.basic_auth_users)
        for index, token in enumerate(self.healer_tokens):
            if token.name in seen:
                raise ValueError(
                    f"healer_tokens[{index}].name: {token.name!r} is used twice (users and tokens share one namespace,"
                    " so the audit trail names one credential)"
                )
            seen.add(token.name)
        return self

    def role_of(self, user: str) -> Role:
        """A user's role: from healer_roles, else viewer (the least a person who can log in may do)."""
        return self.healer_roles.get(user, Role.VIEWER)


def parse_web_config(data: Any, source: Path | str) -> WebConfig:
    """Validate parsed YAML, resolving relative file names against `source`'s folder; WebConfigError names
    each key at fault."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise WebConfigError([f"{source}: (top level): the web config must be a YAML mapping"])
    try:
        return WebConfig.model_validate(data, context={"base": Path(source).parent})
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            # A check across keys (the model's own) names the key at fault in its message.
            where = f"{format_location(error['loc'])}: " if error["loc"] else ""
            lines.append(f"{source}: {where}{message}")
        raise WebConfigError(lines) from None


def load_web_config(path: Path) -> WebConfig:
    """Read and validate a web configuration file; WebConfigError names the file and every key at fault."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise WebConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise WebConfigError([f"{path}: {where}invalid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    return parse_web_config(data, path)
