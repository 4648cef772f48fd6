-- The column 0005 added; the events themselves are untouched.
ALTER TABLE events DROP COLUMN IF EXISTS data_bytes;
