-- The event store, the read projection and the idempotency record.
-- Every key starts with user_id, so the tables can be distributed by user (Citus) later.

CREATE TABLE events (
    position        bigint GENERATED ALWAYS AS IDENTITY,
    user_id         text        NOT NULL,
    task_id         uuid        NOT NULL,
    version         integer     NOT NULL,
    type            text        NOT NULL,
    data            jsonb       NOT NULL,
    schema_version  smallint    NOT NULL DEFAULT 1,
    occurred_at     timestamptz NOT NULL,
    request_id      text,
    idempotency_key text,
    PRIMARY KEY (user_id, position),
    UNIQUE (user_id, task_id, version)
);

CREATE TABLE tasks (
    user_id      text        NOT NULL,
    task_id      uuid        NOT NULL,
    title        text        NOT NULL,
    description  text        NOT NULL,
    completed    boolean     NOT NULL,
    priority     text        NOT NULL,
    due_date     date,
    tags         text[]      NOT NULL,
    version      integer     NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    completed_at timestamptz,
    deleted      boolean     NOT NULL,
    PRIMARY KEY (user_id, task_id)
);

-- GET /tasks: newest first with keyset pagination over live tasks.
CREATE INDEX tasks_newest_first ON tasks (user_id, created_at DESC, task_id DESC) WHERE NOT deleted;

CREATE TABLE idempotency_keys (
    user_id     text        NOT NULL,
    key         text        NOT NULL,
    fingerprint bytea       NOT NULL,
    status      smallint    NOT NULL,
    body        bytea       NOT NULL,
    location    text,
    etag        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
