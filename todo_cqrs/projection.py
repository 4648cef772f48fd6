"""The read projection: one row per task, written by commands and by the rebuild."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql
from psycopg.copy import AsyncQueuedLibpqWriter

from todo_cqrs.domain import Recorded, Task, caseless, evolve, fold
from todo_cqrs.eventstore import copy_task_streams, decode_event, lock_user

Conn = psycopg.AsyncConnection[Any]

_encode = msgspec.json.Encoder().encode
_decode_task = msgspec.json.Decoder(Task).decode

# The columns of a task row: Task's fields in their order (the id is `task_id` here), so
# that a row is Task's positional arguments.
_COLUMN_NAMES = ["task_id" if name == "id" else name for name in Task.__struct_fields__]
TASK_COLUMNS = ", ".join(_COLUMN_NAMES)
# Their PostgreSQL types, for the rebuild's COPY and for reading a row out of a task's JSON.
_COLUMN_TYPES = [
    "uuid", "text", "text", "bool", "text", "date", "text[]", "int4",
    "timestamptz", "timestamptz", "timestamptz", "bool",
]  # fmt: skip


def task_from_row(row: tuple[Any, ...]) -> Task:
    return Task(*row)


# From `body`: one column that msgspec decodes costs less than twelve that psycopg loads.
LOAD_TASK = "SELECT body FROM {table} WHERE user_id = %(user_id)s AND task_id = %(task_id)s"


async def load_task(conn: Conn, user_id: str, task_id: UUID, table: str = "tasks") -> Task | None:
    """The task's current state, deleted or not."""
    cur = await conn.execute(
        LOAD_TASK.format(table=table), {"user_id": user_id, "task_id": task_id}
    )
    row = await cur.fetchone()
    return _decode_task(row[0]) if row else None


# A task row from the task's JSON (the API's shape, `deleted` only when true): one text
# parameter that msgspec encodes, in place of thirteen typed ones that psycopg adapts one
# by one in Python (a text[] through a regex). The JSON itself is kept as the row's `body`,
# which queries send as it is, and the title case-folded beside it, for `q` (`save_params`).
# `{after}` names a CTE whose row must exist first (a command's lock); `{only_if}` a
# condition on the row being replaced.
_SAVE = (
    "INSERT INTO {table} (user_id, "
    + TASK_COLUMNS
    + ", body, title_casefolded) SELECT %(user_id)s, "
    + ", ".join(
        "coalesce(t.deleted, false)" if name == "deleted" else f"t.{name}"
        for name in Task.__struct_fields__
    )
    # `::text` on both: PostgreSQL would otherwise type the parameter jsonb from its use in
    # FROM, and `body` would get jsonb's text (keys reordered, spaces added).
    + ", %(task)s::text, %(title_casefolded)s"
    " FROM {after}jsonb_to_record(%(task)s::text::jsonb) AS t("
    + ", ".join(f"{n} {t}" for n, t in zip(Task.__struct_fields__, _COLUMN_TYPES, strict=True))
    + ")"
    " ON CONFLICT (user_id, task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in [*_COLUMN_NAMES[1:], "body", "title_casefolded"])
    + "{only_if}"
)


def save_params(user_id: str, task: Task, task_json: bytes) -> dict[str, str]:
    """The parameters of a row's save: the user, the task's JSON (`task_json`, as `_encode`
    writes it) and its title as `q` compares it (`domain.caseless`)."""
    return {
        "user_id": user_id,
        "task": task_json.decode(),
        "title_casefolded": caseless(task.title),
    }


def save_decided_task_sql(after: str) -> str:
    """A command's row upsert, for a CTE: it joins the CTE `after` (the command's lock), so
    it writes nothing before that yields its row, and it replaces the row only at the
    version the command was decided on (parameter `expected_version`; 0 for a new task,
    which no row has). It returns a row when it wrote."""
    return _SAVE.format(
        table="tasks",
        after=f"{after}, ",
        only_if=" WHERE tasks.version = %(expected_version)s RETURNING 1",
    )


async def save_task(conn: Conn, user_id: str, task: Task, table: str = "tasks") -> None:
    sql = _SAVE.format(table=table, after="", only_if="")
    await conn.execute(sql, save_params(user_id, task, _encode(task)))


# --- rebuilding the projection from the events ----------------------------------------------

REBUILD_LOCK = 7_361_220_402  # one rebuild at a time, of whatever kind
NEW_TABLE = "tasks_rebuild"

OnEvents = Callable[[int], None]  # told how many more events were folded


def _ignore(_: int) -> None:
    pass


class _Tally:
    """Counts the events folded and passes each report on."""

    def __init__(self, on_events: OnEvents) -> None:
        self.events = 0
        self.on_events = on_events

    def __call__(self, events: int) -> None:
        self.events += events
        self.on_events(events)


class RebuildBusy(Exception):
    """The rebuild cannot go on now: another one holds the rebuild lock (`check` takes
    none: it only reads), or long transactions kept the swap from happening."""


class Drift(msgspec.Struct):
    """A task whose projection row differs from the fold of its events."""

    user_id: str
    task_id: UUID
    differences: list[str]


# COPY's text format, written by hand: several times faster than a generic row adapter,
# which matters at a million rows. Text fields escape backslash, tab, newline and CR.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


_NULL = "\\N"


def _copy_line(user_id: str, task: Task) -> str:
    """The line of user_id, the task's columns, its body and its case-folded title."""
    escapes = _COPY_ESCAPES
    tags = ",".join('"' + tag.replace("\\", "\\\\").replace('"', '\\"') + '"' for tag in task.tags)
    completed_at = task.completed_at
    return (
        f"{user_id.translate(escapes)}\t{task.id}\t{task.title.translate(escapes)}"
        f"\t{task.description.translate(escapes)}\t{'t' if task.completed else 'f'}"
        f"\t{task.priority}\t{task.due_date.isoformat() if task.due_date else _NULL}"
        f"\t{{{tags.translate(escapes)}}}\t{task.version}\t{task.created_at.isoformat()}"
        f"\t{task.updated_at.isoformat()}"
        f"\t{completed_at.isoformat() if completed_at else _NULL}"
        f"\t{'t' if task.deleted else 'f'}\t{_encode(task).decode().translate(escapes)}"
        f"\t{caseless(task.title).translate(escapes)}\n"
    )


async def _folded(
    streams: AsyncGenerator[tuple[str, list[Recorded]], None], on_events: OnEvents
) -> AsyncGenerator[tuple[str, Task], None]:
    """Each task's state, folded from its events (a long task's lists one after another)."""
    count = 0
    task: tuple[str, UUID] | None = None
    state: Task | None = None
    # Closed when the fold fails (an event before TaskCreated, say): else the COPY it left
    # would hold the connection, and the rollback after the error would wait on it for ever.
    async with aclosing(streams):
        async for user_id, stream in streams:
            if (user_id, stream[0].task_id) != task:
                if task is not None and state is not None:
                    yield task[0], state
                task, state = (user_id, stream[0].task_id), None
            state = fold(stream, state)
            count += len(stream)
            if count >= 10_000:
                on_events(count)
                count = 0
    if task is not None and state is not None:
        yield task[0], state
    on_events(count)


async def _copy_tasks(conn: Conn, table: str, tasks: AsyncIterator[tuple[str, Task]]) -> int:
    written = 0
    lines: list[str] = []
    async with (
        conn.cursor() as cur,
        cur.copy(
            f"COPY {table} (user_id, {TASK_COLUMNS}, body, title_casefolded) FROM STDIN",
            writer=AsyncQueuedLibpqWriter(cur),
        ) as copy,
    ):
        async for user_id, task in tasks:
            lines.append(_copy_line(user_id, task))
            if len(lines) == 1000:
                await copy.write("".join(lines))
                written += len(lines)
                lines.clear()
        await copy.write("".join(lines))
    return written + len(lines)


async def _take_rebuild_lock(conn: Conn) -> None:
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (REBUILD_LOCK,))
    row = await cur.fetchone()
    if not (row and row[0]):
        raise RebuildBusy("another rebuild is running; try again when it has finished")


async def _indexes(conn: Conn, table: str) -> list[tuple[str, str, bool]]:
    """(name, definition, is primary key) of each index on the table."""
    cur = await conn.execute(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisprimary"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE i.indrelid = %s::regclass ORDER BY c.relname",
        (table,),
    )
    return [(name, definition, primary) for name, definition, primary in await cur.fetchall()]


async def _copy_indexes(conn: Conn) -> None:
    """Give the new table the live table's indexes (built after the load: much faster),
    named `<name>__new` until the swap renames them."""
    for name, definition, primary in await _indexes(conn, "tasks"):
        new_definition = re.sub(
            r"^(CREATE (?:UNIQUE )?INDEX )(\S+) ON (\S+) ",
            rf"\g<1>{name}__new ON {NEW_TABLE} ",
            definition,
        )
        await conn.execute(new_definition)  # built from the catalog
        if primary:
            await conn.execute(
                f"ALTER TABLE {NEW_TABLE} ADD CONSTRAINT {name}__new"
                f" PRIMARY KEY USING INDEX {name}__new"
            )


async def _catch_up(conn: Conn, table: str, after_position: int) -> int:
    """Fold into `table` the events after a position that it does not hold yet."""
    # A server-side cursor, so that memory stays flat however much was written meanwhile;
    # the rows are written through the same connection between its fetches.
    # A cursor is planned for its first rows (cursor_tuple_fraction 0.1): PostgreSQL would
    # walk the whole events_pkey in order instead of finding the few new rows through the
    # position index, and the last catch-up runs under the ACCESS EXCLUSIVE lock.
    await conn.execute("SET LOCAL cursor_tuple_fraction = 1")
    async with conn.cursor(name="catch_up") as cur:
        # Only what the table lacks (a version past its row's), so that the last pass, under
        # the lock, reads just what was written since the one before.
        await cur.execute(
            "SELECT e.user_id, e.task_id, e.version, e.type, e.data::text, e.schema_version,"
            f" e.occurred_at FROM events e LEFT JOIN {table} t"
            " ON t.user_id = e.user_id AND t.task_id = e.task_id"
            " WHERE e.position > %s AND e.version > coalesce(t.version, 0)"
            " ORDER BY e.user_id, e.task_id, e.version",
            (after_position,),
        )
        applied = 0
        state: Task | None = None
        key: tuple[str, UUID] | None = None
        async for user_id, task_id, version, type_name, data, schema_version, at in cur:
            if key != (user_id, task_id):
                if key is not None and state is not None:
                    await save_task(conn, key[0], state, table)
                key = (user_id, task_id)
                state = await load_task(conn, user_id, task_id, table)
            if state is None or version > state.version:
                event = decode_event(type_name, data, schema_version)
                state = evolve(state, Recorded(task_id, version, at, event))
                applied += 1
    if key is not None and state is not None:
        await save_task(conn, key[0], state, table)
    return applied


async def _high_water(conn: Conn) -> int:
    cur = await conn.execute(
        "SELECT coalesce(pg_sequence_last_value("
        "pg_get_serial_sequence('events', 'position')::regclass), 0)"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


class RebuildSummary(msgspec.Struct):
    events: int
    tasks: int
    caught_up: int = 0


async def rebuild_all(conninfo: str, on_events: OnEvents = _ignore) -> RebuildSummary:
    """Rebuild the whole projection online: into a new table, then swapped in atomically.

    1. Under a SHARE lock on `tasks` (milliseconds: it waits for the commands in flight),
       take a snapshot and the highest event position drawn so far. Every command that has
       drawn positions holds a lock on `tasks` (it writes its row first), so the snapshot
       holds every event up to that position.
    2. Fold the snapshot's events into `tasks_rebuild` with COPY, while commands and queries
       go on against `tasks`; then build its indexes.
    3. Fold in the events committed meanwhile (position past the mark, version past the
       row's), once without a lock and once more under an ACCESS EXCLUSIVE lock, in the
       transaction that drops `tasks` and renames the new table into its place.

    A rebuild killed at any point leaves `tasks` as it was; the next one starts afresh.
    """
    count = _Tally(on_events)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as control:
        await _take_rebuild_lock(control)
        try:
            await control.execute(f"DROP TABLE IF EXISTS {NEW_TABLE}")  # a killed run's
            await control.execute(
                f"CREATE TABLE {NEW_TABLE} (LIKE tasks INCLUDING ALL EXCLUDING INDEXES)"
            )
            await _copy_privileges(control)
            async with (
                await psycopg.AsyncConnection.connect(conninfo) as reader,
                await psycopg.AsyncConnection.connect(conninfo) as writer,
            ):
                await reader.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
                await writer.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)
                async with control.transaction():
                    await control.execute("LOCK TABLE tasks IN SHARE MODE")
                    await reader.execute("SELECT 1")  # the snapshot is taken here
                    mark = await _high_water(control)
                folded = _folded(copy_task_streams(reader), count)
                tasks = await _copy_tasks(writer, NEW_TABLE, folded)
                await reader.rollback()
                await _copy_indexes(writer)
                # The catch-ups find the new events through the BRIN index on position. Make
                # sure it covers the whole table and the planner knows how far positions go,
                # whatever autovacuum did (it may be off): else the last catch-up scans every
                # event under the lock (70 ms per million here).
                await writer.execute("SELECT brin_summarize_new_values('events_position_brin')")
                await writer.execute("ANALYZE events")
                await writer.commit()
                caught_up = await _catch_up(writer, NEW_TABLE, mark)
                await writer.commit()
                caught_up += await _swap_in(writer, mark)
                count(caught_up)
        finally:
            await control.execute("SELECT pg_advisory_unlock(%s)", (REBUILD_LOCK,))
    return RebuildSummary(events=count.events, tasks=tasks, caught_up=caught_up)


SWAP_LOCK_TIMEOUT = 1.0  # seconds that queries and commands may queue behind the swap
SWAP_ATTEMPTS = 10


async def _swap_in(writer: Conn, mark: int) -> int:
    """Under an ACCESS EXCLUSIVE lock on `tasks`: the last catch-up, then the new table in
    the old one's place. Every query and command queues behind a waiting lock request, so
    the wait is bounded (lock_timeout); when a long transaction holds `tasks`, the rebuild
    catches up unlocked, pauses, and tries again. Returns the events caught up."""
    caught_up = 0
    for _ in range(SWAP_ATTEMPTS):
        try:
            await writer.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT * 1000:.0f}ms'")
            await writer.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        except psycopg.errors.LockNotAvailable:
            await writer.rollback()
            caught_up += await _catch_up(writer, NEW_TABLE, mark)
            await writer.commit()
            await asyncio.sleep(SWAP_LOCK_TIMEOUT)  # let the queue behind the attempt drain
            continue
        caught_up += await _catch_up(writer, NEW_TABLE, mark)
        names = [name for name, _, _ in await _indexes(writer, "tasks")]
        await writer.execute("DROP TABLE tasks")
        await writer.execute(f"ALTER TABLE {NEW_TABLE} RENAME TO tasks")
        for name in names:
            await writer.execute(f"ALTER INDEX {name}__new RENAME TO {name}")
        await writer.commit()
        return caught_up
    raise RebuildBusy(
        f"other transactions held the tasks table through {SWAP_ATTEMPTS} tries of"
        f" {SWAP_LOCK_TIMEOUT:g} s to swap the new projection in; it is unchanged. Look for"
        " long transactions (pg_stat_activity) and try again"
    )


async def _copy_privileges(conn: Conn) -> None:
    """Give the new table the live one's grants and owner: the service may run as a role
    other than the one that rebuilds, and must keep its rights on `tasks`."""
    cur = await conn.execute(
        "SELECT a.grantee, pg_get_userbyid(a.grantee), a.privilege_type, a.is_grantable"
        " FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = 'tasks'::regclass"
    )
    for grantee_oid, grantee, privilege, grantable in await cur.fetchall():
        if privilege not in _TABLE_PRIVILEGES:
            continue
        to = sql.SQL("PUBLIC") if grantee_oid == 0 else sql.Identifier(grantee)
        option = sql.SQL(" WITH GRANT OPTION" if grantable else "")
        await conn.execute(
            sql.SQL("GRANT {} ON {} TO {}{}").format(
                sql.SQL(privilege), sql.Identifier(NEW_TABLE), to, option
            )
        )
    cur = await conn.execute(
        "SELECT pg_get_userbyid(relowner), pg_get_userbyid(relowner) <> current_user"
        " FROM pg_class WHERE oid = 'tasks'::regclass"
    )
    row = await cur.fetchone()
    if row and row[1]:
        await conn.execute(
            sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                sql.Identifier(NEW_TABLE), sql.Identifier(row[0])
            )
        )


_TABLE_PRIVILEGES = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "MAINTAIN"}
)


async def rebuild_user(
    conninfo: str, user_id: str, on_events: OnEvents = _ignore
) -> RebuildSummary:
    """Rebuild one user's rows in one transaction, under the user's lock (their commands
    wait); everyone else's rows are not touched."""
    count = _Tally(on_events)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await _take_rebuild_lock(conn)
        # The snapshot must come after the user's lock: under READ COMMITTED each statement
        # takes its own, whatever the server's default isolation.
        await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)
        try:
            async with conn.transaction():
                await lock_user(conn, user_id)
                folded = _folded(copy_task_streams(conn, user_id=user_id), count)
                tasks = [task async for task in folded]  # one user's: small
                await conn.execute("DELETE FROM tasks WHERE user_id = %s", (user_id,))

                async def each() -> AsyncIterator[tuple[str, Task]]:
                    for task in tasks:
                        yield task

                written = await _copy_tasks(conn, "tasks", each())
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (REBUILD_LOCK,))
    return RebuildSummary(events=count.events, tasks=written)


# user_id, the task's columns, body, title_casefolded
_ROW_TYPES = ["text", *_COLUMN_TYPES, "text", "text"]


class _Row(msgspec.Struct):
    """A projection row as `check` reads it: the columns as a Task, the body and the
    case-folded title."""

    user_id: str
    task: Task
    body: str
    title_casefolded: str

    def matches(self, folded: Task) -> bool:
        return (
            self.task == folded
            and self.body == _encode(folded).decode()
            and self.title_casefolded == caseless(folded.title)
        )


async def _copy_rows(conn: Conn) -> AsyncGenerator[_Row, None]:
    query = (
        f"COPY (SELECT user_id, {TASK_COLUMNS}, body, title_casefolded FROM tasks"
        ' ORDER BY user_id COLLATE "C", task_id) TO STDOUT'
    )
    async with conn.cursor() as cur, cur.copy(query) as copy:
        copy.set_types(_ROW_TYPES)
        async for row in copy.rows():
            yield _Row(row[0], task_from_row(row[1:-2]), row[-2], row[-1])


def _differences(row: _Row | None, folded: Task | None) -> list[str]:
    if row is None:
        return ["no projection row"]
    if folded is None:
        return ["a projection row without events"]
    wanted, found = msgspec.structs.asdict(folded), msgspec.structs.asdict(row.task)
    differences = [
        f"{field}: {found[field]!r} in the row, {wanted[field]!r} from the events"
        for field in wanted
        if wanted[field] != found[field]
    ]
    if row.body != (body := _encode(folded).decode()):
        differences.append(f"body: {row.body!r} in the row, {body!r} from the events")
    if row.title_casefolded != (title := caseless(folded.title)):
        differences.append(
            f"title_casefolded: {row.title_casefolded!r} in the row, {title!r} from the events"
        )
    return differences


async def check(conninfo: str, on_events: OnEvents = _ignore) -> list[Drift]:
    """Replay every task and compare with its projection row, writing nothing.

    Both sides are read from one snapshot (exported from one connection to the other), so
    commands running meanwhile cause no false drift.
    """
    async with (
        await psycopg.AsyncConnection.connect(conninfo) as events_conn,
        await psycopg.AsyncConnection.connect(conninfo) as rows_conn,
    ):
        for conn in (events_conn, rows_conn):
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await conn.set_read_only(True)
        cur = await events_conn.execute("SELECT pg_export_snapshot()")
        snapshot = (await cur.fetchone() or [""])[0]
        await rows_conn.execute(f"SET TRANSACTION SNAPSHOT {sql.quote(snapshot)}")
        # Both closed when either side fails: a COPY left open would hold its connection,
        # and the rollback on the way out would wait on it for ever.
        async with (
            aclosing(_folded(copy_task_streams(events_conn, c_order=True), on_events)) as folded,
            aclosing(_copy_rows(rows_conn)) as rows,
        ):
            drifts = await _compare(folded, rows)
    return drifts


async def _compare(
    folded: AsyncIterator[tuple[str, Task]], rows: AsyncIterator[_Row]
) -> list[Drift]:
    """The drifts between the folds and the rows, both in (user, task) order."""
    drifts: list[Drift] = []
    task = await anext(folded, None)
    row = await anext(rows, None)
    while task is not None or row is not None:
        task_key = (task[0], task[1].id.bytes) if task else None
        row_key = (row.user_id, row.task.id.bytes) if row else None
        if row_key is None or (task_key is not None and task_key < row_key):
            assert task is not None
            drifts.append(Drift(task[0], task[1].id, _differences(None, task[1])))
            task = await anext(folded, None)
        elif task_key is None or row_key < task_key:
            assert row is not None
            drifts.append(Drift(row.user_id, row.task.id, _differences(row, None)))
            row = await anext(rows, None)
        else:
            assert task is not None and row is not None
            if not row.matches(task[1]):
                drifts.append(Drift(row.user_id, row.task.id, _differences(row, task[1])))
            task = await anext(folded, None)
            row = await anext(rows, None)
    return drifts
