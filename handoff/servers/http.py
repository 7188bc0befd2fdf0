"""Who may call handoff's own HTTP servers (the codec server, the A2A server): bearer tokens
and/or JWTs checked against a JWKS URL with a required issuer and audience. Without any, a
server listens on loopback only."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from dataclasses import dataclass, field

from handoff.errors import InvalidRequest

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
JWT_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"]


class AuthRefused(InvalidRequest):
    """A server cannot be started as asked (e.g. beyond loopback without authentication)."""


@dataclass(frozen=True)
class BearerAuth:
    """Bearer tokens and/or JWTs signed by a key of a JWKS (with their issuer and audience)."""

    tokens: tuple[str, ...] = field(default=(), repr=False)
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.tokens or self.jwks_url)

    def __post_init__(self) -> None:
        if self.jwks_url and not (self.issuer and self.audience):
            raise AuthRefused("a JWKS URL needs the JWT issuer and audience it must check")

    def require_on(self, host: str, what: str, how: str) -> None:
        """Refuse to serve `what` on `host` beyond loopback without authentication (`how`: how to
        configure it)."""
        if not is_loopback(host) and not self.configured:
            raise AuthRefused(f"{what}: to listen on {host} beyond loopback, configure authentication ({how})")


class BearerVerifier:
    """Checks an `Authorization` header against a `BearerAuth`."""

    def __init__(self, auth: BearerAuth) -> None:
        self._auth = auth
        self._jwks = None
        if auth.jwks_url:
            import jwt  # PyJWT: only a deployment that checks JWTs needs it loaded

            self._jwt = jwt
            self._jwks = jwt.PyJWKClient(auth.jwks_url, cache_keys=True, lifespan=300, timeout=5)

    async def identity(self, header: str | None) -> str | None:
        """Who the credential in `header` is (a JWT's subject, or `token-N` for the Nth configured
        token); None when it is missing or not valid."""
        scheme, _, credential = (header or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return None
        for index, token in enumerate(self._auth.tokens):
            if hmac.compare_digest(credential.encode(), token.encode()):
                return f"token-{index + 1}"
        if self._jwks is None:
            return None
        return await asyncio.to_thread(self._jwt_subject, credential)

    def _jwt_subject(self, token: str) -> str | None:
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
            claims = self._jwt.decode(token, key.key, algorithms=JWT_ALGORITHMS, issuer=self._auth.issuer,
                                      audience=self._auth.audience, options={"require": ["exp", "iss", "aud"]})
        except (self._jwt.PyJWTError, ValueError, KeyError):
            return None
        return str(claims.get("sub") or "jwt")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
