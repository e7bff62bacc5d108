//! systemd integration without libsystemd: readiness, status, watchdog and reload
//! notifications over the sd_notify protocol (one datagram of `KEY=value` lines sent to
//! the socket named by `$NOTIFY_SOCKET`).
//!
//! Everything here is best effort: walhook must run the same with or without systemd, so
//! nothing panics and a failing socket is reported once, not on every ping.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{Classify, ErrorClass};

/// Environment variable naming the notification socket (a path, or `@name` for abstract).
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// Environment variable with the watchdog timeout in microseconds.
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// Environment variable with the pid the watchdog timeout is meant for.
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// How often [`run_notifier`] refreshes the `STATUS=` line.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Why the notification socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor `@abstract-name`.
    #[error(
        "NOTIFY_SOCKET={0:?} is not supported (expected an absolute path or @name); \
         systemd notifications are off"
    )]
    Unsupported(String),
    /// Creating the socket or the address failed.
    #[error("cannot use NOTIFY_SOCKET={socket:?}: {source}; systemd notifications are off")]
    Socket {
        /// The socket as given.
        socket: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Classify for NotifyError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Config
    }
}

/// Sends sd_notify messages to systemd; cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    socket: UnixDatagram,
    addr: SocketAddr,
    target: String,
    /// A send failure is logged at warn once; later ones at debug so a broken socket
    /// does not flood the journal every watchdog interval.
    warned: AtomicBool,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("socket", &self.inner.target)
            .finish()
    }
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`, or `None` when not started by systemd (or the
    /// variable is unusable, which is logged once).
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var_os(NOTIFY_SOCKET_ENV)?;
        let Some(value) = value.to_str() else {
            warn!("NOTIFY_SOCKET is not valid UTF-8; systemd notifications are off");
            return None;
        };
        match Notifier::connect(value) {
            Ok(n) => Some(n),
            Err(e) => {
                warn!("{e}");
                None
            }
        }
    }

    /// A notifier for `socket`: an absolute path, or `@name` for an abstract socket.
    pub fn connect(socket: &str) -> Result<Notifier, NotifyError> {
        let io_err = |source| NotifyError::Socket {
            socket: socket.to_owned(),
            source,
        };
        let addr = if let Some(name) = socket.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(io_err)?
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(socket).map_err(io_err)?
        } else {
            return Err(NotifyError::Unsupported(socket.to_owned()));
        };
        let sock = UnixDatagram::unbound().map_err(io_err)?;
        // A full receive queue must never stall the daemon: drop the message instead.
        sock.set_nonblocking(true).map_err(io_err)?;
        Ok(Notifier {
            inner: Arc::new(Inner {
                socket: sock,
                addr,
                target: socket.to_owned(),
                warned: AtomicBool::new(false),
            }),
        })
    }

    /// Sends `state` (newline-separated `KEY=value` assignments); true when sent.
    pub fn notify(&self, state: &str) -> bool {
        match self
            .inner
            .socket
            .send_to_addr(state.as_bytes(), &self.inner.addr)
        {
            Ok(_) => true,
            Err(e) => {
                if self.inner.warned.swap(true, Ordering::Relaxed) {
                    debug!(socket = %self.inner.target, "systemd notification failed: {e}");
                } else {
                    warn!(
                        socket = %self.inner.target,
                        "cannot notify systemd: {e}; further failures are logged at debug level"
                    );
                }
                false
            }
        }
    }

    /// Startup is complete: `READY=1`. Also ends a reload started with [`Self::reloading`].
    pub fn ready(&self) -> bool {
        self.notify("READY=1")
    }

    /// One line shown by `systemctl status`: `STATUS=…` (newlines become spaces).
    pub fn status(&self, text: &str) -> bool {
        self.notify(&status_message(text))
    }

    /// Keeps the watchdog from restarting the service: `WATCHDOG=1`.
    pub fn watchdog(&self) -> bool {
        self.notify("WATCHDOG=1")
    }

    /// Shutdown has begun: `STOPPING=1`.
    pub fn stopping(&self) -> bool {
        self.notify("STOPPING=1")
    }

    /// A configuration reload has begun: `RELOADING=1` with the `MONOTONIC_USEC=` that
    /// systemd ≥ 253 requires for `Type=notify-reload`. Send [`Self::ready`] when done.
    pub fn reloading(&self) -> bool {
        match monotonic_usec() {
            Some(usec) => self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}")),
            None => self.notify("RELOADING=1"),
        }
    }
}

fn status_message(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("STATUS={line}")
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares reload timestamps with.
fn monotonic_usec() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let secs = u64::try_from(now.tv_sec()).ok()?;
    let nanos = u64::try_from(now.tv_nsec()).ok()?;
    secs.checked_mul(1_000_000)?.checked_add(nanos / 1_000)
}

/// The watchdog timeout systemd expects pings within (`$WATCHDOG_USEC`), or `None` when
/// the watchdog is off or meant for another process (`$WATCHDOG_PID` set to another pid).
/// Ping at half this interval.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var(WATCHDOG_USEC_ENV).ok();
    let pid = std::env::var(WATCHDOG_PID_ENV).ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on given values, so it can be tested without touching the
/// process environment.
fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    // As sd_watchdog_enabled: an absent WATCHDOG_PID means "this process".
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().ok()?;
        if pid != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Talks to systemd for the daemon's lifetime: `READY=1` once `ready` turns true, the
/// text of `status()` as `STATUS=` every [`STATUS_INTERVAL`] (when it changed),
/// `WATCHDOG=1` at half the watchdog interval while `stalled()` says nothing is stuck,
/// and `STOPPING=1` when `shutdown` fires.
pub async fn run_notifier(
    notifier: Notifier,
    ready: watch::Receiver<bool>,
    status: impl Fn() -> String + Send + 'static,
    stalled: impl Fn() -> Option<String> + Send + 'static,
    shutdown: CancellationToken,
) {
    let probes = Probes { status, stalled };
    notify_loop(notifier, ready, probes, shutdown, watchdog_interval()).await;
}

/// What the notifier asks the service: its status line, and whether a loop is stuck.
struct Probes<S, W> {
    status: S,
    stalled: W,
}

/// [`run_notifier`] with the watchdog timeout given, so tests need not set the environment.
async fn notify_loop<S, W>(
    notifier: Notifier,
    mut ready: watch::Receiver<bool>,
    probes: Probes<S, W>,
    shutdown: CancellationToken,
    watchdog: Option<Duration>,
) where
    S: Fn() -> String + Send + 'static,
    W: Fn() -> Option<String> + Send + 'static,
{
    // Set while the watchdog is starved, so the reason is logged once per episode.
    let mut starving = false;
    let watchdog_every = watchdog.map(|d| (d / 2).max(Duration::from_millis(1)));
    let mut watchdog_tick = watchdog_every.map(|every| {
        let mut i = tokio::time::interval(every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_ready = false;
    let mut ready_open = true;
    let mut last_status = String::new();

    // The flag may already be set before this task first runs.
    if *ready.borrow_and_update() {
        last_status = (probes.status)();
        notifier.notify(&format!("READY=1\n{}", status_message(&last_status)));
        sent_ready = true;
    }

    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                notifier.stopping();
                return;
            }
            changed = ready.changed(), if ready_open && !sent_ready => {
                match changed {
                    Ok(()) => {
                        if *ready.borrow_and_update() {
                            last_status = (probes.status)();
                            notifier.notify(&format!(
                                "READY=1\n{}",
                                status_message(&last_status)
                            ));
                            sent_ready = true;
                        }
                    }
                    // The service dropped its sender: it will never become ready.
                    Err(_) => ready_open = false,
                }
            }
            _ = tick(&mut watchdog_tick) => {
                // A stuck loop must not be hidden by a healthy timer: systemd restarts us.
                match (probes.stalled)() {
                    None => {
                        if starving {
                            tracing::info!("progress again; feeding the systemd watchdog");
                        }
                        starving = false;
                        notifier.watchdog();
                    }
                    Some(why) => {
                        if !starving {
                            warn!("{why}; not feeding the systemd watchdog");
                        }
                        starving = true;
                    }
                }
            }
            _ = status_tick.tick() => {
                let now = (probes.status)();
                if now != last_status {
                    notifier.status(&now);
                    last_status = now;
                }
            }
        }
    }
}

/// Waits for the next tick, or forever when there is no interval.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Spawns [`run_notifier`] when started by systemd (`$NOTIFY_SOCKET` set); `None` otherwise.
pub fn spawn_from_env(
    ready: watch::Receiver<bool>,
    status: impl Fn() -> String + Send + 'static,
    stalled: impl Fn() -> Option<String> + Send + 'static,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    let notifier = Notifier::from_env()?;
    Some(tokio::spawn(run_notifier(
        notifier, ready, status, stalled, shutdown,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let path = path.to_str().unwrap().to_owned();
        (dir, sock, path)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn each_message_arrives_as_one_datagram_on_a_path_socket() {
        let (_dir, sock, path) = listener();
        let n = Notifier::connect(&path).unwrap();
        assert!(n.ready());
        assert_eq!(recv(&sock), "READY=1");
        assert!(n.status("lag 0 B\nqueue 3"));
        assert_eq!(recv(&sock), "STATUS=lag 0 B queue 3");
        assert!(n.watchdog());
        assert_eq!(recv(&sock), "WATCHDOG=1");
        assert!(n.stopping());
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn reloading_carries_the_monotonic_timestamp() {
        let (_dir, sock, path) = listener();
        let n = Notifier::connect(&path).unwrap();
        let before = monotonic_usec().unwrap();
        assert!(n.reloading());
        let msg = recv(&sock);
        let mut lines = msg.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec >= before && usec <= monotonic_usec().unwrap());
    }

    #[test]
    fn abstract_socket_names_start_with_at() {
        let name = format!("walhook-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::connect(&format!("@{name}")).unwrap();
        assert!(n.watchdog());
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    #[test]
    fn relative_or_vsock_addresses_are_refused() {
        assert!(matches!(
            Notifier::connect("run/notify"),
            Err(NotifyError::Unsupported(_))
        ));
        assert!(matches!(
            Notifier::connect("vsock:2:1234"),
            Err(NotifyError::Unsupported(_))
        ));
    }

    #[test]
    fn a_missing_socket_is_reported_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.sock");
        let n = Notifier::connect(path.to_str().unwrap()).unwrap();
        assert!(!n.ready());
        assert!(!n.watchdog());
        assert!(n.inner.warned.load(Ordering::Relaxed));
    }

    #[test]
    fn watchdog_interval_follows_usec_and_pid() {
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(watchdog_interval_from(Some("30000000"), None, 7), secs(30));
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            secs(30)
        );
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("x"), 7), None);
    }

    #[tokio::test]
    async fn notifier_task_sends_ready_status_and_stopping() {
        let (_dir, sock, path) = listener();
        let n = Notifier::connect(&path).unwrap();
        let (ready_tx, ready_rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(notify_loop(
            n,
            ready_rx,
            Probes {
                status: || "streaming".to_owned(),
                stalled: || None,
            },
            shutdown.clone(),
            None,
        ));
        let sock = tokio::net::UnixDatagram::from_std({
            sock.set_nonblocking(true).unwrap();
            sock
        })
        .unwrap();
        let next = || async {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
                .await
                .expect("a notification within 5 s")
                .unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        };
        // Before ready: only the status line (the first status tick fires at once).
        assert_eq!(next().await, "STATUS=streaming");
        ready_tx.send_replace(true);
        assert_eq!(next().await, "READY=1\nSTATUS=streaming");
        shutdown.cancel();
        assert_eq!(next().await, "STOPPING=1");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn notifier_task_pings_the_watchdog_at_half_the_interval() {
        let (_dir, sock, path) = listener();
        let n = Notifier::connect(&path).unwrap();
        let (_ready_tx, ready_rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let started = std::time::Instant::now();
        let task = tokio::spawn(notify_loop(
            n,
            ready_rx,
            Probes {
                status: String::new,
                stalled: || None,
            },
            shutdown.clone(),
            Some(Duration::from_millis(400)),
        ));
        let pings = tokio::task::spawn_blocking(move || {
            let mut pings = Vec::new();
            while pings.len() < 3 {
                if recv(&sock) == "WATCHDOG=1" {
                    pings.push(started.elapsed());
                }
            }
            pings
        })
        .await
        .unwrap();
        shutdown.cancel();
        task.await.unwrap();
        // The first ping at once, then every 200 ms: the third no sooner than 400 ms.
        assert!(pings[2] >= Duration::from_millis(390), "{pings:?}");
        assert!(pings[2] < Duration::from_secs(3), "{pings:?}");
    }

    #[tokio::test]
    async fn a_stalled_loop_starves_the_watchdog_until_it_moves_again() {
        let (_dir, sock, path) = listener();
        let n = Notifier::connect(&path).unwrap();
        let (_ready_tx, ready_rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let stalled = Arc::new(AtomicBool::new(true));
        let flag = stalled.clone();
        let task = tokio::spawn(notify_loop(
            n,
            ready_rx,
            Probes {
                status: String::new,
                stalled: move || {
                    flag.load(Ordering::Relaxed)
                        .then(|| "capture stalled: no progress for 99s".to_owned())
                },
            },
            shutdown.clone(),
            Some(Duration::from_millis(100)),
        ));
        let sock = tokio::net::UnixDatagram::from_std({
            sock.set_nonblocking(true).unwrap();
            sock
        })
        .unwrap();
        let mut buf = [0u8; 4096];
        // Stalled: several watchdog periods pass with status lines only.
        let until = tokio::time::Instant::now() + Duration::from_millis(600);
        while let Ok(Ok(n)) = tokio::time::timeout_at(until, sock.recv(&mut buf)).await {
            assert_ne!(&buf[..n], b"WATCHDOG=1");
        }
        stalled.store(false, Ordering::Relaxed);
        let ping = async {
            loop {
                let n = sock.recv(&mut buf).await.unwrap();
                if &buf[..n] == b"WATCHDOG=1" {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ping)
            .await
            .expect("a WATCHDOG=1 once progress resumes");
        shutdown.cancel();
        task.await.unwrap();
    }
}
