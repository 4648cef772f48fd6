-- depends: 0005.events-data-bytes
-- Who streams whose events. A command NOTIFYs only when some process streams its user's
-- events: a transaction that NOTIFYs holds one lock shared by the whole server from just
-- before its commit until after it, so every command's commit, its WAL flush included,
-- waited on every other's (the command's own SQL under pgbench ran 41-45% faster without
-- it; BENCHMARKS.md, 2026-12-07).
--
-- Each service process keeps a row per user it streams to, renews it while the stream is
-- open and deletes it when the last one closes; a process that dies leaves rows that expire.
CREATE TABLE event_listeners (
    user_id    text        NOT NULL,
    listener   text        NOT NULL,  -- the process: host, pid and a random part
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, listener)
);

-- Called by the command's one statement after it has taken the user's advisory lock.
-- VOLATILE, so at READ COMMITTED its query sees the rows committed by then, not only those
-- of the statement's start: a stream that registers takes the same lock before it first
-- reads, so any command either sees the row (and notifies) or had already committed when
-- the stream reads. A command's statement runs at the server's default isolation (it is
-- sent outside a transaction); at REPEATABLE READ or SERIALIZABLE the query would see only
-- the statement's start, so there the command always notifies, as before this migration.
CREATE FUNCTION notify_event_listeners(channel text, listened_user text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' OR EXISTS (
        SELECT FROM event_listeners l
        WHERE l.user_id = listened_user AND l.expires_at > clock_timestamp()
    ) THEN
        PERFORM pg_notify(channel, listened_user);
    END IF;
END
$$;
