//! `EXPLAIN (ANALYZE, BUFFERS)` of every hot queue statement at backlogs of 10k, 100k and
//! 1M notifications for one listener.
//!
//! For each backlog: the queue is filled as the writer fills it (then VACUUM ANALYZE), and
//! autovacuum is turned off on `walhook.new` so that the state stays what the statements
//! see in the middle of a drain between two autovacuum runs: the first half of the backlog
//! delivered (moved to `walhook.processed`, dead tuples and index entries left at the head
//! of `walhook.new`) and the next 128 leased (in flight). Each statement runs once, as a
//! generic plan (what a prepared statement settles on), in a transaction that is rolled
//! back, on a connection with the dispatcher's session settings, each on rows of its own so
//! that one's rolled-back updates do not crowd another's pages; the figures are the
//! execution time and the shared buffers hit + read. The old claim (a walk from the head,
//! before the cursor) runs last in the same state, as the baseline.
//!
//! ```text
//! cargo bench --bench queue_plans                      # 10k, 100k, 1M
//! cargo bench --bench queue_plans -- --backlogs 10000  # one size
//! ```
//!
//! Prints a Markdown table; the full plans go to `target/queue-plans.txt`.

mod common;

use std::fmt::Write as _;
use std::time::Instant;

use common::{DB, create_bench_database, make_backlog, migrate_queue, psql, reset_database};
use tokio_postgres::{Client, SimpleQueryMessage};
use walhook::cluster::LocalCluster;
use walhook::queue::statements as sql;

/// The claim before this change: a walk from the head of the listener's rows.
const OLD_CLAIM: &str = r#"WITH due AS (
    SELECT n.id
    FROM walhook.new n
    WHERE n.listener = $1
      AND n.next_attempt_at <= now()
      AND (n.locked_until IS NULL OR n.locked_until <= now())
      AND NOT EXISTS (
          SELECT 1 FROM walhook.new p
          WHERE p.listener = n.listener
            AND p.entity = n.entity
            AND p.entity_id = n.entity_id
            AND (p.commit_lsn, p.seq) < (n.commit_lsn, n.seq))
    ORDER BY n.commit_lsn, n.seq
    LIMIT $2::bigint
    FOR UPDATE OF n SKIP LOCKED
), claimed AS (
    UPDATE walhook.new n
    SET locked_until = now() + $3::float8 * interval '1 millisecond',
        locked_by = $4::text
    FROM due
    WHERE n.id = due.id
    RETURNING n.id, n.event_id, n.attempts
)
SELECT c.id, c.attempts, e.event_id, e.commit_lsn, e.seq, e.commit_time, e.entity,
       e.entity_id, e.action, e.changed_fields, e."row", e.old, e.subject, e.source_table
FROM claimed c
JOIN walhook.event e ON e.id = c.event_id
ORDER BY e.commit_lsn, e.seq"#;

/// Rows in flight in the measured state.
const IN_FLIGHT: u64 = 128;
/// Rows per claim and per recorded batch, as the dispatcher uses them.
const BATCH: u64 = 500;

struct Case {
    name: &'static str,
    /// Statements run before EXPLAIN in the same (rolled back) transaction.
    setup: String,
    prepare: String,
    execute: String,
    /// On a connection without the dispatcher's session settings (retention).
    plain: bool,
}

fn cases(backlog: u64) -> Vec<Case> {
    let half = backlog / 2;
    // The cursor: the last in-flight row; the rows after it are claimable.
    let cursor_id = half + IN_FLIGHT;
    let cursor = format!("('1/' || to_hex({cursor_id} * 64))::pg_lsn");
    let claim_types = "text, bigint, bigint, float8, text, pg_lsn, int";
    // Notification ids (and entity ids) follow the events' order; a case gets the `k`th
    // batch after the cursor: its ids as an array literal and the update that leases them.
    let batch = |k: u64| -> (String, String) {
        let from = cursor_id + k * BATCH;
        let ids: Vec<String> = (from + 1..=from + BATCH).map(|i| i.to_string()).collect();
        let lease = format!(
            "UPDATE walhook.new SET locked_by = 'bench', locked_until = now() + interval '1 minute'
             WHERE id > {from} AND id <= {};",
            from + BATCH
        );
        (format!("'{{{}}}'", ids.join(",")), lease)
    };
    let claim_args = format!("'l0', {BATCH}, 8388608, 60000, 'bench'");
    let completion = |name: &'static str, k: u64, types: &str, statement: &str, args: &str| {
        let (ids, lease) = batch(k);
        Case {
            name,
            setup: lease,
            prepare: format!("PREPARE s({types}) AS {statement}"),
            execute: format!("EXECUTE s({ids}::bigint[], {args}, 'bench')"),
            plain: false,
        }
    };
    vec![
        Case {
            name: "claim after the cursor (CLAIM_NEXT, 500)",
            setup: String::new(),
            prepare: format!("PREPARE s({claim_types}) AS {}", sql::CLAIM_NEXT),
            execute: format!("EXECUTE s({claim_args}, {cursor}, 0)"),
            plain: false,
        },
        Case {
            name: "sweep behind the cursor (SWEEP, nothing due)",
            setup: String::new(),
            prepare: format!("PREPARE s({claim_types}) AS {}", sql::SWEEP),
            execute: format!("EXECUTE s({claim_args}, {cursor}, 0)"),
            plain: false,
        },
        Case {
            name: "claim by entity (CLAIM_HEADS, 500 entities)",
            setup: String::new(),
            prepare: format!(
                "PREPARE s(text, bigint, bigint, float8, text, text[], text[]) AS {}",
                sql::CLAIM_HEADS
            ),
            execute: format!(
                "EXECUTE s({claim_args}, array_fill('Bench'::text, ARRAY[{BATCH}]), {}::text[])",
                batch(2).0
            ),
            plain: false,
        },
        completion(
            "move delivered to walhook.processed (DELIVERED, 500)",
            3,
            "bigint[], int[], int[], text",
            sql::DELIVERED,
            &format!("array_fill(200, ARRAY[{BATCH}]), array_fill(3, ARRAY[{BATCH}])"),
        ),
        completion(
            "schedule retries (RETRY, 500)",
            4,
            "bigint[], int[], text[], float8[], text",
            sql::RETRY,
            &format!(
                "array_fill(503, ARRAY[{BATCH}]), array_fill('HTTP 503'::text, ARRAY[{BATCH}]), \
                 array_fill(5000::float8, ARRAY[{BATCH}])"
            ),
        ),
        {
            let (ids, lease) = batch(5);
            Case {
                name: "release leases (RELEASE, 500)",
                setup: lease,
                prepare: format!("PREPARE s(bigint[], text) AS {}", sql::RELEASE),
                execute: format!("EXECUTE s({ids}::bigint[], 'bench')"),
                plain: false,
            }
        },
        {
            let (ids, lease) = batch(6);
            Case {
                name: "renew leases (RENEW, 500)",
                setup: lease,
                prepare: format!("PREPARE s(bigint[], float8, text) AS {}", sql::RENEW),
                execute: format!("EXECUTE s({ids}::bigint[], 60000, 'bench')"),
                plain: false,
            }
        },
        Case {
            name: "fan-out of a 500-event batch (FAN_OUT_COPIED, 1 listener)",
            setup: format!(
                "INSERT INTO walhook.event (event_id, commit_lsn, seq, xid, commit_time, entity, entity_id, action, \"row\", source_table)
                 SELECT gen_random_uuid(), ('2/' || to_hex(g))::pg_lsn, 0, 1, now(), 'Bench', (10000000 + g)::text, 'Created', '{{}}'::jsonb, 'public.bench'
                 FROM generate_series(1, {BATCH}) g;"
            ),
            prepare: format!(
                "PREPARE s(pg_lsn, int, pg_lsn, int, text[], text[], text[]) AS {}",
                sql::FAN_OUT_COPIED
            ),
            execute: format!(
                "EXECUTE s('2/1', 0, '2/{BATCH:X}', 0, ARRAY['l0'], ARRAY[NULL::text], ARRAY['Created,Updated,Deleted'])"
            ),
            plain: false,
        },
        Case {
            name: "prune walhook.processed (PRUNE_PROCESSED, 1000)",
            setup: String::new(),
            prepare: format!("PREPARE s(timestamptz, bigint) AS {}", sql::PRUNE_PROCESSED),
            execute: "EXECUTE s(now() + interval '1 minute', 1000)".to_owned(),
            plain: true,
        },
        Case {
            name: "prune walhook.event (PRUNE_EVENTS, 1000)",
            setup: String::new(),
            prepare: format!("PREPARE s(timestamptz, bigint) AS {}", sql::PRUNE_EVENTS),
            execute: "EXECUTE s(now() + interval '1 minute', 1000)".to_owned(),
            plain: true,
        },
        Case {
            name: "baseline: old claim from the head (500)",
            setup: String::new(),
            prepare: format!("PREPARE s(text, bigint, float8, text) AS {OLD_CLAIM}"),
            execute: format!("EXECUTE s('l0', {BATCH}, 60000, 'bench')"),
            plain: false,
        },
    ]
}

struct Figure {
    ms: f64,
    buffers: u64,
}

async fn connect(cluster: &LocalCluster) -> Client {
    let (client, conn) = tokio_postgres::connect(&cluster.url(DB), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute("SET jit = off")
        .await
        .expect("jit off");
    client
}

fn text_rows(messages: &[SimpleQueryMessage]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// Runs the case once, rolled back; its figure and text plan.
async fn measure(client: &Client, case: &Case) -> (Figure, String) {
    client.batch_execute(&case.prepare).await.expect("prepare");
    client.batch_execute("BEGIN").await.expect("begin");
    if !case.setup.is_empty() {
        client.batch_execute(&case.setup).await.expect("setup");
    }
    let rows = text_rows(
        &client
            .simple_query(&format!("EXPLAIN (ANALYZE, BUFFERS) {}", case.execute))
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", case.name)),
    );
    client.batch_execute("ROLLBACK").await.expect("rollback");
    client
        .batch_execute("DEALLOCATE s")
        .await
        .expect("deallocate");
    let plan = rows.join("\n");
    (figure(&plan), plan)
}

/// Execution time and the top node's shared buffers from a text plan.
fn figure(plan: &str) -> Figure {
    let ms = plan
        .lines()
        .find_map(|l| l.trim().strip_prefix("Execution Time: "))
        .and_then(|v| v.trim_end_matches(" ms").parse().ok())
        .unwrap_or(f64::NAN);
    // The first "Buffers:" line belongs to the top node and includes its children.
    let buffers = plan
        .lines()
        .find_map(|l| l.trim().strip_prefix("Buffers: shared "))
        .map(|b| {
            b.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter(|(k, _)| matches!(*k, "hit" | "read"))
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Figure { ms, buffers }
}

fn main() {
    let mut backlogs = vec![10_000u64, 100_000, 1_000_000];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--backlogs" {
            let v = it.next().expect("--backlogs takes a list");
            backlogs = v.split(',').map(|n| n.parse().expect("a number")).collect();
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = LocalCluster::start().expect("start cluster");
    create_bench_database(&cluster);
    let mut table: Vec<(&'static str, Vec<Figure>)> = Vec::new();
    let mut plans = String::new();
    for &backlog in &backlogs {
        eprintln!("== backlog {backlog}");
        reset_database(&cluster);
        migrate_queue(&cluster);
        let t = Instant::now();
        make_backlog(&cluster, backlog, &["l0".to_owned()], None);
        let half = backlog / 2;
        psql(
            &cluster,
            &format!(
                "ALTER TABLE walhook.new SET (autovacuum_enabled = off);
                 WITH moved AS (DELETE FROM walhook.new WHERE id <= {half} RETURNING *)
                 INSERT INTO walhook.processed (id, event_id, listener, entity, entity_id, commit_lsn, seq, attempts, created_at)
                 SELECT id, event_id, listener, entity, entity_id, commit_lsn, seq, 1, created_at FROM moved;
                 UPDATE walhook.new SET locked_by = 'elsewhere', locked_until = now() + interval '1 hour'
                 WHERE id > {half} AND id <= {};",
                half + IN_FLIGHT
            ),
        );
        eprintln!("   state made in {:.1}s", t.elapsed().as_secs_f64());
        let (hot, plain) = rt.block_on(async {
            let hot = connect(&cluster).await;
            hot.batch_execute(sql::SESSION_SETTINGS)
                .await
                .expect("session settings");
            (hot, connect(&cluster).await)
        });
        for (i, case) in cases(backlog).iter().enumerate() {
            let client = if case.plain { &plain } else { &hot };
            let (fig, plan) = rt.block_on(measure(client, case));
            eprintln!(
                "   {}: {:.2} ms, {} buffers",
                case.name, fig.ms, fig.buffers
            );
            let _ = writeln!(
                plans,
                "==== {} — backlog {backlog}\n{}\n{plan}\n",
                case.name, case.execute
            );
            if table.len() <= i {
                table.push((case.name, Vec::new()));
            }
            table[i].1.push(fig);
        }
    }
    // The target directory may be elsewhere (CARGO_TARGET_DIR) and not exist yet.
    let dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("create the target directory");
    let path = dir.join("queue-plans.txt");
    std::fs::write(&path, &plans).expect("write plans");
    println!();
    print!("| statement |");
    for b in &backlogs {
        print!(" backlog {b} |");
    }
    println!();
    print!("| --- |");
    for _ in &backlogs {
        print!(" ---: |");
    }
    println!();
    for (name, figures) in &table {
        print!("| {name} |");
        for f in figures {
            print!(" {:.2} ms, {} buffers |", f.ms, f.buffers);
        }
        println!();
    }
    println!("\nfull plans: {}", path.display());
}
