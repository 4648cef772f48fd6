"""Bearer token verification: key sources, a JWKS cache, and `Verifier.verify(token)`.

Key sources, all optional and combined (API.md, "Auth"):

- an HS256 secret (`TODO_JWT_SECRET`, or the development secret when nothing else is set);
- PEM public keys (`TODO_JWT_PUBLIC_KEY`: PEM text or a path; several blocks allowed);
- a JWKS file (`TODO_JWT_JWKS_FILE`), re-read when it changes;
- a JWKS URL (`TODO_JWT_JWKS_URL`), fetched without blocking the event loop, cached, and
  refreshed when a token names an unknown `kid` or the cache is older than its max age, at
  most once per `min_refresh` seconds (failed attempts count too).

Every key carries the one algorithm its type allows (Ed25519: EdDSA, RSA: RS256, EC P-256:
ES256, the secret: HS256). A token is only tried against keys whose algorithm equals its
header's `alg`, so `none` never verifies and a public key never reaches an HMAC verifier.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from todo_cqrs.config import Settings
from todo_cqrs.domain import text_problem

log = logging.getLogger("todo_cqrs.auth")

LEEWAY = 30  # seconds, for exp, nbf and iat
VERIFIED_CACHE_SIZE = 10_000  # tokens whose verified claims are kept a while
ASYMMETRIC = frozenset({"EdDSA", "RS256", "ES256"})
MIN_RSA_BITS = 2048
FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 1024 * 1024


class InvalidToken(Exception):
    """The token does not verify: answer 401 invalid_token."""


class KeysUnavailable(Exception):
    """The keys the token needs cannot be had right now: answer 503 with Retry-After."""

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


@dataclass(frozen=True)
class VerificationKey:
    """A key and the single algorithm it may verify."""

    key: Any  # bytes for HS256; a cryptography public key otherwise
    algorithm: str
    kid: str | None = None  # None: matches a token of any kid (or none)

    def matches(self, algorithm: str, kid: str | None) -> bool:
        if self.algorithm != algorithm:
            return False
        return self.kid is None or kid is None or self.kid == kid


def _numeric_date(value: Any) -> bool:
    """RFC 7519's NumericDate: a JSON number that a double holds (I-JSON, RFC 7493). PyJWT
    also lets through "123" and 10**400, which broke the cache's expiry arithmetic."""
    if type(value) not in (int, float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any double
        return False


def mint_token(secret: str, user_id: str, ttl: int = 3600) -> str:
    """A bare HS256 token for `todo-cqrs token` (and the tests): sub, iat and exp."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + ttl}, secret, algorithm="HS256")


# --- loading keys -----------------------------------------------------------------------------


def _algorithm_of(public_key: Any) -> str:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {public_key.key_size} bits; {MIN_RSA_BITS} is the least")
        return "RS256"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name != "secp256r1":
            raise ValueError(f"EC curve {public_key.curve.name}; ES256 needs P-256")
        return "ES256"
    raise ValueError(f"unsupported public key type {type(public_key).__name__}")


def keys_from_pem(text: str) -> list[VerificationKey]:
    """Every public key (or certificate) in PEM text, each with its algorithm."""
    keys = []
    for block in text.split("-----BEGIN ")[1:]:
        pem = ("-----BEGIN " + block).strip().encode()
        if block.startswith("CERTIFICATE-----"):
            public_key: Any = x509.load_pem_x509_certificate(pem).public_key()
        elif block.startswith("PUBLIC KEY-----") or block.startswith("RSA PUBLIC KEY-----"):
            public_key = load_pem_public_key(pem)
        else:
            raise ValueError("only public keys and certificates belong in TODO_JWT_PUBLIC_KEY")
        keys.append(VerificationKey(public_key, _algorithm_of(public_key)))
    if not keys:
        raise ValueError("no PEM public key found")
    return keys


def load_public_keys(value: str) -> list[VerificationKey]:
    """TODO_JWT_PUBLIC_KEY: PEM text, or the path of a PEM file."""
    try:
        text = value if "-----BEGIN" in value else Path(value).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"TODO_JWT_PUBLIC_KEY: cannot read {value}: {error}") from None
    return keys_from_pem(text)


_JWK_ALGORITHM: dict[tuple[Any, Any], str] = {
    ("OKP", "Ed25519"): "EdDSA",
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
}


def keys_from_jwks(document: Any) -> list[VerificationKey]:
    """The signing keys of a JWKS document we accept; others are skipped (and logged).

    Symmetric (`oct`) keys are never taken from a JWKS.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('a JWKS is an object with a "keys" list')
    keys = []
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        kty = jwk.get("kty")
        algorithm = _JWK_ALGORITHM.get((kty, None if kty == "RSA" else jwk.get("crv")))
        why = None
        if algorithm is None:
            why = f"unsupported key type {kty}/{jwk.get('crv')}"
        elif jwk.get("alg", algorithm) != algorithm:
            why = f"alg {jwk.get('alg')} is not accepted"
        elif jwk.get("use", "sig") != "sig":
            why = f"use {jwk.get('use')} is not sig"
        elif kid is not None and not isinstance(kid, str):
            why = "kid is not a string"
        if why is None and algorithm is not None:
            try:
                public_key = jwt.PyJWK(jwk, algorithm=algorithm).key
                if _algorithm_of(public_key) != algorithm:
                    raise ValueError("key type and alg disagree")
            except Exception as error:
                why = str(error) or type(error).__name__
            else:
                keys.append(VerificationKey(public_key, algorithm, kid))
                continue
        log.warning("JWKS key %r skipped: %s", kid, why)
    return keys


# --- key sources ------------------------------------------------------------------------------


class JwksFile:
    """A local JWKS file, re-read when its size, mtime or inode change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._keys: list[VerificationKey] = []
        self._loaded = False

    def current(self) -> list[VerificationKey]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                self._keys = keys_from_jwks(json.loads(self.path.read_bytes()))
                self._stamp, self._loaded = stamp, True
        except (OSError, ValueError) as error:  # json errors are ValueErrors
            log.warning("JWKS file %s unreadable: %s", self.path, error)
            if not self._loaded:
                raise KeysUnavailable("The token keys cannot be read.", 5) from None
        return self._keys


class JwksUrl:
    """A JWKS fetched over HTTP(S) and cached.

    Refreshed when asked for a kid it does not hold, or in the background once the cache is
    older than `max_age`; never more than once per `min_refresh` seconds, whatever the cause
    and whether the attempt succeeded, so a flood of unknown kids or a provider that is down
    is not hammered. Concurrent requests share one fetch. A failed refresh keeps the cached
    keys.
    """

    def __init__(self, url: str, min_refresh: float = 30.0, max_age: float = 300.0) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError("TODO_JWT_JWKS_URL must be an http(s) URL")
        self.url = url
        self.min_refresh = min_refresh
        self.max_age = max_age
        self.fetches = 0  # attempts, for tests and logs
        self._keys: list[VerificationKey] = []
        self._fetched_at: float | None = None  # last success
        self._attempted_at: float | None = None  # last attempt
        self._last_failed = False
        self._refreshing: asyncio.Task[None] | None = None
        # Loaded here, at the app's start: imported at the first fetch, it would hold up
        # the event loop (and every request) for a tenth of a second.
        importlib.import_module("httpx")

    def cached(self) -> list[VerificationKey]:
        return self._keys

    def _may_refresh(self) -> bool:
        return (
            self._attempted_at is None or time.monotonic() - self._attempted_at >= self.min_refresh
        )

    def retry_after(self) -> int:
        if self._attempted_at is None:
            return 1
        left = self.min_refresh - (time.monotonic() - self._attempted_at)
        return max(1, math.ceil(left))

    def has(self, algorithm: str, kid: str | None) -> bool:
        return any(k.matches(algorithm, kid) for k in self._keys)

    def stale(self) -> bool:
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= self.max_age

    async def _fetch(self) -> None:
        # Not imported at the top: httpx, with the packages its command line loads (rich,
        # pygments, click), costs each worker 4.6 MB of memory, and only a JWKS URL needs
        # it (BENCHMARKS.md, 2026-12-07, session 13). `__init__` has loaded it.
        import httpx

        self.fetches += 1
        self._attempted_at = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=FETCH_TIMEOUT) as client:
                response = await client.get(self.url, headers={"Accept": "application/json"})
            response.raise_for_status()
            if len(response.content) > MAX_JWKS_BYTES:
                raise ValueError("JWKS document over 1 MiB")
            keys = keys_from_jwks(json.loads(response.content))
        except (httpx.HTTPError, ValueError) as error:
            self._last_failed = True
            log.warning("JWKS fetch from %s failed: %s", self.url, error)
            return
        self._keys, self._fetched_at, self._last_failed = keys, time.monotonic(), False
        log.info("JWKS fetched from %s: %d key(s)", self.url, len(keys))

    def _start_refresh(self) -> asyncio.Task[None] | None:
        """The running refresh, or a new one when the rate limit allows; else None."""
        if self._refreshing is None or self._refreshing.done():
            if not self._may_refresh():
                return None
            self._refreshing = asyncio.create_task(self._fetch())
        return self._refreshing

    def refresh_if_stale(self) -> None:
        """Start a background refresh of an old cache; the caller keeps the cached keys."""
        if self._keys and self.stale():
            self._start_refresh()

    async def refresh_for(self, algorithm: str, kid: str | None) -> None:
        """Fetch again for a kid the cache does not hold (rate-limited).

        Raises KeysUnavailable when the provider cannot be reached (now or at the last
        attempt, when the rate limit forbids another) and nothing matches.
        """
        task = self._start_refresh()
        if task is not None:
            await asyncio.shield(task)
        if not self.has(algorithm, kid) and (self._last_failed or self._fetched_at is None):
            raise KeysUnavailable(
                "The identity provider's keys cannot be fetched; retry shortly.",
                self.retry_after(),
            )

    async def aclose(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()


# --- the verifier -----------------------------------------------------------------------------


class Verifier:
    """Checks a bearer token against the configured keys and the claim rules."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_keys: Iterable[VerificationKey] = (),
        jwks_file: JwksFile | None = None,
        jwks_url: JwksUrl | None = None,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self.static = list(public_keys)
        if secret is not None:
            self.static.append(VerificationKey(secret.encode(), "HS256"))
        self.jwks_file = jwks_file
        self.jwks_url = jwks_url
        self.issuer = issuer
        self.audience = audience
        self.algorithms = frozenset(k.algorithm for k in self.static)
        if jwks_file is not None or jwks_url is not None:
            self.algorithms |= ASYMMETRIC
        # Tokens verified lately, with their subject and the time until which it may be
        # reused: a client sends the same token many times, and a signature check is a
        # tenth of a request's work. Bounded in size, and in time (a minute, or the token's
        # expiry). The subject alone, not the claims: 0.4 KB less a token, 3.8 MB of a full
        # cache (BENCHMARKS.md, 2026-12-07, session 13).
        self.verified: dict[str, tuple[str, float]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        """HS256 is accepted with an explicit secret, or (with the development secret) when
        no public key, JWKS file or JWKS URL is configured."""
        return cls(
            secret=settings.hs256_secret(),
            public_keys=load_public_keys(settings.jwt_public_key)
            if settings.jwt_public_key
            else (),
            jwks_file=JwksFile(Path(settings.jwt_jwks_file)) if settings.jwt_jwks_file else None,
            jwks_url=JwksUrl(
                settings.jwt_jwks_url,
                min_refresh=settings.jwt_jwks_min_refresh,
                max_age=settings.jwt_jwks_max_age,
            )
            if settings.jwt_jwks_url
            else None,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )

    def _decode(self, token: str, key: VerificationKey) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=[key.algorithm],  # the key's own algorithm, never the token's choice
            leeway=LEEWAY,
            issuer=self.issuer,
            audience=self.audience,
            options={
                "require": ["exp", "sub"],
                "verify_aud": self.audience is not None,
                "verify_iss": self.issuer is not None,
            },
        )
        return claims

    def _try(self, token: str, keys: Iterable[VerificationKey]) -> dict[str, Any] | None:
        """The claims from the first key whose signature holds; None if none does.

        Claim errors (expired, wrong audience...) come only after a good signature, so they
        are final and raised.
        """
        for key in keys:
            try:
                return self._decode(token, key)
            except jwt.InvalidSignatureError:
                continue
        return None

    async def verify(self, token: str) -> str:
        """The token's subject (the user id); raises InvalidToken or KeysUnavailable."""
        now = time.time()
        if (known := self.verified.get(token)) is not None and now < known[1]:
            return known[0]
        claims = await self._verify_claims(token)
        if len(self.verified) >= VERIFIED_CACHE_SIZE:
            del self.verified[next(iter(self.verified))]  # the oldest
        subject: str = claims["sub"]
        self.verified[token] = (subject, min(now + 60, claims["exp"] + LEEWAY))
        return subject

    async def _verify_claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            algorithm, kid = header.get("alg"), header.get("kid")
            if not isinstance(algorithm, str) or algorithm not in self.algorithms:
                raise jwt.InvalidAlgorithmError(f"the algorithm {algorithm!r} is not accepted")
            if kid is not None and not isinstance(kid, str):
                raise jwt.InvalidTokenError("kid must be a string")
            claims = await self._verify(token, algorithm, kid)
            subject, expires = claims["sub"], claims["exp"]
            if not isinstance(subject, str) or not 1 <= len(subject) <= 255:
                raise jwt.InvalidTokenError("sub must be a string of 1 to 255 characters")
            if problem := text_problem(subject):  # the user id is stored as text
                raise jwt.InvalidTokenError(f"sub {problem}")
            if not _numeric_date(expires):
                raise jwt.InvalidTokenError("exp must be a finite number of seconds")
        except jwt.PyJWTError as error:  # InvalidKeyError too: never a 500 for a token
            raise InvalidToken(str(error)) from None
        return claims

    async def _verify(self, token: str, algorithm: str, kid: str | None) -> dict[str, Any]:
        keys = [k for k in self.static if k.matches(algorithm, kid)]
        if self.jwks_file is not None:
            keys += [k for k in self.jwks_file.current() if k.matches(algorithm, kid)]
        url = self.jwks_url
        if url is not None and algorithm in ASYMMETRIC:
            url.refresh_if_stale()
            keys += [k for k in url.cached() if k.matches(algorithm, kid)]
        claims = self._try(token, keys)
        if claims is not None:
            return claims
        if url is not None and algorithm in ASYMMETRIC and not url.has(algorithm, kid):
            await url.refresh_for(algorithm, kid)  # an unknown kid: perhaps a new key
            claims = self._try(token, [k for k in url.cached() if k.matches(algorithm, kid)])
            if claims is not None:
                return claims
        if not keys:
            named = f" with kid {kid!r}" if kid is not None else ""
            raise jwt.InvalidTokenError(f"no {algorithm} key{named}")
        raise jwt.InvalidSignatureError("Signature verification failed")

    async def aclose(self) -> None:
        if self.jwks_url is not None:
            await self.jwks_url.aclose()
