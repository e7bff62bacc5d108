-- walhook queue schema, version 11: listeners that keep a cursor over walhook.event.
--
-- A NATS listener with position = "cursor" gets no walhook.new row per event. Its place is
-- one row here: the id of the last walhook.event row it has passed (published, or moved to
-- walhook.failed). walhook.event ids are assigned in commit order (writers of events hold
-- a transaction-level advisory lock while they insert), so "every event after the cursor"
-- is exactly what it has not seen yet. Event retention keeps the events after every cursor.
--
-- The batch writer creates and drops these rows in the transaction that changes who gets
-- walhook.new rows, so a listener switched between positions misses nothing and gets
-- nothing twice.
--
-- entities and actions mirror the configuration (written at start and on reload) so that
-- `walhook status`, the metrics and SQL users can count a cursor listener's backlog with
-- the same rule the fan-out uses for other listeners.

CREATE TABLE walhook.listener_cursor (
    listener    text PRIMARY KEY,
    event_id    bigint NOT NULL,
    lock_key    int GENERATED ALWAYS AS IDENTITY,
    entities    text[],
    actions     text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE walhook.listener_cursor IS 'walhook: the position of each listener with position = "cursor" (no walhook.new rows per event)';
COMMENT ON COLUMN walhook.listener_cursor.event_id IS 'walhook.event.id of the last event the listener has passed (published, or moved to walhook.failed)';
COMMENT ON COLUMN walhook.listener_cursor.entities IS 'entities the listener receives; NULL = all';
COMMENT ON COLUMN walhook.listener_cursor.actions IS 'actions (row and derived) the listener receives';
COMMENT ON COLUMN walhook.listener_cursor.lock_key IS 'the process delivering the listener holds pg_advisory_lock(2003329909, lock_key)';
