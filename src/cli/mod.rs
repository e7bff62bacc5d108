//! The command line: parses arguments, sets up logging, runs a command, maps errors to
//! exit codes (78 = EX_CONFIG for anything an operator must fix first).

mod assets;
mod backfill;
#[cfg(feature = "demo")]
mod demo;
mod logging;
mod manual;
mod ops;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DEFAULT_PATH};
use crate::error::{Classify, ErrorClass};

/// PostgreSQL change data capture to webhooks.
#[derive(Parser, Debug)]
#[command(name = "walhook", version, about, long_about = None)]
struct Cli {
    /// Log format: text for people, json for log collectors (default: text on a terminal
    /// and in systemd's journal, json otherwise). WALHOOK_LOG sets the level (e.g. debug).
    #[arg(long, global = true, value_enum)]
    log_format: Option<logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct ConfigArg {
    /// Configuration file.
    #[arg(long, short = 'c', env = "WALHOOK_CONFIG", default_value = DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: stream changes into the queue tables.
    Run(ConfigArg),
    /// Check the configuration and the database prerequisites; one line per check.
    Check(CheckArgs),
    /// Create the queue tables, publication and slot (or print the SQL for a DBA).
    Setup(SetupArgs),
    /// Queue counts per listener, last errors, slot lag and the flushed position.
    Status(ops::StatusArgs),
    /// List Failed notifications with their comments, newest first.
    Failed(ops::FailedArgs),
    /// Move Failed notifications back to walhook.new for another round of attempts, or
    /// (--event) queue one stored event again for a listener.
    Retry(ops::RetryArgs),
    /// Send one sample (or stored) event to a listener in its format and authentication,
    /// and show the request (secrets masked) and the answer; exits 1 when the listener fails.
    TestListener(manual::TestListenerArgs),
    /// Give up on Failed notifications for good: move them to walhook.discarded with a reason.
    Discard(ops::DiscardArgs),
    /// Send an entity's existing rows as Snapshot events, in order with live changes;
    /// resumes where it stopped when run again with the same arguments. Needs `walhook run`
    /// streaming to turn the chunks into events.
    Backfill(backfill::BackfillArgs),
    /// Show the whole flow on a throwaway local database with sample tables and changes.
    #[cfg(feature = "demo")]
    Demo {
        /// Stop after this long (e.g. 20s, 5m); default: run until Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// Print a shell completion script, e.g. `walhook completions bash >
    /// /etc/bash_completion.d/walhook`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages and completion scripts into a directory (for packaging).
    #[command(hide = true)]
    Assets {
        /// The directory; created when missing.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Check only the file, without connecting to the database: syntax, keys, values,
    /// referenced files and environment variables (for config management and CI).
    #[arg(long)]
    offline: bool,
}

#[derive(Args, Debug)]
struct SetupArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print the SQL instead of running it.
    #[arg(long)]
    print_sql: bool,
    /// Also set REPLICA IDENTITY FULL on entity tables that lack it, so changedFields and
    /// `track` see complete old rows.
    #[arg(long)]
    replica_identity_full: bool,
    /// Remove the replication slot and the publication (the queue tables stay).
    #[arg(long, conflicts_with_all = ["print_sql", "replica_identity_full"])]
    drop: bool,
    /// With --drop: also drop schema walhook and every queued event and notification.
    #[arg(long, requires = "drop")]
    drop_queue: bool,
    /// Accept this database as walhook's own after it was copied or restored from another
    /// (walhook refuses to capture or deliver on an unadopted copy).
    #[arg(long, conflicts_with_all = ["print_sql", "drop"])]
    adopt: bool,
    /// With --adopt: move notifications still pending from the original to walhook.failed.
    #[arg(long, requires = "adopt")]
    discard_pending: bool,
    /// The replication slot vanished while in use, so changes were lost: record the gap in
    /// walhook.capture_gap (the monitors are told when capture resumes) and create the slot
    /// again. walhook refuses to start until this is run.
    #[arg(long, conflicts_with_all = ["drop", "adopt"])]
    accept_gap: bool,
}

/// An error that ends the process: one line, and the exit code of its class.
#[derive(Debug)]
struct Failure {
    class: ErrorClass,
    message: String,
}

impl<E: Classify + std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            class: e.class(),
            message: e.to_string(),
        }
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    // The demo talks to a person: readable text, and only what goes wrong.
    let (format, default_filter) = match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo { .. } => (
            Some(cli.log_format.unwrap_or(logging::LogFormat::Text)),
            "warn,tokio_postgres=error",
        ),
        _ => (cli.log_format, "info,tokio_postgres=warn"),
    };
    logging::init(format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("walhook: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(f) => {
            // Multi-line messages (several config errors) keep one problem per line.
            for line in f.message.lines() {
                eprintln!("walhook: error: {line}");
            }
            f.class.exit_code()
        }
    }
}

async fn dispatch(command: Command) -> Result<i32, Failure> {
    match command {
        Command::Run(c) => {
            let config = Config::load(&c.config)?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            let (reload_tx, reload_rx) =
                tokio::sync::watch::channel(std::sync::Arc::new(config.clone()));
            spawn_reload_handler(c.config.clone(), reload_tx, shutdown.clone());
            crate::service::run_with_reload(config, shutdown, Some(reload_rx)).await?;
            Ok(0)
        }
        Command::Check(args) if args.offline => {
            let (config, _) = args.config.load()?;
            println!("{}", offline_verdict(&config));
            Ok(0)
        }
        Command::Check(args) => {
            let (config, params) = args.config.load()?;
            let (client, conn, tls) = crate::db::connect_raw(&params).await?;
            tokio::spawn(conn);
            let mut report = crate::setup::check(&client, &config).await;
            report
                .items
                .insert(0, crate::setup::tls_item(&params, tls.as_ref()));
            report.items.extend(crate::streams::check(&config).await);
            println!("{report}");
            Ok(if report.ok() {
                0
            } else {
                crate::error::EX_CONFIG
            })
        }
        Command::Setup(args) => setup(args).await,
        Command::Status(args) => ops::run_status(args).await,
        Command::Failed(args) => ops::run_failed(args).await,
        Command::Retry(args) => ops::run_retry(args).await,
        Command::TestListener(args) => manual::run_test_listener(args).await,
        Command::Discard(args) => ops::run_discard(args).await,
        Command::Backfill(args) => backfill::run_backfill(args).await,
        #[cfg(feature = "demo")]
        Command::Demo { duration } => demo::run(duration).await,
        Command::Completions { shell } => {
            assets::print_completions(shell);
            Ok(0)
        }
        Command::Assets { out } => {
            let written = assets::write_assets(&out).map_err(|e| Failure {
                class: ErrorClass::Transient,
                message: format!("cannot write to {}: {e}", out.display()),
            })?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(0)
        }
    }
}

/// The line `walhook check --offline` prints for a file without errors.
fn offline_verdict(config: &Config) -> String {
    fn count(n: usize, one: &str, many: &str) -> String {
        format!("{n} {}", if n == 1 { one } else { many })
    }
    format!(
        "ok    configuration {}: {}, {}, {} (database not checked: --offline)",
        config.path.display(),
        count(config.entities.len(), "entity", "entities"),
        count(config.listeners.len(), "listener", "listeners"),
        count(config.monitors.len(), "monitor", "monitors"),
    )
}

async fn setup(args: SetupArgs) -> Result<i32, Failure> {
    let (config, mut client) = args.config.load_and_connect().await?;
    if args.adopt {
        return adopt(&config, &mut client, args.discard_pending).await;
    }
    if args.drop {
        let opts = crate::setup::DropOptions {
            queue_schema: args.drop_queue,
        };
        let done = crate::setup::drop_all(&client, &config, opts).await?;
        for line in done {
            println!("{line}");
        }
        return Ok(0);
    }
    let opts = crate::setup::SetupOptions {
        replica_identity_full: args.replica_identity_full,
        accept_gap: args.accept_gap,
    };
    let steps = crate::setup::plan(&client, &config, opts).await?;
    if args.print_sql {
        print!("{}", crate::setup::script(&steps, &config));
        print!("{}", crate::streams::describe_plan(&config));
        return Ok(0);
    }
    if steps.is_empty() {
        println!("nothing to do: the database is set up for walhook");
    } else {
        let params = config.source.connect_params()?;
        crate::setup::apply(&mut client, &steps, Some(&params)).await?;
        for s in &steps {
            println!("done  {}", s.why);
        }
    }
    for (changed, line) in crate::streams::setup(&config).await? {
        println!("{}{line}", if changed { "done  " } else { "ok    " });
    }
    Ok(0)
}

async fn adopt(
    config: &Config,
    client: &mut tokio_postgres::Client,
    discard_pending: bool,
) -> Result<i32, Failure> {
    let params = config.source.connect_params()?;
    let current = crate::guard::current_identity(&params).await?;
    let adopted = crate::guard::adopt(client, &current, discard_pending)
        .await
        .map_err(|e| Failure {
            class: ErrorClass::Transient,
            message: format!("adopting this database failed: {e}"),
        })?;
    match adopted.previous {
        Some(prev) if prev != current => println!("adopted: {current} (was recorded as {prev})"),
        Some(_) => println!("nothing to adopt: walhook.state already records {current}"),
        None => println!("recorded {current} in walhook.state"),
    }
    if discard_pending {
        println!(
            "moved {} pending notification(s) to walhook.failed",
            adopted.discarded
        );
    } else if !config.listeners.is_empty() {
        println!(
            "note: {} listener(s) in {} will now receive events from this database; point them at test receivers or remove them if this is a test copy",
            config.listeners.len(),
            config.path.display()
        );
    }
    Ok(0)
}

impl ConfigArg {
    /// Loads and checks the configuration, including the connection string, without
    /// connecting: everything `check --offline` and the commands that connect both find.
    fn load(&self) -> Result<(Config, crate::replication::conn::ConnectParams), Failure> {
        let config = Config::load(&self.config)?;
        let params = config.source.connect_params()?;
        Ok((config, params))
    }

    /// Loads the configuration and opens an ordinary connection to its source database.
    async fn load_and_connect(&self) -> Result<(Config, tokio_postgres::Client), Failure> {
        let (config, params) = self.load()?;
        let client = crate::service::connect_ordinary(&params).await?;
        Ok((config, client))
    }
}

/// SIGHUP re-reads the configuration file. A file with errors is refused with the errors
/// logged on one line, and the running configuration stays.
fn spawn_reload_handler(
    path: PathBuf,
    reloads: tokio::sync::watch::Sender<std::sync::Arc<Config>>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot install the SIGHUP handler; configuration reload is off");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {}
                _ = shutdown.cancelled() => return,
            }
            let notifier = crate::systemd::Notifier::from_env();
            if let Some(n) = &notifier {
                n.reloading();
            }
            // The same validator as `walhook check` and start: a file it refuses changes
            // nothing, and the refusal is one line (problems separated by " | ").
            match Config::load(&path) {
                Ok(config) => {
                    if reloads.borrow().admin != config.admin {
                        tracing::warn!(
                            "SIGHUP: [admin] changes take effect at the next restart; the admin endpoint stays where it is"
                        );
                    }
                    tracing::info!(config = %path.display(), "SIGHUP: configuration reloaded");
                    reloads.send_replace(std::sync::Arc::new(config));
                }
                Err(e) => {
                    let problems: Vec<String> = e.to_string().lines().map(str::to_owned).collect();
                    tracing::error!(
                        "SIGHUP: reload refused, the running configuration stays: {}",
                        problems.join(" | ")
                    );
                }
            }
            if let Some(n) = &notifier {
                n.ready();
            }
        }
    });
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot install signal handlers; stop walhook with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down (a second one exits at once)"),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down (a second one exits at once)"),
        }
        shutdown.cancel();
        // A second signal means "now": nothing in flight is lost (the slot resends what was
        // not confirmed), only the clean end of the stream is skipped.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!(
            "second stop signal: exiting at once; unconfirmed changes are sent again at the next start"
        );
        std::process::exit(EXIT_SECOND_SIGNAL);
    });
}

/// Exit code after a second SIGTERM/SIGINT: 128 + SIGTERM, as a shell reports a killed job.
const EXIT_SECOND_SIGNAL: i32 = 143;
