//! Delivery benchmark: end to end, from a source commit through the release `walhook run`
//! binary to an in-process HTTP receiver on 127.0.0.1 that answers 200 at once.
//!
//! Three scenarios, each on a fresh slot and queue schema:
//! (a) throughput, one listener, unlimited rate: `--events` inserts in 100-row transactions
//!     (a DO block with COMMIT inside), measured from the first commit (the earliest
//!     CloudEvents `time` received) to the last receipt. A second slot created before the
//!     load is drained by pg_recvlogical afterwards over the same WAL range, for the ratio;
//! (b) latency at a steady rate: one single-row transaction every `1/--rate` s on its own
//!     connection for `--latency-secs`; per event, receipt time minus the CloudEvents `time`
//!     (the commit timestamp from the WAL), and receipt time minus `clock_timestamp()` taken
//!     by the INSERT (column `c`, epoch seconds, read from `data.row`);
//! (c) throughput as (a) with `--listeners` listeners, each receiving every event.
//!
//!     cargo bench --bench delivery
//!     cargo bench --bench delivery -- --events 20000 --latency-secs 10
//!     cargo bench --bench delivery -- --db-setting enable_seqscan=off   # planner experiment
//!
//! Prints a Markdown table with the figures and walhook's peak RSS and CPU.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use common::{
    DB, Walhook, cpu_secs, create_bench_database, psql, recvlogical_drain, reset_database,
    vm_hwm_kb,
};
use walhook::cluster::LocalCluster;

/// Rows per transaction in the throughput load.
const TX_ROWS: u64 = 100;
/// Give up when nothing new arrives for this long.
const STALL: Duration = Duration::from_secs(60);

struct Args {
    events: u64,
    latency_secs: u64,
    rate: u64,
    listeners: usize,
    concurrency: Option<u32>,
    /// `ALTER DATABASE … SET name = value` before walhook starts (planner experiments).
    db_settings: Vec<(String, String)>,
}

fn parse_args() -> Args {
    let mut args = Args {
        events: 100_000,
        latency_secs: 20,
        rate: 500,
        listeners: 4,
        concurrency: None,
        db_settings: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match a.as_str() {
            "--events" => args.events = num("--events").max(TX_ROWS) / TX_ROWS * TX_ROWS,
            "--latency-secs" => args.latency_secs = num("--latency-secs"),
            "--rate" => args.rate = num("--rate").max(1),
            "--listeners" => args.listeners = num("--listeners").max(1) as usize,
            "--concurrency" => args.concurrency = Some(num("--concurrency") as u32),
            "--db-setting" => {
                let v = it.next().unwrap_or_default();
                let (name, value) = v
                    .split_once('=')
                    .unwrap_or_else(|| panic!("--db-setting takes NAME=VALUE, not {v:?}"));
                args.db_settings.push((name.to_owned(), value.to_owned()));
            }
            // cargo bench passes --bench; ignore anything else.
            _ => {}
        }
    }
    args
}

// ---------------------------------------------------------------------------------------
// The receiver.

/// What one listener's endpoint has seen since the last reset.
#[derive(Default)]
struct ListenerStats {
    requests: u64,
    ids: HashSet<uuid::Uuid>,
    /// Earliest CloudEvents `time` (commit time), epoch seconds.
    first_commit: Option<f64>,
    /// Latest receipt, epoch seconds.
    last_receipt: Option<f64>,
    /// Receipt − commit time (ms), first receipt of each event.
    commit_latency_ms: Vec<f64>,
    /// Receipt − `clock_timestamp()` of the INSERT (ms), first receipt of each event.
    insert_latency_ms: Vec<f64>,
    bad: u64,
}

#[derive(Default)]
struct Receiver {
    listeners: Mutex<Vec<ListenerStats>>,
}

impl Receiver {
    fn reset(&self, listeners: usize) {
        let mut l = self.listeners.lock().unwrap();
        l.clear();
        l.resize_with(listeners, ListenerStats::default);
    }

    fn unique(&self) -> Vec<u64> {
        let l = self.listeners.lock().unwrap();
        l.iter().map(|s| s.ids.len() as u64).collect()
    }
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

async fn hook(
    State(rx): State<Arc<Receiver>>,
    Path(listener): Path<usize>,
    body: Bytes,
) -> StatusCode {
    let now = epoch_secs(SystemTime::now());
    let parsed: Option<(uuid::Uuid, f64, Option<f64>)> = (|| {
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let id = v.get("id")?.as_str()?.parse().ok()?;
        let time = parse_rfc3339(v.get("time")?.as_str()?)?;
        let inserted = v.pointer("/data/row/c").and_then(|c| c.as_f64());
        Some((id, time, inserted))
    })();
    let mut all = rx.listeners.lock().unwrap();
    let Some(stats) = all.get_mut(listener) else {
        return StatusCode::OK;
    };
    stats.requests += 1;
    let Some((id, time, inserted)) = parsed else {
        stats.bad += 1;
        return StatusCode::OK;
    };
    if stats.ids.insert(id) {
        stats.first_commit = Some(stats.first_commit.map_or(time, |f| f.min(time)));
        stats.commit_latency_ms.push((now - time) * 1000.0);
        if let Some(at) = inserted {
            stats.insert_latency_ms.push((now - at) * 1000.0);
        }
    }
    stats.last_receipt = Some(stats.last_receipt.map_or(now, |l| l.max(now)));
    StatusCode::OK
}

/// `2024-05-01T12:34:56.123456Z` as epoch seconds.
fn parse_rfc3339(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let min: i64 = t.next()?.parse().ok()?;
    let sec: f64 = t.next()?.parse().ok()?;
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

// ---------------------------------------------------------------------------------------
// walhook as a child process.

fn start_walhook(
    cluster: &LocalCluster,
    receiver_port: u16,
    listeners: usize,
    concurrency: Option<u32>,
) -> Walhook {
    let mut text = format!(
        "[source]\nurl = \"{}\"\nslot = \"walhook\"\npublication = \"walhook\"\nheartbeat = \"off\"\n\n\
         [queue]\nbatch_delay = \"0ms\"\n\n\
         [[entity]]\nname = \"Bench\"\ntable = \"bench\"\n",
        cluster.url(DB)
    );
    for i in 0..listeners {
        text.push_str(&format!(
            "\n[[listener]]\nname = \"l{i}\"\nurl = \"http://127.0.0.1:{receiver_port}/hook/{i}\"\n"
        ));
        if let Some(c) = concurrency {
            text.push_str(&format!("concurrency = {c}\n"));
        }
    }
    Walhook::start(&text)
}

/// Inserts marker rows until every listener has received one: walhook has created its
/// slot, mirrored its listeners and delivers.
fn warm_up(cluster: &LocalCluster, receiver: &Receiver, walhook: &mut Walhook, listeners: usize) {
    receiver.reset(listeners);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut marker = 0;
    loop {
        if receiver.unique().iter().all(|&n| n > 0) {
            break;
        }
        walhook.assert_running("during start-up");
        assert!(
            Instant::now() < deadline,
            "walhook delivered nothing in 90 s"
        );
        marker += 1;
        psql(
            cluster,
            &format!("INSERT INTO bench VALUES (-{marker}, 0, 'warm-up', 0, now(), true)"),
        );
        let next = Instant::now() + Duration::from_millis(500);
        while Instant::now() < next && !receiver.unique().iter().all(|&n| n > 0) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // Let stragglers (later markers) arrive before counting starts.
    std::thread::sleep(Duration::from_millis(700));
    receiver.reset(listeners);
}

/// Waits until every listener has `expected` distinct events; panics on a stall.
fn wait_for_all(receiver: &Receiver, walhook: &mut Walhook, expected: u64) {
    let mut last = Vec::new();
    let mut last_change = Instant::now();
    loop {
        let now = receiver.unique();
        if now.iter().all(|&n| n >= expected) {
            return;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        walhook.assert_running("during the run");
        assert!(
            last_change.elapsed() < STALL,
            "no progress for {STALL:?}: received {last:?} of {expected} per listener"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios.

struct Usage {
    peak_rss_mb: u64,
    cpu_percent: f64,
}

struct Throughput {
    listeners: usize,
    events: u64,
    load_secs: f64,
    /// Per listener: events/s from the first commit to its last receipt.
    per_listener: Vec<f64>,
    /// All requests (including any duplicates) over the whole span.
    requests_per_sec: f64,
    duplicates: u64,
    drain_per_sec: Option<f64>,
    usage: Usage,
    exit_code: Option<i32>,
}

struct Latency {
    target_rate: u64,
    achieved_rate: f64,
    events: u64,
    commit_p50: f64,
    commit_p99: f64,
    commit_max: f64,
    insert_p50: f64,
    insert_p99: f64,
    usage: Usage,
    exit_code: Option<i32>,
}

fn throughput(
    cluster: &LocalCluster,
    receiver: &Receiver,
    port: u16,
    args: &Args,
    listeners: usize,
    with_drain: bool,
) -> Throughput {
    eprintln!(
        "== throughput: {} events, {listeners} listener(s)",
        args.events
    );
    reset_database(cluster);
    let mut walhook = start_walhook(cluster, port, listeners, args.concurrency);
    warm_up(cluster, receiver, &mut walhook, listeners);
    if with_drain {
        psql(
            cluster,
            "SELECT pg_create_logical_replication_slot('drain', 'pgoutput')",
        );
    }
    let cpu_before = cpu_secs(walhook.pid());
    let load = format!(
        "DO $$ BEGIN
           FOR t IN 0..{txs} - 1 LOOP
             INSERT INTO bench SELECT g, g, 'row ' || g, g * 1.5, now(), g % 2 = 0
               FROM generate_series(t * {TX_ROWS} + 1, t * {TX_ROWS} + {TX_ROWS}) g;
             COMMIT;
           END LOOP;
         END $$;",
        txs = args.events / TX_ROWS
    );
    let t = Instant::now();
    psql(cluster, &load);
    let load_secs = t.elapsed().as_secs_f64();
    let end_lsn = psql(cluster, "SELECT pg_current_wal_lsn()");
    eprintln!("   loaded in {load_secs:.2}s, WAL end {end_lsn}");
    wait_for_all(receiver, &mut walhook, args.events);
    let cpu = cpu_secs(walhook.pid()) - cpu_before;
    let peak_rss_mb = vm_hwm_kb(walhook.pid()) / 1024;

    let (per_listener, requests_per_sec, duplicates, span) = {
        let stats = receiver.listeners.lock().unwrap();
        let first = stats
            .iter()
            .filter_map(|s| s.first_commit)
            .fold(f64::INFINITY, f64::min);
        let last = stats
            .iter()
            .filter_map(|s| s.last_receipt)
            .fold(0.0, f64::max);
        let per: Vec<f64> = stats
            .iter()
            .map(|s| s.ids.len() as f64 / (s.last_receipt.unwrap_or(last) - first))
            .collect();
        let requests: u64 = stats.iter().map(|s| s.requests).sum();
        let unique: u64 = stats.iter().map(|s| s.ids.len() as u64).sum();
        let bad: u64 = stats.iter().map(|s| s.bad).sum();
        assert_eq!(bad, 0, "the receiver could not read {bad} payloads");
        (
            per,
            requests as f64 / (last - first),
            requests - unique,
            last - first,
        )
    };
    eprintln!(
        "   delivered in {span:.2}s from the first commit: {:?} events/s per listener",
        per_listener.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    let exit_code = walhook.stop();

    let drain_per_sec = with_drain.then(|| {
        let secs = recvlogical_drain(cluster, &end_lsn);
        eprintln!("   pg_recvlogical drained the same range in {secs:.2}s");
        args.events as f64 / secs
    });
    Throughput {
        listeners,
        events: args.events,
        load_secs,
        per_listener,
        requests_per_sec,
        duplicates,
        drain_per_sec,
        usage: Usage {
            peak_rss_mb,
            cpu_percent: 100.0 * cpu / span,
        },
        exit_code,
    }
}

fn latency(
    cluster: &LocalCluster,
    receiver: &Receiver,
    rt: &tokio::runtime::Runtime,
    port: u16,
    args: &Args,
) -> Latency {
    eprintln!(
        "== latency: {} events/s for {} s, one listener",
        args.rate, args.latency_secs
    );
    reset_database(cluster);
    let mut walhook = start_walhook(cluster, port, 1, args.concurrency);
    warm_up(cluster, receiver, &mut walhook, 1);
    let cpu_before = cpu_secs(walhook.pid());
    let url = cluster.url(DB);
    let rate = args.rate;
    let total = rate * args.latency_secs;
    let t = Instant::now();
    let sent = rt
        .block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let insert = client
                .prepare(
                    "INSERT INTO bench VALUES ($1, $1, 'latency', \
                     extract(epoch FROM clock_timestamp())::float8, now(), true)",
                )
                .await?;
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            // Burst keeps the average rate when one commit takes longer than the period.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 1..=total as i32 {
                tick.tick().await;
                // Autocommit: each INSERT is its own single-row transaction.
                client.execute(&insert, &[&i]).await?;
            }
            Ok::<u64, tokio_postgres::Error>(total)
        })
        .expect("latency load");
    let load_secs = t.elapsed().as_secs_f64();
    wait_for_all(receiver, &mut walhook, sent);
    let cpu = cpu_secs(walhook.pid()) - cpu_before;
    let span = t.elapsed().as_secs_f64();
    let peak_rss_mb = vm_hwm_kb(walhook.pid()) / 1024;
    let exit_code = walhook.stop();
    let (mut commit, mut insert) = {
        let mut stats = receiver.listeners.lock().unwrap();
        let s = stats.get_mut(0).expect("one listener");
        (
            std::mem::take(&mut s.commit_latency_ms),
            std::mem::take(&mut s.insert_latency_ms),
        )
    };
    commit.sort_by(f64::total_cmp);
    insert.sort_by(f64::total_cmp);
    Latency {
        target_rate: rate,
        achieved_rate: sent as f64 / load_secs,
        events: sent,
        commit_p50: percentile(&commit, 0.50),
        commit_p99: percentile(&commit, 0.99),
        commit_max: commit.last().copied().unwrap_or(f64::NAN),
        insert_p50: percentile(&insert, 0.50),
        insert_p99: percentile(&insert, 0.99),
        usage: Usage {
            peak_rss_mb,
            cpu_percent: 100.0 * cpu / span,
        },
        exit_code,
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let receiver = Arc::new(Receiver::default());
    let app = Router::new()
        .route("/hook/{listener}", post(hook))
        .with_state(receiver.clone());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind receiver");
    let port = listener.local_addr().expect("receiver address").port();
    rt.spawn(async move { axum::serve(listener, app).await });

    let cluster = LocalCluster::start().expect("start cluster");
    create_bench_database(&cluster);
    for (name, value) in &args.db_settings {
        // Applies to every later session, walhook's included.
        eprintln!("== ALTER DATABASE {DB} SET {name} = {value}");
        psql(
            &cluster,
            &format!("ALTER DATABASE {DB} SET {name} = '{value}'"),
        );
    }

    let one = throughput(&cluster, &receiver, port, &args, 1, true);
    let lat = (args.latency_secs > 0).then(|| latency(&cluster, &receiver, &rt, port, &args));
    let many = (args.listeners > 1)
        .then(|| throughput(&cluster, &receiver, port, &args, args.listeners, false));

    println!();
    println!("| scenario | figure | walhook peak RSS | walhook CPU (% of one core) |");
    println!("| --- | --- | ---: | ---: |");
    let rate = one.per_listener.first().copied().unwrap_or(f64::NAN);
    let ratio = one
        .drain_per_sec
        .map(|d| format!("{:.3}", rate / d))
        .unwrap_or_default();
    println!(
        "| (a) 1 listener, {} events in {}-row transactions (load took {:.2} s) | **{:.0} events/s** delivered; pg_recvlogical drain {:.0} changes/s; ratio {} | {} MB | {:.0}% |",
        one.events,
        TX_ROWS,
        one.load_secs,
        rate,
        one.drain_per_sec.unwrap_or(f64::NAN),
        ratio,
        one.usage.peak_rss_mb,
        one.usage.cpu_percent
    );
    if let Some(l) = &lat {
        println!(
            "| (b) {} single-row commits/s (achieved {:.0}/s), {} events | commit→receipt **p50 {:.1} ms, p99 {:.1} ms** (max {:.1}); INSERT clock_timestamp()→receipt p50 {:.1} ms, p99 {:.1} ms | {} MB | {:.0}% |",
            l.target_rate,
            l.achieved_rate,
            l.events,
            l.commit_p50,
            l.commit_p99,
            l.commit_max,
            l.insert_p50,
            l.insert_p99,
            l.usage.peak_rss_mb,
            l.usage.cpu_percent
        );
    }
    if let Some(m) = &many {
        let per = m
            .per_listener
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" / ");
        println!(
            "| (c) {} listeners, {} events each (load took {:.2} s) | **{} events/s** per listener; {:.0} requests/s in total | {} MB | {:.0}% |",
            m.listeners,
            m.events,
            m.load_secs,
            per,
            m.requests_per_sec,
            m.usage.peak_rss_mb,
            m.usage.cpu_percent
        );
    }
    println!();
    let dups = one.duplicates + many.as_ref().map_or(0, |m| m.duplicates);
    println!("duplicate deliveries: {dups}");
    let codes: Vec<String> = [Some(one.exit_code), lat.as_ref().map(|l| l.exit_code)]
        .into_iter()
        .chain([many.as_ref().map(|m| m.exit_code)])
        .flatten()
        .map(|c| c.map_or("killed".to_owned(), |c| c.to_string()))
        .collect();
    println!("walhook exit codes after SIGTERM: {}", codes.join(", "));
}
