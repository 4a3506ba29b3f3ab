"""How healer's clients reach Prometheus, Alertmanager and Grafana: TLS and authentication, as Prometheus's
`http_config` spells them (`tls_config`, `basic_auth`, `bearer_token_file`).

Files are checked when the config loads (readable, a secret file not empty, a certificate matching its key),
so a fault is one line naming the key path; secrets are read when a client starts and never appear in an
error, a log line or a repr.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import aiohttp


def readable_file(value: Path) -> Path:
    """A file that exists and can be read; the error names it and why not."""
    try:
        with value.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {value}: {exc.strerror}") from None
    return value


def _secret_file(value: Path) -> Path:
    """A file that holds a secret: readable and not blank (a blank one would silently send no credential)."""
    try:
        text = value.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {value}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{value} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{value} is empty; put the credential in it, or remove the key")
    return value


ReadableFile = Annotated[Path, AfterValidator(readable_file)]
SecretFile = Annotated[Path, AfterValidator(_secret_file)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSClientConfig(_Strict):
    """`tls_config`: the CA that signs the server's certificate, healer's own certificate for mutual TLS, the
    name to expect (and send as SNI) instead of the URL's host, and whether not to verify at all."""

    ca_file: ReadableFile | None = None
    cert_file: ReadableFile | None = None
    key_file: ReadableFile | None = None
    server_name: str | None = Field(default=None, min_length=1)
    insecure_skip_verify: bool = False

    @model_validator(mode="after")
    def _usable(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both for a client certificate, or neither")
        self.ssl_context()  # a CA that is not PEM, or a key that does not match its certificate, fails here
        return self

    def ssl_context(self) -> ssl.SSLContext:
        """A client context: the system's CAs or `ca_file`'s, the client certificate if any, TLS 1.2 at least."""
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.ca_file is not None:
                context.load_verify_locations(cafile=self.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"ca_file: {self.ca_file} holds no usable PEM certificate ({_reason(exc)})") from None
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"cert_file and key_file: {self.cert_file} and {self.key_file} are not a PEM certificate and"
                    f" its private key ({_reason(exc)})"
                ) from None
        if self.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def _reason(exc: BaseException) -> str:
    """An SSL error's reason (such as KEY_VALUES_MISMATCH), never a file's content."""
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__)


class BasicAuthConfig(_Strict):
    """`basic_auth`: a user name and the file holding its password."""

    username: str = Field(min_length=1, pattern=r"^[^:\r\n]+$")
    password_file: SecretFile


class HTTPClientConfig(_Strict):
    """The TLS and authentication keys every client section shares."""

    tls_config: TLSClientConfig | None = None
    basic_auth: BasicAuthConfig | None = None
    bearer_token_file: SecretFile | None = None

    @model_validator(mode="after")
    def _one_authentication(self) -> Self:
        if self.basic_auth is not None and self.bearer_token_file is not None:
            raise ValueError("basic_auth and bearer_token_file are exclusive; give one")
        return self

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """The context for https:// URLs; None for the library's default (the system's CAs)."""
        return self.tls_config.ssl_context() if self.tls_config is not None else None

    @property
    def server_name(self) -> str | None:
        return self.tls_config.server_name if self.tls_config is not None else None

    def authorization(self) -> str | None:
        """The Authorization header to send, read from the files now; None without credentials."""
        if self.bearer_token_file is not None:
            return f"Bearer {self.bearer_token_file.read_text().strip()}"
        if self.basic_auth is not None:
            password = self.basic_auth.password_file.read_text().strip()
            pair = f"{self.basic_auth.username}:{password}".encode()
            return f"Basic {base64.b64encode(pair).decode()}"
        return None


def client_session(
    tls: TLSClientConfig | None, authorization: str | None, timeout: aiohttp.ClientTimeout
) -> aiohttp.ClientSession:
    """An aiohttp session with a `tls_config` and an Authorization header; a request passes
    `server_hostname=tls.server_name` itself (aiohttp takes it per request)."""
    import aiohttp

    headers = {"User-Agent": "healer"}
    if authorization is not None:
        headers["Authorization"] = authorization
    connector = aiohttp.TCPConnector(ssl=tls.ssl_context()) if tls is not None else None
    return aiohttp.ClientSession(timeout=timeout, headers=headers, connector=connector)
