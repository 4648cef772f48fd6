-- depends: 0005.events-data-bytes
-- Who streams whose events. A command NOTIFYs only when some process streams its user's
-- events: a transaction that NOTIFYs holds one lock for the whole database from just before
-- its commit until after it, so every command's commit, its WAL flush included, waited on
-- every other's; without the NOTIFY, commands commit side by side (pgbench, the command's
-- own SQL at 32 connections: 1,406-1,498 tps with it, 2,085-2,193 without; BENCHMARKS.md).
--
-- Each service process keeps a row per user it streams to, refreshes it while the stream is
-- open and deletes it when the last one closes; a process that dies leaves rows that expire.
CREATE TABLE event_listeners (
    user_id    text        NOT NULL,
    listener   text        NOT NULL,  -- the process: host, pid and a random part
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, listener)
);

-- Called by the command's one statement after it has taken the user's advisory lock.
-- VOLATILE, so its query sees the rows committed by then, not only those of the statement's
-- start: a stream that registers takes the same lock before it first reads, so any command
-- either sees the row (and notifies) or had already committed when the stream reads.
CREATE FUNCTION notify_event_listeners(channel text, listened_user text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF EXISTS (
        SELECT FROM event_listeners l
        WHERE l.user_id = listened_user AND l.expires_at > clock_timestamp()
    ) THEN
        PERFORM pg_notify(channel, listened_user);
    END IF;
END
$$;
