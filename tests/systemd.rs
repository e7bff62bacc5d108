//! The systemd units pass `systemd-analyze verify`, and `walhook run` speaks the sd_notify
//! protocol: READY=1 once streaming, STATUS= lines and WATCHDOG=1 pings.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{CUSTOMER_ENTITY, Daemon, TestDb, config_toml, walhook_bin};

/// Where the units expect the binary; replaced by the built one for verification.
const INSTALLED_BIN: &str = "/usr/local/bin/walhook";

fn units() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let mut units: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "service"))
        .collect();
    units.sort();
    units
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The unit's `Key=value` settings, comments skipped.
fn settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn both_units_exist() {
    let names: Vec<String> = units()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["walhook.service", "walhook@.service"]);
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(analyze) = find_in_path("systemd-analyze") else {
        if std::env::var_os("CI").is_some() {
            panic!("systemd-analyze is missing in CI: install the systemd package (.ci/run does)");
        }
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    // verify insists that ExecStart exists: point it at the binary cargo built.
    let dir = tempfile::tempdir().unwrap();
    let mut copies = Vec::new();
    for unit in units() {
        let text = std::fs::read_to_string(&unit).unwrap();
        assert!(
            text.contains(&format!("ExecStart={INSTALLED_BIN} ")),
            "{} must start {INSTALLED_BIN}",
            unit.display()
        );
        let copy = dir.path().join(unit.file_name().unwrap());
        std::fs::write(&copy, text.replace(INSTALLED_BIN, walhook_bin())).unwrap();
        copies.push(copy);
    }
    // --man=no: Documentation=man:walhook(1) exists once the package is installed, not here.
    let out = std::process::Command::new(&analyze)
        .args(["verify", "--man=no"])
        .args(&copies)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys and unparsable values are only warnings (exit 0): refuse them too.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("walhook")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warned:\n{}",
        ours.join("\n")
    );
}

#[test]
fn units_run_as_a_notify_service_with_watchdog_and_hardening() {
    let required = [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30s"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "78"),
        ("User", "walhook"),
        ("Group", "walhook"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", ""),
        ("SystemCallFilter", "@system-service"),
        ("UMask", "0077"),
    ];
    for unit in units() {
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        let s = settings(&std::fs::read_to_string(&unit).unwrap());
        for (key, value) in required {
            assert!(
                s.iter().any(|(k, v)| k == key && v == value),
                "{name}: missing {key}={value}"
            );
        }
        let (config, env) = if name.contains('@') {
            ("/etc/walhook/%i.toml", "-/etc/walhook/%i.env")
        } else {
            ("/etc/walhook/walhook.toml", "-/etc/walhook/walhook.env")
        };
        assert!(
            s.contains(&(
                "ExecStart".into(),
                format!("{INSTALLED_BIN} run --config {config}")
            )),
            "{name}: ExecStart"
        );
        assert!(
            s.contains(&("EnvironmentFile".into(), env.into())),
            "{name}: EnvironmentFile"
        );
    }
}

async fn slot_active(db: &TestDb) -> bool {
    let c = db.client().await;
    c.query_one(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walhook' AND active",
        &[],
    )
    .await
    .map(|r| r.get::<_, i64>(0) == 1)
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_notifies_ready_when_streaming_then_status_and_watchdog() {
    let db = TestDb::new();
    db.execute("CREATE TABLE customer (id int PRIMARY KEY, name text)")
        .await;
    let toml = config_toml(&db.url, CUSTOMER_ENTITY);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let socket_str = socket_path.to_str().unwrap();
    // No WATCHDOG_PID: the pid is unknown before spawning, and an absent one means "you".
    let daemon = Daemon::start_with(&toml, "text", |command| {
        command
            .env_remove("WATCHDOG_PID")
            .envs([("NOTIFY_SOCKET", socket_str), ("WATCHDOG_USEC", "2000000")]);
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready_seen = false;
    let mut statuses = Vec::new();
    let mut watchdog_after_ready = 0;
    let mut buf = vec![0u8; 4096];
    while !(ready_seen && !statuses.is_empty() && watchdog_after_ready >= 2) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, socket.recv(&mut buf)).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "timed out: READY=1 {ready_seen}, STATUS= {statuses:?}, \
                 WATCHDOG=1 after ready {watchdog_after_ready}\nlog:\n{}",
                daemon.log()
            ),
        };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        for line in msg.lines() {
            if line == "READY=1" {
                assert!(
                    slot_active(&db).await,
                    "READY=1 before the slot streams; log:\n{}",
                    daemon.log()
                );
                ready_seen = true;
            } else if line == "WATCHDOG=1" && ready_seen {
                watchdog_after_ready += 1;
            } else if let Some(s) = line.strip_prefix("STATUS=") {
                statuses.push(s.to_owned());
            }
        }
    }
    assert!(
        statuses.iter().all(|s| !s.trim().is_empty()),
        "{statuses:?}"
    );
}
