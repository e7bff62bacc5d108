-- walhook queue schema, version 3: searching notifications (the web console), and
-- discarding Failed notifications with a reason.
--
-- Creating these indexes locks writes to walhook.processed and walhook.failed while they
-- build (seconds per million rows). On a large queue a DBA may build them beforehand,
-- outside a transaction, with CREATE INDEX CONCURRENTLY and the same names: the IF NOT
-- EXISTS below then skips them.

-- Status Discarded: Failed notifications an operator gave up on (`walhook discard` or the
-- console), with the reason. Like walhook.processed it has no foreign key to walhook.event
-- and is pruned by age (queue.retention, by discarded_at), so discarding a dead letter
-- lets retention drop its event; the row says who gave up on what, and why.
CREATE TABLE walhook.discarded (
    id                bigint PRIMARY KEY,
    event_id          bigint NOT NULL,
    listener          text NOT NULL,
    entity            text NOT NULL,
    entity_id         text NOT NULL,
    commit_lsn        pg_lsn NOT NULL,
    seq               int NOT NULL,
    attempts          int NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL,
    failed_at         timestamptz NOT NULL,
    last_status_code  int,
    comment           text,
    discarded_at      timestamptz NOT NULL DEFAULT now(),
    reason            text NOT NULL CHECK (btrim(reason) <> '')
);
CREATE INDEX discarded_discarded_at_idx ON walhook.discarded (discarded_at);

COMMENT ON TABLE walhook.discarded IS 'walhook: Failed notifications an operator discarded (status Discarded); pruned by age';
COMMENT ON COLUMN walhook.discarded.comment IS 'the last delivery error, as it was in walhook.failed';
COMMENT ON COLUMN walhook.discarded.reason IS 'why the operator discarded it';

-- Search: newest first, (created_at, id) as the keyset, optionally narrowed to a listener,
-- an entity or an entity id. Each index walks one filter in result order, so a page costs
-- the rows it shows whatever the table holds. walhook.new gets none on purpose: it is the
-- hot table (every index costs on each fan-out insert and each move), and it is scanned.
CREATE INDEX IF NOT EXISTS processed_created_idx ON walhook.processed (created_at, id);
CREATE INDEX IF NOT EXISTS processed_listener_created_idx ON walhook.processed (listener, created_at, id);
CREATE INDEX IF NOT EXISTS processed_entity_created_idx ON walhook.processed (entity, created_at, id);
CREATE INDEX IF NOT EXISTS processed_entity_id_created_idx ON walhook.processed (entity_id, created_at, id);
CREATE INDEX IF NOT EXISTS failed_created_idx ON walhook.failed (created_at, id);
CREATE INDEX IF NOT EXISTS failed_listener_created_idx ON walhook.failed (listener, created_at, id);
CREATE INDEX IF NOT EXISTS failed_entity_created_idx ON walhook.failed (entity, created_at, id);
CREATE INDEX IF NOT EXISTS failed_entity_id_created_idx ON walhook.failed (entity_id, created_at, id);
CREATE INDEX IF NOT EXISTS discarded_created_idx ON walhook.discarded (created_at, id);
CREATE INDEX IF NOT EXISTS discarded_entity_id_created_idx ON walhook.discarded (entity_id, created_at, id);

-- The view gains the Discarded rows and, at the end (existing columns keep their places),
-- when and why they were discarded.
CREATE OR REPLACE VIEW walhook.notification AS
SELECT n.id, 'New'::text AS status, n.listener, n.event_id, e.event_id AS event_uuid,
       n.entity, n.entity_id, e.action, n.commit_lsn, n.seq, n.attempts, n.created_at,
       n.next_attempt_at, n.last_attempt_at, NULL::timestamptz AS delivered_at,
       NULL::timestamptz AS failed_at, n.last_status_code, NULL::int AS latency_ms, n.comment,
       NULL::timestamptz AS discarded_at, NULL::text AS reason
FROM walhook.new n LEFT JOIN walhook.event e ON e.id = n.event_id
UNION ALL
SELECT p.id, 'Processed', p.listener, p.event_id, e.event_id,
       p.entity, p.entity_id, e.action, p.commit_lsn, p.seq, p.attempts, p.created_at,
       NULL, NULL, p.delivered_at,
       NULL, p.status_code, p.latency_ms, NULL,
       NULL, NULL
FROM walhook.processed p LEFT JOIN walhook.event e ON e.id = p.event_id
UNION ALL
SELECT f.id, 'Failed', f.listener, f.event_id, e.event_id,
       f.entity, f.entity_id, e.action, f.commit_lsn, f.seq, f.attempts, f.created_at,
       NULL, NULL, NULL,
       f.failed_at, f.last_status_code, NULL, f.comment,
       NULL, NULL
FROM walhook.failed f LEFT JOIN walhook.event e ON e.id = f.event_id
UNION ALL
SELECT d.id, 'Discarded', d.listener, d.event_id, e.event_id,
       d.entity, d.entity_id, e.action, d.commit_lsn, d.seq, d.attempts, d.created_at,
       NULL, NULL, NULL,
       d.failed_at, d.last_status_code, NULL, d.comment,
       d.discarded_at, d.reason
FROM walhook.discarded d LEFT JOIN walhook.event e ON e.id = d.event_id;

COMMENT ON VIEW walhook.notification IS 'walhook: every notification with its status (New / Processed / Failed / Discarded)';
