-- walhook queue schema, version 10: backfills (`walhook backfill`).
--
-- A backfill reads an entity's existing rows in chunks, in key order. Each chunk is one
-- transaction on the source: it locks the chunk's rows (FOR SHARE), writes them into the
-- WAL as one transactional logical message (prefix 'walhook.backfill') that capture turns
-- into Snapshot events, and records its last key here. The message and the progress commit
-- together, so a backfill killed at any point resumes after the last chunk that committed:
-- no chunk is lost and none is sent twice.
--
-- At most one backfill runs per (entity, listener, filter); running it again with the same
-- arguments resumes it. The token proves to capture that a message was written by a
-- backfill recorded here (any role may call pg_logical_emit_message).

CREATE TABLE walhook.backfill (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity        text NOT NULL,
    listener      text,
    filter        text,
    status        text NOT NULL DEFAULT 'running'
                  CHECK (status IN ('running', 'finished', 'restarted')),
    key_columns   text[] NOT NULL,
    last_key      text[],
    rows          bigint NOT NULL DEFAULT 0,
    chunks        bigint NOT NULL DEFAULT 0,
    last_message_lsn pg_lsn,
    token         uuid NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);

CREATE UNIQUE INDEX backfill_running_idx
    ON walhook.backfill (entity, coalesce(listener, ''), coalesce(filter, ''))
    WHERE status = 'running';

COMMENT ON TABLE walhook.backfill IS 'walhook: backfills of existing rows as Snapshot events (walhook backfill), with their progress';
COMMENT ON COLUMN walhook.backfill.listener IS 'the only listener the Snapshot events are for; NULL = every listener that receives them';
COMMENT ON COLUMN walhook.backfill.filter IS 'the --where condition; NULL = every row';
COMMENT ON COLUMN walhook.backfill.status IS 'running (resumable), finished, or restarted (replaced by a later run with --restart)';
COMMENT ON COLUMN walhook.backfill.last_key IS 'text form of the key of the last row sent (key_columns order); the next chunk starts after it';
COMMENT ON COLUMN walhook.backfill.last_message_lsn IS 'WAL position of the last chunk''s message: capture has queued it once walhook.state.flushed_lsn passes it';
COMMENT ON COLUMN walhook.backfill.token IS 'secret that capture checks in each chunk message, so other roles cannot forge Snapshot events';
