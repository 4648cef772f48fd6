"""Settings, read once from the environment."""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict


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
    # A request whose answer has not begun after this long gets 503 (a database that hangs
    # rather than refuses); a started answer, such as an event stream, is never cut by it.
    request_timeout: float = 10.0
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
        """The settings from the environment; a value out of its range raises ValueError
        naming the variable (`todo-cqrs` says it in one line, with exit status 2)."""
        env = os.environ
        pool_min = _setting("TODO_POOL_MIN", "2", int, "a whole number, 0 or more", _at_least(0))
        pool_max = _setting(
            "TODO_POOL_MAX", str(POOL_MAX), int, "a whole number, 1 or more", _at_least(1)
        )
        if pool_min > pool_max:
            raise ValueError(f"TODO_POOL_MIN ({pool_min}) is above TODO_POOL_MAX ({pool_max})")
        jwt_secret = env.get("TODO_JWT_SECRET") or None
        if jwt_secret is not None and len(jwt_secret.encode()) < MIN_SECRET_BYTES:
            # RFC 7518 3.2: an HS256 key is at least as long as the hash (256 bits). The value
            # itself is never repeated in the message.
            raise ValueError(
                f"TODO_JWT_SECRET: expected at least {MIN_SECRET_BYTES} bytes;"
                f" got {len(jwt_secret.encode())}"
            )
        return cls(
            database_url=_database_url("DATABASE_URL"),
            data_dir=Path(env.get("TODO_DATA_DIR", ".todo-cqrs")).absolute(),
            jwt_secret=jwt_secret,
            jwt_issuer=env.get("TODO_JWT_ISSUER") or None,
            jwt_audience=env.get("TODO_JWT_AUDIENCE") or None,
            pool_min=pool_min,
            pool_max=pool_max,
            pool_timeout=_seconds("TODO_POOL_TIMEOUT", "3"),
            log_level=_setting(
                "TODO_LOG_LEVEL", "INFO", _log_level, "one of " + ", ".join(LOG_LEVELS), _a_level
            ),
            # The contract asks for a heartbeat at least every 15 s; each one is a query per
            # stream, so not more often than twice a second.
            heartbeat=_setting(
                "TODO_SSE_HEARTBEAT",
                "10",
                float,
                "seconds, from 0.5 to 15",
                lambda seconds: 0.5 <= seconds <= 15,
            ),
            # Whole seconds, 1 or more: uvicorn takes an int, and 0 would cut every request.
            shutdown_timeout=_setting(
                "TODO_SHUTDOWN_TIMEOUT", "10", int, "whole seconds, 1 or more", _at_least(1)
            ),
            request_timeout=_setting(
                "TODO_REQUEST_TIMEOUT",
                "10",
                float,
                "seconds, from 1 to 600",
                lambda seconds: 1 <= seconds <= 600,
            ),
            jwt_public_key=env.get("TODO_JWT_PUBLIC_KEY") or None,
            jwt_jwks_url=env.get("TODO_JWT_JWKS_URL") or None,
            jwt_jwks_file=env.get("TODO_JWT_JWKS_FILE") or None,
            jwt_jwks_min_refresh=_seconds("TODO_JWT_JWKS_MIN_REFRESH", "30"),
            jwt_jwks_max_age=_seconds("TODO_JWT_JWKS_MAX_AGE", "300"),
            query_database_url=_database_url("QUERY_DATABASE_URL"),
            replica_wait=_setting(
                "TODO_REPLICA_WAIT", "2", float, "seconds, 0 or more", _finite_at_least(0)
            ),
            listen_database_url=_database_url("LISTEN_DATABASE_URL"),
            prepared_statements=_setting(
                "TODO_PREPARED_STATEMENTS", "on", _switch, "on or off", _anything
            ),
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
        try:
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
        except OSError as error:  # a setting that does not work: say which
            reason = error.strerror or str(error)
            raise ValueError(
                f"TODO_DATA_DIR: cannot keep the development JWT secret in {path}: {reason}"
            ) from None


MIN_SECRET_BYTES = 32
# Connections per worker. Reads keep a worker's one thread busy with a few in flight; a
# command's commit waits on the WAL flush, and commands in flight together can share one
# flush. On the benchmark's 2-core machine 10 beat 5 by 16-35% on create, with reads mixed
# (get up to 7% better with 5, list up to 22% better with 10); only with the CPU starved
# (the same machine at half speed) did 5 win (BENCHMARKS.md, session 10).
POOL_MAX = 10
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
T = TypeVar("T")


def _setting(
    name: str, default: str, parse: Callable[[str], T], expected: str, valid: Callable[[T], bool]
) -> T:
    """The variable `name` (else `default`) parsed; ValueError naming it when it does not
    parse or is out of range."""
    given = os.environ.get(name, default)
    try:
        value = parse(given.strip())
    except (ValueError, KeyError):
        pass
    else:
        if valid(value):
            return value
    raise ValueError(f"{name}: expected {expected}; got {given!r}")


def _database_url(name: str) -> str | None:
    """The variable `name`, None when unset or empty; ValueError naming it when libpq cannot
    read it. Caught here, it is one line at start rather than a traceback in any command, or
    a server that starts and retries an unusable replica or listen URL for ever."""
    given = os.environ.get(name) or None
    if given is not None:
        try:
            conninfo_to_dict(given)
        except (psycopg.ProgrammingError, UnicodeError) as error:
            reason = str(error).strip().splitlines()[0]
            expected = "expected a PostgreSQL URL or key=value string"
            raise ValueError(f"{name}: {expected}; {reason}") from None
    return given


def _seconds(name: str, default: str) -> float:
    return _setting(name, default, float, "seconds, more than 0", _finite_above(0))


def _at_least(least: int) -> Callable[[int], bool]:
    return lambda value: value >= least


def _finite_at_least(least: float) -> Callable[[float], bool]:
    return lambda value: math.isfinite(value) and value >= least


def _finite_above(least: float) -> Callable[[float], bool]:
    return lambda value: math.isfinite(value) and value > least


def _anything(_: object) -> bool:
    return True


def _a_level(name: str) -> bool:
    return name in LOG_LEVELS


def _log_level(name: str) -> str:
    """The level's name; Python's logging also takes WARN and FATAL for two of them."""
    name = name.upper()
    return {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(name, name)


def _switch(value: str) -> bool:
    return _SWITCH[value.lower()]
