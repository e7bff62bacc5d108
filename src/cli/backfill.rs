//! `walhook backfill`: sends an entity's existing rows as Snapshot events; prints progress
//! on a terminal and a summary at the end.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;

use super::{ConfigArg, Failure};
use crate::backfill::{BackfillOptions, Outcome, Report};

/// `walhook backfill`.
#[derive(Args, Debug)]
pub(super) struct BackfillArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The entity whose rows are sent (its `[[entity]]` name).
    #[arg(long)]
    entity: String,
    /// Send the events to this listener only (default: every listener that receives the
    /// entity's snapshot action).
    #[arg(long)]
    listener: Option<String>,
    /// Only rows matching this SQL condition over the table's columns, like
    /// "created_at >= '2024-01-01'" (one expression; it must only read).
    #[arg(long = "where", value_name = "SQL")]
    filter: Option<String>,
    /// Rows per chunk (one transaction and one WAL message each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Start over from the first row, even when the same backfill finished or was
    /// interrupted (by default an interrupted one resumes where it stopped).
    #[arg(long)]
    restart: bool,
}

/// A progress line on stderr, redrawn at most a few times a second, when it is a terminal.
struct ProgressLine {
    on: bool,
    estimate: i64,
    drawn: Option<Instant>,
}

impl ProgressLine {
    fn draw(&mut self, rows: i64) {
        if !self.on
            || self
                .drawn
                .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        let share = if self.estimate > 0 {
            format!(" (~{}%)", (rows * 100 / self.estimate).min(100))
        } else {
            String::new()
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{rows} rows sent{share}   ");
        let _ = err.flush();
        self.drawn = Some(Instant::now());
    }

    fn clear(&mut self) {
        if self.on && self.drawn.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.drawn = None;
        }
    }
}

pub(super) async fn run_backfill(args: BackfillArgs) -> Result<i32, Failure> {
    let (config, mut client) = args.config.load_and_connect().await?;
    let opts = BackfillOptions {
        entity: args.entity,
        listener: args.listener,
        filter: args
            .filter
            .map(|f| f.trim().to_owned())
            .filter(|f| !f.is_empty()),
        batch: args.batch,
        restart: args.restart,
    };
    let mut line = ProgressLine {
        on: std::io::stderr().is_terminal(),
        estimate: 0,
        drawn: None,
    };
    let target = match &opts.listener {
        Some(l) => format!(" for listener {l}"),
        None => String::new(),
    };
    let entity = opts.entity.clone();
    let mut report = |r: Report| match r {
        Report::Warning(w) => {
            line.clear();
            eprintln!("walhook: warning: {w}");
        }
        Report::Started { run, estimate } => {
            line.estimate = estimate;
            println!("backfill {run} of {entity}{target}: started");
        }
        Report::Resumed {
            run,
            rows,
            estimate,
        } => {
            line.estimate = estimate;
            println!("backfill {run} of {entity}{target}: resuming after {rows} rows already sent");
        }
        Report::Chunk { rows } => line.draw(rows),
    };
    let outcome = crate::backfill::run(&config, &mut client, &opts, &mut report).await;
    line.clear();
    match outcome? {
        Outcome::AlreadyFinished(run) => {
            let when = run
                .finished_at
                .map(|t| format!(" at {}", humantime::format_rfc3339_seconds(t)))
                .unwrap_or_default();
            println!(
                "backfill {} of {}{target} finished{when} ({} rows); nothing to do: run with --restart to send every row again",
                run.id, opts.entity, run.rows
            );
        }
        Outcome::Finished {
            run,
            rows,
            chunks,
            last_message_lsn,
            flushed_lsn,
        } => {
            println!(
                "backfill {run} of {}{target} finished: {rows} rows in {chunks} chunks",
                opts.entity
            );
            if let Some(last) = last_message_lsn {
                println!(
                    "the last chunk is at WAL position {last}; capture had queued the stream up to {} (walhook status shows the queue)",
                    flushed_lsn.as_deref().unwrap_or("nothing yet")
                );
            }
        }
    }
    Ok(0)
}
