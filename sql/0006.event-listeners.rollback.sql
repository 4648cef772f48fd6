-- Commands NOTIFY through the function until the code that no longer calls it is gone: roll
-- back the code first.
DROP FUNCTION IF EXISTS notify_event_listeners(text, text);
DROP TABLE IF EXISTS event_listeners;
