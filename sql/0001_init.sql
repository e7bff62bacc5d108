-- walhook queue schema, version 1.
--
-- Applied by `walhook setup` (or `walhook setup --print-sql` for a DBA to run by hand).
-- Column names are a contract with the DBAs who browse these tables: change them only
-- with a new migration.

CREATE SCHEMA IF NOT EXISTS walhook;

CREATE TABLE IF NOT EXISTS walhook.schema_migration (
    version     int PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per entity event; append-only, pruned by age.
CREATE TABLE walhook.event (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid NOT NULL,
    commit_lsn      pg_lsn NOT NULL,
    seq             int NOT NULL,
    xid             bigint NOT NULL,
    commit_time     timestamptz NOT NULL,
    entity          text NOT NULL,
    entity_id       text NOT NULL,
    action          text NOT NULL CHECK (action IN ('Created', 'Updated', 'Deleted')),
    changed_fields  text[],
    "row"           jsonb NOT NULL,
    old             jsonb,
    subject         text,
    source_table    text NOT NULL,
    queued_at       timestamptz NOT NULL DEFAULT now(),
    -- Re-sent changes after a restart hit this key and are skipped.
    CONSTRAINT event_commit_lsn_seq_key UNIQUE (commit_lsn, seq)
);
CREATE INDEX event_entity_entity_id_idx ON walhook.event (entity, entity_id);
-- Lookups by the id listeners receive. Not UNIQUE: the id is derived from (commit_lsn, seq),
-- which the key above keeps unique. Hash, not btree: per insert a btree over random uuids
-- cost ~20% of the writer's server CPU, a hash index ~13% (measured on PostgreSQL 15).
CREATE INDEX event_event_id_idx ON walhook.event USING hash (event_id);
CREATE INDEX event_queued_at_idx ON walhook.event (queued_at);

COMMENT ON TABLE walhook.event IS 'walhook: one row per entity event (append-only; pruned by age)';
COMMENT ON COLUMN walhook.event.event_id IS 'stable id sent to listeners: uuid v5 of system identifier, commit LSN and seq';
COMMENT ON COLUMN walhook.event.seq IS 'ordinal of the row change within its source transaction';
COMMENT ON COLUMN walhook.event.changed_fields IS 'changed columns of an update; NULL when unknown (no old row) and for inserts/deletes';

-- The listeners of the current configuration, mirrored at start so SQL users can join on them.
-- Notifications refer to listeners by name without a foreign key: a listener removed from
-- the configuration keeps its history.
CREATE TABLE walhook.listener (
    name        text PRIMARY KEY,
    url         text,
    entities    text[],
    enabled     bool NOT NULL DEFAULT true,
    added_at    timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN walhook.listener.entities IS 'entities the listener receives; NULL = all';

-- A notification (event x listener) lives in exactly one of walhook.new, walhook.processed
-- and walhook.failed; its id comes from this sequence and stays the same as it moves.
CREATE SEQUENCE walhook.notification_id_seq AS bigint;

-- Status New: waiting for delivery. Small and hot: rows are updated on every attempt and
-- deleted on delivery, so leave room for HOT updates and vacuum it eagerly.
--
-- Foreign keys to walhook.event, and why they differ:
-- * walhook.failed: REFERENCES without ON DELETE CASCADE. Retention must never silently
--   drop a dead letter, so deleting an event that still has a Failed notification fails.
-- * walhook.new: none. Its rows are created only by the queue writer, in the same statement
--   that inserts their events, or moved back from walhook.failed (which has the key); a
--   per-row foreign key check cost a quarter of the write throughput (and so would an index
--   on event_id: the table is small, an anti-join scans it once). Event retention must
--   skip events that still have New rows:
--   DELETE FROM walhook.event e WHERE e.queued_at < $cutoff
--     AND NOT EXISTS (SELECT 1 FROM walhook.new n WHERE n.event_id = e.id)
--     AND NOT EXISTS (SELECT 1 FROM walhook.failed f WHERE f.event_id = e.id)
-- * walhook.processed: none. It is append-only and pruned by age on its own; a delivered
--   notification may outlive its event (the view then shows NULL event columns).
CREATE TABLE walhook.new (
    id               bigint PRIMARY KEY,
    event_id         bigint NOT NULL,
    listener         text NOT NULL,
    entity           text NOT NULL,
    entity_id        text NOT NULL,
    commit_lsn       pg_lsn NOT NULL,
    seq              int NOT NULL,
    attempts         int NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status_code int,
    comment          text
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
-- No index on next_attempt_at: the claim filters it during its walk in commit order, and
-- every index here costs on each fan-out insert and each move to processed.
-- Per-entity ordering: the dispatcher delivers the oldest change of an entity first.
CREATE INDEX new_listener_entity_order_idx ON walhook.new (listener, entity, entity_id, commit_lsn, seq);

COMMENT ON TABLE walhook.new IS 'walhook: notifications waiting for delivery (status New)';
COMMENT ON COLUMN walhook.new.comment IS 'the last delivery error, in plain words';

-- Status Processed: delivered. Append-only, pruned by age (queue.retention).
CREATE TABLE walhook.processed (
    id            bigint PRIMARY KEY,
    event_id      bigint NOT NULL,
    listener      text NOT NULL,
    entity        text NOT NULL,
    entity_id     text NOT NULL,
    commit_lsn    pg_lsn NOT NULL,
    seq           int NOT NULL,
    attempts      int NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz NOT NULL DEFAULT now(),
    status_code   int,
    latency_ms    int
);
CREATE INDEX processed_delivered_at_idx ON walhook.processed (delivered_at);

COMMENT ON TABLE walhook.processed IS 'walhook: delivered notifications (status Processed); no foreign key to walhook.event, pruned by age';

-- Status Failed: given up on after the last attempt; `walhook retry` moves rows back to walhook.new.
CREATE TABLE walhook.failed (
    id                bigint PRIMARY KEY,
    event_id          bigint NOT NULL REFERENCES walhook.event (id),
    listener          text NOT NULL,
    entity            text NOT NULL,
    entity_id         text NOT NULL,
    commit_lsn        pg_lsn NOT NULL,
    seq               int NOT NULL,
    attempts          int NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    failed_at         timestamptz NOT NULL DEFAULT now(),
    last_status_code  int,
    comment           text
);
CREATE INDEX failed_failed_at_idx ON walhook.failed (failed_at);
CREATE INDEX failed_event_id_idx ON walhook.failed (event_id);

COMMENT ON TABLE walhook.failed IS 'walhook: notifications given up on (status Failed), the dead-letter queue';

-- Where the source is and how far its changes are durable here.
CREATE TABLE walhook.state (
    id                 int PRIMARY KEY CHECK (id = 1),
    system_identifier  text,
    database_name      text,
    slot_name          text,
    flushed_lsn        pg_lsn,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN walhook.state.flushed_lsn IS 'end LSN of the last source commit whose events are committed in walhook.event';

-- One place to search every notification. event_id is walhook.event.id, as in the three
-- tables; event_uuid is the stable id listeners receive. Event columns are NULL for
-- Processed rows whose event was pruned.
CREATE VIEW walhook.notification AS
SELECT n.id, 'New'::text AS status, n.listener, n.event_id, e.event_id AS event_uuid,
       n.entity, n.entity_id, e.action, n.commit_lsn, n.seq, n.attempts, n.created_at,
       n.next_attempt_at, n.last_attempt_at, NULL::timestamptz AS delivered_at,
       NULL::timestamptz AS failed_at, n.last_status_code, NULL::int AS latency_ms, n.comment
FROM walhook.new n LEFT JOIN walhook.event e ON e.id = n.event_id
UNION ALL
SELECT p.id, 'Processed', p.listener, p.event_id, e.event_id,
       p.entity, p.entity_id, e.action, p.commit_lsn, p.seq, p.attempts, p.created_at,
       NULL, NULL, p.delivered_at,
       NULL, p.status_code, p.latency_ms, NULL
FROM walhook.processed p LEFT JOIN walhook.event e ON e.id = p.event_id
UNION ALL
SELECT f.id, 'Failed', f.listener, f.event_id, e.event_id,
       f.entity, f.entity_id, e.action, f.commit_lsn, f.seq, f.attempts, f.created_at,
       NULL, NULL, NULL,
       f.failed_at, f.last_status_code, NULL, f.comment
FROM walhook.failed f LEFT JOIN walhook.event e ON e.id = f.event_id;

COMMENT ON VIEW walhook.notification IS 'walhook: every notification with its status (New / Processed / Failed)';
