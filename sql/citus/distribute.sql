-- Distribute todo-cqrs over a Citus cluster, co-located by user_id.
-- Run once on the coordinator, after `todo-cqrs migrate`, before the service takes traffic:
--   psql "$DATABASE_URL" -f sql/citus/distribute.sql
-- Every primary key and unique constraint starts with user_id, and every statement of the
-- service on a user's data filters by user_id, so each command and query runs on one worker.
-- Not a yoyo migration (yoyo reads only the files directly in sql/): plain PostgreSQL has no
-- create_distributed_table.

SELECT create_distributed_table('events', 'user_id');
SELECT create_distributed_table('tasks', 'user_id', colocate_with => 'events');
SELECT create_distributed_table('idempotency_keys', 'user_id', colocate_with => 'events');
SELECT create_distributed_table('event_listeners', 'user_id', colocate_with => 'events');
