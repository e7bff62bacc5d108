//! Capture benchmark: walhook against pg_recvlogical on the same WAL, in the same run.
//!
//! For each transaction shape, two slots are created before the load so both see the same
//! WAL range. (a) pg_recvlogical drains one slot to /dev/null; (b) the release `walhook`
//! binary decodes, maps and commits the other slot's changes into `walhook.event`.
//!
//! ```text
//! cargo bench --bench capture            # 1,000,000 bulk + 200,000 single + 200,000 mixed
//! cargo bench --bench capture -- --bulk 200000 --single 50000 --mixed 0
//! ```
//!
//! walhook starts cold for each shape: a new process, the queue schema created by its
//! setup, the clock running from its start to the last event queued.
//!
//! Prints rates, their ratio and walhook's peak RSS as a Markdown table.

mod common;

use std::time::{Duration, Instant};

use common::{
    DB, Walhook, cpu_secs, create_bench_database, psql, recvlogical_drain, reset_database,
    vm_hwm_kb,
};
use walhook::cluster::LocalCluster;

struct Args {
    bulk: u64,
    single: u64,
    mixed: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        bulk: 1_000_000,
        single: 200_000,
        mixed: 200_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match a.as_str() {
            "--bulk" => args.bulk = num("--bulk"),
            "--single" => args.single = num("--single"),
            "--mixed" => args.mixed = num("--mixed") / 2 * 2,
            // cargo bench passes --bench; ignore anything else.
            _ => {}
        }
    }
    args
}

struct Shape {
    name: &'static str,
    changes: u64,
    load_sql: String,
}

struct Outcome {
    name: &'static str,
    changes: u64,
    recvlogical_secs: f64,
    walhook_secs: f64,
    walhook_peak_rss_mb: u64,
}

fn main() {
    let args = parse_args();
    let cluster = LocalCluster::start().expect("start cluster");
    create_bench_database(&cluster);
    let half = args.bulk / 2;
    let shapes = [
        Shape {
            name: "1000-row transactions (inserts, then one-column updates)",
            changes: half * 2,
            load_sql: format!(
                "DO $$ BEGIN
                   FOR t IN 0..{txs} - 1 LOOP
                     INSERT INTO bench SELECT g, g, 'row ' || g, g * 1.5, now(), g % 2 = 0
                       FROM generate_series(t * 1000 + 1, t * 1000 + 1000) g;
                     COMMIT;
                   END LOOP;
                   FOR t IN 0..{txs} - 1 LOOP
                     UPDATE bench SET a = a + 1 WHERE id > t * 1000 AND id <= t * 1000 + 1000;
                     COMMIT;
                   END LOOP;
                 END $$;",
                txs = half / 1000
            ),
        },
        Shape {
            name: "single-row transactions (inserts)",
            changes: args.single,
            load_sql: format!(
                "DO $$ BEGIN
                   FOR i IN 1..{n} LOOP
                     INSERT INTO bench VALUES (10000000 + i, i, 'single ' || i, i * 0.5, now(), true);
                     COMMIT;
                   END LOOP;
                 END $$;",
                n = args.single
            ),
        },
        Shape {
            name: "single-row transactions (an insert, then an update of an earlier row)",
            changes: args.mixed,
            load_sql: format!(
                "DO $$ BEGIN
                   FOR i IN 1..{n} LOOP
                     INSERT INTO bench VALUES (20000000 + i, i, 'mixed ' || i, i * 0.5, now(), true);
                     COMMIT;
                     UPDATE bench SET a = a + 1, b = 'updated ' || i
                       WHERE id = 20000000 + 1 + ((i::bigint * 7919) % 1000003) % i;
                     COMMIT;
                   END LOOP;
                 END $$;",
                n = args.mixed / 2
            ),
        },
    ];
    let mut outcomes = Vec::new();
    for shape in &shapes {
        if shape.changes == 0 {
            continue;
        }
        outcomes.push(run_shape(&cluster, shape));
    }
    println!();
    println!(
        "| shape | changes | pg_recvlogical changes/s | walhook queued events/s | ratio | walhook peak RSS |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for o in &outcomes {
        let drain = o.changes as f64 / o.recvlogical_secs;
        let wal = o.changes as f64 / o.walhook_secs;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {} MB |",
            o.name,
            o.changes,
            drain,
            wal,
            wal / drain,
            o.walhook_peak_rss_mb
        );
    }
}

fn run_shape(cluster: &LocalCluster, shape: &Shape) -> Outcome {
    eprintln!("== {}: {} changes", shape.name, shape.changes);
    reset_database(cluster);
    psql(
        cluster,
        "SELECT pg_create_logical_replication_slot('drain', 'pgoutput');
         SELECT pg_create_logical_replication_slot('walhook', 'pgoutput');",
    );
    let t = Instant::now();
    psql(cluster, &shape.load_sql);
    let end_lsn = psql(cluster, "SELECT pg_current_wal_lsn()");
    eprintln!(
        "   loaded in {:.1}s, WAL end {end_lsn}",
        t.elapsed().as_secs_f64()
    );
    psql(cluster, "CHECKPOINT");

    // (a) pg_recvlogical drains the same range to /dev/null.
    let recvlogical_secs = recvlogical_drain(cluster, &end_lsn);
    eprintln!("   pg_recvlogical: {recvlogical_secs:.2}s");

    // (b) walhook decodes, maps and commits the same changes to walhook.event.
    let t = Instant::now();
    let mut walhook = Walhook::start(&format!(
        "[source]\nurl = \"{}\"\nslot = \"walhook\"\npublication = \"walhook\"\nheartbeat = \"off\"\n\n[[entity]]\nname = \"Bench\"\ntable = \"bench\"\n",
        cluster.url(DB)
    ));
    let pid = walhook.pid();
    let mut peak_kb = 0;
    loop {
        peak_kb = peak_kb.max(vm_hwm_kb(pid));
        let exists = psql(cluster, "SELECT to_regclass('walhook.event') IS NOT NULL") == "t";
        let queued: i64 = if exists {
            psql(cluster, "SELECT coalesce(max(id), 0) FROM walhook.event")
                .parse()
                .unwrap_or(0)
        } else {
            0
        };
        if queued as u64 >= shape.changes {
            break;
        }
        walhook.assert_running("early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let walhook_secs = t.elapsed().as_secs_f64();
    peak_kb = peak_kb.max(vm_hwm_kb(pid));
    let cpu = cpu_secs(pid);
    eprintln!(
        "   walhook process CPU: {cpu:.2}s ({:.0}% of one core)",
        100.0 * cpu / walhook_secs
    );
    drop(walhook);
    eprintln!(
        "   walhook: {walhook_secs:.2}s, peak RSS {} MB",
        peak_kb / 1024
    );
    Outcome {
        name: shape.name,
        changes: shape.changes,
        recvlogical_secs,
        walhook_secs,
        walhook_peak_rss_mb: peak_kb / 1024,
    }
}
