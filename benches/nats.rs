//! NATS JetStream delivery benchmark: end to end, from source commits through the release
//! `walhook run` binary to a local nats-server with JetStream (file storage), every publish
//! acknowledged by the stream.
//!
//! `--events` inserts in 100-row transactions (a DO block with COMMIT inside) are measured
//! from the start of the load to the moment the stream holds all of them (its message
//! count, polled every 10 ms). A second slot created before the load is drained by
//! pg_recvlogical afterwards over the same WAL range, for the ratio. The stream must hold
//! exactly `--events` messages: a duplicate would show as more.
//!
//! Each run is made with the listener's `position = "cursor"` and then `"queue"`
//! (`--position cursor|queue` for only one), alternately in one session.
//!
//!     cargo bench --bench nats
//!     cargo bench --bench nats -- --events 20000 --concurrency 128 --position cursor
//!
//! `--backlog` measures the delivery stage alone: nats-server is stopped while the load is
//! captured (the listener holds its events in the queue), started again once every event
//! is queued, and the rate is taken from the first message of the load in the stream to
//! the last, with the CPU each process used meanwhile.
//!
//! Needs nats-server (Debian package nats-server) on PATH or in /usr/sbin.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{
    DB, Walhook, cpu_secs, create_bench_database, load_sql, psql, recvlogical_drain,
    reset_database, vm_hwm_kb,
};
use walhook::cluster::LocalCluster;

/// Rows per transaction in the load.
const TX_ROWS: u64 = 100;
/// Give up when the stream grows no more for this long.
const STALL: Duration = Duration::from_secs(60);

struct Args {
    events: u64,
    concurrency: u32,
    runs: u32,
    positions: Vec<&'static str>,
    /// Measure publishing from a queued backlog instead of end to end.
    backlog: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        events: 50_000,
        concurrency: 64,
        runs: 2,
        positions: vec!["cursor", "queue"],
        backlog: false,
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
            "--concurrency" => args.concurrency = num("--concurrency").clamp(1, 1000) as u32,
            "--runs" => args.runs = num("--runs").max(1) as u32,
            "--backlog" => args.backlog = true,
            "--position" => {
                args.positions = match it.next().as_deref() {
                    Some("cursor") => vec!["cursor"],
                    Some("queue") => vec!["queue"],
                    _ => panic!("--position takes cursor or queue"),
                }
            }
            // cargo bench passes --bench; ignore anything else.
            _ => {}
        }
    }
    args
}

/// nats-server with JetStream in a temp dir on a free 127.0.0.1 port; killed on drop.
struct NatsServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Self::spawn(port, dir.path());
        NatsServer { child, port, dir }
    }

    /// Starts nats-server on `port` with its store in `dir`, and waits until it listens.
    fn spawn(port: u16, dir: &std::path::Path) -> Child {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server (install the Debian package nats-server)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    /// Stops the server gracefully (SIGTERM), keeping its store for [`Self::resume`].
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }

    /// Starts the stopped server again on the same port and store.
    fn resume(&mut self) {
        self.child = Self::spawn(self.port, self.dir.path());
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    position: &'static str,
    capture_secs: f64,
    events: u64,
    load_secs: f64,
    secs: f64,
    drain_per_sec: f64,
    stored: u64,
    peak_rss_mb: u64,
    cpu_percent: f64,
    /// CPU seconds per process of the pipeline during the run, largest first.
    cpu: Vec<(String, f64)>,
}

/// A process of the pipeline: walhook, nats-server, or a PostgreSQL backend (labelled with
/// its application name or type, and what it was last doing).
fn pipeline_processes(cluster: &LocalCluster, walhook: u32, nats: u32) -> Vec<(u32, String)> {
    let mut procs = vec![
        (walhook, "walhook".to_owned()),
        (nats, "nats-server".to_owned()),
    ];
    let backends = psql(
        cluster,
        "SELECT pid, coalesce(nullif(application_name, ''), backend_type),
                regexp_replace(left(query, 40), '\\s+', ' ', 'g')
         FROM pg_stat_activity
         WHERE backend_type IN ('client backend', 'walsender') AND pid <> pg_backend_pid()",
    );
    for line in backends.lines() {
        let mut cols = line.splitn(3, '|');
        if let (Some(pid), Some(name), Some(query)) = (cols.next(), cols.next(), cols.next())
            && let Ok(pid) = pid.parse()
        {
            procs.push((pid, format!("backend {name}: {query}")));
        }
    }
    procs
}

/// CPU seconds of each of `procs` now.
fn cpu_now(procs: &[(u32, String)]) -> Vec<f64> {
    procs.iter().map(|(pid, _)| cpu_secs(*pid)).collect()
}

/// What a `--backlog` run measured.
struct BacklogRun {
    position: &'static str,
    events: u64,
    /// From the first message of the load in the stream to the last.
    secs: f64,
    /// Messages already in the stream at the first look after the server was back.
    first: u64,
    drain_per_sec: f64,
    cpu: Vec<(String, f64)>,
}

/// The delivery stage alone, from a backlog of `args.events` queued events (see the
/// module's `--backlog`).
fn run_backlog(
    rt: &tokio::runtime::Runtime,
    cluster: &LocalCluster,
    nats: &mut NatsServer,
    args: &Args,
    position: &'static str,
) -> BacklogRun {
    let (js, mut walhook, base) = prepare(rt, cluster, nats, args, position);
    psql(
        cluster,
        "SELECT pg_create_logical_replication_slot('drain', 'pgoutput')",
    );
    nats.stop();
    psql(cluster, &load_sql(args.events, TX_ROWS));
    let end_lsn = psql(cluster, "SELECT pg_current_wal_lsn()");
    // The load's ids are positive, the warm-up markers' negative.
    let queued = "SELECT count(*) FROM walhook.event WHERE entity_id NOT LIKE '-%'";
    let deadline = Instant::now() + STALL;
    while psql(cluster, queued).parse::<u64>().expect("count") < args.events {
        walhook.assert_running("while capturing the backlog");
        assert!(
            Instant::now() < deadline,
            "the backlog was not queued in {STALL:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nats.resume();
    let procs = pipeline_processes(cluster, walhook.pid(), nats.child.id());
    let before = cpu_now(&procs);
    let resumed = Instant::now();
    let mut first: Option<(Instant, u64)> = None;
    loop {
        // The bench's own client reconnects too: no answer counts as no progress.
        let now = try_stored(rt, &js).map_or(0, |n| n.saturating_sub(base));
        if first.is_none() && now > 0 {
            first = Some((Instant::now(), now));
        }
        if now >= args.events {
            break;
        }
        walhook.assert_running("while publishing the backlog");
        assert!(
            resumed.elapsed() < STALL,
            "{now} of {} published {STALL:?} after nats-server was back",
            args.events
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (began, first) = first.expect("progress before the end");
    let secs = began.elapsed().as_secs_f64();
    let cpu = cpu_used(cluster, (walhook.pid(), nats.child.id()), &procs, &before);
    walhook.stop();
    let drain_secs = recvlogical_drain(cluster, &end_lsn);
    BacklogRun {
        position,
        events: args.events,
        secs,
        first,
        drain_per_sec: args.events as f64 / drain_secs,
        cpu,
    }
}

/// Prints the `--backlog` runs: rates, then the CPU each process used per event.
fn print_backlog(runs: &[BacklogRun]) {
    println!();
    println!("| run | position | backlog | published from it | pg_recvlogical drain | ratio |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for (i, r) in runs.iter().enumerate() {
        let rate = (r.events - r.first) as f64 / r.secs.max(0.001);
        println!(
            "| {} | {} | {} | **{rate:.0} events/s** | {:.0} changes/s | {:.3} |",
            i + 1,
            r.position,
            r.events,
            r.drain_per_sec,
            rate / r.drain_per_sec
        );
    }
    for (i, r) in runs.iter().enumerate() {
        print_cpu(
            &format!("run {} ({}, backlog)", i + 1, r.position),
            &r.cpu,
            r.events,
        );
    }
}

/// The CPU table of one run: seconds and µs per event for each process.
fn print_cpu(title: &str, cpu: &[(String, f64)], events: u64) {
    let total: f64 = cpu.iter().map(|(_, s)| s).sum();
    println!();
    println!(
        "{title}: {total:.1} CPU seconds, {:.1} µs per event",
        total * 1e6 / events as f64
    );
    println!();
    println!("| process | CPU seconds | µs per event |");
    println!("| --- | ---: | ---: |");
    for (label, used) in cpu {
        println!(
            "| {label} | {used:.2} | {:.1} |",
            used * 1e6 / events as f64
        );
    }
}

/// How many messages stream BENCH holds, if the server answers.
fn try_stored(rt: &tokio::runtime::Runtime, js: &jetstream::Context) -> Option<u64> {
    rt.block_on(async {
        let mut stream = js.get_stream("BENCH").await.ok()?;
        Some(stream.info().await.ok()?.state.messages)
    })
}

/// How many messages stream BENCH holds.
fn stored(rt: &tokio::runtime::Runtime, js: &jetstream::Context) -> u64 {
    rt.block_on(async {
        let mut stream = js.get_stream("BENCH").await.expect("stream BENCH");
        stream.info().await.expect("stream info").state.messages
    })
}

/// A fresh queue and stream BENCH, walhook running with one NATS listener `bus` at
/// `position`, and the stream's message count once warm-up markers got through.
fn prepare(
    rt: &tokio::runtime::Runtime,
    cluster: &LocalCluster,
    nats: &NatsServer,
    args: &Args,
    position: &'static str,
) -> (jetstream::Context, Walhook, u64) {
    reset_database(cluster);
    let js = rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = jetstream::new(client);
        let _ = js.delete_stream("BENCH").await;
        js.create_stream(jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["api.event.*".into()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("create stream");
        js
    });
    let toml = format!(
        "[source]\nurl = \"{}\"\nslot = \"walhook\"\npublication = \"walhook\"\nheartbeat = \"off\"\n\n\
         [queue]\nbatch_delay = \"0ms\"\n\n\
         [[entity]]\nname = \"Bench\"\ntable = \"bench\"\n\n\
         [[listener]]\nname = \"bus\"\nurl = \"{}\"\nconcurrency = {}\n\n\
         [listener.nats]\nposition = \"{position}\"\n",
        cluster.url(DB),
        nats.url(),
        args.concurrency
    );
    let mut walhook = Walhook::start(&toml);
    // Warm-up: marker rows until one is in the stream.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut marker = 0;
    while stored(rt, &js) == 0 {
        walhook.assert_running("during start-up");
        assert!(
            Instant::now() < deadline,
            "nothing reached the stream in 90 s"
        );
        marker += 1;
        psql(
            cluster,
            &format!("INSERT INTO bench VALUES (-{marker}, 0, 'warm-up', 0, now(), true)"),
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_millis(700));
    let base = stored(rt, &js);
    (js, walhook, base)
}

/// CPU seconds each of `procs` used since `before`, labelled by what it was doing at the
/// end, largest first.
fn cpu_used(
    cluster: &LocalCluster,
    pids: (u32, u32),
    procs: &[(u32, String)],
    before: &[f64],
) -> Vec<(String, f64)> {
    let after = cpu_now(procs);
    let labels: std::collections::HashMap<u32, String> =
        pipeline_processes(cluster, pids.0, pids.1)
            .into_iter()
            .collect();
    let mut used: Vec<(String, f64)> = procs
        .iter()
        .zip(after.iter().zip(before))
        .map(|((pid, label), (after, before))| {
            let label = labels.get(pid).unwrap_or(label);
            (format!("{label} (pid {pid})"), after - before)
        })
        .filter(|(_, used)| *used > 0.0)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    used
}

fn run(
    rt: &tokio::runtime::Runtime,
    cluster: &LocalCluster,
    nats: &NatsServer,
    args: &Args,
    position: &'static str,
) -> Run {
    let (js, mut walhook, base) = prepare(rt, cluster, nats, args, position);
    psql(
        cluster,
        "SELECT pg_create_logical_replication_slot('drain', 'pgoutput')",
    );
    let cpu_before = cpu_secs(walhook.pid());
    let procs = pipeline_processes(cluster, walhook.pid(), nats.child.id());
    let procs_before = cpu_now(&procs);
    let load = load_sql(args.events, TX_ROWS);
    let load_began: f64 = psql(cluster, "SELECT extract(epoch FROM clock_timestamp())")
        .parse()
        .expect("epoch");
    let t = Instant::now();
    psql(cluster, &load);
    let load_secs = t.elapsed().as_secs_f64();
    let end_lsn = psql(cluster, "SELECT pg_current_wal_lsn()");
    let mut last = base;
    let mut last_change = Instant::now();
    // (seconds since the load began, messages in the stream) at each change.
    let mut timeline = Vec::new();
    loop {
        let now = stored(rt, &js);
        timeline.push((t.elapsed().as_secs_f64(), now - base));
        if now >= base + args.events {
            break;
        }
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        walhook.assert_running("during the run");
        assert!(
            last_change.elapsed() < STALL,
            "no progress for {STALL:?}: {} of {} in the stream",
            now - base,
            args.events
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(walhook.pid()) - cpu_before;
    let per_process = cpu_used(
        cluster,
        (walhook.pid(), nats.child.id()),
        &procs,
        &procs_before,
    );
    // When the last event was queued (its writer's transaction began): capture's share.
    let captured: f64 = psql(
        cluster,
        "SELECT extract(epoch FROM max(queued_at)) FROM walhook.event",
    )
    .parse()
    .expect("epoch");
    let capture_secs = (captured - load_began).max(0.001);
    let peak_rss_mb = vm_hwm_kb(walhook.pid()) / 1024;
    // Anything published twice would arrive a little later: look again after a pause.
    std::thread::sleep(Duration::from_millis(500));
    let stored_now = stored(rt, &js) - base;
    walhook.stop();
    let drain_secs = recvlogical_drain(cluster, &end_lsn);
    eprintln!(
        "   {} events in the stream {secs:.2}s after the load began (load {load_secs:.2}s); pg_recvlogical drained in {drain_secs:.2}s",
        args.events
    );
    // How delivery kept up: what the stream held when capture's last batch began, and the
    // rate of the rest, when delivery had the machine to itself.
    let at_capture = timeline
        .iter()
        .take_while(|(s, _)| *s <= capture_secs)
        .last()
        .map_or(0, |&(_, n)| n);
    eprintln!(
        "   when the last event was queued ({capture_secs:.2}s): {at_capture} in the stream ({:.0}/s); the other {} took {:.2}s ({:.0}/s)",
        at_capture as f64 / capture_secs,
        args.events - at_capture,
        secs - capture_secs,
        (args.events - at_capture) as f64 / (secs - capture_secs).max(0.001)
    );
    Run {
        position,
        capture_secs,
        events: args.events,
        load_secs,
        secs,
        drain_per_sec: args.events as f64 / drain_secs,
        stored: stored_now,
        peak_rss_mb,
        cpu_percent: 100.0 * cpu / secs,
        cpu: per_process,
    }
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut nats = NatsServer::start();
    let cluster = LocalCluster::start().expect("start cluster");
    create_bench_database(&cluster);
    if args.backlog {
        let mut runs = Vec::new();
        for i in 0..args.runs {
            for &position in &args.positions {
                eprintln!(
                    "== run {}: a backlog of {} events, concurrency {}, position {position}",
                    i + 1,
                    args.events,
                    args.concurrency
                );
                runs.push(run_backlog(&rt, &cluster, &mut nats, &args, position));
            }
        }
        print_backlog(&runs);
        return;
    }
    let mut runs = Vec::new();
    for i in 0..args.runs {
        for &position in &args.positions {
            eprintln!(
                "== run {}: {} events, concurrency {}, position {position}",
                i + 1,
                args.events,
                args.concurrency
            );
            runs.push(run(&rt, &cluster, &nats, &args, position));
        }
    }
    println!();
    println!(
        "| run | position | events | load took | queued in walhook.event | acked in the stream | pg_recvlogical drain | ratio | stored | walhook peak RSS | walhook CPU |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, r) in runs.iter().enumerate() {
        let rate = r.events as f64 / r.secs;
        println!(
            "| {} | {} | {} | {:.2} s | {:.0} events/s | **{:.0} events/s** | {:.0} changes/s | {:.3} | {} | {} MB | {:.0}% |",
            i / args.positions.len() + 1,
            r.position,
            r.events,
            r.load_secs,
            r.events as f64 / r.capture_secs,
            rate,
            r.drain_per_sec,
            rate / r.drain_per_sec,
            r.stored,
            r.peak_rss_mb,
            r.cpu_percent
        );
    }
    // Where the CPU went: per event, for each process of the pipeline (the load's own
    // backend is not counted; it ends before it can be read).
    for (i, r) in runs.iter().enumerate() {
        let total: f64 = r.cpu.iter().map(|(_, s)| s).sum();
        let title = format!(
            "run {} ({}): {:.2} cores over {:.2} s",
            i / args.positions.len() + 1,
            r.position,
            total / r.secs,
            r.secs
        );
        print_cpu(&title, &r.cpu, r.events);
    }
}
