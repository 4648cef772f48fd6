-- depends: 0004.task-title-casefolded
-- Each event's size as the JSON text that history and the feed send (`data::text`), so that
-- a page can stop at 1 MiB of data (eventstore.PAGE_BYTES) without turning every event it
-- might hold into text first: the sizes are summed, and only the events kept are turned.
-- Generated, so every writer fills it. Adding it rewrites the table once, while commands,
-- history, the feed and time travel wait (README: upgrading to migration 0005).
ALTER TABLE events
    ADD COLUMN data_bytes integer GENERATED ALWAYS AS (octet_length(data::text)) STORED;
