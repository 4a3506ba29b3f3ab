"""Access control: credentials (the exporter-toolkit web config file and the deprecated shared token), roles,
and the one middleware that authenticates and authorises every request.

What other modules use: `IDENTITY` (who a request is, set on every request), `Role`, `require(request, role)`
(raise 401/403 unless the caller's role allows it), `allowed(request, role)`, `actor(request)` (the name the
audit trail records), `set_route_role` (a route whose role is not its method's default) and
`SESSION_AUTHENTICATOR` (how a request without an Authorization header proves who it is, e.g. a cookie).
`add_login_routes` installs the console's login form and sessions; `csrf_token(request)` is the token a
browser's page must send back in X-CSRF-Token.
"""

from healer.auth.access import LEGACY_TOKEN_NAME, Access, load_access, loose_permissions, read_secret_file
from healer.auth.login import add_login_routes
from healer.auth.middleware import (
    ACCESS,
    IDENTITY,
    QUERY_CREDENTIAL_NAMES,
    SESSION_AUTHENTICATOR,
    SESSIONS,
    access_control,
    actor,
    allowed,
    csrf_token,
    identity,
    require,
    route_role,
    set_route_role,
)
from healer.auth.roles import LOOPBACK_ANYONE, NOBODY, CredentialKind, Identity, Role
from healer.auth.sessions import COOKIE_NAME, CSRF_HEADER, Sessions
from healer.auth.webconfig import (
    ClientAuthType,
    TLSServerConfig,
    TLSVersion,
    TokenSpec,
    WebConfig,
    WebConfigError,
    load_web_config,
    parse_web_config,
)

__all__ = [
    "ACCESS",
    "COOKIE_NAME",
    "CSRF_HEADER",
    "IDENTITY",
    "LEGACY_TOKEN_NAME",
    "LOOPBACK_ANYONE",
    "NOBODY",
    "QUERY_CREDENTIAL_NAMES",
    "SESSIONS",
    "SESSION_AUTHENTICATOR",
    "Access",
    "ClientAuthType",
    "CredentialKind",
    "Identity",
    "Role",
    "Sessions",
    "TLSServerConfig",
    "TLSVersion",
    "TokenSpec",
    "WebConfig",
    "WebConfigError",
    "access_control",
    "actor",
    "add_login_routes",
    "allowed",
    "csrf_token",
    "identity",
    "load_access",
    "load_web_config",
    "loose_permissions",
    "parse_web_config",
    "read_secret_file",
    "require",
    "route_role",
    "set_route_role",
]
