"""Settings, read once from the environment."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    data_dir: Path
    jwt_secret: str | None
    jwt_issuer: str | None
    jwt_audience: str | None
    pool_min: int
    pool_max: int
    pool_timeout: float
    log_level: str
    heartbeat: float = 10.0
    # On SIGTERM, `serve` stops accepting and lets requests in flight finish; event streams
    # never finish by themselves, so whatever is still open after this long is cut (an
    # EventSource reconnects elsewhere with Last-Event-ID and misses nothing).
    shutdown_timeout: int = 10
    jwt_public_key: str | None = None  # PEM text, or the path of a PEM file
    jwt_jwks_url: str | None = None
    jwt_jwks_file: str | None = None
    jwt_jwks_min_refresh: float = 30.0  # seconds between two fetches of the JWKS URL, at least
    jwt_jwks_max_age: float = 300.0  # seconds before the cached JWKS is refreshed in background
    # Scaling out (README "Scaling out"): a streaming replica for queries, the longest a query
    # waits for it to replay the caller's last write, a direct connection for LISTEN when
    # DATABASE_URL goes through PgBouncer, and server-side prepared statements on or off.
    query_database_url: str | None = None
    replica_wait: float = 2.0
    listen_database_url: str | None = None
    prepared_statements: bool = True

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            data_dir=Path(env.get("TODO_DATA_DIR", ".todo-cqrs")).absolute(),
            jwt_secret=env.get("TODO_JWT_SECRET") or None,
            jwt_issuer=env.get("TODO_JWT_ISSUER") or None,
            jwt_audience=env.get("TODO_JWT_AUDIENCE") or None,
            pool_min=int(env.get("TODO_POOL_MIN", "2")),
            pool_max=int(env.get("TODO_POOL_MAX", "10")),
            pool_timeout=float(env.get("TODO_POOL_TIMEOUT", "3")),
            log_level=env.get("TODO_LOG_LEVEL", "INFO").upper(),
            heartbeat=float(env.get("TODO_SSE_HEARTBEAT", "10")),
            shutdown_timeout=_shutdown_timeout(env.get("TODO_SHUTDOWN_TIMEOUT", "10")),
            jwt_public_key=env.get("TODO_JWT_PUBLIC_KEY") or None,
            jwt_jwks_url=env.get("TODO_JWT_JWKS_URL") or None,
            jwt_jwks_file=env.get("TODO_JWT_JWKS_FILE") or None,
            jwt_jwks_min_refresh=float(env.get("TODO_JWT_JWKS_MIN_REFRESH", "30")),
            jwt_jwks_max_age=float(env.get("TODO_JWT_JWKS_MAX_AGE", "300")),
            query_database_url=env.get("QUERY_DATABASE_URL") or None,
            replica_wait=float(env.get("TODO_REPLICA_WAIT", "2")),
            listen_database_url=env.get("LISTEN_DATABASE_URL") or None,
            prepared_statements=_switch(env.get("TODO_PREPARED_STATEMENTS", "on")),
        )

    def public_keys_configured(self) -> bool:
        return bool(self.jwt_public_key or self.jwt_jwks_url or self.jwt_jwks_file)

    def hs256_secret(self) -> str | None:
        """The HS256 secret tokens may be signed with, or None when HS256 is refused.

        An explicit TODO_JWT_SECRET always counts; the development secret only when no public
        key, JWKS URL or JWKS file is configured (an identity provider replaces it).
        """
        if self.jwt_secret:
            return self.jwt_secret
        if self.public_keys_configured():
            return None
        return self.resolved_jwt_secret()

    def resolved_jwt_secret(self) -> str:
        """TODO_JWT_SECRET, else a development secret kept in the data folder.

        The kept secret lets `serve` and `token` agree with nothing configured; production
        sets TODO_JWT_SECRET or public keys (see `hs256_secret`).
        """
        if self.jwt_secret:
            return self.jwt_secret
        path = self.data_dir / "jwt-secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fresh = path.with_suffix(f".{os.getpid()}.tmp")
            fresh.write_text(secrets.token_hex(32))
            fresh.chmod(0o600)
            try:
                # Link, not rename: of two processes starting at once, the first one wins.
                os.link(fresh, path)
            except FileExistsError:
                pass
            finally:
                fresh.unlink()
        return path.read_text().strip()


def _shutdown_timeout(value: str) -> int:
    """TODO_SHUTDOWN_TIMEOUT: whole seconds, 1 or more (uvicorn takes an int, and 0 would
    cut every request)."""
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"TODO_SHUTDOWN_TIMEOUT: expected whole seconds, 1 or more; got {value!r}")
    return seconds


def _switch(value: str) -> bool:
    words = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
    try:
        return words[value.strip().lower()]
    except KeyError:
        raise ValueError(f"expected on or off, got {value!r}") from None
