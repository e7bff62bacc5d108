//! Signs of life: a [`Beat`] is stamped by a loop whenever it makes progress, and counts
//! as stalled when it is armed (progress is expected) and older than its limit. The
//! systemd watchdog and `/readyz` read them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A shared "last seen alive" stamp; cheap to clone, cheap to stamp.
#[derive(Clone, Debug)]
pub struct Beat {
    inner: Arc<BeatInner>,
}

#[derive(Debug)]
struct BeatInner {
    what: &'static str,
    origin: Instant,
    /// Milliseconds since `origin` at the last stamp.
    last: AtomicU64,
    /// Milliseconds of silence that count as a stall.
    limit: AtomicU64,
    armed: AtomicBool,
}

impl Beat {
    /// A disarmed beat; `what` names the loop in messages ("capture").
    pub fn new(what: &'static str) -> Beat {
        Beat {
            inner: Arc::new(BeatInner {
                what,
                origin: Instant::now(),
                last: AtomicU64::new(0),
                limit: AtomicU64::new(u64::MAX),
                armed: AtomicBool::new(false),
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Progress was made.
    pub fn stamp(&self) {
        self.inner.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// From now on silence longer than `limit` is a stall.
    pub fn arm(&self, limit: Duration) {
        self.stamp();
        let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self.inner.limit.store(ms, Ordering::Relaxed);
        self.inner.armed.store(true, Ordering::Relaxed);
    }

    /// Arms the beat until the returned guard is dropped.
    pub fn armed(&self, limit: Duration) -> Armed {
        self.arm(limit);
        Armed(self.clone())
    }

    /// Silence is expected (between sessions, while waiting by design).
    pub fn disarm(&self) {
        self.inner.armed.store(false, Ordering::Relaxed);
    }

    /// How long the loop has been silent, when that is a stall.
    pub fn stalled(&self) -> Option<Duration> {
        if !self.inner.armed.load(Ordering::Relaxed) {
            return None;
        }
        let silent = self
            .now_ms()
            .saturating_sub(self.inner.last.load(Ordering::Relaxed));
        (silent > self.inner.limit.load(Ordering::Relaxed)).then(|| Duration::from_millis(silent))
    }

    /// One line for a stall, e.g. "capture stalled: no progress for 41s".
    pub fn stall_message(&self) -> Option<String> {
        self.stalled().map(|d| {
            format!(
                "{} stalled: no progress for {}s",
                self.inner.what,
                d.as_secs()
            )
        })
    }
}

/// Disarms its beat when dropped; see [`Beat::armed`].
#[derive(Debug)]
pub struct Armed(Beat);

impl Drop for Armed {
    fn drop(&mut self) {
        self.0.disarm();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_armed_beat_stalls() {
        let b = Beat::new("capture");
        assert_eq!(b.stalled(), None);
        b.arm(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        assert!(b.stalled().is_some());
        assert!(
            b.stall_message()
                .is_some_and(|m| m.starts_with("capture stalled"))
        );
        b.disarm();
        assert_eq!(b.stalled(), None);
        b.arm(Duration::from_secs(3600));
        assert_eq!(b.stalled(), None);
    }
}
