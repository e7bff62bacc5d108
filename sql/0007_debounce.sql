-- walhook queue schema, version 7: debounce windows.
--
-- A listener with `debounce` does not get a notification per change: its changes to one
-- entity coalesce here, in a window, until the window closes (measured from the first
-- change, or from the last). Then the window becomes one notification in walhook.new: for a
-- single change, of that change's event; for several, of a coalesced event (variant
-- 'debounce/<listener>') with the union of the changed columns, the latest row and the
-- first old values, whose id derives from the coalesced events' ids. A window that is not
-- flushed yet is not a notification, so nothing is ever merged into a notification that
-- was attempted; windows of one entity are flushed in the order of their first change.

CREATE TABLE walhook.debounce (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    listener           text NOT NULL,
    entity             text NOT NULL,
    entity_id          text NOT NULL,
    -- The first coalesced change: its key orders the notification among the entity's.
    commit_lsn         pg_lsn NOT NULL,
    seq                int NOT NULL,
    first_event        bigint NOT NULL,
    event_ids          uuid[] NOT NULL,
    coalesced_id       uuid NOT NULL,
    action             text NOT NULL,
    row_action         text,
    changed_fields     text[],
    "row"              jsonb NOT NULL,
    old                jsonb,
    subject            text,
    source_table       text NOT NULL,
    relation           text NOT NULL,
    xid                bigint NOT NULL,
    first_commit_time  timestamptz NOT NULL,
    commit_time        timestamptz NOT NULL,
    due_at             timestamptz NOT NULL,
    open               bool NOT NULL
);
-- One open window per listener and entity: changes merge into it.
CREATE UNIQUE INDEX debounce_open_key ON walhook.debounce (listener, entity, entity_id) WHERE open;
CREATE INDEX debounce_due_at_idx ON walhook.debounce (due_at);

COMMENT ON TABLE walhook.debounce IS 'walhook: changes of debounced listeners waiting for their window to close (then one notification in walhook.new)';
COMMENT ON COLUMN walhook.debounce.event_ids IS 'ids of the events coalesced so far, in order';
COMMENT ON COLUMN walhook.debounce.coalesced_id IS 'the id listeners receive: the event id for one change, else uuid v5 of the coalesced ids';
COMMENT ON COLUMN walhook.debounce.open IS 'false: closed early (a delete or derived action followed), flushed at due_at';
COMMENT ON COLUMN walhook.debounce.relation IS 'the quoted table name, to order changed_fields by column position';
