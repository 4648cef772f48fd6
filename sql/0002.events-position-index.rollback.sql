-- The index 0002 made; events and their positions are untouched.
DROP INDEX IF EXISTS events_position_brin;
