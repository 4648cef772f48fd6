-- The code of this version calls the function in every command: put the older version's
-- servers back first.
DROP FUNCTION IF EXISTS notify_event_listeners(text, text);
DROP TABLE IF EXISTS event_listeners;
