"""The online rebuild, `--user`, `--check`, and their safety, on a database of their own.

A generated data set (a few hundred thousand events) makes a full rebuild last long enough
for commands, queries and a kill to happen while it runs.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import JWT_SECRET
from helpers import CLI, ServeProcess, http_client, run_cli, service_env
from psycopg.conninfo import make_conninfo

from todo_cqrs import dataset, db
from todo_cqrs.auth import mint_token
from todo_cqrs.projection import REBUILD_LOCK

USERS, TASKS, EVENTS = 200, 60_000, 300_000


@pytest.fixture(scope="module")
def rebuild_url(server_url: str) -> Iterator[str]:
    """A fresh database holding the generated data set and its projection."""
    url = db.create_database(server_url, "todo_cqrs_rebuild")
    db.migrate(url)
    dataset.generate(url, users=USERS, tasks=TASKS, events=EVENTS)
    done = run_cli("rebuild", "--quiet", env=service_env(DATABASE_URL=url), timeout=120)
    assert done.returncode == 0, done.stderr
    yield url
    db.drop_database(server_url, url)


def projection_digest(url: str, user_id: str | None = None) -> str:
    """A digest of the whole `tasks` table (or one user's rows), byte for byte."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY user_id, task_id), ''))"
            " FROM tasks t WHERE %(user)s::text IS NULL OR user_id = %(user)s",
            {"user": user_id},
        ).fetchone()
    assert row is not None
    return str(row[0])


def check(url: str) -> subprocess.CompletedProcess[str]:
    return run_cli("rebuild", "--check", "--quiet", env=service_env(DATABASE_URL=url), timeout=120)


def test_the_generated_projection_is_clean(rebuild_url: str) -> None:
    done = check(rebuild_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"checked {EVENTS:,} events" in done.stdout
    assert "no drift" in done.stdout


def test_check_finds_corrupted_rows_and_the_rebuild_repairs_them(rebuild_url: str) -> None:
    with psycopg.connect(rebuild_url, autocommit=True) as conn:
        victims = conn.execute(
            "SELECT user_id, task_id FROM tasks ORDER BY user_id, task_id LIMIT 5"
        ).fetchall()
        conn.execute(
            "UPDATE tasks SET title = 'tampered' WHERE user_id = %s AND task_id = %s", victims[0]
        )
        conn.execute(
            "UPDATE tasks SET version = version + 7, completed = NOT completed"
            " WHERE user_id = %s AND task_id = %s",
            victims[1],
        )
        conn.execute("DELETE FROM tasks WHERE user_id = %s AND task_id = %s", victims[2])
        conn.execute(  # the JSON that queries send, its columns intact
            "UPDATE tasks SET body = jsonb_set(body::jsonb, '{title}', '\"in body\"')::text"
            " WHERE user_id = %s AND task_id = %s",
            victims[3],
        )
        conn.execute(  # what `q` searches, the rest intact
            "UPDATE tasks SET title_casefolded = 'not the title'"
            " WHERE user_id = %s AND task_id = %s",
            victims[4],
        )
        conn.execute(
            "INSERT INTO tasks SELECT 'ghost-user', gen_random_uuid(), title, description,"
            " completed, priority, due_date, tags, version, created_at, updated_at,"
            " completed_at, deleted, body, title_casefolded FROM tasks LIMIT 1"
        )
    found = check(rebuild_url)
    assert found.returncode == 1, found.stdout + found.stderr
    drift_lines = [line for line in found.stdout.splitlines() if line.startswith("drift: ")]
    assert len(drift_lines) == 6
    text = "\n".join(drift_lines)
    assert f"task {victims[0][1]}: title: 'tampered' in the row" in text
    assert f"task {victims[1][1]}: completed:" in text and "version:" in text
    assert f"task {victims[2][1]}: no projection row" in text
    assert f"task {victims[3][1]}: body: " in text and '"title": "in body"' in text
    assert f"task {victims[4][1]}: title_casefolded: 'not the title' in the row" in text
    assert "user 'ghost-user'" in text and "a projection row without events" in text
    assert "6 drifted task(s)" in found.stdout

    repaired = run_cli("rebuild", "--quiet", env=service_env(DATABASE_URL=rebuild_url), timeout=120)
    assert repaired.returncode == 0, repaired.stderr
    assert f"from {EVENTS:,} events" in repaired.stdout
    assert check(rebuild_url).returncode == 0


def test_rebuild_of_one_user_leaves_every_other_row_byte_identical(rebuild_url: str) -> None:
    mine, other = "bench-user-7", "bench-user-8"
    with psycopg.connect(rebuild_url, autocommit=True) as conn:
        conn.execute("UPDATE tasks SET title = 'mine, tampered' WHERE user_id = %s", (mine,))
        conn.execute(
            "UPDATE tasks SET title = 'other, tampered' WHERE task_id = ("
            " SELECT task_id FROM tasks WHERE user_id = %s LIMIT 1)",
            (other,),
        )
    others_before = {user: projection_digest(rebuild_url, user) for user in (other, "bench-user-9")}
    done = run_cli("rebuild", "--user", mine, "--quiet", env=service_env(DATABASE_URL=rebuild_url))
    assert done.returncode == 0, done.stderr
    tasks_of_user = TASKS // USERS
    assert (
        f"rebuilt {tasks_of_user:,} tasks from {tasks_of_user * EVENTS // TASKS:,}" in done.stdout
    )
    for user, digest in others_before.items():
        assert projection_digest(rebuild_url, user) == digest
    found = check(rebuild_url)
    assert found.returncode == 1
    assert "user 'bench-user-8'" in found.stdout and "1 drifted task(s)" in found.stdout
    assert run_cli("rebuild", "--quiet", env=service_env(DATABASE_URL=rebuild_url)).returncode == 0


def test_a_second_rebuild_refuses_while_one_runs(rebuild_url: str) -> None:
    with psycopg.connect(rebuild_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (REBUILD_LOCK,))
        for args in (["rebuild"], ["rebuild", "--user", "bench-user-1"]):
            done = run_cli(*args, env=service_env(DATABASE_URL=rebuild_url))
            assert done.returncode == 3
            assert "another rebuild is running" in done.stderr
    assert run_cli("rebuild", "--quiet", env=service_env(DATABASE_URL=rebuild_url)).returncode == 0


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_a_rebuild_killed_half_way_leaves_the_projection_intact(
    rebuild_url: str, how: signal.Signals
) -> None:
    before = projection_digest(rebuild_url)
    process = subprocess.Popen(
        [*CLI, "rebuild", "--quiet"],
        env=service_env(DATABASE_URL=rebuild_url),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Kill it once the new table has rows: it is building, not yet swapping.
        deadline = time.monotonic() + 60
        with psycopg.connect(rebuild_url, autocommit=True) as conn:
            while time.monotonic() < deadline and process.poll() is None:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY tasks_rebuild%%'"
                ).fetchone()
                if row and row[0]:
                    break
                time.sleep(0.02)
        assert process.poll() is None, "the rebuild finished before it could be killed"
        process.send_signal(how)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    if how == signal.SIGINT:  # one line, no traceback
        assert (process.returncode, stderr) == (
            130,
            "todo-cqrs rebuild: interrupted; the projection is as it was\n",
        )
    assert projection_digest(rebuild_url) == before
    again = run_cli("rebuild", "--quiet", env=service_env(DATABASE_URL=rebuild_url), timeout=120)
    assert again.returncode == 0, again.stderr
    assert projection_digest(rebuild_url) == before  # the same events fold to the same rows
    assert check(rebuild_url).returncode == 0


def test_rebuild_under_load_loses_nothing_and_queries_keep_answering(
    rebuild_url: str, tmp_path: Path
) -> None:
    env = service_env(DATABASE_URL=rebuild_url, TODO_JWT_SECRET=JWT_SECRET)
    with ServeProcess(env, tmp_path, tmp_path / "serve.log", workers=2) as serve:
        stop = threading.Event()
        acknowledged: dict[
            str, dict[str, Any] | None
        ] = {}  # task id -> last answer (None: deleted)
        failures: list[str] = []
        reads = [0]

        def writer(n: int) -> None:
            user = f"load-writer-{n}-{secrets.token_hex(3)}"
            with http_client(serve.url, mint_token(JWT_SECRET, user)) as client:
                mine: list[str] = []
                step = 0
                while not stop.is_set() and step < 2000:
                    step += 1
                    if not mine or step % 4 == 0:
                        r = client.post("/tasks", json={"title": f"w{n} s{step}", "tags": ["a\tb"]})
                        if r.status_code != 201:
                            failures.append(f"create {r.status_code} {r.text}")
                            continue
                        mine.append(r.json()["id"])
                        acknowledged[r.json()["id"]] = r.json()
                        continue
                    task_id = mine[step % len(mine)]
                    if acknowledged[task_id] is None:
                        r = client.post(f"/tasks/{task_id}/restore")
                    elif step % 7 == 0:
                        r = client.delete(f"/tasks/{task_id}")
                    else:
                        r = client.patch(f"/tasks/{task_id}", json={"title": f"w{n} s{step}"})
                    if r.status_code not in (200, 204):
                        failures.append(f"{r.request.method} {r.status_code} {r.text}")
                        continue
                    acknowledged[task_id] = None if r.status_code == 204 else r.json()

        def reader() -> None:
            with http_client(serve.url, mint_token(JWT_SECRET, "bench-user-3")) as client:
                while not stop.is_set():
                    for url in ("/tasks?limit=50", "/tasks?completed=true&limit=5"):
                        r = client.get(url)
                        if r.status_code != 200 or not r.json()["items"]:
                            failures.append(f"GET {url}: {r.status_code} {r.text[:200]}")
                        reads[0] += 1

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        threads.append(threading.Thread(target=reader))
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.5)
            rebuilds = [
                run_cli(
                    "rebuild", "--quiet", env=service_env(DATABASE_URL=rebuild_url), timeout=120
                )
                for _ in range(2)
            ]
            time.sleep(0.3)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        for done in rebuilds:
            assert done.returncode == 0, done.stderr
        caught_up = [
            int(d.stdout.split("; ")[1].split(" caught up")[0].replace(",", "")) for d in rebuilds
        ]
        assert failures == []
        assert reads[0] > 20
        assert sum(caught_up) > 0  # commands did commit while the rebuilds ran

        assert check(rebuild_url).returncode == 0
        with psycopg.connect(rebuild_url) as conn:
            rows = dict(
                conn.execute(
                    "SELECT task_id::text, CASE WHEN deleted THEN NULL ELSE version END FROM tasks"
                    " WHERE user_id LIKE 'load-writer-%%'"
                ).fetchall()
            )
        assert len(acknowledged) > 20
        for task_id, answer in acknowledged.items():
            assert task_id in rows, f"acknowledged task {task_id} is missing"
            expected = None if answer is None else answer["version"]
            assert rows[task_id] == expected, task_id


def test_the_service_keeps_its_rights_when_another_role_rebuilds(
    server_url: str, tmp_path: Path
) -> None:
    """`serve` as an application role with granted rights, the rebuild as the tables' owner:
    the new `tasks` carries the old one's grants (it used to have none: every request 500)."""
    url = db.create_database(server_url, "todo_cqrs_roles")
    role = f"todo_app_{secrets.token_hex(4)}"
    try:
        db.migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
            conn.execute(
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"'
            )
            conn.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
        app_url = make_conninfo(url, user=role)
        env = service_env(
            DATABASE_URL=app_url, TODO_JWT_SECRET=JWT_SECRET, TODO_DATA_DIR=str(tmp_path)
        )
        user = f"roles-{secrets.token_hex(4)}"
        with (
            ServeProcess(env, tmp_path, tmp_path / "serve.log") as serve,
            http_client(serve.url, mint_token(JWT_SECRET, user)) as http,
        ):
            assert http.post("/tasks", json={"title": "before"}).status_code == 201
            done = run_cli("rebuild", "--quiet", env=service_env(DATABASE_URL=url), timeout=60)
            assert done.returncode == 0, done.stderr
            assert http.post("/tasks", json={"title": "after"}).status_code == 201
            listed = http.get("/tasks")
            assert listed.status_code == 200, listed.text
            assert [t["title"] for t in listed.json()["items"]] == ["after", "before"]
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        db.drop_database(server_url, url)
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_swap_waits_for_a_long_reader_in_bounded_turns(rebuild_url: str) -> None:
    """A transaction that holds `tasks` for 10 s, longer than the rebuild's load takes: the
    swap's lock request would queue every query behind it until the reader is done. It waits
    at most SWAP_LOCK_TIMEOUT at a time, so queries are held up about a second at worst, and
    the rebuild still succeeds once the reader is done."""
    reader_started, stop = threading.Event(), threading.Event()
    waits: list[float] = []

    def long_reader() -> None:
        with psycopg.connect(rebuild_url) as conn:
            conn.execute("SELECT count(*) FROM tasks WHERE user_id = 'nobody'")
            reader_started.set()
            time.sleep(10)  # the transaction, and its lock on tasks, stays open meanwhile

    def queries() -> None:
        with psycopg.connect(rebuild_url, autocommit=True) as conn:
            while not stop.is_set():
                started = time.monotonic()
                conn.execute("SELECT count(*) FROM tasks WHERE user_id = 'user-1'")
                waits.append(time.monotonic() - started)
                time.sleep(0.05)

    threads = [threading.Thread(target=long_reader), threading.Thread(target=queries)]
    threads[0].start()
    assert reader_started.wait(10)
    threads[1].start()
    try:
        done = run_cli("rebuild", "--quiet", env=service_env(DATABASE_URL=rebuild_url), timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert done.returncode == 0, done.stderr
    assert max(waits) < 2.5, max(waits)  # the lock timeout (1 s) and slack
    assert check(rebuild_url).returncode == 0
