"""Command handlers: each command's write is one transaction that appends its events and
writes its row.

A command is an expected-version write (as in Message DB or the `eventsourcing` library):

1. Read the task row (no lock); check If-Match; `decide`; fold the new events with
   `evolve`. A deleted task is gone for every command but restore.
2. Write in one statement (`_RECORD`), which is one transaction by itself: take the user's
   advisory lock, upsert the row only if it is still at the version read in step 1, append
   the events only if the row was written, NOTIFY the feed. The lock is held from before
   the events draw their positions until the commit, so a user's positions commit in
   increasing order (the feed never skips one); the version check means no update is lost
   and versions stay contiguous. When another command got there first, nothing is written
   and the command runs steps 1 and 2 again inside a transaction that takes the user's lock
   first, where no other command of the user can overtake it.
3. With an Idempotency-Key, steps 1 and 2 run inside a transaction that first takes a
   try-lock on (user, key) (held by a transaction that has not committed yet means `409`)
   and replays a stored answer (or `422` if the request differs), and that stores the new
   answer before it commits.

The statement locks both tables before any event draws its position, so a command that
has drawn positions holds a lock on `tasks`, which the online rebuild relies on.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from todo_cqrs import db, eventstore, projection
from todo_cqrs.domain import (
    Command,
    CreateTask,
    DeleteTask,
    Recorded,
    RestoreTask,
    Task,
    TaskNotDeleted,
    TaskNotFound,
    decide,
    fold,
)
from todo_cqrs.problems import Problem, not_found

Conn = psycopg.AsyncConnection[Any]

_encode = msgspec.json.Encoder().encode

# A command's outcome in one statement: the user's lock, the row (if still at the version
# decided on), its events and the feed's NOTIFY (delivered at commit) when some process
# streams the user's events (migration 0006). It returns a row when it wrote, none when
# another command changed the task first.
_RECORD = (
    f"WITH locked AS MATERIALIZED ({eventstore.LOCK_USER}),"
    f" saved AS ({projection.save_decided_task_sql(after='locked')}),"
    f" appended AS ({eventstore.append_events_sql(after='saved')})"
    " SELECT notify_event_listeners(%(channel)s, %(user_id)s) FROM saved"
)


class Answer(msgspec.Struct):
    """The HTTP answer to a command; an idempotent retry gets the same one back."""

    status: int
    body: bytes = b""
    location: str | None = None
    etag: str | None = None
    replayed: bool = False
    consistency_token: str | None = None  # the WAL position after the commit; not stored

    @classmethod
    def from_problem(cls, problem: Problem) -> Answer:
        # A 412 names the current version in its ETag, with a key or without.
        return cls(status=problem.status, body=problem.encode(), etag=problem.headers.get("ETag"))


class Idempotency(msgspec.Struct):
    key: str
    fingerprint: bytes


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    """Identifies a request for idempotency: method, path and the body up to JSON equality."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(body), order="sorted") if body else b""
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        canonical = body
    return hashlib.sha256(b"%s\n%s\n%s" % (method.encode(), path.encode(), canonical)).digest()


async def execute(
    pool: AsyncConnectionPool,
    user_id: str,
    task_id: UUID,
    command: Command | Problem,
    *,
    if_match: frozenset[str] | None = None,
    idempotency: Idempotency | None = None,
    request_id: str | None = None,
    consistency_token: bool = False,
) -> Answer:
    """Run one (validated) command in one transaction and return its answer.

    `if_match` holds the strong entity tags of an If-Match header (None when absent or `*`).
    A Problem in place of the command is a request refused before it became one (a bad
    body, say): with an Idempotency-Key its answer is stored like any other.
    `consistency_token`: put the WAL position after the commit in the answer (for queries
    on a replica; the round trip that asks for it costs a tenth of a command's CPU).
    """
    meta = eventstore.EventMeta(
        request_id=request_id, idempotency_key=idempotency.key if idempotency else None
    )
    async with pool.connection() as conn:
        # Not in pipeline mode: psycopg's pipeline costs this process 28% more instructions
        # per command (measured with callgrind, BENCHMARKS.md), and here the CPU, not the
        # round trip to the database, is what limits throughput. Without an Idempotency-Key
        # a command makes two round trips (the row, `_RECORD`; a create only the second),
        # each statement a transaction of its own, and one more for a consistency token.
        if idempotency is None:
            answer = await _run(conn, user_id, task_id, command, if_match, meta)
        else:
            async with conn.transaction():
                answer = await _run_idempotent(
                    conn, user_id, task_id, command, if_match, idempotency, meta
                )
        if consistency_token:
            # After the commit: a replica that has replayed this far shows the command.
            answer.consistency_token = await db.wal_position(conn)
    return answer


async def _run_idempotent(
    conn: Conn,
    user_id: str,
    task_id: UUID,
    command: Command | Problem,
    if_match: frozenset[str] | None,
    idempotency: Idempotency,
    meta: eventstore.EventMeta,
) -> Answer:
    """The command under an Idempotency-Key, inside the caller's transaction."""
    stored = await _claim_key(conn, user_id, idempotency)
    if stored is not None:
        return stored
    try:
        answer = await _run(conn, user_id, task_id, command, if_match, meta)
    except Problem as problem:
        # A 4xx is a final answer too: a retry gets it again, not a second attempt.
        answer = Answer.from_problem(problem)
    await conn.execute(
        "INSERT INTO idempotency_keys (user_id, key, fingerprint, status, body, location,"
        " etag) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            user_id,
            idempotency.key,
            idempotency.fingerprint,
            answer.status,
            answer.body,
            answer.location,
            answer.etag,
        ),
    )
    return answer


async def _claim_key(conn: Conn, user_id: str, idempotency: Idempotency) -> Answer | None:
    """Lock the key for this transaction; return the stored answer of an earlier request."""
    cur = await conn.execute(
        "SELECT pg_try_advisory_xact_lock(hashtext(%s), hashtext(%s))",
        (user_id, idempotency.key),
    )
    row = await cur.fetchone()
    if not (row and row[0]):
        raise Problem(409, "A request with this Idempotency-Key is still in progress.")
    cur = await conn.execute(
        "SELECT fingerprint, status, body, location, etag FROM idempotency_keys"
        " WHERE user_id = %s AND key = %s",
        (user_id, idempotency.key),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    if bytes(row[0]) != idempotency.fingerprint:
        raise Problem(422, "This Idempotency-Key was used with a different request.")
    return Answer(status=row[1], body=bytes(row[2]), location=row[3], etag=row[4], replayed=True)


async def _run(
    conn: Conn,
    user_id: str,
    task_id: UUID,
    command: Command | Problem,
    if_match: frozenset[str] | None,
    meta: eventstore.EventMeta,
) -> Answer:
    if isinstance(command, Problem):
        raise command  # a request refused before it became a command; stored all the same
    answer = await _attempt(conn, user_id, task_id, command, if_match, meta)
    if answer is None:
        # Another command changed the task between this one's read and its write. Again,
        # under the user's lock: no command of the user writes until this one commits, so
        # this attempt cannot lose, and a crowd on one task starves nobody. (Inside the
        # Idempotency-Key transaction this is a savepoint.)
        async with conn.transaction():
            await eventstore.lock_user(conn, user_id)
            answer = await _attempt(conn, user_id, task_id, command, if_match, meta)
        if answer is None:
            raise RuntimeError(f"task {task_id} changed while its user's lock was held")
    return answer


async def _attempt(
    conn: Conn,
    user_id: str,
    task_id: UUID,
    command: Command,
    if_match: frozenset[str] | None,
    meta: eventstore.EventMeta,
) -> Answer | None:
    """Read, decide, write; None when another command changed the task in between."""
    creating = isinstance(command, CreateTask)
    state = None if creating else await projection.load_task(conn, user_id, task_id)
    if not creating:
        # A deleted task is gone for every command but restore, whatever If-Match says.
        if state is None or (state.deleted and not isinstance(command, RestoreTask)):
            raise not_found()
        if if_match is not None and str(state.version) not in if_match:
            raise Problem(
                412,
                f"The task is at version {state.version}; If-Match does not name it.",
                headers={"ETag": f'"{state.version}"'},
            )
    try:
        events = decide(state, command)
    except TaskNotFound:
        raise not_found() from None
    except TaskNotDeleted:
        raise Problem(409, "The task is not deleted.") from None
    version = state.version if state else 0
    # The service's clock, never before the task's last event: time travel by `as_of` needs
    # a task's events in time order, whichever host (and clock) wrote them.
    now = datetime.now(UTC) if state is None else max(datetime.now(UTC), state.updated_at)
    recorded = [
        Recorded(task_id=task_id, version=version + i, occurred_at=now, event=event)
        for i, event in enumerate(events, start=1)
    ]
    new_state = fold(recorded, state)
    assert new_state is not None
    body = _encode(new_state)
    if recorded and not await _record(conn, user_id, version, new_state, body, recorded, meta):
        return None
    etag = f'"{new_state.version}"'
    if creating:
        return Answer(201, body, location=f"/tasks/{task_id}", etag=etag)
    if isinstance(command, DeleteTask):
        return Answer(204)
    return Answer(200, body, etag=etag)


async def _record(
    conn: Conn,
    user_id: str,
    expected_version: int,
    task: Task,
    task_json: bytes,
    recorded: list[Recorded],
    meta: eventstore.EventMeta,
) -> bool:
    """`_RECORD`; False when the task is no longer at `expected_version`."""
    try:
        cur = await conn.execute(
            _RECORD,
            {
                **projection.save_params(user_id, task, task_json),
                "expected_version": expected_version,
                "task_id": recorded[0].task_id,
                "occurred_at": recorded[0].occurred_at,
                "request_id": meta.request_id,
                "idempotency_key": meta.idempotency_key,
                "events": eventstore.new_events_json(recorded),
                "channel": eventstore.CHANNEL,
            },
        )
    except psycopg.errors.SerializationFailure:
        # Outside a transaction the statement runs at the server's default isolation; at
        # REPEATABLE READ a row changed since it began fails it rather than matching no
        # expected version. Either way the task moved on: the caller starts over (in a
        # READ COMMITTED transaction, see db.create_pool).
        return False
    return cur.rowcount == 1


async def prune_idempotency_keys(pool: AsyncConnectionPool) -> int:
    """Forget idempotent answers older than 24 hours (the contract keeps them that long)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - interval '24 hours'"
        )
        return cur.rowcount
