//! `[queue]`: the queue tables.

use std::time::Duration;

use serde::Deserialize;
use serde_spanned::Spanned;

use super::Str;
use super::check::Checker;
use super::units::RawSize;

/// `[queue]`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Delete Processed rows older than this (default 7d).
    pub retention: Duration,
    /// Most events written in one queue transaction (default 5000).
    pub batch_size: usize,
    /// Longest time an event waits for its batch to fill before it is written (default 20ms).
    pub batch_delay: Duration,
    /// Most bytes of events written in one queue transaction (default 8 MB); a batch ends at
    /// whichever of `batch_size` and this comes first.
    pub batch_bytes: u64,
    /// Most bytes of decoded events held in memory waiting for the queue writer (default
    /// 32 MB); capture stops reading the stream until the writer catches up.
    pub capture_buffer_bytes: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    retention: Str,
    batch_size: Option<Spanned<i64>>,
    batch_delay: Str,
    batch_bytes: Option<Spanned<RawSize>>,
    capture_buffer: Option<Spanned<RawSize>>,
}

pub(super) const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86_400);
pub(super) const DEFAULT_BATCH_SIZE: usize = 5000;
/// With rows of 1 MB these keep walhook's peak RSS well under 200 MB (docs/benchmarks.md).
pub(super) const DEFAULT_BATCH_BYTES: u64 = 8 * 1024 * 1024;
pub(super) const DEFAULT_CAPTURE_BUFFER: u64 = 32 * 1024 * 1024;
pub(super) const MAX_BATCH_SIZE: i64 = 100_000;
pub(super) const DEFAULT_BATCH_DELAY: Duration = Duration::from_millis(20);
pub(super) const MAX_BATCH_DELAY: Duration = Duration::from_secs(10);

impl Checker<'_> {
    pub(super) fn queue(&mut self, raw: Option<&Spanned<RawQueue>>) -> QueueConfig {
        let Some(raw) = raw else {
            return QueueConfig {
                retention: DEFAULT_RETENTION,
                batch_size: DEFAULT_BATCH_SIZE,
                batch_delay: DEFAULT_BATCH_DELAY,
                batch_bytes: DEFAULT_BATCH_BYTES,
                capture_buffer_bytes: DEFAULT_CAPTURE_BUFFER,
            };
        };
        let raw = raw.get_ref();
        let retention = self.duration(&raw.retention, "queue.retention", DEFAULT_RETENTION);
        if let Some(v) = &raw.retention
            && retention.is_zero()
        {
            self.report(
                v.span().start,
                "queue.retention",
                "retention must be above 0",
                "use a duration like \"7d\"",
            );
        }
        let batch_size = self.count(
            &raw.batch_size,
            "queue.batch_size",
            MAX_BATCH_SIZE,
            DEFAULT_BATCH_SIZE,
        );
        let batch_delay = self.duration(&raw.batch_delay, "queue.batch_delay", DEFAULT_BATCH_DELAY);
        if let Some(v) = &raw.batch_delay
            && batch_delay > MAX_BATCH_DELAY
        {
            self.report(
                v.span().start,
                "queue.batch_delay",
                &format!("{} is too long", v.get_ref()),
                "use at most \"10s\" (default \"20ms\")",
            );
        }
        let batch_bytes = self.size(&raw.batch_bytes, "queue.batch_bytes", DEFAULT_BATCH_BYTES);
        let capture_buffer_bytes = self.size(
            &raw.capture_buffer,
            "queue.capture_buffer",
            DEFAULT_CAPTURE_BUFFER,
        );
        QueueConfig {
            retention,
            batch_size,
            batch_delay,
            batch_bytes,
            capture_buffer_bytes,
        }
    }
}
