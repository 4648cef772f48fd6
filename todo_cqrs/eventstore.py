"""The append-only event table: appending a command's events and reading them back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg

from todo_cqrs.domain import EVENT_TYPES, Event, Recorded, event_data, event_type

Conn = psycopg.AsyncConnection[Any]


class EventMeta(msgspec.Struct):
    """What caused an event: the request that carried the command."""

    request_id: str | None
    idempotency_key: str | None


class StoredEvent(msgspec.Struct):
    """An event as history and the feed show it."""

    position: int
    task_id: UUID
    version: int
    type: str
    data: msgspec.Raw
    occurred_at: datetime
    meta: EventMeta


_encode = msgspec.json.Encoder().encode


def decode_event(type_name: str, data: str | bytes) -> Event:
    return msgspec.json.decode(data, type=EVENT_TYPES[type_name])


async def append_events(conn: Conn, user_id: str, events: list[Recorded], meta: EventMeta) -> None:
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO events (user_id, task_id, version, type, data, occurred_at,"
            " request_id, idempotency_key) VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s, %s)",
            [
                (
                    user_id,
                    r.task_id,
                    r.version,
                    event_type(r.event),
                    _encode(event_data(r.event)).decode(),
                    r.occurred_at,
                    meta.request_id,
                    meta.idempotency_key,
                )
                for r in events
            ],
        )


async def task_history(
    conn: Conn, user_id: str, task_id: UUID, after_version: int, limit: int
) -> list[StoredEvent]:
    cur = await conn.execute(
        "SELECT position, task_id, version, type, data::text, occurred_at, request_id,"
        " idempotency_key FROM events WHERE user_id = %s AND task_id = %s AND version > %s"
        " ORDER BY version LIMIT %s",
        (user_id, task_id, after_version, limit),
    )
    return [
        StoredEvent(
            position=row[0],
            task_id=row[1],
            version=row[2],
            type=row[3],
            data=msgspec.Raw(row[4].encode()),
            occurred_at=row[5],
            meta=EventMeta(request_id=row[6], idempotency_key=row[7]),
        )
        for row in await cur.fetchall()
    ]


async def task_exists(conn: Conn, user_id: str, task_id: UUID) -> bool:
    """Whether the user ever created this task (deleted or not)."""
    cur = await conn.execute(
        "SELECT 1 FROM events WHERE user_id = %s AND task_id = %s AND version = 1",
        (user_id, task_id),
    )
    return await cur.fetchone() is not None


async def all_streams(conn: Conn) -> AsyncIterator[tuple[str, Recorded]]:
    """Every event, grouped by user and task in version order, through a server-side cursor
    so that memory stays flat whatever the table's size."""
    async with conn.cursor(name="all_events") as cur:
        cur.itersize = 5000
        await cur.execute(
            "SELECT user_id, task_id, version, type, data::text, occurred_at FROM events"
            " ORDER BY user_id, task_id, version"
        )
        async for user_id, task_id, version, type_name, data, occurred_at in cur:
            yield user_id, Recorded(task_id, version, occurred_at, decode_event(type_name, data))
