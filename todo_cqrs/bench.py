"""Benchmarks that write their figures into BENCHMARKS.md (`nox -s bench_rebuild`, `nox -s bench`).

    python -m todo_cqrs.bench rebuild [--users N] [--tasks N] [--events N]
    python -m todo_cqrs.bench api [--workers 2] [--connections 32] [--duration 15] [--smoke]
                                  [--big [--users N --tasks N --events N]] [--scale-out]

Uses BENCH_DATABASE_URL (a server where it may create and drop a database), else an embedded
PostgreSQL in a temporary folder. `api` drives a real `todo-cqrs serve` on a loopback port
with wrk, and the same SQL straight at the database with pgbench (see `bench_api`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import jwt
import psutil
import psycopg
from psycopg_pool import AsyncConnectionPool

from todo_cqrs import __version__, auth, commands, db, eventstore, projection, queries
from todo_cqrs.config import POOL_MAX, Settings

REPORT = Path("BENCHMARKS.md")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {system}"


def write_section(name: str, body: str) -> None:
    """Replace (or add) the section `## name` of BENCHMARKS.md."""
    text = (
        REPORT.read_text() if REPORT.exists() else "# Benchmarks\n\nWritten by `nox -s bench*`.\n"
    )
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    REPORT.write_text(text)


def reported_rates(name: str) -> dict[str, float]:
    """The requests/s of each scenario in the section `## name` of BENCHMARKS.md, if any."""
    text = REPORT.read_text() if REPORT.exists() else ""
    found = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    rates: dict[str, float] = {}
    for scenario, rate in re.findall(r"^\| (\w+) \| ([\d,]+) \|", found[1] if found else "", re.M):
        rates.setdefault(scenario, float(rate.replace(",", "")))  # the first table: wrk's
    return rates


def run_cli(url: str, *args: str) -> tuple[float, str]:
    """Run `todo-cqrs ARGS` against url; return (seconds, its last output line)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "todo_cqrs.cli", *args],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        check=True,
    )
    return time.monotonic() - started, done.stdout.strip().splitlines()[-1]


def bench_rebuild(server_url: str, users: int, tasks: int, events: int) -> None:
    url = db.create_database(server_url, "todo_cqrs_bench")
    try:
        db.migrate(url)
        print(f"generating {events:,} events of {tasks:,} tasks of {users:,} users ...", flush=True)
        generate_s, _ = run_cli(
            url, "generate", "--users", str(users), "--tasks", str(tasks),
            "--events", str(events), "--quiet",
        )  # fmt: skip
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE events")
            server_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        runs = []
        for _ in range(2):
            print("rebuilding ...", flush=True)
            seconds, line = run_cli(url, "rebuild", "--quiet")
            runs.append((seconds, line))
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        check_s, check_line = run_cli(url, "rebuild", "--check", "--quiet")
    finally:
        db.drop_database(server_url, url)
    best = min(seconds for seconds, _ in runs)
    rows = "\n".join(
        f"| {i} | {s:.1f} s | {events / s:,.0f} | `{line}` |" for i, (s, line) in enumerate(runs, 1)
    )
    write_section(
        "Projection rebuild",
        f"""
Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; Python {platform.python_version()},
PostgreSQL {server_version}, todo-cqrs {__version__}. Database and benchmark share the machine.

Data set: {users:,} users, {tasks:,} tasks, {events:,} events, made by `todo-cqrs generate`
in {generate_s:.0f} s. Each run is a whole `todo-cqrs rebuild` process (start-up, snapshot,
fold, COPY, index build, catch-up, swap), timed from outside.

| run | wall time | events/s (whole process) | its summary line |
| --- | --- | --- | --- |
{rows}

- Best: **{events / best:,.0f} events/s** (target: 150,000).
- Peak resident memory of the largest `todo-cqrs` process: **{rss_mb:.0f} MB**
  (target: under 200 MB).
- `todo-cqrs rebuild --check` over the same data: {check_s:.1f} s (`{check_line}`).
""",
    )
    print(REPORT.read_text())


# --- the HTTP API (issue 6) -----------------------------------------------------------------
#
# One run: a fresh database; `todo-cqrs serve --workers N` on a free loopback port; a data
# set (seeded through the API, or with --big generated in the database and rebuilt); then
# each scenario driven by wrk for --duration seconds; the workers' memory; serve stopped;
# then pgbench runs the SQL of one PATCH and of one list query straight at the database:
# its transactions/s are the ceiling that the scenarios are compared with.

# Each scenario's mix of requests, in percent.
SCENARIOS: dict[str, dict[str, int]] = {
    "create": {"create": 100},
    "get": {"get": 100},
    "list": {"list": 100},
    "patch": {"patch": 100},
    "history": {"history": 100},
    "mixed": {"get": 40, "list": 20, "history": 20, "create": 10, "patch": 10},
}
COMMAND_KINDS = frozenset({"create", "patch"})

# The wrk script of a scenario; @TARGETS@ and @WEIGHTS@ are filled in at run time. Each
# thread reads the `token task_id` lines and picks a random one for each request.
_LUA = r"""-- Written by todo_cqrs/bench.py for one scenario of `nox -s bench`.
local targets_path = "@TARGETS@"
local weights = {@WEIGHTS@}
local thread_rate = @RATE@  -- requests/s of each thread; 0: as fast as the connections go
local targets = {}
local kinds = {}
local sent = 0
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_no", threads)
end

function init(args)
  for line in io.lines(targets_path) do
    local token, task = line:match("^(%S+) (%S+)$")
    if token then
      targets[#targets + 1] = {"Bearer " .. token, task}
    end
  end
  for _, w in ipairs(weights) do
    for _ = 1, w[2] do
      kinds[#kinds + 1] = w[1]
    end
  end
  math.randomseed(os.time() + 7919 * (thread_no or 0))
end

if thread_rate > 0 then
  -- Paced: the thread's requests start on a Poisson schedule of thread_rate a second, each
  -- on whichever of its connections is free. Latency is measured from the send, so a
  -- schedule that falls behind (every connection busy) shows in the rate, not the latency.
  local ffi = require("ffi")
  ffi.cdef[[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clock_id, bench_timespec *tp);
  ]]
  local now_ts = ffi.new("bench_timespec")
  local next_ms = nil

  function delay()
    ffi.C.clock_gettime(1, now_ts)  -- CLOCK_MONOTONIC
    local now = tonumber(now_ts.tv_sec) * 1000 + tonumber(now_ts.tv_nsec) / 1e6
    local gap = -math.log(1 - math.random()) * 1000 / thread_rate
    next_ms = math.max(now, (next_ms or now) + gap)
    return next_ms - now
  end
end

function request()
  sent = sent + 1
  local target = targets[math.random(#targets)]
  local kind = kinds[math.random(#kinds)]
  local headers = {Authorization = target[1]}
  if kind == "get" then
    return wrk.format("GET", "/tasks/" .. target[2], headers)
  elseif kind == "list" then
    return wrk.format("GET", "/tasks?limit=50", headers)
  elseif kind == "history" then
    return wrk.format("GET", "/tasks/" .. target[2] .. "/history", headers)
  end
  headers["Content-Type"] = "application/json"
  local title = string.format('"bench %d-%d"', thread_no or 0, sent)
  if kind == "create" then
    return wrk.format("POST", "/tasks", headers, '{"title": ' .. title .. ', "tags": ["bench"]}')
  end
  return wrk.format("PATCH", "/tasks/" .. target[2], headers, '{"title": ' .. title .. '}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %.0f, "duration_us": %.0f, "connect": %.0f, "read": %.0f,'
      .. ' "write": %.0f, "status": %.0f, "timeout": %.0f, "p50_us": %.0f, "p95_us": %.0f,'
      .. ' "p99_us": %.0f, "max_us": %.0f, "mean_us": %.0f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max, latency.mean))
end
"""

# The SQL of one PATCH that renames a task, as commands.execute sends it without an
# Idempotency-Key and without a replica: projection.load_task; commands._RECORD (the lock,
# the row, the event and the NOTIFY check in one statement). The first statement is the
# harness's: it picks a random seeded task and computes what the service computes in Python
# (the new title, the task's JSON after the rename, as msgspec writes it, so that the row's
# body stays what `rebuild --check` expects; the title case-folded, which for this lower-case
# title is the title itself; the event's JSON); reading the row there too adds one
# primary-key read per transaction to the harness's side. (`#` stands for `:` in the time
# format, where pgbench would take `:MI` for a variable.)
_PGBENCH_COMMAND = """\\set n random(1, @TARGETS@)
SELECT b.user_id AS uid, b.task_id AS tid, r.version AS expected_version,
  regexp_replace(regexp_replace(regexp_replace(r.body,
    '"title":"(?:[^"\\\\]|\\\\.)*"', '"title":"' || t.title || '"'),
    '"version":\\d+', '"version":' || (r.version + 1)),
    '"updated_at":"[^"]*"', '"updated_at":"' || replace(to_char(t.at AT TIME ZONE 'UTC',
      CASE WHEN extract(microseconds FROM t.at)::int % 1000000 = 0
      THEN 'YYYY-MM-DD"T"HH24#MI#SS"Z"' ELSE 'YYYY-MM-DD"T"HH24#MI#SS.US"Z"' END), '#', ':')
      || '"') AS task_json,
  jsonb_build_array(jsonb_build_object('version', r.version + 1, 'type', 'TaskRenamed',
    'data', jsonb_build_object('title', t.title), 'schema_version', 1)) AS events_json,
  t.at AS occurred_at, 'todo_events' AS channel, gen_random_uuid()::text AS request_id,
  t.title AS title_casefolded
  FROM bench_targets b JOIN tasks r ON r.user_id = b.user_id AND r.task_id = b.task_id,
    (SELECT 'pgbench ' || md5(random()::text) AS title, clock_timestamp() AS at) t
  WHERE b.n = :n \\gset
@LOAD_TASK@;
@RECORD@;
"""

# queries.list_tasks without filters or cursor, `limit` 50 (so LIMIT 51).
_PGBENCH_LIST = """\\set n random(1, @TARGETS@)
SELECT user_id AS uid FROM bench_targets WHERE n = :n \\gset
\\set limit 51
@LIST@;
"""

# The parameters of commands._RECORD as pgbench variables; pgbench's are untyped, so some
# get a cast.
_RECORD_VALUES = {
    "user_id": ":uid",
    "task": ":task_json",
    "title_casefolded": ":title_casefolded",
    "expected_version": ":expected_version::int4",
    "task_id": ":tid::uuid",
    "occurred_at": ":occurred_at::timestamptz",
    "request_id": ":request_id",
    "idempotency_key": "NULL::text",
    "events": ":events_json",
    "channel": ":channel",
}


_LIST_SQL = queries.LIST_TASKS.format(where="")  # no filters, no cursor
_LOAD_TASK_SQL = projection.LOAD_TASK.format(table="tasks")


def pgbench_scripts(targets: int) -> dict[str, str]:
    """The pgbench scripts, built from the statements that the service sends."""
    record = commands._RECORD
    for name, value in _RECORD_VALUES.items():
        record = record.replace(f"%({name})s", value)
    assert "%(" not in record
    return {
        name: text.replace("@TARGETS@", str(targets))
        .replace(
            "@LOAD_TASK@",
            _LOAD_TASK_SQL.replace("%(user_id)s", ":uid").replace("%(task_id)s", ":tid"),
        )
        .replace("@RECORD@", record)
        .replace("@LIST@", _LIST_SQL.replace("%(user_id)s", ":uid").replace("%(limit)s", ":limit"))
        for name, text in (("command", _PGBENCH_COMMAND), ("list", _PGBENCH_LIST))
    }


# The read statements whose plans --big writes out (copied from queries.py, eventstore.py
# and projection.py; one seeded task's ids fill them in).
def explained_queries() -> dict[str, str]:
    return {
        "list (GET /tasks?limit=50)": _LIST_SQL.replace("%(limit)s", "51"),
        "get (GET /tasks/{id})": queries.GET_TASK,
        "history (GET /tasks/{id}/history)": eventstore.TASK_HISTORY.replace("%(after)s", "0")
        .replace("%(limit)s", "100")
        .replace("%(page_bytes)s", str(eventstore.PAGE_BYTES)),
        "the command's row read (PATCH /tasks/{id})": _LOAD_TASK_SQL,
    }


@dataclass
class Options:
    workers: int
    connections: int
    threads: int
    duration: int
    warmup: int
    users: int
    tasks_per_user: int
    big: bool
    tasks: int
    events: int
    targets: int
    smoke: bool
    log_level: str
    rate: int = 0  # requests/s of the paced runs after the others; 0: none
    only: list[str] = field(default_factory=list)  # some scenarios, not all (no report)


@dataclass
class Scenario:
    name: str
    requests: int
    seconds: float
    errors: int
    error_detail: str
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    rss_mb: list[float] = field(default_factory=list)  # each worker's, after this run

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass
class PgbenchResult:
    name: str
    tps: float
    latency_ms: float
    p99_ms: float
    failed: int
    transactions: int


@dataclass
class DataSet:
    users: int
    tasks: int
    events: int
    how: str


@dataclass
class Run:
    options: Options
    data: DataSet
    scenarios: list[Scenario] = field(default_factory=list)
    paced: list[Scenario] = field(default_factory=list)  # each scenario at options.rate
    pgbench: dict[str, PgbenchResult] = field(default_factory=dict)
    floor: dict[str, Scenario] = field(default_factory=dict)  # FloorApp's get and list
    floor_rss_mb: list[float] = field(default_factory=list)
    server_version: str = ""
    plans: dict[str, str] = field(default_factory=dict)

    @property
    def worker_rss_mb(self) -> list[float]:
        """Each worker's RSS after the whole run: after its last scenario."""
        return [*self.scenarios, *self.paced][-1].rss_mb


def _service_env(**extra: str) -> dict[str, str]:
    """This environment without the service's own variables, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TODO_")
        and name not in {"DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR", "BENCH_DATABASE_URL"}
    }
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _pool_max() -> str:
    """The service's pool size under the benchmark: the caller's TODO_POOL_MAX (the one
    setting of the service's that passes through), else the service's default."""
    return os.environ.get("TODO_POOL_MAX", str(POOL_MAX))


def _answers(url: str) -> bool:
    """Whether url answers 2xx (a service that is not listening yet does not)."""
    try:
        return httpx.get(url, timeout=2.0, trust_env=False).is_success
    except httpx.TransportError:
        return False


class Serve:
    """`todo-cqrs serve` on a free loopback port, in a session of its own (serve and its
    workers stop as one process group); its output goes to `log_path`."""

    def __init__(
        self, env: dict[str, str], log_path: Path, workers: int, app: str | None = None
    ) -> None:
        """`app` ("module:attribute"): that ASGI app under plain uvicorn instead of serve."""
        self.env = env
        self.port = db.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("ab")
        where = ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        command = (
            ["todo_cqrs.cli", "serve", *where]
            if app is None
            else ["uvicorn", app, *where, "--no-access-log", "--log-level", "warning"]
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", *command],
            env=env, cwd=log_path.parent, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.family: list[psutil.Process] = []

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited with {self.process.returncode}:\n{self.tail()}")
            if _answers(f"{self.url}/ready"):
                self.family = [psutil.Process(self.process.pid), *self.workers()]
                return
            time.sleep(0.2)
        raise TimeoutError(f"serve was not ready within {timeout:.0f} s:\n{self.tail()}")

    def workers(self) -> list[psutil.Process]:
        """The processes that serve requests: uvicorn's spawned workers, or serve itself."""
        main = psutil.Process(self.process.pid)
        spawned = [
            child
            for child in main.children(recursive=True)
            if any("spawn_main" in part for part in child.cmdline())
        ]
        return spawned or [main]

    def worker_rss_mb(self) -> list[float]:
        return [worker.memory_info().rss / 2**20 for worker in self.workers()]

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as a supervisor sends it; SIGKILL to the group (and to each worker
        seen) when it does not stop in time."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    print(f"serve did not stop within {timeout:.0f} s: killing it", flush=True)
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(15)
            for member in self.family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if member.is_running() and member.status() != psutil.STATUS_ZOMBIE:
                        member.kill()
        finally:
            self._log.close()


# --- the floor: the service's reads without the framework ------------------------------------

_Message = dict[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]


class FloorApp:
    """`GET /tasks/{id}` and `GET /tasks?limit=50` as a bare ASGI app: the service's own pool
    (`db.create_pool`, the same settings), token check (`auth.Verifier`, cache included) and
    query functions, and nothing else: no Litestar, no request id, no log, no metrics, no
    problem bodies (any failure is a bare 500, which wrk counts as an error).

    What uvicorn, psycopg and PostgreSQL cost together on the machine of the run: `bench_api`
    drives it with the same load right after the service, so the report can set the service's
    reads against a floor measured minutes apart, not on another day's hardware.
    """

    def __init__(self) -> None:
        self.pool: AsyncConnectionPool | None = None
        self.verifier: auth.Verifier | None = None

    async def __call__(self, scope: _Message, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        try:
            status, body = 200, await self._read(scope)
        except Exception:  # a floor, not a service: wrk only needs the status
            status, body = 500, b""
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _read(self, scope: _Message) -> bytes:
        assert self.pool is not None and self.verifier is not None
        path: str = scope["path"]
        if path == "/ready":
            return b"{}"
        authorization = dict(scope["headers"])[b"authorization"].decode()
        user = await self.verifier.verify(authorization.removeprefix("Bearer "))
        if path == "/tasks":
            return await queries.list_tasks(self.pool, user, queries.TaskFilters(), 50, None)
        task = await queries.get_task(self.pool, user, UUID(path.removeprefix("/tasks/")))
        return task.json

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        settings = Settings.from_env()
        assert settings.database_url is not None
        self.pool = db.create_pool(
            settings.database_url,
            min_size=settings.pool_min,
            max_size=settings.pool_max,
            timeout=settings.pool_timeout,
            prepared_statements=settings.prepared_statements,
        )
        self.verifier = auth.Verifier.from_settings(settings)
        while (await receive())["type"] == "lifespan.startup":
            await self.pool.open()
            await send({"type": "lifespan.startup.complete"})
        await self.pool.close()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


floor_app = FloorApp()


def _token(secret: str, user: str, ttl: int) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl}, secret, algorithm="HS256")


def _user_client(base_url: str, token: str, timeout: float = 30.0) -> httpx.Client:
    """An HTTP client of the service that speaks as the token's user."""
    return httpx.Client(
        base_url=base_url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
        trust_env=False,
    )


def _seed_user(base_url: str, token: str, user: str, count: int) -> list[str]:
    """Create `count` tasks for one user through the API; their ids."""
    ids = []
    with _user_client(base_url, token) as client:
        for i in range(count):
            body: dict[str, object] = {
                "title": f"Seeded task {i} of {user}",
                "priority": ("low", "medium", "high")[i % 3],
                "tags": ["bench", f"tag{i % 7}"],
            }
            if i % 4 == 0:
                body["due_date"] = f"2027-{1 + i % 12:02d}-{1 + i % 28:02d}"
            response = client.post("/tasks", json=body)
            if response.status_code != 201:
                raise RuntimeError(
                    f"seeding: POST /tasks answered {response.status_code}: {response.text[:300]}"
                )
            ids.append(str(response.json()["id"]))
    return ids


def _age_tasks(base_url: str, token: str, ids: list[str]) -> None:
    """Give each task the events that `todo-cqrs generate` gives a task of --big after its
    TaskCreated (renamed, priority and tags changed: one PATCH; then completed), so that the
    small and the big data sets differ in size, not in shape: 5 events a task, as in --big."""
    with _user_client(base_url, token) as client:
        for i, task_id in enumerate(ids):
            # A priority other than the one _seed_user gave task i, so that it is an event.
            priority = ("medium", "high", "low")[i % 3]
            edit = {"title": f"Task {i} v2", "priority": priority, "tags": [f"tag{i % 50}", "v4"]}
            for response in (
                client.patch(f"/tasks/{task_id}", json=edit),
                client.post(f"/tasks/{task_id}/complete"),
            ):
                if response.status_code != 200:
                    raise RuntimeError(
                        f"seeding: {response.request.method} {response.request.url.path}"
                        f" answered {response.status_code}: {response.text[:300]}"
                    )


def _seed_and_age_user(base_url: str, token: str, user: str, count: int) -> list[str]:
    ids = _seed_user(base_url, token, user, count)
    _age_tasks(base_url, token, ids)
    return ids


def seed_through_api(
    base_url: str, url: str, secret: str, options: Options, ttl: int
) -> list[tuple[str, str, str]]:
    """options.users users with options.tasks_per_user tasks each, made through the API from
    a pool of threads (POST /tasks, a PATCH and a complete: 5 events a task, as in --big);
    every task is a target: (user, token, task_id)."""
    users = [f"bench-user-{i}" for i in range(options.users)]
    tokens = {user: _token(secret, user, ttl) for user in users}
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(16, len(users))) as pool:
        futures = {
            user: pool.submit(
                _seed_and_age_user, base_url, tokens[user], user, options.tasks_per_user
            )
            for user in users
        }
        try:
            targets = [
                (user, tokens[user], task_id)
                for user, future in futures.items()
                for task_id in future.result(timeout=600)
            ]
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # only the users under way finish
            raise
    seconds = time.monotonic() - started
    print(
        f"seeded {len(targets):,} tasks of {len(users):,} users through the API in {seconds:.1f} s"
        f" ({3 * len(targets) / seconds:,.0f} requests/s)",
        flush=True,
    )
    return targets


def generated_targets(url: str, secret: str, count: int, ttl: int) -> list[tuple[str, str, str]]:
    """`count` random live tasks of the generated data set, with their users' tokens."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT user_id, task_id::text FROM tasks WHERE NOT deleted ORDER BY random() LIMIT %s",
            (count,),
        ).fetchall()
    tokens: dict[str, str] = {}
    return [
        (user, tokens.setdefault(user, _token(secret, user, ttl)), task_id)
        for user, task_id in rows
    ]


def save_targets(url: str, targets: list[tuple[str, str, str]], path: Path) -> None:
    """The wrk scripts' `token task_id` file and pgbench's bench_targets table."""
    path.write_text("".join(f"{token} {task_id}\n" for _, token, task_id in targets))
    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_targets")
        conn.execute(
            "CREATE TABLE bench_targets (n integer PRIMARY KEY, user_id text NOT NULL,"
            " task_id uuid NOT NULL)"
        )
        with conn.cursor().copy("COPY bench_targets (n, user_id, task_id) FROM STDIN") as copy:
            for n, (user, _, task_id) in enumerate(targets, start=1):
                copy.write_row((n, user, task_id))


def data_set(url: str, how: str) -> DataSet:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(DISTINCT user_id), count(*) FROM tasks").fetchone()
        users, tasks = row or (0, 0)
        events = (conn.execute("SELECT count(*) FROM events").fetchone() or (0,))[0]
    return DataSet(users=users, tasks=tasks, events=events, how=how)


def run_wrk(
    name: str,
    base_url: str,
    folder: Path,
    targets_path: Path,
    options: Options,
    seconds: int,
    rate: int = 0,
) -> Scenario:
    """One scenario under wrk: as fast as the connections go, or `rate` requests/s in all."""
    weights = ", ".join(f'{{"{kind}", {share}}}' for kind, share in SCENARIOS[name].items())
    # One file per target: two wrk runs at once (--scale-out) must not rewrite each other's.
    script = folder / f"{name}-{base_url.rsplit(':', 1)[-1]}.lua"
    script.write_text(
        _LUA.replace("@TARGETS@", str(targets_path))
        .replace("@WEIGHTS@", weights)
        .replace("@RATE@", repr(rate / options.threads))
    )
    done = subprocess.run(
        ["wrk", "-t", str(options.threads), "-c", str(options.connections),
         "-d", f"{seconds}s", "--timeout", "10s", "-s", str(script), base_url],
        capture_output=True, text=True, timeout=seconds + 60, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    r = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    kinds = ("connect", "read", "write", "status", "timeout")
    errors = sum(int(r[kind]) for kind in kinds)
    detail = ", ".join(f"{r[kind]:.0f} {kind}" for kind in kinds if r[kind])
    return Scenario(
        name=name,
        requests=int(r["requests"]),
        seconds=r["duration_us"] / 1e6,
        errors=errors,
        error_detail=detail,
        p50_ms=r["p50_us"] / 1000,
        p95_ms=r["p95_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000,
    )


def run_pgbench(name: str, url: str, script: Path, options: Options) -> PgbenchResult:
    seconds = options.duration
    # Every transaction's latency goes to a log (one file per thread), for its p99: the
    # database's own tail at the same number of connections, beside the service's.
    log_prefix = script.parent / f"pgbench-log-{name}"
    done = subprocess.run(
        ["pgbench", "-n", "-M", "prepared", "-c", str(options.connections), "-j", "2",
         "-T", str(seconds), "-l", f"--log-prefix={log_prefix}", "-f", str(script), url],
        capture_output=True, text=True, timeout=seconds + 120, check=False,
        env={**os.environ, "PGOPTIONS": "-c TimeZone=UTC"},
    )  # fmt: skip
    latencies_us: list[int] = []
    for log_file in script.parent.glob(f"{log_prefix.name}.*"):
        with log_file.open() as lines:  # client, transaction, latency in µs, ...
            latencies_us.extend(int(line.split()[2]) for line in lines)
        log_file.unlink()
    latencies_us.sort()
    out = done.stdout
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    if done.returncode != 0 or tps is None:
        raise RuntimeError(f"pgbench failed ({done.returncode}):\n{out}\n{done.stderr}")
    latency = re.search(r"^latency average = ([\d.]+) ms", out, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    processed = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    return PgbenchResult(
        name=name,
        tps=float(tps.group(1)),
        latency_ms=float(latency.group(1)) if latency else float("nan"),
        p99_ms=latencies_us[(len(latencies_us) - 1) * 99 // 100] / 1000
        if latencies_us
        else float("nan"),
        failed=int(failed.group(1)) if failed else 0,
        transactions=int(processed.group(1)) if processed else 0,
    )


def _summary(s: Scenario) -> str:
    return (
        f"{s.rate:8,.0f} requests/s  p50 {s.p50_ms:6.1f} ms  p95 {s.p95_ms:6.1f} ms"
        f"  p99 {s.p99_ms:6.1f} ms  errors {s.errors}"
        + (f" ({s.error_detail})" if s.errors else "")
        + (f"  RSS {_megabytes(s.rss_mb)}" if s.rss_mb else "")
    )


def _megabytes(each: list[float]) -> str:
    return ", ".join(f"{mb:.0f} MB" for mb in each)


def explain(url: str, user_id: str, task_id: str) -> dict[str, str]:
    plans = {}
    with psycopg.connect(url, options="-c TimeZone=UTC") as conn:
        for name, sql in explained_queries().items():
            rows = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + sql, {"user_id": user_id, "task_id": task_id}
            ).fetchall()
            plans[name] = "\n".join(str(row[0]) for row in rows)
    return plans


def bench_api(server_url: str, options: Options, folder: Path, cleanup: ExitStack) -> Run:
    url = db.create_database(server_url, "todo_cqrs_bench")
    cleanup.callback(db.drop_database, server_url, url)
    db.migrate(url)
    secret = secrets.token_hex(32)
    ttl = 6 * 3600
    if options.big:
        print(
            f"generating {options.events:,} events of {options.tasks:,} tasks"
            f" of {options.users:,} users ...",
            flush=True,
        )
        generate_s, _ = run_cli(
            url, "generate", "--users", str(options.users), "--tasks", str(options.tasks),
            "--events", str(options.events), "--quiet",
        )  # fmt: skip
        print(f"generated in {generate_s:.0f} s; rebuilding the projection ...", flush=True)
        rebuild_s, line = run_cli(url, "rebuild", "--quiet")
        print(f"{line}", flush=True)
        how = (
            f"`todo-cqrs generate` ({generate_s:.0f} s) and `todo-cqrs rebuild` ({rebuild_s:.0f} s)"
        )
    serve = Serve(
        _service_env(
            DATABASE_URL=url,
            TODO_JWT_SECRET=secret,
            TODO_DATA_DIR=str(folder / "data"),
            TODO_LOG_LEVEL=options.log_level,
            TODO_POOL_MAX=_pool_max(),
        ),
        folder / "serve.log",
        options.workers,
    )
    cleanup.callback(serve.stop)
    serve.wait_ready()
    print(f"serve --workers {options.workers} is ready at {serve.url}", flush=True)
    if options.big:
        targets = generated_targets(url, secret, options.targets, ttl)
    else:
        targets = seed_through_api(serve.url, url, secret, options, ttl)
        how = "`POST /tasks`, a `PATCH` and a `complete` per task through the API"
    targets_path = folder / "targets.txt"
    save_targets(url, targets, targets_path)
    with psycopg.connect(url, autocommit=True) as conn:
        # Statistics for the planner, and the load's dirty pages written out, so that no
        # scenario pays for a checkpoint of the data set's making.
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        server_version = str((conn.execute("SHOW server_version").fetchone() or ("?",))[0])
    run = Run(options=options, data=data_set(url, how), server_version=server_version)
    print(
        f"data set: {run.data.users:,} users, {run.data.tasks:,} tasks, {run.data.events:,} events;"
        f" {len(targets):,} targets",
        flush=True,
    )
    if options.warmup:
        print(f"warm-up: {options.warmup} s of the mixed scenario", flush=True)
        run_wrk("mixed", serve.url, folder, targets_path, options, options.warmup)
    for name in options.only or SCENARIOS:
        scenario = run_wrk(name, serve.url, folder, targets_path, options, options.duration)
        scenario.rss_mb = serve.worker_rss_mb()
        run.scenarios.append(scenario)
        print(f"{name:>8}: {_summary(scenario)}", flush=True)
        if serve.process.poll() is not None:
            raise RuntimeError(f"serve exited during {name}:\n{serve.tail()}")
    if options.rate:
        print(f"paced: each scenario at {options.rate:,} requests/s", flush=True)
        for name in options.only or SCENARIOS:
            scenario = run_wrk(
                name, serve.url, folder, targets_path, options, options.duration, options.rate
            )
            scenario.rss_mb = serve.worker_rss_mb()
            run.paced.append(scenario)
            print(f"{name:>8}: {_summary(scenario)}", flush=True)
            if serve.process.poll() is not None:
                raise RuntimeError(f"serve exited during {name} (paced):\n{serve.tail()}")
    print(f"worker RSS: {_megabytes(run.worker_rss_mb)}", flush=True)
    serve.stop()  # the database alone for the floor and for pgbench
    if options.only:
        return run  # a quick comparison: no floor, no ceiling, no report
    floor = Serve(serve.env, folder / "floor.log", options.workers, app="todo_cqrs.bench:floor_app")
    cleanup.callback(floor.stop)
    floor.wait_ready()
    if options.warmup:
        run_wrk("get", floor.url, folder, targets_path, options, options.warmup)
    for name in ("get", "list"):
        run.floor[name] = run_wrk(name, floor.url, folder, targets_path, options, options.duration)
        print(f"the floor (a bare ASGI app), {name}: {run.floor[name].rate:,.0f} requests/s")
    run.floor_rss_mb = floor.worker_rss_mb()
    floor.stop()
    if any(s.errors for s in [*run.scenarios, *run.paced]):
        print(f"(some requests failed; the service's log is {serve.log_path})", flush=True)
    for name, text in pgbench_scripts(len(targets)).items():
        script = folder / f"pgbench-{name}.sql"
        script.write_text(text)
        result = run_pgbench(name, url, script, options)
        run.pgbench[name] = result
        print(
            f"pgbench {name}: {result.tps:,.0f} tps, {result.latency_ms:.2f} ms average,"
            f" {result.failed} failed",
            flush=True,
        )
    if options.big:
        user_id, _, task_id = targets[0]
        run.plans = explain(url, user_id, task_id)
    if options.smoke:
        # pgbench's command script must do what a PATCH does: the projection still equals
        # a replay of the events (cheap on a smoke run's data set).
        _, line = run_cli(url, "rebuild", "--check", "--quiet")
        print(f"after pgbench: {line}", flush=True)
    return run


# --- scaling out (issue 7) --------------------------------------------------------------------
#
# A primary and a streaming standby of its own (db.LocalServer, fsync on), seeded through the
# API; then reads with one service host, without and with QUERY_DATABASE_URL on the standby,
# and commands with one and with two service hosts (two wrk runs at once, half the
# connections each). Every host is `serve --workers N`, and all of them share this machine.

SCALE_OUT_RUNS: list[tuple[str, tuple[str, ...], int, bool]] = [
    # (setting, scenarios, service hosts, queries on the standby)
    ("one host", ("get", "list", "create", "patch"), 1, False),
    ("one host, queries on the replica", ("get", "list"), 1, True),
    ("two hosts", ("create", "patch"), 2, False),
    ("two hosts, queries on the replica", ("get", "list", "mixed"), 2, True),
]


def _together(name: str, parts: list[Scenario]) -> Scenario:
    """Two wrk runs at once, as one: requests added up; the worse of each percentile."""
    return Scenario(
        name=name,
        requests=sum(p.requests for p in parts),
        seconds=max(p.seconds for p in parts),
        errors=sum(p.errors for p in parts),
        error_detail="; ".join(p.error_detail for p in parts if p.error_detail),
        p50_ms=max(p.p50_ms for p in parts),
        p95_ms=max(p.p95_ms for p in parts),
        p99_ms=max(p.p99_ms for p in parts),
        max_ms=max(p.max_ms for p in parts),
    )


def bench_scale_out(options: Options, folder: Path, cleanup: ExitStack) -> str:
    binaries = db.server_binaries()
    if binaries is None:
        raise SystemExit("no PostgreSQL server binaries (initdb, pg_basebackup) found")
    primary = db.LocalServer.primary(binaries, folder / "servers")
    cleanup.callback(primary.stop)
    db.migrate(primary.url)
    standby = primary.standby(folder / "servers")
    cleanup.callback(standby.stop)
    secret = secrets.token_hex(32)
    env = {"DATABASE_URL": primary.url, "TODO_JWT_SECRET": secret,
           "TODO_LOG_LEVEL": options.log_level}  # fmt: skip

    def start(host: str, replica: bool) -> Serve:
        extra = {"QUERY_DATABASE_URL": standby.url} if replica else {}
        data = folder / f"data-{host}"
        serve = Serve(
            _service_env(**env, **extra, TODO_DATA_DIR=str(data)),
            folder / f"serve-{host}.log",
            options.workers,
        )
        cleanup.callback(serve.stop)
        serve.wait_ready()
        return serve

    seeder = start("seed", False)
    targets = seed_through_api(seeder.url, primary.url, secret, options, 6 * 3600)
    seeder.stop()
    targets_path = folder / "targets.txt"
    save_targets(primary.url, targets, targets_path)
    with psycopg.connect(primary.url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        version = str((conn.execute("SHOW server_version").fetchone() or ("?",))[0])
    rows = []

    def run_scenario(name: str, url: str, options: Options) -> Scenario:
        return run_wrk(name, url, folder, targets_path, options, options.duration)

    half = replace(options, connections=max(1, options.connections // 2), threads=1)
    for setting, names, hosts, replica in SCALE_OUT_RUNS:
        serves = [start(f"{setting}-{n}".replace(" ", "-"), replica) for n in range(hosts)]
        print(f"{setting}: {hosts} x serve --workers {options.workers}", flush=True)
        if options.warmup:
            run_wrk("mixed", serves[0].url, folder, targets_path, options, options.warmup)
        for name in names:
            urls = [serve.url for serve in serves]
            each = options if hosts == 1 else half
            with ThreadPoolExecutor(hosts) as pool:
                parts = list(pool.map(partial(run_scenario, name, options=each), urls))
            result = parts[0] if hosts == 1 else _together(name, parts)
            print(f"  {name:>7}: {result.rate:8,.0f} requests/s  p99 {result.p99_ms:6.1f} ms"
                  f"  errors {result.errors}", flush=True)  # fmt: skip
            rows.append(
                f"| {setting} | {name} | {result.rate:,.0f} | {result.p50_ms:.1f}"
                f" | {result.p99_ms:.1f} | {result.errors} |"
            )
        for serve in serves:
            serve.stop()
    return f"""
- Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; PostgreSQL {version}
  (a primary and a streaming hot standby of it, both on this machine, fsync on),
  todo-cqrs {__version__}.
- Each service host is `todo-cqrs serve --workers {options.workers}` on its own loopback
  port. Load: wrk, {options.connections} connections, {options.duration} s per scenario; with
  two hosts, two wrk runs at once with half the connections each, their requests added up
  and the worse latency shown. Data set: {len(targets):,} tasks of {options.users:,} users,
  made through the API. Queries send no consistency token (each reads whatever the replica
  has), so the replica's cost is its liveness check on checkout.
- Everything shares 2 cores: a second host or a replica adds processes, not cores. These
  numbers show that the settings work under load and what they cost here; the gain of a
  second machine is not measurable on one.

| setting | scenario | requests/s | p50 ms | p99 ms | errors |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
"""


# --- instructions per request ----------------------------------------------------------------
#
# wrk's requests/s on this shared 2-core machine move by a third from one minute to the
# next; the instructions that one request costs the service do not (callgrind counts them,
# repeatable to 2%). One uvicorn process runs the app as each `serve` worker does (JSON
# access log, multiprocess metrics) under valgrind; its counters are zeroed before and
# dumped after `requests` requests of each kind, sent one at a time after 20 to warm up.

INSTRUCTION_KINDS = ("get", "list", "create", "patch")


def _send(client: httpx.Client, kind: str, ids: list[str], i: int) -> None:
    task = ids[i % len(ids)]
    if kind == "get":
        response = client.get(f"/tasks/{task}")
    elif kind == "list":
        response = client.get("/tasks", params={"limit": 50})
    elif kind == "create":
        response = client.post("/tasks", json={"title": f"counted {i}", "tags": ["bench"]})
    else:
        response = client.patch(f"/tasks/{task}", json={"title": f"counted {i}"})
    if not response.is_success:
        raise RuntimeError(f"{kind}: {response.status_code} {response.text[:300]}")


def bench_instructions(server_url: str, requests: int, folder: Path) -> str:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not on PATH (`nox -s bench_instructions` installs it)")
    db.migrate(server_url)
    secret, user = secrets.token_hex(32), f"counted-{secrets.token_hex(4)}"
    (folder / "metrics").mkdir()
    port, out = db.free_port(), folder / "callgrind.out"
    env = _service_env(
        DATABASE_URL=server_url,
        TODO_JWT_SECRET=secret,
        TODO_DATA_DIR=str(folder / "data"),
        PROMETHEUS_MULTIPROC_DIR=str(folder / "metrics"),
    )
    with (folder / "uvicorn.log").open("ab") as log:
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, "-m", "uvicorn", "todo_cqrs.http:create_app", "--factory",
             "--http", "todo_cqrs.http:BoundedHeadProtocol",  # as `serve` runs it
             "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
             "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    token = _token(secret, user, 6 * 3600)
    counts: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 300  # a Python start under valgrind takes a while
        while not _answers(f"{base_url}/ready"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn under valgrind did not start; see {folder}")
            time.sleep(1)
        ids = _seed_user(base_url, token, user, 60)
        with _user_client(base_url, token, timeout=120) as c:
            for dumps, kind in enumerate(INSTRUCTION_KINDS, start=1):
                for i in range(20):
                    _send(c, kind, ids, i)
                subprocess.run(["callgrind_control", "--zero", str(process.pid)], check=True,
                               capture_output=True)  # fmt: skip
                for i in range(requests):
                    _send(c, kind, ids, i)
                subprocess.run(["callgrind_control", "--dump", str(process.pid)], check=True,
                               capture_output=True)  # fmt: skip
                dump, deadline = Path(f"{out}.{dumps}"), time.monotonic() + 60
                while not dump.exists() or "\ntotals:" not in dump.read_text():
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"callgrind wrote no {dump.name} within 60 s")
                    time.sleep(0.2)  # the dump is written when the process next runs
                # summary: what ran since the zeroing (totals also counts calls begun before)
                total = re.search(r"^summary: (\d+)", dump.read_text(), re.M)
                counts[kind] = int(total[1]) / requests if total else float("nan")
                print(f"{kind:>7}: {counts[kind] / 1000:8,.0f} k instructions per request",
                      flush=True)  # fmt: skip
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    rows = "\n".join(f"| {kind} | {n / 1000:,.0f} k |" for kind, n in counts.items())
    return f"""
- Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; Python
  {platform.python_version()}, litestar {_version("litestar")}, uvicorn {_version("uvicorn")},
  psycopg {_version("psycopg")}, todo-cqrs {__version__}.
- Instructions of one uvicorn process (the app as each `serve` worker runs it: JSON access
  log at INFO, multiprocess metrics) per request, counted by callgrind over {requests}
  requests of each kind sent one at a time, after 20 to warm up. Unlike requests/s here,
  these repeat within 2%: use them to compare a change's before and after.

| request | instructions |
| --- | --- |
{rows}
"""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def ceiling(run: Run, name: str) -> float:
    """The pgbench transactions/s that a scenario is compared with: the command script for
    commands, the list script for reads, their 20/80 blend (harmonic) for the mixed one."""
    command, listing = run.pgbench["command"].tps, run.pgbench["list"].tps
    shares = SCENARIOS[name]
    writes = sum(share for kind, share in shares.items() if kind in COMMAND_KINDS) / 100
    if writes == 1:
        return command
    if writes == 0:
        return listing
    return 1 / (writes / command + (1 - writes) / listing)


def report(run: Run) -> str:
    o, d = run.options, run.data
    rows = []
    for s in run.scenarios:
        limit = ceiling(run, s.name)
        rows.append(
            f"| {s.name} | {s.rate:,.0f} | {s.p50_ms:.1f} | {s.p95_ms:.1f} | {s.p99_ms:.1f}"
            f" | {s.errors}{f' ({s.error_detail})' if s.errors else ''}"
            f" | {limit:,.0f} | {s.rate / limit:.0%} |"
        )
    pg_rows = [
        f"| {p.name} | {p.tps:,.0f} | {p.latency_ms:.2f} | {p.p99_ms:.1f} | {p.failed} |"
        for p in run.pgbench.values()
    ]
    by_name = {s.name: s for s in run.scenarios}

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    error_total = sum(s.errors for s in [*run.scenarios, *run.paced])  # the paced runs too
    worst_p99 = max(run.scenarios, key=lambda s: s.p99_ms)

    def ratio_line(names: tuple[str, ...], script: str, target: float) -> str:
        parts = [f"{n} {by_name[n].rate / ceiling(run, n):.0%}" for n in names]
        ok = all(by_name[n].rate / ceiling(run, n) >= target for n in names)
        return (
            f"- {' and '.join(names)} at ≥{target:.0%} of the pgbench {script} script:"
            f" {', '.join(parts)}: {verdict(ok)}"
        )

    rss = _megabytes(run.worker_rss_mb)
    # Each worker's RSS after each run, in the order run: a leak shows as steady growth.
    rss_trend = "; ".join(
        f"{s.name}{kind} {'/'.join(f'{mb:.0f}' for mb in s.rss_mb)}"
        for kind, runs in (("", run.scenarios), (" paced", run.paced))
        for s in runs
    )
    small = reported_rates("HTTP API") if o.big else {}
    against_small = []
    if small:
        shares = {s.name: s.rate / small[s.name] for s in run.scenarios if s.name in small}
        against_small.append(
            "- Every scenario within 20% of the small data set's throughput (the HTTP API"
            " section): " + ", ".join(f"{n} {share:.0%}" for n, share in shares.items())
            + ": " + verdict(all(share >= 0.8 for share in shares.values()))
        )  # fmt: skip
    floor_rows = [
        f"| {name} | {by_name[name].rate:,.0f} | {f.rate:,.0f}"
        f" | {by_name[name].rate / f.rate:.0%} | {f.rate / ceiling(run, name):.0%}"
        f" | {f.p99_ms:.1f} | {f.errors} |"
        for name, f in run.floor.items()
        if name in by_name
    ]
    floor = ""
    if floor_rows:
        floor = f"""
The floor, for scale: the same two reads from a bare ASGI app (`bench.FloorApp`) under plain
uvicorn with {o.workers} workers, the service's pool settings, token check and query functions, and
no framework, request id, log or metrics; the same load, right after the service. Its
workers' RSS after the run: {_megabytes(run.floor_rss_mb)}.

| read | service (req/s) | bare app (req/s) | service / bare | bare / ceiling | bare p99 | errors |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(floor_rows)}
"""
    bare_shares = ", ".join(
        f"{name} {f.rate / ceiling(run, name):.0%}" for name, f in run.floor.items()
    )
    pgbench_p99 = ", ".join(f"{p.name} {p.p99_ms:.1f} ms" for p in run.pgbench.values())
    paced, plan = "", []
    if run.paced:
        paced_rows = [
            f"| {s.name} | {s.rate:,.0f} | {s.p50_ms:.1f} | {s.p95_ms:.1f} | {s.p99_ms:.1f}"
            f" | {s.errors}{f' ({s.error_detail})' if s.errors else ''} |"
            for s in run.paced
        ]
        paced = f"""
Paced: each scenario again at {o.rate:,} requests/s on the same {o.connections} connections,
for {o.duration} s. Each wrk thread starts its requests on a Poisson schedule (wrk's `delay`)
on whichever connection is free; latency counts from each request's send. A rate the service
cannot keep shows as fewer requests/s, not as latency.

| scenario | requests/s | p50 | p95 | p99 | errors |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(paced_rows)}
"""
        # The plan is for a service's whole traffic, which the mixed scenario stands for;
        # the others paced alone show which kind of request gives out first.
        behind = [f"{s.name} ({s.rate:,.0f})" for s in run.paced if s.rate < 0.95 * o.rate]
        worst_paced = max(run.paced, key=lambda s: s.p99_ms)
        alone = (
            f"each scenario alone at that rate: kept by all but {', '.join(behind)}"
            if behind
            else "each scenario alone kept that rate"
        ) + f", the worst p99 {worst_paced.name} at {worst_paced.p99_ms:.1f} ms"
        mixed = next((s for s in run.paced if s.name == "mixed"), None)
        if mixed is not None:
            met = (
                o.rate >= 1000
                and mixed.rate >= 0.95 * o.rate
                and mixed.p95_ms < 200
                and not mixed.errors
            )
            plan.append(
                f"- The users' plan (issue 6's opening: 1,000 requests/s, p95 under 200 ms), as"
                f" the mixed scenario paced at {o.rate:,} requests/s: {mixed.rate:,.0f}"
                f" requests/s, p95 {mixed.p95_ms:.1f} ms, p99 {mixed.p99_ms:.1f} ms,"
                f" {mixed.errors} errors: {verdict(met)} ({alone})"
            )
    targets = "\n".join(
        [
            f"- Zero errors: {error_total} in all: {verdict(error_total == 0)}",
            f"- p99 under 50 ms in every scenario: the worst is {worst_p99.name}"
            f" at {worst_p99.p99_ms:.1f} ms: {verdict(worst_p99.p99_ms < 50)}"
            + (f" (pgbench's own p99: {pgbench_p99})" if pgbench_p99 else ""),
            ratio_line(("create", "patch"), "command", 0.5),
            ratio_line(("get", "list"), "list", 0.4)
            + (f" (the bare app: {bare_shares})" if bare_shares else ""),
            f"- RSS under 80 MB per worker: {rss}: "
            + verdict(all(mb < 80 for mb in run.worker_rss_mb)),
            *against_small,
            *plan,
        ]
    )
    plans = ""
    if run.plans:
        plans = "\n### Query plans on this data set\n\n`EXPLAIN (ANALYZE, BUFFERS)` of the read" \
            " statements, for one target task after the run:\n" + "".join(
            f"\n{name}:\n\n```\n{plan}\n```\n" for name, plan in run.plans.items()
        )  # fmt: skip
    pool = _pool_max()
    picks = o.targets if o.big else d.tasks
    return f"""
- Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.
- Versions: Python {platform.python_version()}, PostgreSQL {run.server_version},
  litestar {_version("litestar")}, uvicorn {_version("uvicorn")}, psycopg {_version("psycopg")},
  todo-cqrs {__version__}. Service, PostgreSQL, wrk and pgbench share the machine (loopback).
- Service: `todo-cqrs serve --workers {o.workers}`, {pool} pool connections per worker,
  log level {o.log_level} (one JSON line per request, to a file).
- Load: wrk, {o.connections} connections on {o.threads} threads, {o.duration} s per scenario
  after a {o.warmup} s warm-up; each request picks one of {picks:,} (user token, task) at random.
- Data set: {d.users:,} users, {d.tasks:,} tasks, {d.events:,} events, made by {d.how};
  then VACUUM ANALYZE and a CHECKPOINT before the first scenario.
- Errors are wrk's: answers of status 400 or more, socket errors and timeouts.
  Latencies in ms. Mixed: get 40 %, list 20 %, history 20 %, create 10 %, patch 10 %.

| scenario | requests/s | p50 | p95 | p99 | errors | DB ceiling (tps) | share of it |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
{paced}
The ceiling: `pgbench -M prepared -c {o.connections} -j 2 -T {o.duration}` straight at the same
database (the service stopped), running the statements that the service sends: `command` is a
PATCH that renames a task (the row read; one statement with the user's advisory lock, the
projection upsert over the version read, the event insert and the NOTIFY check, which finds
no stream), `list` is the list query (LIMIT 51). Each transaction first picks a random
target from `bench_targets` (for a command it also reads the row and builds the JSON that the
service builds in Python), so the ceiling is a little lower than the statements' alone.
Commands are compared with the command script, reads with the list script, mixed with their
20/80 blend.

| pgbench script | tps | latency average (ms) | p99 (ms) | failed |
| --- | --- | --- | --- | --- |
{chr(10).join(pg_rows)}
{floor}
Resident memory (RSS) of each worker after the run: {rss}. After each run, in the order
run (MB, one number a worker): {rss_trend}.

Targets (issue 6):

{targets}
{plans}"""


def api_main(args: argparse.Namespace) -> None:
    if args.smoke:
        duration, warmup = args.duration or 1, 0
        users = args.users or (50 if args.big else 4)
        tasks_per_user = args.tasks_per_user or 52
    else:
        duration, warmup = args.duration or 15, args.warmup
        users = args.users or (10_000 if args.big else 200)
        tasks_per_user = args.tasks_per_user or 60
    options = Options(
        workers=args.workers,
        connections=args.connections,
        threads=args.threads,
        duration=duration,
        warmup=warmup,
        users=users,
        tasks_per_user=tasks_per_user,
        big=args.big,
        tasks=args.tasks,
        events=args.events,
        targets=args.targets,
        smoke=args.smoke,
        log_level=args.log_level,
        only=args.only.split(",") if args.only else [],
        rate=args.rate if args.rate is not None else (0 if args.only else 1000),
    )
    for tool in ("wrk", "pgbench"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not on PATH (`nox -s bench` installs it)")
    # A SIGTERM (a CI job cancelled) unwinds like Ctrl-C, so every process is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as cleanup:
        folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="todo-bench-")))
        if args.scale_out:
            body, section = bench_scale_out(options, folder, cleanup), "Scaling out"
        else:
            server_url = os.environ.get("BENCH_DATABASE_URL")
            if not server_url:
                pg_folder = folder / "postgres"
                cleanup.callback(db.stop_embedded, pg_folder)
                server_url = db.start_embedded(pg_folder)
            run = bench_api(server_url, options, folder, cleanup)
            if options.only:
                print("--only: BENCHMARKS.md left as it was")
                return
            body = report(run)
            section = "HTTP API on the big data set" if options.big else "HTTP API"
    if options.smoke:
        print(body)
        print("smoke run: BENCHMARKS.md left as it was")
        return
    write_section(section, body)
    print(body)
    print(f"written to {REPORT}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m todo_cqrs.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("rebuild")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=5_000_000)
    p = sub.add_parser("api", help="the HTTP API under wrk, against pgbench's ceiling")
    p.add_argument("--workers", type=int, default=2, help="serve --workers (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk and pgbench (default 32)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--duration", type=int, help="seconds per scenario (default 15; smoke 1)")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up (default 3)")
    p.add_argument("--users", type=int, help="users (default 200; --big 10,000; smoke 4)")
    p.add_argument("--tasks-per-user", type=int, help="tasks seeded per user (default 60)")
    p.add_argument("--big", action="store_true", help="a generated data set, not seeded")
    p.add_argument("--tasks", type=int, default=1_000_000, help="--big: tasks (1,000,000)")
    p.add_argument("--events", type=int, default=5_000_000, help="--big: events (5,000,000)")
    p.add_argument("--targets", type=int, default=5_000, help="--big: tasks the load picks from")
    p.add_argument("--smoke", action="store_true", help="1 s per scenario; BENCHMARKS.md untouched")
    p.add_argument("--only", help="comma-separated scenarios, for quick comparisons (smoke-like)")
    p.add_argument(
        "--scale-out",
        action="store_true",
        help="one and two service hosts, with and without a streaming replica for queries",
    )
    p.add_argument("--log-level", default="INFO", help="TODO_LOG_LEVEL of serve (default INFO)")
    p.add_argument(
        "--rate",
        type=int,
        help="then each scenario again at this many requests/s (default 1,000, the users'"
        " plan; with --only 0); 0: no paced runs",
    )
    p = sub.add_parser("instructions", help="instructions per request, counted by callgrind")
    p.add_argument("--requests", type=int, default=100, help="of each kind (default 100)")
    args = parser.parse_args()
    if args.what == "api":
        api_main(args)
        return
    if args.what == "instructions":
        with ExitStack() as cleanup:
            work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="todo-cg-")))
            server_url = os.environ.get("BENCH_DATABASE_URL")
            if not server_url:
                cleanup.callback(db.stop_embedded, work / "postgres")
                server_url = db.start_embedded(work / "postgres")
            body = bench_instructions(server_url, args.requests, work)
        write_section("Instructions per request", body)
        print(body)
        print(f"written to {REPORT}")
        return
    server_url = os.environ.get("BENCH_DATABASE_URL")
    if server_url:
        bench_rebuild(server_url, args.users, args.tasks, args.events)
        return
    with tempfile.TemporaryDirectory(prefix="todo-cqrs-bench-") as folder:
        try:
            bench_rebuild(db.start_embedded(Path(folder)), args.users, args.tasks, args.events)
        finally:
            db.stop_embedded(Path(folder))


if __name__ == "__main__":
    main()
