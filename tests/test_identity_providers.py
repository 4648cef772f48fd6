"""Identity providers through the real app (API.md, "Auth"): asymmetric tokens from a PEM key,
a JWKS file or a JWKS URL served on loopback (as Better Auth's JWT plugin publishes it), key
rotation without a restart, the rate-limited refresh, the provider being down, and the
refusals (algorithm confusion, `none`, iss/aud, nbf/exp beyond the 30 s leeway)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from conftest import JWT_SECRET
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from litestar.testing import TestClient

from todo_cqrs import auth
from todo_cqrs.auth import mint_token
from todo_cqrs.config import Settings
from todo_cqrs.http import create_app

BASE_URL = "http://localhost:3000"  # Better Auth's BASE_URL: its default iss and aud


# --- keys and tokens --------------------------------------------------------------------------


class Key:
    """A private key, its public JWK (as an identity provider publishes it) and PEM."""

    def __init__(self, algorithm: str, kid: str | None = None) -> None:
        self.algorithm = algorithm
        self.kid = kid or f"kid-{uuid.uuid4().hex[:12]}"
        private: Any
        if algorithm == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
        elif algorithm == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
        elif algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        else:
            raise ValueError(algorithm)
        self.private = private
        self.jwk: dict[str, Any] = {**jwk, "kid": self.kid, "alg": algorithm}
        self.pem = (
            private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def token(self, claims: dict[str, Any] | None = None, kid: str | None = "own") -> str:
        headers = {"kid": self.kid if kid == "own" else kid} if kid is not None else None
        return jwt.encode(claims or claims_for(), self.private, self.algorithm, headers=headers)


def claims_for(sub: str | None = None, **extra: Any) -> dict[str, Any]:
    """Shaped like a Better Auth JWT plugin token: sub, iss, aud, iat, exp (15 min)."""
    now = int(time.time())
    user = sub or f"user-{uuid.uuid4()}"
    return {
        "id": user,
        "email": "ada@example.com",
        "name": "Ada",
        "emailVerified": True,
        "sub": user,
        "iss": BASE_URL,
        "aud": BASE_URL,
        "iat": now,
        "exp": now + 900,
        **extra,
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(claims: dict[str, Any], secret: bytes, kid: str | None = None) -> str:
    """HS256 by hand: PyJWT refuses to sign with a PEM public key as the secret."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def unsigned(claims: dict[str, Any], kid: str | None = None) -> str:
    header = {"alg": "none", "typ": "JWT", **({"kid": kid} if kid else {})}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


# --- a JWKS provider on loopback --------------------------------------------------------------


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving /api/auth/jwks, counting the fetches."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer._lock:
                    outer.fetches += 1
                    body = json.dumps({"keys": [k.jwk for k in outer.keys]}).encode()
                if self.path != "/api/auth/jwks":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/auth/jwks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        """The provider goes down: the port refuses connections."""
        if self.running:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()
            self.running = False


@pytest.fixture
def ed_key() -> Key:
    return Key("EdDSA")


@pytest.fixture
def provider(ed_key: Key) -> Iterator[JwksServer]:
    server = JwksServer([ed_key])
    yield server
    server.stop()


def make_settings(database_url: str, data_dir: Path, **auth_settings: Any) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=data_dir,
        jwt_secret=auth_settings.pop("jwt_secret", None),
        jwt_issuer=auth_settings.pop("jwt_issuer", None),
        jwt_audience=auth_settings.pop("jwt_audience", None),
        pool_min=1,
        pool_max=2,
        pool_timeout=5.0,
        log_level="WARNING",
        **auth_settings,
    )


@pytest.fixture
def app_for(database_url: str, tmp_path: Path) -> Iterator[Any]:
    """Builds the real app for the given auth settings; closes every client at the end."""
    clients: list[TestClient[Any]] = []

    def build(**auth_settings: Any) -> TestClient[Any]:
        settings = make_settings(database_url, tmp_path / "data", **auth_settings)
        client: TestClient[Any] = TestClient(app=create_app(settings))  # type: ignore[arg-type]
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def get(client: TestClient[Any], token: str) -> Any:
    return client.get("/tasks", headers={"Authorization": f"Bearer {token}"})


def assert_401(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 401


def assert_503(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 503 and body["detail"]
    assert "Traceback" not in response.text


# --- Better Auth over a JWKS URL --------------------------------------------------------------


def test_better_auth_token_works_through_the_jwks_url(
    app_for: Any, provider: JwksServer, ed_key: Key
) -> None:
    client = app_for(jwt_jwks_url=provider.url, jwt_issuer=BASE_URL, jwt_audience=BASE_URL)
    user = f"user-{uuid.uuid4()}"
    assert set(ed_key.jwk) == {"kty", "crv", "x", "kid", "alg"}
    assert ed_key.jwk["kty"] == "OKP" and ed_key.jwk["crv"] == "Ed25519"
    token = ed_key.token(claims_for(user))
    assert jwt.get_unverified_header(token)["kid"] == ed_key.kid

    headers = {"Authorization": f"Bearer {token}"}
    created = client.post("/tasks", json={"title": "from Better Auth"}, headers=headers)
    assert created.status_code == 201, created.text
    listed = get(client, ed_key.token(claims_for(user)))
    assert listed.status_code == 200
    assert [t["id"] for t in listed.json()["items"]] == [created.json()["id"]]
    assert provider.fetches == 1  # fetched once, then cached


def test_hs256_is_refused_when_only_public_keys_are_configured(
    app_for: Any, provider: JwksServer, tmp_path: Path
) -> None:
    client = app_for(jwt_jwks_url=provider.url)
    assert_401(get(client, mint_token(JWT_SECRET, "someone")))
    assert not (tmp_path / "data" / "jwt-secret").exists()  # no development secret made
    assert provider.fetches == 0  # an HS256 token never reaches the provider


def test_hs256_with_an_explicit_secret_works_beside_a_jwks(
    app_for: Any, provider: JwksServer, ed_key: Key
) -> None:
    client = app_for(jwt_jwks_url=provider.url, jwt_secret=JWT_SECRET)
    assert get(client, mint_token(JWT_SECRET, f"user-{uuid.uuid4()}")).status_code == 200
    assert get(client, ed_key.token()).status_code == 200


# --- PEM and JWKS file ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
@pytest.mark.parametrize("form", ["text", "path"])
def test_pem_public_key(app_for: Any, tmp_path: Path, algorithm: str, form: str) -> None:
    key = Key(algorithm)
    value = key.pem
    if form == "path":
        path = tmp_path / "public.pem"
        path.write_text(key.pem)
        value = str(path)
    client = app_for(jwt_public_key=value)
    assert get(client, key.token()).status_code == 200
    assert get(client, key.token(kid=None)).status_code == 200  # a PEM key takes any kid
    assert_401(get(client, Key(algorithm).token()))  # another key of the same kind


def test_several_pem_keys_in_one_value(app_for: Any) -> None:
    rsa_key, ec_key = Key("RS256"), Key("ES256")
    client = app_for(jwt_public_key=rsa_key.pem + "\n" + ec_key.pem)
    assert get(client, rsa_key.token()).status_code == 200
    assert get(client, ec_key.token()).status_code == 200


def test_a_bad_public_key_fails_at_start(database_url: str, tmp_path: Path) -> None:
    for value in ("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----", "/no/file"):
        with pytest.raises((ValueError, OSError)):
            create_app(make_settings(database_url, tmp_path, jwt_public_key=value))


def test_jwks_file_rs256_and_es256_reread_when_it_changes(app_for: Any, tmp_path: Path) -> None:
    rsa_key, ec_key, ed_new = Key("RS256"), Key("ES256"), Key("EdDSA")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_key.jwk, ec_key.jwk]}))
    client = app_for(jwt_jwks_file=str(path))
    assert get(client, rsa_key.token()).status_code == 200
    assert get(client, ec_key.token()).status_code == 200
    assert_401(get(client, ed_new.token()))

    # rotation: a new key added, the RSA key removed; no restart
    path.write_text(json.dumps({"keys": [ec_key.jwk, ed_new.jwk]}))
    assert get(client, ed_new.token()).status_code == 200
    assert get(client, ec_key.token()).status_code == 200
    assert_401(get(client, rsa_key.token()))

    # a broken rewrite keeps the keys read before
    path.write_text("{not json")
    assert get(client, ec_key.token()).status_code == 200


def test_symmetric_and_unlisted_jwks_keys_are_ignored(app_for: Any, tmp_path: Path) -> None:
    secret = b"s" * 48
    rs = Key("RS256")
    mislabelled = {**rs.jwk, "kid": "ps", "alg": "PS256"}
    oct_key = {"kty": "oct", "k": _b64(secret), "kid": "sym", "alg": "HS256"}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [oct_key, mislabelled]}))
    client = app_for(jwt_jwks_file=str(path))
    assert_401(get(client, forge_hs256(claims_for(), secret, kid="sym")))
    assert_401(get(client, rs.token(kid="ps")))


# --- rotation and the rate-limited refresh ----------------------------------------------------


def test_rotation_without_restart(app_for: Any, provider: JwksServer, ed_key: Key) -> None:
    client = app_for(jwt_jwks_url=provider.url, jwt_jwks_min_refresh=0.3)
    assert get(client, ed_key.token()).status_code == 200
    assert provider.fetches == 1

    new_key = Key("EdDSA")
    provider.keys.append(new_key)
    time.sleep(0.35)  # past the minimum interval between two fetches
    assert get(client, new_key.token()).status_code == 200  # unknown kid -> one refresh
    assert provider.fetches == 2
    assert get(client, new_key.token()).status_code == 200
    assert get(client, ed_key.token()).status_code == 200
    assert provider.fetches == 2  # both cached now

    provider.keys.remove(ed_key)
    time.sleep(0.35)
    assert_401(get(client, Key("EdDSA").token()))  # an unknown kid: the next refresh
    assert provider.fetches == 3
    assert_401(get(client, ed_key.token()))  # the removed key stopped working
    assert get(client, new_key.token()).status_code == 200


def test_an_old_cache_is_refreshed_in_the_background(
    app_for: Any, provider: JwksServer, ed_key: Key
) -> None:
    client = app_for(jwt_jwks_url=provider.url, jwt_jwks_min_refresh=0.1, jwt_jwks_max_age=0.2)
    assert get(client, ed_key.token()).status_code == 200
    provider.keys = [Key("EdDSA")]
    time.sleep(0.25)
    deadline = time.monotonic() + 3
    while get(client, ed_key.token()).status_code == 200:  # served from cache meanwhile
        assert time.monotonic() < deadline, "the removed key kept working"
        time.sleep(0.05)
    assert_401(get(client, ed_key.token()))
    assert 2 <= provider.fetches <= 4


def test_a_flood_of_unknown_kids_fetches_at_most_once_or_twice(
    app_for: Any, provider: JwksServer, ed_key: Key
) -> None:
    client = app_for(jwt_jwks_url=provider.url)  # the default: one refresh per 30 s at most
    assert get(client, ed_key.token()).status_code == 200
    stranger = Key("EdDSA")
    for _ in range(50):
        assert_401(get(client, stranger.token(kid=f"kid-{uuid.uuid4().hex}")))
    assert provider.fetches <= 2
    assert get(client, ed_key.token()).status_code == 200


def test_concurrent_unknown_kids_share_one_fetch(provider: JwksServer, ed_key: Key) -> None:
    verifier = auth.Verifier(jwks_url=auth.JwksUrl(provider.url))
    stranger = Key("EdDSA")
    good = claims_for()
    tokens = [stranger.token(kid=f"kid-{i}") for i in range(50)] + [ed_key.token(good)]

    async def verify_all() -> list[Any]:
        return await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)

    results = asyncio.run(verify_all())
    assert all(isinstance(r, auth.InvalidToken) for r in results[:-1])
    assert results[-1] == good["sub"]
    assert provider.fetches == 1


# --- the provider down ------------------------------------------------------------------------


def test_provider_down_cached_keys_keep_working(
    app_for: Any, provider: JwksServer, ed_key: Key
) -> None:
    client = app_for(jwt_jwks_url=provider.url, jwt_jwks_min_refresh=0.1, jwt_jwks_max_age=0.1)
    assert get(client, ed_key.token()).status_code == 200
    provider.stop()
    time.sleep(0.15)  # the cache is old now: its background refresh fails
    for _ in range(3):
        assert get(client, ed_key.token()).status_code == 200
        time.sleep(0.05)
    # an unknown kid that cannot be fetched: 503, not 401
    time.sleep(0.15)
    assert_503(get(client, Key("EdDSA").token()))
    assert get(client, ed_key.token()).status_code == 200


def test_provider_down_with_nothing_cached_answers_503(
    app_for: Any, provider: JwksServer, ed_key: Key
) -> None:
    provider.stop()
    client = app_for(jwt_jwks_url=provider.url)
    response = get(client, ed_key.token())
    assert_503(response)
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert_503(get(client, ed_key.token()))  # within the rate limit: no new attempt, still 503
    assert "x-request-id" in response.headers


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "EdDSA", "ES256"])
@pytest.mark.parametrize("with_secret", [False, True], ids=["pem-only", "pem-and-secret"])
def test_hs256_signed_with_the_public_key_is_refused(
    app_for: Any, algorithm: str, with_secret: bool
) -> None:
    key = Key(algorithm)
    extra = {"jwt_secret": JWT_SECRET} if with_secret else {}
    client = app_for(jwt_public_key=key.pem, **extra)
    assert get(client, key.token()).status_code == 200
    for secret in (key.pem.encode(), key.pem.strip().encode()):
        assert_401(get(client, forge_hs256(claims_for(), secret)))
        assert_401(get(client, forge_hs256(claims_for(), secret, kid=key.kid)))


def test_hs256_signed_with_the_jwks_is_refused(
    app_for: Any, provider: JwksServer, ed_key: Key
) -> None:
    client = app_for(jwt_jwks_url=provider.url)
    assert get(client, ed_key.token()).status_code == 200
    for secret in (
        json.dumps(ed_key.jwk).encode(),
        base64.urlsafe_b64decode(ed_key.jwk["x"] + "="),
    ):
        assert_401(get(client, forge_hs256(claims_for(), secret, kid=ed_key.kid)))


def test_a_key_verifies_only_its_own_algorithm(app_for: Any, tmp_path: Path) -> None:
    """An RSA key published as RS256 does not verify a PS256 or RS512 token."""
    rs = Key("RS256")
    client = app_for(jwt_public_key=rs.pem)
    for algorithm in ("PS256", "RS512"):
        assert_401(get(client, jwt.encode(claims_for(), rs.private, algorithm)))


def test_alg_none_is_refused(app_for: Any, provider: JwksServer, ed_key: Key) -> None:
    client = app_for(jwt_jwks_url=provider.url, jwt_secret=JWT_SECRET)
    assert_401(get(client, unsigned(claims_for())))
    assert_401(get(client, unsigned(claims_for(), kid=ed_key.kid)))
    assert_401(get(client, jwt.encode(claims_for(), None, "none")))


@pytest.mark.parametrize(
    "claims",
    [
        {"iss": "https://evil.example"},
        {"aud": "https://other.example"},
        {"aud": ["https://other.example", "https://third.example"]},
        {"iss": None},
        {"aud": None},
    ],
    ids=["wrong-iss", "wrong-aud", "wrong-aud-list", "no-iss", "no-aud"],
)
def test_wrong_issuer_or_audience_is_refused(
    app_for: Any, provider: JwksServer, ed_key: Key, claims: dict[str, Any]
) -> None:
    client = app_for(jwt_jwks_url=provider.url, jwt_issuer=BASE_URL, jwt_audience=BASE_URL)
    good = claims_for()
    assert get(client, ed_key.token(good)).status_code == 200
    bad = {k: v for k, v in {**good, **claims}.items() if v is not None}
    assert_401(get(client, ed_key.token(bad)))


def test_audience_list_containing_ours_is_accepted(
    app_for: Any, provider: JwksServer, ed_key: Key
) -> None:
    client = app_for(jwt_jwks_url=provider.url, jwt_audience=BASE_URL)
    token = ed_key.token(claims_for(aud=["https://other.example", BASE_URL]))
    assert get(client, token).status_code == 200


@pytest.mark.parametrize(
    ("shift", "status"),
    [
        ({"nbf": 60}, 401),
        ({"nbf": 20}, 200),
        ({"exp": -60}, 401),
        ({"exp": -20}, 200),
        ({"nbf": -10}, 200),
        ({"iat": 60}, 401),  # issued in the future (README: token claims)
        ({"iat": 20}, 200),
    ],
    ids=[
        "nbf-beyond-leeway",
        "nbf-within-leeway",
        "exp-beyond-leeway",
        "exp-within-leeway",
        "nbf",
        "iat-beyond-leeway",
        "iat-within-leeway",
    ],
)
def test_nbf_exp_and_iat_with_30_s_leeway(
    app_for: Any, provider: JwksServer, ed_key: Key, shift: dict[str, int], status: int
) -> None:
    client = app_for(jwt_jwks_url=provider.url)
    now = int(time.time())
    claims = claims_for(**{name: now + delta for name, delta in shift.items()})
    response = get(client, ed_key.token(claims))
    if status == 401:
        assert_401(response)
    else:
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "claims",
    [{"sub": ""}, {"sub": "u" * 256}, {"sub": 42}, {"sub": None}, {"exp": None}],
    ids=["empty-sub", "long-sub", "int-sub", "no-sub", "no-exp"],
)
def test_claim_rules_hold_for_asymmetric_tokens(
    app_for: Any, provider: JwksServer, ed_key: Key, claims: dict[str, Any]
) -> None:
    client = app_for(jwt_jwks_url=provider.url)
    bad = {k: v for k, v in {**claims_for(), **claims}.items() if v is not None}
    assert_401(get(client, ed_key.token(bad)))


@pytest.mark.parametrize(
    "header",
    [{"alg": ["EdDSA"]}, {"alg": "EdDSA", "kid": 5}, {"alg": "EdDSA", "kid": {"a": 1}}, {}],
    ids=["alg-list", "kid-int", "kid-object", "no-alg"],
)
def test_odd_headers_answer_401(
    app_for: Any, provider: JwksServer, ed_key: Key, header: dict[str, Any]
) -> None:
    client = app_for(jwt_jwks_url=provider.url)
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims_for()).encode())}"
    signature = ed_key.private.sign(signing_input.encode())
    assert_401(get(client, f"{signing_input}.{_b64(signature)}"))
