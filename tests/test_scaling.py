"""Scaling out (the first steps of issue 7): a stateless service tier, and a schema that
Citus can distribute by user."""

from __future__ import annotations

import ast
import re
import secrets
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from conftest import JWT_SECRET
from helpers import ServeProcess, assert_projection_is_the_fold, http_client, service_env

from todo_cqrs.auth import mint_token


def test_two_servers_on_one_database_keep_every_guarantee(
    database_url: str, tmp_path: Path
) -> None:
    env = service_env(DATABASE_URL=database_url, TODO_JWT_SECRET=JWT_SECRET, TMPDIR=str(tmp_path))
    user = f"tier-{secrets.token_hex(4)}"
    token = mint_token(JWT_SECRET, user)
    with (
        ServeProcess(env, tmp_path, tmp_path / "a.log") as a,
        ServeProcess(env, tmp_path, tmp_path / "b.log") as b,
    ):
        with http_client(a.url, token) as client:
            tasks = [client.post("/tasks", json={"title": f"t{i}"}).json()["id"] for i in range(3)]
        outcomes: Counter[int] = Counter()
        lock = threading.Lock()

        def racer(n: int) -> None:
            # Each client alternates between the two servers, request by request.
            with http_client(a.url, token) as on_a, http_client(b.url, token) as on_b:
                for round_ in range(6):
                    client = on_a if (n + round_) % 2 else on_b
                    task_id = tasks[(n + round_) % 3]
                    seen = client.get(f"/tasks/{task_id}")
                    other = on_b if client is on_a else on_a
                    r = other.patch(
                        f"/tasks/{task_id}",
                        json={"title": f"{n}.{round_}"},
                        headers={"If-Match": seen.headers["etag"]},
                    )
                    assert r.status_code in (200, 412), r.text
                    with lock:
                        outcomes[r.status_code] += 1

        with ThreadPoolExecutor(20) as pool:
            list(pool.map(racer, range(20)))

        # One Idempotency-Key sent to both servers at once creates one task.
        key = f"tier-key-{secrets.token_hex(4)}"

        def create(n: int) -> int:
            with http_client((a, b)[n % 2].url, token) as client:
                r = client.post("/tasks", json={"title": "once"}, headers={"Idempotency-Key": key})
                return r.status_code

        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(create, range(10)))
        assert set(statuses) <= {201, 409} and 201 in statuses

    assert outcomes[200] > 0 and outcomes[412] > 0
    with psycopg.connect(database_url) as conn:
        created_once = conn.execute(
            "SELECT count(*) FROM events WHERE user_id = %s AND idempotency_key = %s",
            (user, key),
        ).fetchone()
    assert created_once == (1,)
    streams = assert_projection_is_the_fold(database_url, user)
    # every successful PATCH is one event past the creation
    assert (
        sum(len(events) - 1 for key_, events in streams.items() if str(key_[1]) in tasks)
        == (outcomes[200])
    )


def test_every_key_of_every_table_starts_with_user_id(database_url: str) -> None:
    """Citus distributes a table by a column that every primary key and unique constraint
    must contain; ours all start with user_id (yoyo's own bookkeeping tables aside)."""
    with psycopg.connect(database_url) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                " AND tablename NOT LIKE '%%yoyo%%' ORDER BY 1"
            )
        ]
        keys = conn.execute(
            "SELECT c.conrelid::regclass::text, c.conname, c.contype,"
            " (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(c.conkey)"
            "  WITH ORDINALITY AS k(attnum, i)"
            "  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum)"
            " FROM pg_constraint c WHERE c.contype IN ('p', 'u')"
            " AND c.conrelid::regclass::text = ANY(%s)",
            (tables,),
        ).fetchall()
    assert tables == ["event_listeners", "events", "idempotency_keys", "tasks"]
    assert {table for table, _, kind, _ in keys if kind == "p"} == set(tables)
    for table, name, _, columns in keys:
        assert columns[0] == "user_id", f"{table}.{name} is keyed by {columns}"


def test_the_citus_script_distributes_every_table() -> None:
    script = (Path(__file__).parent.parent / "sql" / "citus" / "distribute.sql").read_text()
    for table in ("events", "tasks", "idempotency_keys", "event_listeners"):
        assert f"create_distributed_table('{table}', 'user_id'" in script


# --- every statement on a user's data filters by user_id ------------------------------------

PACKAGE = Path(__file__).parent.parent / "todo_cqrs"
USER_TABLES = (
    r"(?:events|tasks|idempotency_keys|event_listeners|tasks_rebuild|\{table\}|\{NEW_TABLE\})"
)
_STATEMENT = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH|COPY)\b")
_ON_USER_TABLE = re.compile(rf"\b(?:FROM|INTO|UPDATE|JOIN|COPY)\s+{USER_TABLES}(?!\w)")
_USER_FILTER = re.compile(r"\bWHERE\b.*\buser_id\s*=", re.S)
_USER_COLUMN_FIRST = re.compile(rf"\b(?:INTO|COPY)\s+{USER_TABLES}\s*\(user_id,")

# The statements that read or change every user's rows on purpose; each is one statement,
# which Citus runs on every shard (none joins two users' rows).
ALL_USERS = {
    "FROM events {condition}": "the full rebuild and --check fold every stream;"
    " with --user, condition is `WHERE user_id = %s`",
    "FROM events e LEFT JOIN {table} t ON t.user_id = e.user_id": "the rebuild's catch-up:"
    " events past its mark that the new table lacks (joined on user_id, so within a shard)",
    "COPY (SELECT user_id, {TASK_COLUMNS}, body, title_casefolded FROM tasks": "--check reads"
    " the whole projection",
    "DELETE FROM idempotency_keys WHERE created_at <": "the hourly prune of answers past 24 h",
    "DELETE FROM event_listeners WHERE expires_at <": "the hourly prune of stream registrations"
    " of processes that died",
    "DELETE FROM event_listeners WHERE listener =": "a process forgets its stream registrations"
    " at shutdown",
    "SELECT count(*) FROM events": "the rebuild's progress bar total; the benchmark's size",
    "SELECT count(DISTINCT user_id), count(*) FROM tasks": "the benchmark's data set size",
    "FROM tasks WHERE NOT deleted ORDER BY random()": "the benchmark picks its targets",
}


def _sql_text(node: ast.expr) -> str:
    """A string or f-string literal's text, each {expression} written as in the source."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    assert isinstance(node, ast.JoinedStr)
    return "".join(
        part.value if isinstance(part, ast.Constant) else "{" + ast.unparse(part.value) + "}"
        for part in node.values
        if isinstance(part, ast.Constant | ast.FormattedValue)
    )


def package_statements() -> list[tuple[str, str]]:
    """(where, SQL) of every statement on a user table written in the package."""
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        inside_fstrings = {
            id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
            for part in ast.walk(node) if part is not node
        }  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in inside_fstrings or not isinstance(node, ast.Constant | ast.JoinedStr):
                continue
            if isinstance(node, ast.Constant) and not isinstance(node.value, str):
                continue
            text = _sql_text(node)
            if _STATEMENT.match(text) and _ON_USER_TABLE.search(text):
                found.append((f"{path.name}:{node.lineno}", text))
    return found


def test_every_statement_on_a_users_data_filters_by_user_id() -> None:
    statements = package_statements()
    assert len(statements) >= 15  # the scan finds the package's SQL at all
    unfiltered = []
    allowed_seen = set()
    for where, sql in statements:
        allowed = [marker for marker in ALL_USERS if marker in sql]
        allowed_seen.update(allowed)
        if allowed or _USER_FILTER.search(sql) or _USER_COLUMN_FIRST.search(sql):
            if " JOIN " in sql:
                assert re.search(r"\bON\b[^;]*\buser_id\b", sql), f"{where} joins: {sql}"
            continue
        unfiltered.append(f"{where}: {sql}")
    assert not unfiltered, "statements without a user_id filter:\n" + "\n".join(unfiltered)
    assert allowed_seen == set(ALL_USERS), "allow-list entries that match no statement"


def test_the_scan_tells_a_filtered_statement_from_an_unfiltered_one() -> None:
    def passes(sql: str) -> bool:
        return bool(_USER_FILTER.search(sql) or _USER_COLUMN_FIRST.search(sql))

    assert passes("SELECT * FROM tasks WHERE user_id = %s AND task_id = %s")
    assert passes("INSERT INTO events (user_id, task_id) VALUES (%s, %s)")
    assert not passes("SELECT * FROM tasks WHERE task_id = %s")
    assert not passes("UPDATE tasks SET title = %s WHERE task_id = %s")
    assert not passes("INSERT INTO events (task_id, user_id) VALUES (%s, %s)")
