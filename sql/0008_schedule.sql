-- walhook queue schema, version 8: runs of scheduled notifications.
--
-- A [[schedule]] runs at most once per period across every walhook process: the process
-- that inserts the period's row runs it; the others find the row and skip. After downtime
-- only the latest missed period runs, once. A schedule seen for the first time records its
-- current period as skipped and first runs at the next one.

CREATE TABLE walhook.schedule_run (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    schedule     text NOT NULL,
    period       timestamptz NOT NULL,
    skipped      bool NOT NULL DEFAULT false,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    rows         bigint,
    duration_ms  bigint,
    error        text,
    CONSTRAINT schedule_run_schedule_period_key UNIQUE (schedule, period)
);

COMMENT ON TABLE walhook.schedule_run IS 'walhook: runs of [[schedule]] queries (at most one per schedule and period)';
COMMENT ON COLUMN walhook.schedule_run.period IS 'the scheduled time this run stands for';
COMMENT ON COLUMN walhook.schedule_run.rows IS 'events the run queued; NULL while running, after an error, or when skipped';
COMMENT ON COLUMN walhook.schedule_run.error IS 'why the run failed (tried again at the next period)';
