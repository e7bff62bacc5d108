-- walhook queue schema, version 3: changes capture set aside, gaps in capture, TRUNCATE.

-- Changes capture could not turn into events or store (json that jsonb refuses, values over
-- jsonb's size limit, an entity whose id column was dropped or renamed…). Capture goes on
-- past them and the slot advances, so this table is where they stay visible: the row in
-- its JSON text form (escapes such as \u0000 kept as written) and the reason.
-- A change lives in walhook.event or here, never both; re-sent changes hit the key below.
CREATE TABLE walhook.rejected (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    commit_lsn    pg_lsn NOT NULL,
    seq           int NOT NULL,
    xid           bigint NOT NULL,
    commit_time   timestamptz NOT NULL,
    entity        text NOT NULL,
    entity_id     text,
    action        text NOT NULL,
    source_table  text NOT NULL,
    reason        text NOT NULL,
    sqlstate      text,
    "row"         text,
    old           text,
    rejected_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rejected_commit_lsn_seq_key UNIQUE (commit_lsn, seq)
);
CREATE INDEX rejected_rejected_at_idx ON walhook.rejected (rejected_at);

COMMENT ON TABLE walhook.rejected IS 'walhook: changes capture set aside instead of queuing (see reason); capture went on past them';
COMMENT ON COLUMN walhook.rejected.entity_id IS 'NULL when the id could not be determined (e.g. the id column was dropped)';
COMMENT ON COLUMN walhook.rejected.sqlstate IS 'the SQLSTATE the queue database answered, when it refused the event';
COMMENT ON COLUMN walhook.rejected."row" IS 'the row as JSON text, excluded columns removed; NULL when even the text could not be stored';

-- Gaps in capture: the replication slot was lost while walhook.state showed it in use, so
-- the changes between last_flushed_lsn and resumed_lsn were never read. Recorded by
-- `walhook setup --accept-gap`; resumed_lsn is filled in once the slot exists again, and
-- alerted_at once the monitors were told.
CREATE TABLE walhook.capture_gap (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot_name         text NOT NULL,
    reason            text NOT NULL,
    last_flushed_lsn  pg_lsn NOT NULL,
    resumed_lsn       pg_lsn,
    accepted_at       timestamptz NOT NULL DEFAULT now(),
    accepted_by       text NOT NULL DEFAULT current_user,
    alerted_at        timestamptz
);

COMMENT ON TABLE walhook.capture_gap IS 'walhook: changes lost because the replication slot vanished (accepted with walhook setup --accept-gap)';
COMMENT ON COLUMN walhook.capture_gap.last_flushed_lsn IS 'end of the last source commit captured before the gap';
COMMENT ON COLUMN walhook.capture_gap.resumed_lsn IS 'where capture started again (NULL until the slot exists again); changes committed in between are lost';

-- TRUNCATE of an entity table becomes a Truncated event (when the entity asks for it).
-- NOT VALID: the new check is wider than the old one, so existing rows cannot violate it
-- and a large walhook.event need not be scanned under an exclusive lock.
ALTER TABLE walhook.event DROP CONSTRAINT event_action_check;
ALTER TABLE walhook.event ADD CONSTRAINT event_action_check
    CHECK (action IN ('Created', 'Updated', 'Deleted', 'Truncated')) NOT VALID;
