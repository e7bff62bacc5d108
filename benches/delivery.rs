//! Delivery benchmark: the release `walhook run` binary delivering to an in-process HTTP
//! receiver on 127.0.0.1 that answers 200 at once (one event per POST).
//!
//! Scenarios, each on a fresh slot and queue schema:
//! * drain: a backlog of `--drain` notifications (default 10k, 100k and 1M) for one
//!   listener, made in the queue tables before walhook starts (as the writer makes them
//!   while a listener is away; then VACUUM ANALYZE, as autovacuum would have run
//!   meanwhile). events/s from the first receipt to the last; the sizes of `walhook.new`
//!   and its indexes before, at the largest during, right after and once autovacuum has
//!   run; for the largest backlog, pruning the delivered rows from `walhook.processed`.
//! * fan: `--listeners` listeners (default 4) with a backlog of `--fan` (default 100k) each:
//!   requests/s in total and per listener (fairness: the slowest against the mean);
//! * latency: the default configuration (then `batch_delay = "0ms"` as the floor), one
//!   single-row transaction every `1/--rate` s
//!   (default 500/s) on its own connection for `--latency-secs` (default 60); per event,
//!   receipt time minus the CloudEvents `time` (the commit timestamp from the WAL), and
//!   minus `clock_timestamp()` taken by the INSERT (column `c`, read from `data.row`);
//! * large: a backlog of `--large` events (default 300) whose rows are 1 MB of text that
//!   does not compress, then as many that compress to ~1%, for one listener: walhook's peak
//!   RSS (VmHWM);
//! * live (`--live N`, default off): N inserts in 100-row transactions while walhook runs,
//!   capture and delivery together, against pg_recvlogical's drain of the same WAL.
//!
//! ```text
//! cargo bench --bench delivery
//! cargo bench --bench delivery -- --drain 10000,100000 --fan 0 --latency-secs 10 --large 0
//! cargo bench --bench delivery -- --drain 100000 --fan 0 --latency-secs 0 --large 0 --rates-only
//! ```
//!
//! `--rates-only` skips the wait for autovacuum and walhook's index rebuild after each drain
//! (their sizes show as `–`), for comparing builds run after run.
//!
//! Prints Markdown tables.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::receiver::{self, Receiver, epoch_secs};
use common::{
    DB, Walhook, cpu_secs, create_bench_database, load_sql, make_backlog, mb, migrate_queue, psql,
    recvlogical_drain, reset_database, table_size, vm_hwm_kb,
};
use walhook::cluster::LocalCluster;

/// Rows per transaction in the live load.
const TX_ROWS: u64 = 100;
/// `--rates-only`: table health after a drain is not measured.
static RATES_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Give up when nothing new arrives for this long.
const STALL: Duration = Duration::from_secs(90);

struct Args {
    drain: Vec<u64>,
    fan: u64,
    listeners: usize,
    latency_secs: u64,
    rate: u64,
    large: u64,
    live: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        drain: vec![10_000, 100_000, 1_000_000],
        fan: 100_000,
        listeners: 4,
        latency_secs: 60,
        rate: 500,
        large: 300,
        live: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value =
            |name: &str| -> String { it.next().unwrap_or_else(|| panic!("{name} takes a value")) };
        let num = |name: &str, v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}"))
        };
        match a.as_str() {
            "--drain" => {
                let v = value("--drain");
                args.drain = v
                    .split(',')
                    .map(|n| num("--drain", n.to_owned()))
                    .filter(|&n| n > 0)
                    .collect();
            }
            "--fan" => args.fan = num("--fan", value("--fan")),
            "--listeners" => {
                args.listeners = num("--listeners", value("--listeners")).max(1) as usize
            }
            "--latency-secs" => args.latency_secs = num("--latency-secs", value("--latency-secs")),
            "--rate" => args.rate = num("--rate", value("--rate")).max(1),
            "--large" => args.large = num("--large", value("--large")),
            // Only the rates: skip waiting for autovacuum and the index rebuild after each
            // drain (for comparing builds run after run).
            "--rates-only" => RATES_ONLY.store(true, std::sync::atomic::Ordering::Relaxed),
            "--live" => args.live = num("--live", value("--live")) / TX_ROWS * TX_ROWS,
            // cargo bench passes --bench; ignore anything else.
            _ => {}
        }
    }
    args
}

/// The config: default settings but for the heartbeat (no writes of its own during runs).
fn start_walhook(cluster: &LocalCluster, port: u16, listeners: usize, queue: &str) -> Walhook {
    let mut text = format!(
        "[source]\nurl = \"{}\"\nslot = \"walhook\"\npublication = \"walhook\"\nheartbeat = \"off\"\n\n\
         {queue}\n\n[[entity]]\nname = \"Bench\"\ntable = \"bench\"\n",
        cluster.url(DB)
    );
    for i in 0..listeners {
        text.push_str(&format!(
            "\n[[listener]]\nname = \"l{i}\"\nurl = \"http://127.0.0.1:{port}/hook/{i}\"\n"
        ));
    }
    Walhook::start(&text)
}

fn listener_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("l{i}")).collect()
}

/// Waits until every listener has `expected` distinct events, calling `sample` about once a
/// second; panics on a stall.
fn wait_for_all(
    receiver: &Receiver,
    walhook: &mut Walhook,
    expected: u64,
    mut sample: impl FnMut(),
) {
    let mut last = Vec::new();
    let mut last_change = Instant::now();
    let mut next_sample = Instant::now();
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
        if Instant::now() >= next_sample {
            sample();
            next_sample = Instant::now() + Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Per listener: (delivered, first receipt, last receipt); all requests; duplicates.
fn receipts(receiver: &Receiver) -> (Vec<(u64, f64, f64)>, u64, u64) {
    let stats = receiver.listeners.lock().unwrap();
    let bad: u64 = stats.iter().map(|s| s.bad).sum();
    assert_eq!(bad, 0, "the receiver could not read {bad} payloads");
    let per = stats
        .iter()
        .map(|s| {
            (
                s.ids.len() as u64,
                s.first_receipt.unwrap_or(f64::NAN),
                s.last_receipt.unwrap_or(f64::NAN),
            )
        })
        .collect();
    let requests: u64 = stats.iter().map(|s| s.requests).sum();
    let unique: u64 = stats.iter().map(|s| s.ids.len() as u64).sum();
    (per, requests, requests - unique)
}

// ---------------------------------------------------------------------------------------
// Backlog drains.

#[derive(Clone, Copy, Default)]
struct Sizes {
    heap: u64,
    indexes: u64,
}

impl Sizes {
    fn of(cluster: &LocalCluster, table: &str) -> Sizes {
        let (heap, indexes) = table_size(cluster, table);
        Sizes { heap, indexes }
    }

    fn max(self, o: Sizes) -> Sizes {
        Sizes {
            heap: self.heap.max(o.heap),
            indexes: self.indexes.max(o.indexes),
        }
    }

    fn show(self) -> String {
        format!("{} + {}", mb(self.heap), mb(self.indexes))
    }
}

struct Drain {
    listeners: usize,
    backlog: u64,
    /// Per listener events/s from its first to its last receipt.
    per_listener: Vec<f64>,
    /// All requests from the first receipt to the last.
    total_per_sec: f64,
    duplicates: u64,
    start_to_first: f64,
    new_before: Sizes,
    new_during: Sizes,
    new_after: Sizes,
    new_vacuumed: Option<Sizes>,
    /// Once walhook rebuilt the indexes (when they were large enough for it to).
    new_rebuilt: Option<Sizes>,
    processed_after: Sizes,
    peak_rss_mb: u64,
    cpu_percent: f64,
    exit_code: Option<i32>,
}

fn drain(
    cluster: &LocalCluster,
    receiver: &Receiver,
    port: u16,
    backlog: u64,
    listeners: usize,
    row_sql: Option<&str>,
) -> Drain {
    eprintln!("== drain: {backlog} notifications for each of {listeners} listener(s)");
    reset_database(cluster);
    migrate_queue(cluster);
    let t = Instant::now();
    make_backlog(cluster, backlog, &listener_names(listeners), row_sql);
    eprintln!("   backlog made in {:.1}s", t.elapsed().as_secs_f64());
    let new_before = Sizes::of(cluster, "walhook.new");
    receiver.reset(listeners);
    let started = epoch_secs(SystemTime::now());
    let mut walhook = start_walhook(cluster, port, listeners, "");
    let pid = walhook.pid();
    let mut new_during = new_before;
    let mut peak_kb = 0;
    wait_for_all(receiver, &mut walhook, backlog, || {
        new_during = new_during.max(Sizes::of(cluster, "walhook.new"));
        peak_kb = peak_kb.max(vm_hwm_kb(pid));
    });
    let cpu = cpu_secs(pid);
    peak_kb = peak_kb.max(vm_hwm_kb(pid));
    let (per, requests, duplicates) = receipts(receiver);
    let first = per.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let last = per.iter().map(|p| p.2).fold(0.0, f64::max);
    let per_listener: Vec<f64> = per.iter().map(|(n, f, l)| *n as f64 / (l - f)).collect();
    eprintln!(
        "   delivered in {:.1}s: {:?} events/s",
        last - first,
        per_listener.iter().map(|r| r.round()).collect::<Vec<_>>()
    );
    // Let the last outcomes be recorded before measuring.
    wait_until(Duration::from_secs(30), || {
        psql(cluster, "SELECT count(*) FROM walhook.new") == "0"
    });
    let new_after = Sizes::of(cluster, "walhook.new");
    let processed_after = Sizes::of(cluster, "walhook.processed");
    // Autovacuum (threshold 1000 dead rows on walhook.new) runs within its naptime (1 min).
    let rates_only = RATES_ONLY.load(std::sync::atomic::Ordering::Relaxed);
    let vacuumed = !rates_only
        && wait_until(Duration::from_secs(90), || {
            psql(
            cluster,
            "SELECT n_dead_tup = 0 AND coalesce(last_autovacuum, 'epoch') > now() - interval '5 min'
             FROM pg_stat_user_tables WHERE relid = 'walhook.new'::regclass",
        ) == "t"
        });
    let new_vacuumed = vacuumed.then(|| Sizes::of(cluster, "walhook.new"));
    // walhook rebuilds indexes over COMPACT_MIN_INDEX_BYTES that the rows left do not need,
    // at its next retention run (every minute).
    let new_rebuilt = new_vacuumed
        .filter(|v| v.indexes > walhook::queue::COMPACT_MIN_INDEX_BYTES as u64)
        .and_then(|v| {
            wait_until(Duration::from_secs(150), || {
                Sizes::of(cluster, "walhook.new").indexes < v.indexes / 4
            })
            .then(|| Sizes::of(cluster, "walhook.new"))
        });
    let exit_code = walhook.stop();
    Drain {
        listeners,
        backlog,
        per_listener,
        total_per_sec: requests as f64 / (last - first),
        duplicates,
        start_to_first: first - started,
        new_before,
        new_during,
        new_after,
        new_vacuumed,
        new_rebuilt,
        processed_after,
        peak_rss_mb: peak_kb / 1024,
        cpu_percent: 100.0 * cpu / (last - started),
        exit_code,
    }
}

/// Polls `check` every 200 ms until it holds or `within` passes; whether it held.
fn wait_until(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Prunes every row of `walhook.processed` with the retention statement, batch by batch;
/// (rows, seconds, slowest batch in ms).
fn prune_all(cluster: &LocalCluster, rt: &tokio::runtime::Runtime) -> (u64, f64, f64) {
    let url = cluster.url(DB);
    rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let statement = client
            .prepare(walhook::queue::statements::PRUNE_PROCESSED)
            .await
            .expect("prepare");
        let cutoff = SystemTime::now() + Duration::from_secs(1);
        let batch = walhook::queue::PRUNE_BATCH;
        let (mut rows, mut slowest) = (0u64, 0f64);
        let t = Instant::now();
        loop {
            let b = Instant::now();
            let n = client
                .execute(&statement, &[&cutoff, &batch])
                .await
                .expect("prune");
            slowest = slowest.max(b.elapsed().as_secs_f64() * 1000.0);
            rows += n;
            if n < batch as u64 {
                break;
            }
        }
        (rows, t.elapsed().as_secs_f64(), slowest)
    })
}

// ---------------------------------------------------------------------------------------
// Latency and live throughput.

struct Latency {
    achieved_rate: f64,
    events: u64,
    commit: [f64; 3],
    insert: [f64; 2],
    peak_rss_mb: u64,
    cpu_percent: f64,
    exit_code: Option<i32>,
}

fn latency(
    cluster: &LocalCluster,
    receiver: &Receiver,
    rt: &tokio::runtime::Runtime,
    port: u16,
    args: &Args,
    queue: &str,
) -> Latency {
    eprintln!(
        "== latency: {} events/s for {} s, one listener, {}",
        args.rate,
        args.latency_secs,
        if queue.is_empty() {
            "default configuration"
        } else {
            queue
        }
    );
    reset_database(cluster);
    let mut walhook = start_walhook(cluster, port, 1, queue);
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
    wait_for_all(receiver, &mut walhook, sent, || {});
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
        achieved_rate: sent as f64 / load_secs,
        events: sent,
        commit: [
            percentile(&commit, 0.50),
            percentile(&commit, 0.99),
            commit.last().copied().unwrap_or(f64::NAN),
        ],
        insert: [percentile(&insert, 0.50), percentile(&insert, 0.99)],
        peak_rss_mb,
        cpu_percent: 100.0 * cpu / span,
        exit_code,
    }
}

/// Inserts marker rows until every listener has received one: walhook has created its
/// slot, mirrored its listeners and delivers.
fn warm_up(cluster: &LocalCluster, receiver: &Receiver, walhook: &mut Walhook, listeners: usize) {
    receiver.reset(listeners);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut marker = 0;
    while !receiver.unique().iter().all(|&n| n > 0) {
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

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Capture and delivery together: (events/s from the first commit, pg_recvlogical's
/// drain/s of the same WAL, peak RSS MB).
fn live(cluster: &LocalCluster, receiver: &Receiver, port: u16, events: u64) -> (f64, f64, u64) {
    eprintln!("== live: {events} inserts in {TX_ROWS}-row transactions, one listener");
    reset_database(cluster);
    let mut walhook = start_walhook(cluster, port, 1, "");
    warm_up(cluster, receiver, &mut walhook, 1);
    psql(
        cluster,
        "SELECT pg_create_logical_replication_slot('drain', 'pgoutput')",
    );
    psql(cluster, &load_sql(events, TX_ROWS));
    let end_lsn = psql(cluster, "SELECT pg_current_wal_lsn()");
    wait_for_all(receiver, &mut walhook, events, || {});
    let peak = vm_hwm_kb(walhook.pid()) / 1024;
    let rate = {
        let stats = receiver.listeners.lock().unwrap();
        let s = &stats[0];
        s.ids.len() as f64 / (s.last_receipt.unwrap_or(0.0) - s.first_commit.unwrap_or(0.0))
    };
    walhook.stop();
    let secs = recvlogical_drain(cluster, &end_lsn);
    (rate, events as f64 / secs, peak)
}

// ---------------------------------------------------------------------------------------

/// 1 MB of text per row that pglz cannot shrink (md5 hex of a counter), or that it shrinks
/// to ~1% (one repeated character).
const LARGE_ROWS: [(&str, &str); 2] = [
    (
        "1 MB rows, incompressible",
        "jsonb_build_object('id', g, 'blob', (SELECT string_agg(md5(g::text || ':' || i::text), '') FROM generate_series(1, 32768) i))",
    ),
    (
        "1 MB rows, compressible",
        "jsonb_build_object('id', g, 'blob', repeat('x', 1048576))",
    ),
];

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (receiver, port) = receiver::start(&rt);
    let cluster = LocalCluster::start().expect("start cluster");
    create_bench_database(&cluster);

    let mut drains = Vec::new();
    for &n in &args.drain {
        drains.push(drain(&cluster, &receiver, port, n, 1, None));
    }
    // The last drain left its delivered rows in walhook.processed.
    let prune = (!drains.is_empty()).then(|| {
        eprintln!("== pruning walhook.processed");
        prune_all(&cluster, &rt)
    });
    let fan =
        (args.fan > 0).then(|| drain(&cluster, &receiver, port, args.fan, args.listeners, None));
    // The default configuration, then without any batching delay as the floor of this
    // machine at the time.
    let lat: Vec<(&str, Latency)> = if args.latency_secs > 0 {
        [
            ("default configuration", ""),
            ("batch_delay = \"0ms\"", "[queue]\nbatch_delay = \"0ms\""),
        ]
        .into_iter()
        .map(|(name, queue)| (name, latency(&cluster, &receiver, &rt, port, &args, queue)))
        .collect()
    } else {
        Vec::new()
    };
    let mut large = Vec::new();
    if args.large > 0 {
        for (name, sql) in LARGE_ROWS {
            large.push((
                name,
                drain(&cluster, &receiver, port, args.large, 1, Some(sql)),
            ));
        }
    }
    let live = (args.live > 0).then(|| live(&cluster, &receiver, port, args.live));

    println!();
    println!(
        "| backlog drain (1 listener) | events/s | start → first receipt | walhook.new before / largest during / after / after autovacuum / after walhook's index rebuild (heap + indexes) | walhook.processed after | walhook peak RSS | CPU (% of a core) |"
    );
    println!("| ---: | ---: | ---: | --- | --- | ---: | ---: |");
    for d in &drains {
        println!(
            "| {} | **{:.0}** | {:.2} s | {} / {} / {} / {} / {} | {} | {} MB | {:.0}% |",
            d.backlog,
            d.per_listener[0],
            d.start_to_first,
            d.new_before.show(),
            d.new_during.show(),
            d.new_after.show(),
            d.new_vacuumed
                .map_or("(not within 90 s)".to_owned(), Sizes::show),
            d.new_rebuilt.map_or("–".to_owned(), Sizes::show),
            d.processed_after.show(),
            d.peak_rss_mb,
            d.cpu_percent
        );
    }
    if let (Some(small), Some(big)) = (drains.first(), drains.last()) {
        println!(
            "\nratio largest / smallest backlog: {:.2}",
            big.per_listener[0] / small.per_listener[0]
        );
    }
    if let Some((rows, secs, slowest)) = prune {
        println!(
            "\npruning walhook.processed: {rows} rows in {secs:.1} s ({:.0} rows/s), batches of {}, slowest batch {slowest:.1} ms",
            rows as f64 / secs,
            walhook::queue::PRUNE_BATCH
        );
    }
    if let Some(f) = &fan {
        let mean = f.per_listener.iter().sum::<f64>() / f.per_listener.len() as f64;
        let min = f.per_listener.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "\n| {} listeners × {} backlog | total requests/s | per listener events/s | slowest / mean | peak RSS |",
            f.listeners, f.backlog
        );
        println!("| --- | ---: | --- | ---: | ---: |");
        println!(
            "| drain | **{:.0}** | {} | **{:.2}** | {} MB |",
            f.total_per_sec,
            f.per_listener
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            min / mean,
            f.peak_rss_mb
        );
    }
    for (name, l) in &lat {
        println!(
            "\nlatency, {name}, {} single-row commits/s (achieved {:.0}/s), {} events: commit→receipt **p50 {:.1} ms, p99 {:.1} ms** (max {:.1}); INSERT clock_timestamp()→receipt p50 {:.1} ms, p99 {:.1} ms; peak RSS {} MB, CPU {:.0}%",
            args.rate,
            l.achieved_rate,
            l.events,
            l.commit[0],
            l.commit[1],
            l.commit[2],
            l.insert[0],
            l.insert[1],
            l.peak_rss_mb,
            l.cpu_percent
        );
    }
    for (name, d) in &large {
        println!(
            "\n{name}: {} events delivered at {:.0}/s, walhook peak RSS (VmHWM) **{} MB**",
            d.backlog, d.per_listener[0], d.peak_rss_mb
        );
    }
    if let Some((rate, drain, peak)) = live {
        println!(
            "\nlive, capture and delivery together: {rate:.0} events/s from the first commit; pg_recvlogical drain {drain:.0}/s; ratio {:.3}; peak RSS {peak} MB",
            rate / drain
        );
    }
    let dups: u64 = drains.iter().chain(&fan).map(|d| d.duplicates).sum();
    println!("\nduplicate deliveries: {dups}");
    let codes: Vec<String> = drains
        .iter()
        .chain(&fan)
        .map(|d| d.exit_code)
        .chain(lat.iter().map(|(_, l)| l.exit_code))
        .map(|c| c.map_or("killed".to_owned(), |c| c.to_string()))
        .collect();
    println!("walhook exit codes after SIGTERM: {}", codes.join(", "));
}
