"""Roles and the identity a request is authenticated as."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Role(enum.StrEnum):
    """What a credential may do. Each credential has one role (the deprecated shared token has two)."""

    # Posts the webhook and nothing else: Alertmanager's credential cannot read the audit trail.
    ALERTMANAGER = "alertmanager"
    # Reads the API, /metrics and the console.
    VIEWER = "viewer"
    # A viewer who may also approve, reject, pause, unpause, close the circuit, open and cancel goals
    # and acknowledge optimisations.
    OPERATOR = "operator"


# The roles each role satisfies: an operator may do whatever a viewer may; an alertmanager only its own.
_SATISFIES: dict[Role, frozenset[Role]] = {
    Role.ALERTMANAGER: frozenset({Role.ALERTMANAGER}),
    Role.VIEWER: frozenset({Role.VIEWER}),
    Role.OPERATOR: frozenset({Role.VIEWER, Role.OPERATOR}),
}
# The order in which a role is shown when an identity has several (the deprecated token's alertmanager+operator).
_RANK = (Role.OPERATOR, Role.VIEWER, Role.ALERTMANAGER)


class CredentialKind(enum.StrEnum):
    """How a request proved who it is."""

    BASIC = "basic"  # a user of basic_auth_users
    SESSION = "session"  # a user of basic_auth_users who logged in to the console (its session cookie)
    TOKEN = "token"  # noqa: S105 - a kind of credential, not one: a bearer token of healer_tokens
    LEGACY_TOKEN = "legacy_token"  # noqa: S105 - server.auth.bearer_token_file or HEALER_TOKEN
    ANONYMOUS = "anonymous"  # no credential (every role when none is configured, as before access control)


@dataclass(frozen=True)
class Identity:
    """Who a request is: the credential's name and its roles; the audit trail records `name`."""

    name: str
    roles: frozenset[Role]
    kind: CredentialKind

    def may(self, needed: Role) -> bool:
        """Tell whether one of this identity's roles satisfies `needed`."""
        return any(needed in _SATISFIES[role] for role in self.roles)

    @property
    def role(self) -> Role | None:
        """The highest role, for display; None for an anonymous caller without any."""
        return next((role for role in _RANK if role in self.roles), None)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "roles": sorted(self.roles), "kind": self.kind}


# The caller of an open route (health, readiness, or /metrics when open) who sent no valid credential.
NOBODY = Identity("anonymous", frozenset(), CredentialKind.ANONYMOUS)
# Every caller when no credential at all is configured: healer then only listens on loopback.
LOOPBACK_ANYONE = Identity("anonymous", frozenset(Role), CredentialKind.ANONYMOUS)
