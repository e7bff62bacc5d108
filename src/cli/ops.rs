//! Operator commands over the queue tables: `walhook status`, `walhook failed`,
//! `walhook retry` and `walhook discard`. They print for people (aligned tables, human ages and sizes) and, for
//! `status --json`, for machines.

use std::fmt::Write as _;
use std::time::SystemTime;

use clap::{ArgGroup, Args};
use serde_json::{Value, json};

use super::{ConfigArg, Failure};
use crate::config::Config;
use crate::error::ErrorClass;
use crate::human::{age as human_age, bytes as human_bytes};
use crate::queue::admin::{
    DiscardReason, FailedFilter, FailedPage, NotRequeued, RetrySelection, Since, discard_failed,
    list_failed, retry_failed,
};
use crate::queue::status::{ErrorOf, Status, status};
use crate::types::Lsn;

/// `walhook status`.
#[derive(Args, Debug)]
pub(super) struct StatusArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `walhook failed`.
#[derive(Args, Debug)]
pub(super) struct FailedArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Only this listener's notifications.
    #[arg(long)]
    listener: Option<String>,
    /// Only those that failed within this long (1h, 2d) or since this time (RFC 3339, like
    /// 2024-05-01T12:00:00Z or 2024-05-01T14:00:00+02:00).
    #[arg(long, value_parser = parse_since)]
    since: Option<Since>,
    /// Show at most this many (newest first).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
    limit: i64,
}

/// Which Failed notifications `walhook retry` and `walhook discard` move.
#[derive(Args, Debug)]
#[command(group(
    ArgGroup::new("which").required(true).args(["ids", "all", "event"]),
))]
pub(super) struct FailedSelection {
    #[command(flatten)]
    config: ConfigArg,
    /// Only this listener's notifications (with --event: the listener to send to).
    #[arg(long)]
    listener: Option<String>,
    /// The Failed notification with this id (repeatable: --id 3 --id 7, or --id 3 7).
    #[arg(long = "id", value_name = "ID", num_args = 1.., conflicts_with = "all")]
    ids: Vec<i64>,
    /// Every Failed notification (of --listener, when given).
    #[arg(long)]
    all: bool,
    /// Send this stored event (its event id) to --listener again, as a new notification;
    /// the earlier ones stay in walhook.processed / walhook.failed.
    #[arg(long, value_name = "EVENT_ID", requires = "listener", conflicts_with_all = ["ids", "all"])]
    event: Option<uuid::Uuid>,
}

impl FailedSelection {
    fn selection(&self) -> RetrySelection {
        if self.all {
            RetrySelection::All
        } else {
            RetrySelection::Ids(self.ids.clone())
        }
    }
}

/// `walhook retry`.
#[derive(Args, Debug)]
pub(super) struct RetryArgs {
    #[command(flatten)]
    which: FailedSelection,
}

/// `walhook discard`.
#[derive(Args, Debug)]
pub(super) struct DiscardArgs {
    #[command(flatten)]
    which: FailedSelection,
    /// Why they are discarded; kept with them in walhook.discarded.
    #[arg(long, value_parser = parse_reason)]
    reason: DiscardReason,
}

fn parse_reason(s: &str) -> Result<DiscardReason, String> {
    DiscardReason::new(s).ok_or_else(|| {
        "the reason is empty: say why, like --reason \"customer deleted upstream\"".to_owned()
    })
}

/// Parses `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(s: &str) -> Result<Since, String> {
    if let Ok(d) = crate::config::parse_duration(s) {
        return Ok(Since::Ago(d));
    }
    crate::human::parse_time(s).map(Since::At).ok_or_else(|| {
        format!(
            "invalid --since {s:?}: give a duration like 30m, 1h or 2d, or a time like 2024-05-01T12:00:00Z"
        )
    })
}

pub(super) async fn run_status(args: StatusArgs) -> Result<i32, Failure> {
    let (config, client) = args.config.load_and_connect().await?;
    let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
    let report = status(&client, &names, &config.source.slot).await?;
    let refusal = guard_refusal(&config, &client).await;
    let validation = eventgrid_validation(&config, &client).await;
    let schedules = crate::queue::schedule::last_runs(&client).await?;
    if args.json {
        let mut doc = status_json(&report);
        doc["refused"] = json!(refusal);
        doc["schedules"] = schedules_json(&schedules);
        doc["eventgrid_validation"] = validation
            .iter()
            .map(|(name, validated, line)| {
                json!({ "listener": name, "validated": validated, "status": line })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        if let Some(why) = &refusal {
            println!("REFUSING TO RUN: {why}\n");
        }
        print!("{}", render_status(&report));
        if !validation.is_empty() {
            println!("\nEvent Grid validation:");
            for (name, _, line) in &validation {
                println!("  {}: {line}", cell(name));
            }
        }
        print!("{}", render_schedules(report.now, &config, &schedules));
    }
    // A report, not a check: failures in the queue are data, not an error of this command.
    Ok(0)
}

/// Each Event Grid webhook's validation: (listener, validated, what status says).
async fn eventgrid_validation(
    config: &Config,
    client: &tokio_postgres::Client,
) -> Vec<(String, bool, String)> {
    use crate::delivery::validation::status_line;
    if config
        .listeners
        .iter()
        .all(|l| status_line(l, None).is_none())
    {
        return Vec::new();
    }
    // Before the first migration there is no table: every webhook is then unvalidated.
    let stored = crate::queue::read_validations(client)
        .await
        .unwrap_or_default();
    config
        .listeners
        .iter()
        .filter_map(|l| {
            let row = stored.iter().find(|v| v.listener == l.name);
            let (validated, line) = status_line(l, row)?;
            Some((l.name.clone(), validated, line))
        })
        .collect()
}

/// Why the daemon refuses to capture and deliver here (an unadopted copy), if it does.
async fn guard_refusal(config: &Config, client: &tokio_postgres::Client) -> Option<String> {
    let params = config.source.connect_params().ok()?;
    let current = crate::guard::current_identity(&params).await.ok()?;
    crate::guard::verdict(client, &current)
        .await
        .ok()?
        .explain()
}

pub(super) async fn run_failed(args: FailedArgs) -> Result<i32, Failure> {
    let (_, client) = args.config.load_and_connect().await?;
    let filter = FailedFilter {
        listener: args.listener,
        since: args.since,
        limit: args.limit,
    };
    let page = list_failed(&client, &filter).await?;
    print!("{}", render_failed(&page, filter.limit));
    Ok(0)
}

pub(super) async fn run_retry(args: RetryArgs) -> Result<i32, Failure> {
    let which = args.which;
    if let (Some(event), Some(listener)) = (which.event, &which.listener) {
        return super::manual::run_resend(&which.config, event, listener).await;
    }
    let (_, client) = which.config.load_and_connect().await?;
    let selection = which.selection();
    let outcome = retry_failed(&client, which.listener.as_deref(), &selection).await?;
    Ok(report_moved(
        outcome.requeued.len(),
        ("requeue", "requeued"),
        "to walhook.new",
        selection == RetrySelection::All,
        &which.listener,
        &outcome.not_requeued,
    ))
}

pub(super) async fn run_discard(args: DiscardArgs) -> Result<i32, Failure> {
    let which = args.which;
    if which.event.is_some() {
        return Err(Failure {
            class: ErrorClass::Config,
            message: "--event sends a stored event again and goes with walhook retry; discard takes --id or --all".to_owned(),
        });
    }
    let (_, client) = which.config.load_and_connect().await?;
    let selection = which.selection();
    let outcome =
        discard_failed(&client, which.listener.as_deref(), &selection, &args.reason).await?;
    Ok(report_moved(
        outcome.discarded.len(),
        ("discard", "discarded"),
        "to walhook.discarded",
        selection == RetrySelection::All,
        &which.listener,
        &outcome.not_discarded,
    ))
}

/// Prints what a retry or discard moved and what it did not; the exit code is 1 when an id
/// asked for was not moved.
fn report_moved(
    n: usize,
    (verb, done): (&str, &str),
    destination: &str,
    all: bool,
    listener: &Option<String>,
    not_moved: &[NotRequeued],
) -> i32 {
    if n == 0 && all {
        println!(
            "nothing to {verb}: no Failed notifications{}",
            for_listener(listener)
        );
    } else {
        println!(
            "{done} {n} Failed notification{} {destination}{}",
            if n == 1 { "" } else { "s" },
            for_listener(listener)
        );
    }
    for missing in not_moved {
        println!("not {done}: {missing}");
    }
    if not_moved.is_empty() { 0 } else { 1 }
}

fn for_listener(listener: &Option<String>) -> String {
    listener
        .as_ref()
        .map(|l| format!(" for listener {l:?}"))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// rendering

/// The last run of each configured schedule (and of schedules no longer configured).
fn render_schedules(
    now: SystemTime,
    config: &Config,
    runs: &[crate::queue::schedule::ScheduleRun],
) -> String {
    if config.schedules.is_empty() && runs.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nschedules:\n");
    let mut names: Vec<&str> = config.schedules.iter().map(|s| s.name.as_str()).collect();
    for r in runs {
        if !names.contains(&r.schedule.as_str()) {
            names.push(&r.schedule);
        }
    }
    for name in names {
        let line = match runs.iter().find(|r| r.schedule == name) {
            None => "not run yet".to_owned(),
            Some(r) if r.skipped => format!(
                "new since {}; first run at its next period",
                ago(now, r.started_at)
            ),
            Some(r) => {
                let when = format!("last run {} ({})", time(r.period), ago(now, r.started_at));
                let how = match (&r.error, r.rows, r.finished_at) {
                    (Some(e), ..) => format!("FAILED: {}", cell(e)),
                    (None, Some(n), _) => {
                        format!("{n} event(s) in {} ms", r.duration_ms.unwrap_or(0))
                    }
                    (None, None, None) => "running (or stopped while running)".to_owned(),
                    (None, None, Some(_)) => "ended".to_owned(),
                };
                match &r.last_error {
                    Some((at, e)) => {
                        format!("{when}: {how}; last failure {}: {}", time(*at), cell(e))
                    }
                    None => format!("{when}: {how}"),
                }
            }
        };
        let _ = writeln!(out, "  {name}: {line}");
    }
    out
}

fn schedules_json(runs: &[crate::queue::schedule::ScheduleRun]) -> Value {
    Value::Array(
        runs.iter()
            .map(|r| {
                json!({
                    "name": r.schedule,
                    "period": time(r.period),
                    "started_at": time(r.started_at),
                    "finished_at": r.finished_at.map(time),
                    "rows": r.rows,
                    "duration_ms": r.duration_ms,
                    "error": r.error,
                    "skipped": r.skipped,
                })
            })
            .collect(),
    )
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ago(now: SystemTime, t: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(d) => format!("{} ago", human_age(d)),
        Err(e) => format!("in {}", human_age(e.duration())),
    }
}

/// One line, whatever the database holds: control characters would break the table.
fn cell(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// An aligned table: numeric columns (`right[i]`) right-aligned, the last column unpadded.
fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        let last = row.len().saturating_sub(1);
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = w.saturating_sub(c.chars().count());
            let right_aligned = right.get(i).copied().unwrap_or(false);
            if right_aligned {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(c);
            } else {
                line.push_str(c);
                if i < last {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn lsn(l: Option<Lsn>) -> String {
    l.map_or_else(|| "-".to_owned(), |l| l.to_string())
}

fn render_status(s: &Status) -> String {
    let mut out = String::new();
    if s.listeners.is_empty() {
        out.push_str("listeners: none configured and none in the queue tables\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .listeners
            .iter()
            .map(|l| {
                let name = if l.configured {
                    cell(&l.name)
                } else {
                    format!("{} (not configured)", cell(&l.name))
                };
                let last_error = l.last_error.as_ref().map_or_else(
                    || "-".to_owned(),
                    |e| {
                        let what = match e.of {
                            ErrorOf::Notification(id) => format!("#{id} {}", e.status),
                            ErrorOf::HeldEvent(id) => format!("cursor held at event #{id}"),
                        };
                        format!(
                            "{} ({what}{}): {}",
                            ago(s.now, e.at),
                            e.status_code
                                .map(|c| format!(", HTTP {c}"))
                                .unwrap_or_default(),
                            cell(&e.comment)
                        )
                    },
                );
                vec![
                    name,
                    l.new.to_string(),
                    l.due.to_string(),
                    l.waiting.to_string(),
                    l.processed.to_string(),
                    l.failed.to_string(),
                    l.oldest_undelivered_age(s.now)
                        .map_or_else(|| "-".to_owned(), human_age),
                    last_error,
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "LISTENER",
                "NEW",
                "DUE",
                "RETRYING",
                "PROCESSED",
                "FAILED",
                "OLDEST UNDELIVERED",
                "LAST ERROR",
            ],
            &[false, true, true, true, true, true, false, false],
            &rows,
        ));
    }
    out.push('\n');

    match &s.slot.found {
        None => {
            let _ = writeln!(
                out,
                "slot {:?}: missing; run `walhook setup` to create it",
                s.slot.name
            );
        }
        Some(d) => {
            let _ = writeln!(
                out,
                "slot {:?}: {}",
                s.slot.name,
                if d.active {
                    d.active_pid
                        .map_or_else(|| "active".to_owned(), |p| format!("active (pid {p})"))
                } else {
                    "not active (no walhook is streaming from it)".to_owned()
                }
            );
            let _ = writeln!(out, "  confirmed flush  {}", lsn(d.confirmed_flush_lsn));
            let _ = writeln!(
                out,
                "  lag              {} behind the current WAL position {}",
                d.lag_bytes.map_or_else(|| "-".to_owned(), human_bytes),
                lsn(d.current_lsn)
            );
            let _ = writeln!(
                out,
                "  retained WAL     {} (restart_lsn {})",
                d.retained_bytes.map_or_else(|| "-".to_owned(), human_bytes),
                lsn(d.restart_lsn)
            );
        }
    }

    let _ = write!(out, "events: {} queued", s.events.total);
    if let Some(t) = s.events.latest_commit_time {
        let _ = write!(out, ", latest commit {} ({})", time(t), ago(s.now, t));
    }
    out.push('\n');

    match &s.state {
        None => out.push_str("state: empty (walhook has not run against this database yet)\n"),
        Some(st) => {
            let _ = writeln!(
                out,
                "state: system identifier {}, flushed LSN {}, updated {} ({})",
                st.system_identifier.as_deref().unwrap_or("-"),
                lsn(st.flushed_lsn),
                time(st.updated_at),
                ago(s.now, st.updated_at)
            );
        }
    }
    out
}

fn json_time(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| Value::String(time(t)))
}

fn json_lsn(l: Option<Lsn>) -> Value {
    l.map_or(Value::Null, |l| Value::String(l.to_string()))
}

fn status_json(s: &Status) -> Value {
    let listeners: Vec<Value> = s
        .listeners
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "configured": l.configured,
                "new": l.new,
                "due": l.due,
                "waiting": l.waiting,
                "processed": l.processed,
                "failed": l.failed,
                "oldest_undelivered": json_time(l.oldest_undelivered),
                "oldest_undelivered_age_seconds": l.oldest_undelivered_age(s.now).map(|d| d.as_secs()),
                "last_error": l.last_error.as_ref().map(|e| json!({
                    "id": e.of.notification(),
                    "held_event_id": e.of.held_event(),
                    "status": e.status.as_str(),
                    "at": time(e.at),
                    "status_code": e.status_code,
                    "comment": e.comment,
                })),
            })
        })
        .collect();
    let slot = match &s.slot.found {
        None => json!({ "name": s.slot.name, "exists": false }),
        Some(d) => json!({
            "name": s.slot.name,
            "exists": true,
            "active": d.active,
            "active_pid": d.active_pid,
            "confirmed_flush_lsn": json_lsn(d.confirmed_flush_lsn),
            "restart_lsn": json_lsn(d.restart_lsn),
            "current_lsn": json_lsn(d.current_lsn),
            "lag_bytes": d.lag_bytes,
            "retained_bytes": d.retained_bytes,
        }),
    };
    json!({
        "now": time(s.now),
        "listeners": listeners,
        "slot": slot,
        "events": {
            "total": s.events.total,
            "latest_commit_time": json_time(s.events.latest_commit_time),
            "latest_queued_at": json_time(s.events.latest_queued_at),
        },
        "state": s.state.as_ref().map(|st| json!({
            "system_identifier": st.system_identifier,
            "database_name": st.database_name,
            "slot_name": st.slot_name,
            "flushed_lsn": json_lsn(st.flushed_lsn),
            "updated_at": time(st.updated_at),
        })),
    })
}

fn render_failed(page: &FailedPage, limit: i64) -> String {
    let mut out = String::new();
    if page.rows.is_empty() {
        out.push_str("no Failed notifications match\n");
        return out;
    }
    let rows: Vec<Vec<String>> = page
        .rows
        .iter()
        .map(|f| {
            vec![
                f.id.to_string(),
                cell(&f.listener),
                cell(&f.entity),
                cell(&f.entity_id),
                f.action.clone().unwrap_or_else(|| "-".to_owned()),
                f.attempts.to_string(),
                time(f.failed_at),
                f.last_status_code
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                f.comment.as_deref().map_or_else(|| "-".to_owned(), cell),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ID",
            "LISTENER",
            "ENTITY",
            "ENTITY ID",
            "ACTION",
            "ATTEMPTS",
            "FAILED AT",
            "STATUS",
            "COMMENT",
        ],
        &[true, false, false, false, false, true, false, true, false],
        &rows,
    ));
    let more = page.more();
    if more > 0 {
        let _ = writeln!(
            out,
            "… {more} more; use --limit {} to see them all, or narrow with --listener / --since",
            limit.saturating_add(more)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn since_accepts_durations_and_rfc3339_with_offsets() {
        assert_eq!(parse_since("1h"), Ok(Since::Ago(Duration::from_secs(3600))));
        assert_eq!(
            parse_since("2d"),
            Ok(Since::Ago(Duration::from_secs(172_800)))
        );
        let utc = humantime::parse_rfc3339("2024-05-01T12:00:00Z").unwrap();
        assert_eq!(parse_since("2024-05-01T12:00:00Z"), Ok(Since::At(utc)));
        assert_eq!(parse_since("2024-05-01T14:00:00+02:00"), Ok(Since::At(utc)));
        assert_eq!(parse_since("2024-05-01T09:30:00-02:30"), Ok(Since::At(utc)));
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("2024-05-01T14:00:00+25:00").is_err());
    }

    #[test]
    fn table_aligns_columns_and_right_aligns_numbers() {
        let t = table(
            &["NAME", "N", "NOTE"],
            &[false, true, false],
            &[
                vec!["a".into(), "1".into(), "x".into()],
                vec!["long".into(), "123".into(), "".into()],
            ],
        );
        assert_eq!(t, "NAME    N  NOTE\na       1  x\nlong  123\n");
    }

    #[test]
    fn cells_never_span_lines() {
        assert_eq!(cell("a\nb\tc"), "a b c");
    }
}
