//! Process metrics with Prometheus' standard names (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, …), read from `/proc/self` at scrape time.
//!
//! Outside Linux, or when `/proc` cannot be read, the series are left out rather than
//! reported as zero.

use std::fmt::Write as _;

/// One reading of the process's resources.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// The fields of `/proc/self/stat` walhook reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    /// User plus system CPU time, in clock ticks.
    cpu_ticks: u64,
    /// Start time after boot, in clock ticks.
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

impl ProcessStats {
    /// Reads `/proc/self`; whatever cannot be read stays `None`.
    pub(crate) fn read() -> ProcessStats {
        let mut stats = ProcessStats::default();
        let ticks = sysconf(nix::unistd::SysconfVar::CLK_TCK);
        let page = sysconf(nix::unistd::SysconfVar::PAGE_SIZE);
        if let Some(stat) = std::fs::read("/proc/self/stat")
            .ok()
            .and_then(|b| parse_stat(&b))
        {
            stats.virtual_bytes = Some(stat.virtual_bytes);
            stats.resident_bytes = page.map(|p| stat.resident_pages.saturating_mul(p));
            if let Some(hz) = ticks.filter(|t| *t > 0) {
                stats.cpu_seconds = Some(stat.cpu_ticks as f64 / hz as f64);
                let boot = std::fs::read("/proc/stat")
                    .ok()
                    .and_then(|b| parse_boot_time(&b));
                stats.start_time_seconds =
                    boot.map(|b| b as f64 + stat.start_ticks as f64 / hz as f64);
            }
        }
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        stats.max_fds = std::fs::read("/proc/self/limits")
            .ok()
            .and_then(|b| parse_max_open_files(&b));
        stats
    }

    /// Appends the Prometheus text exposition of the known values.
    pub(crate) fn render(&self, out: &mut String) {
        let series: [(&str, &str, &str, Option<f64>); 6] = [
            (
                "process_cpu_seconds_total",
                "counter",
                "Total user and system CPU time spent in seconds.",
                self.cpu_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                self.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                self.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                self.start_time_seconds,
            ),
            (
                "process_open_fds",
                "gauge",
                "Number of open file descriptors.",
                self.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors.",
                self.max_fds.map(|v| v as f64),
            ),
        ];
        for (name, kind, help, value) in series {
            if let Some(v) = value {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} {kind}");
                let _ = writeln!(out, "{name} {v}");
            }
        }
    }
}

fn sysconf(var: nix::unistd::SysconfVar) -> Option<u64> {
    nix::unistd::sysconf(var)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted from the last `)`.
fn parse_stat(bytes: &[u8]) -> Option<Stat> {
    let close = bytes.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(bytes.get(close + 1..)?).ok()?;
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n.checked_sub(3)?)?.parse().ok() };
    Some(Stat {
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The `btime` line of `/proc/stat`: boot time in seconds since the epoch.
fn parse_boot_time(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of "Max open files" in `/proc/PID/limits` (`None` when unlimited).
fn parse_max_open_files(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.get("Max open files".len()..)?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STAT: &[u8] = b"4242 (wal hook) (x)) S 1 4242 4242 0 -1 4194560 2048 0 0 0 150 30 0 0 20 0 9 0 123456 987654321 2500 18446744073709551615 1 1 0 0 0 0 0 4096 17479 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        assert_eq!(
            parse_stat(STAT),
            Some(Stat {
                cpu_ticks: 180,
                start_ticks: 123456,
                virtual_bytes: 987654321,
                resident_pages: 2500,
            })
        );
        assert_eq!(parse_stat(b"1 (x) S 1 2 3"), None);
        assert_eq!(parse_stat(b""), None);
    }

    #[test]
    fn limits_and_boot_time_are_read_from_their_lines() {
        let limits = b"Limit                     Soft Limit           Hard Limit           Units     \nMax cpu time              unlimited            unlimited            seconds   \nMax open files            1024                 524288               files     \n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files(
                b"Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
        assert_eq!(
            parse_boot_time(b"cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_reports_every_series() {
        let stats = ProcessStats::read();
        assert!(stats.resident_bytes.unwrap() > 0, "{stats:?}");
        assert!(stats.open_fds.unwrap() >= 3, "{stats:?}");
        let start = stats.start_time_seconds.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "{start}"
        );
        let mut out = String::new();
        stats.render(&mut out);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(out.contains(&format!("\n{name} ")), "{name} in\n{out}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_stat(&bytes);
            let _ = parse_boot_time(&bytes);
            let _ = parse_max_open_files(&bytes);
        }
    }
}
