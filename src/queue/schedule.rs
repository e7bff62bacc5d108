//! Runs of scheduled notifications in `walhook.schedule_run` (see `sql/0008_schedule.sql`):
//! claiming a period (at most one run per schedule and period across processes), recording
//! how it ended, and the last run of each schedule for `walhook status`.

use std::time::SystemTime;

use tokio_postgres::GenericClient;

use super::{QueueError, db_error};

const HAS_RUNS: &str = "SELECT EXISTS (SELECT 1 FROM walhook.schedule_run WHERE schedule = $1)";

const CLAIM: &str =
    "INSERT INTO walhook.schedule_run (schedule, period, skipped) VALUES ($1, $2, $3)
ON CONFLICT (schedule, period) DO NOTHING RETURNING id";

const FINISH: &str = "UPDATE walhook.schedule_run
SET finished_at = now(), rows = $2, duration_ms = $3, error = $4 WHERE id = $1";

const LAST_RUNS: &str = "SELECT DISTINCT ON (schedule) schedule, period, started_at, finished_at,
       rows, duration_ms, error, skipped
FROM walhook.schedule_run ORDER BY schedule, period DESC";

const LAST_ERRORS: &str = "SELECT DISTINCT ON (schedule) schedule, period, error
FROM walhook.schedule_run WHERE error IS NOT NULL ORDER BY schedule, period DESC";

/// What claiming a period gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This process runs the period; the run's id.
    Run(i64),
    /// The schedule is new: its current period is recorded as skipped, the first run is
    /// the next period.
    FirstSeen,
    /// Another process (or this one, earlier) has the period.
    Taken,
}

/// Claims `period` of schedule `name`.
pub async fn claim(
    client: &impl GenericClient,
    name: &str,
    period: SystemTime,
) -> Result<Claim, QueueError> {
    const CONTEXT: &str = "claiming a schedule run in walhook.schedule_run";
    let seen: bool = client
        .query_one(HAS_RUNS, &[&name])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(db_error(CONTEXT, None))?;
    let row = client
        .query_opt(CLAIM, &[&name, &period, &!seen])
        .await
        .map_err(db_error(CONTEXT, None))?;
    Ok(match (row, seen) {
        (None, _) => Claim::Taken,
        (Some(_), false) => Claim::FirstSeen,
        (Some(r), true) => Claim::Run(r.try_get(0).map_err(db_error(CONTEXT, None))?),
    })
}

/// Records how run `id` ended: `rows` queued, or the error.
pub async fn finish(
    client: &impl GenericClient,
    id: i64,
    rows: Option<i64>,
    duration_ms: i64,
    error: Option<&str>,
) -> Result<(), QueueError> {
    client
        .execute(FINISH, &[&id, &rows, &duration_ms, &error])
        .await
        .map_err(db_error("recording a schedule run", None))?;
    Ok(())
}

/// The last run of one schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleRun {
    /// The schedule's name.
    pub schedule: String,
    /// The scheduled time the run stands for.
    pub period: SystemTime,
    /// When it started.
    pub started_at: SystemTime,
    /// When it ended; `None` while running (or when the process died).
    pub finished_at: Option<SystemTime>,
    /// Events queued.
    pub rows: Option<i64>,
    /// How long it took.
    pub duration_ms: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The schedule was seen for the first time: nothing ran.
    pub skipped: bool,
    /// The latest failure of the schedule, when it is not this run: (period, error).
    pub last_error: Option<(SystemTime, String)>,
}

/// The last run of every schedule that ran, by name.
pub async fn last_runs(client: &impl GenericClient) -> Result<Vec<ScheduleRun>, QueueError> {
    const CONTEXT: &str = "reading walhook.schedule_run";
    let err = || db_error(CONTEXT, None);
    let mut out = Vec::new();
    for r in client.query(LAST_RUNS, &[]).await.map_err(err())? {
        out.push(ScheduleRun {
            schedule: r.try_get(0).map_err(err())?,
            period: r.try_get(1).map_err(err())?,
            started_at: r.try_get(2).map_err(err())?,
            finished_at: r.try_get(3).map_err(err())?,
            rows: r.try_get(4).map_err(err())?,
            duration_ms: r.try_get(5).map_err(err())?,
            error: r.try_get(6).map_err(err())?,
            skipped: r.try_get(7).map_err(err())?,
            last_error: None,
        });
    }
    for r in client.query(LAST_ERRORS, &[]).await.map_err(err())? {
        let name: String = r.try_get(0).map_err(err())?;
        let period: SystemTime = r.try_get(1).map_err(err())?;
        let error: String = r.try_get(2).map_err(err())?;
        if let Some(run) = out
            .iter_mut()
            .find(|run| run.schedule == name && run.period != period)
        {
            run.last_error = Some((period, error));
        }
    }
    Ok(out)
}
