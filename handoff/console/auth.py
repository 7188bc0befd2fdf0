"""Who uses the console, and what they may do.

A person is known in one of three ways, tried in order:

- a **trusted identity header** (`HANDOFF_CONSOLE_PROXY_HEADER`, e.g. `X-Forwarded-User`) set by a
  reverse proxy that signed the person in (OIDC in front of an internal tool); the header is
  believed only from the proxy's own addresses (`HANDOFF_CONSOLE_PROXY_ADDRESSES`), and ignored
  from anyone else;
- a **bearer credential** in `Authorization`: a console token (`HANDOFF_CONSOLE_TOKENS`, entries
  `NAME=TOKEN`: the token names its person) or a JWT checked as handoff's other servers check
  them (its subject names the person);
- a **session cookie** the sign-in page gives for one of those credentials, signed with the
  console's secret and valid for `SESSION_S`, with the role the person signed in with.

With none of them configured the console listens on loopback only, and its one user is the
person running it (their login name), an operator.

Roles (`HANDOFF_CONSOLE_ROLES`, entries `NAME=ROLE` or `NAME=approver:SCOPE|SCOPE`, a scope being
an agent id or a capability): a viewer reads; an approver also decides hops (those to the agents
or capabilities of its scopes, when it has any); an operator also steers, cancels and re-runs.
A person the setting does not name is a viewer; a JWT with the operator scope is an operator's,
one with `APPROVER_SCOPE` an approver's.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from enum import IntEnum

from handoff.errors import InvalidRequest
from handoff.models import AgentCapability, HopRecord
from handoff.servers.http import BearerAuth, BearerVerifier, is_loopback
from handoff.settings import Settings, token_list

SESSION_COOKIE = "handoff_console"
SESSION_S = 8 * 3600
APPROVER_SCOPE = "handoff:approver"
"""The JWT scope of a person who may decide hops."""
MAX_NAME_CHARS = 200
ENV_TOKENS = Settings.env_name("console_tokens")
ENV_PROXY_HEADER = Settings.env_name("console_proxy_header")


class Role(IntEnum):
    """What a person may do; each role may do what the ones below it may."""

    VIEWER = 1
    APPROVER = 2
    OPERATOR = 3


@dataclass(frozen=True)
class Person:
    """A signed-in person: the name decisions are recorded under, their role, and for an approver
    the agents and capabilities whose hops they may decide (none: every hop)."""

    name: str
    role: Role
    scopes: frozenset[str] = frozenset()

    def may_decide(self, hop: HopRecord) -> bool:
        if self.role >= Role.OPERATOR:
            return True
        if self.role < Role.APPROVER:
            return False
        return not self.scopes or hop.to_agent in self.scopes or (
            hop.capability is not None and hop.capability.value in self.scopes)

    @property
    def may_operate(self) -> bool:
        return self.role >= Role.OPERATOR


@dataclass(frozen=True)
class ConsoleAuth:
    """How the console knows people (see the module's text); `configured` when any way is."""

    tokens: dict[str, str] = field(default_factory=dict, repr=False)
    """Console tokens: token -> the person it names."""
    bearer: BearerAuth = BearerAuth()
    proxy_header: str | None = None
    proxy_addresses: frozenset[str] = frozenset()
    roles: dict[str, tuple[Role, frozenset[str]]] = field(default_factory=dict)
    secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    @property
    def configured(self) -> bool:
        return bool(self.tokens or self.bearer.configured or self.proxy_header)

    @classmethod
    def from_settings(cls, env: Settings, bearer: BearerAuth = BearerAuth()) -> ConsoleAuth:
        """The console's ways of knowing people from its settings; one line on a malformed one."""
        tokens: dict[str, str] = {}
        for entry in token_list(env.console_tokens):
            name, sep, token = entry.partition("=")
            if not sep or not name.strip() or not token.strip():
                raise InvalidRequest(f"{ENV_TOKENS}: each entry is NAME=TOKEN")
            tokens[token.strip()] = name.strip()
        header = env.console_proxy_header.strip() or None
        addresses = frozenset(token_list(env.console_proxy_addresses))
        if header and not addresses:
            raise InvalidRequest(f"{ENV_PROXY_HEADER} needs the proxy's addresses in "
                                 f"{Settings.env_name('console_proxy_addresses')}")
        secret = env.console_secret.encode() if env.console_secret else os.urandom(32)
        return cls(tokens=tokens, bearer=bearer, proxy_header=header, proxy_addresses=addresses,
                   roles=parse_roles(env.console_roles), secret=secret)

    def require_on(self, host: str) -> None:
        if not is_loopback(host) and not self.configured:
            raise InvalidRequest(f"the console: to listen on {host} beyond loopback, configure who may use it "
                                 f"({ENV_TOKENS}, {ENV_PROXY_HEADER}, or --jwks-url)")


def parse_roles(text: str) -> dict[str, tuple[Role, frozenset[str]]]:
    """`NAME=ROLE[:SCOPE|SCOPE]` entries, comma separated; one line on a malformed one."""
    roles: dict[str, tuple[Role, frozenset[str]]] = {}
    known = ", ".join(r.name.lower() for r in Role)
    capabilities = {c.value for c in AgentCapability}
    for entry in token_list(text):
        name, sep, rest = entry.partition("=")
        role_name, _, scope_text = rest.partition(":")
        role = Role.__members__.get(role_name.strip().upper())
        if not sep or not name.strip() or role is None:
            raise InvalidRequest(f"{Settings.env_name('console_roles')}: {entry[:80]!r} is not NAME=ROLE "
                                 f"(roles: {known})")
        named = (s.strip() for s in scope_text.split("|") if s.strip())
        scopes = frozenset(s.upper() if s.upper() in capabilities else s for s in named)
        if scopes and role is not Role.APPROVER:
            raise InvalidRequest(f"{Settings.env_name('console_roles')}: only an approver has scopes ({entry[:80]!r})")
        roles[name.strip()] = (role, scopes)
    return roles


class People:
    """Finds the person behind a request (`person`), signs sessions and cross-site request
    forgery tokens for them."""

    def __init__(self, auth: ConsoleAuth) -> None:
        self.auth = auth
        self._verifier = BearerVerifier(auth.bearer) if auth.bearer.configured else None
        self._local = Person(_login_name(), Role.OPERATOR)

    async def person(self, headers: dict[str, str], peer: str | None, cookie: str | None) -> Person | None:
        """Who makes a request (lower-cased `headers`, the peer's address, the session cookie), or
        None when nobody known does."""
        if not self.auth.configured:
            return self._local
        header = self.auth.proxy_header
        if header and peer in self.auth.proxy_addresses:
            name = headers.get(header.lower(), "").strip()
            if name:
                return self._named(name) if _acceptable(name) else None
        from_bearer = await self.from_credential(headers.get("authorization", "").partition(" ")[2].strip(),
                                                 scheme=headers.get("authorization", "").partition(" ")[0])
        if from_bearer is not None:
            return from_bearer
        return self._from_session(cookie) if cookie else None

    async def from_credential(self, credential: str, *, scheme: str = "Bearer") -> Person | None:
        """The person a console token or a JWT names; None when it names nobody."""
        if scheme.lower() != "bearer" or not credential:
            return None
        for token, name in self.auth.tokens.items():
            if hmac.compare_digest(credential.encode(), token.encode()):
                return self._named(name)
        if self._verifier is None:
            return None
        principal = await self._verifier.principal(f"Bearer {credential}")
        if principal is None:
            return None
        name = principal.name.removeprefix("jwt:")
        person = self._named(name)
        if principal.operator:
            return Person(name, Role.OPERATOR)
        if APPROVER_SCOPE in principal.scopes and person.role < Role.APPROVER:
            return Person(name, Role.APPROVER)
        return person

    def _named(self, name: str) -> Person:
        role, scopes = self.auth.roles.get(name, (Role.VIEWER, frozenset()))
        return Person(name, role, scopes)

    def session_cookie(self, person: Person, now: float | None = None) -> str:
        """A cookie value naming `person` until `SESSION_S` from now, signed."""
        expires = int((time.time() if now is None else now) + SESSION_S)
        body = base64.urlsafe_b64encode(f"{expires}|{int(person.role)}|{person.name}".encode()).decode().rstrip("=")
        return f"{body}.{self._sign('session', body)}"

    def _from_session(self, cookie: str) -> Person | None:
        body, _, signature = cookie.partition(".")
        if len(cookie) > 1024 or not hmac.compare_digest(signature, self._sign("session", body)):
            return None
        try:
            padded = body + "=" * (-len(body) % 4)
            expires, role, name = base64.urlsafe_b64decode(padded.encode()).decode().split("|", 2)
            if int(expires) < time.time():
                return None
            signed_in_as = Role(int(role))
        except (ValueError, UnicodeDecodeError):
            return None
        if not _acceptable(name):
            return None
        # the role the person signed in with (a JWT's scope gives one the setting may not): a change
        # of the setting applies from their next sign-in
        return Person(name, signed_in_as, self._named(name).scopes if signed_in_as is Role.APPROVER else frozenset())

    def csrf_token(self, person: Person) -> str:
        """The token every state-changing form of `person` carries (and no other site can know)."""
        return self._sign("csrf", person.name)

    def csrf_valid(self, person: Person, token: str) -> bool:
        return bool(token) and hmac.compare_digest(token, self.csrf_token(person))

    def _sign(self, purpose: str, text: str) -> str:
        digest = hmac.new(self.auth.secret, f"{purpose}|{text}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _acceptable(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME_CHARS and name.isprintable()


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local"
