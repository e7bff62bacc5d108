//! When the queue writer commits what it has gathered: group commit.
//!
//! A batch is written as soon as the input is idle at a transaction boundary, so at low
//! rates nothing waits for `batch_delay`; while one write is in flight the next batch
//! gathers in the writer's channel, so at high rates batches grow by themselves. A batch is
//! also written when it reaches its count or byte limit, and when `batch_delay` has passed
//! while waiting for the rest of a source transaction. Reading what is already queued never
//! waits, so it goes on until a limit or until the input is idle.

use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::mapper::EntityEvent;

/// Bytes of events one queue transaction holds at most (by [`approx_bytes`]): bounds the
/// writer's memory and the size of the COPY and fan-out of one transaction with large rows.
pub const MAX_BATCH_BYTES: usize = 8 << 20;

/// The writer's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushPolicy {
    /// Most events per batch (`queue.batch_size`).
    pub max_events: usize,
    /// Most bytes per batch ([`MAX_BATCH_BYTES`]).
    pub max_bytes: usize,
    /// Longest wait for the rest of a source transaction (`queue.batch_delay`).
    pub max_delay: Duration,
}

/// What is gathered so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gathered {
    /// Events in the batch.
    pub events: usize,
    /// Their [`approx_bytes`].
    pub bytes: usize,
    /// Whether the last item read ended a source transaction.
    pub at_commit: bool,
}

/// The writer's next move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flush {
    /// Write the batch now.
    Now,
    /// Read more; write at the deadline at the latest.
    ReadUntil(Instant),
}

impl FlushPolicy {
    /// Decides after reading: `idle` means nothing more is queued right now; `started` is
    /// when the batch's first item arrived.
    pub fn decide(&self, gathered: Gathered, idle: bool, started: Instant, now: Instant) -> Flush {
        let deadline = started + self.max_delay;
        if gathered.events >= self.max_events.max(1)
            || gathered.bytes >= self.max_bytes
            || (idle && (gathered.at_commit || now >= deadline))
        {
            Flush::Now
        } else {
            Flush::ReadUntil(deadline)
        }
    }
}

/// The approximate size of an event in memory and on the wire: its JSON values' text plus a
/// little per value. Cheap (no serialization); used for byte limits, not for accounting.
pub fn approx_bytes(event: &EntityEvent) -> usize {
    const FIXED: usize = 128;
    FIXED
        + event.entity_id.len()
        + event.subject.as_ref().map_or(0, String::len)
        + event
            .changed_fields
            .as_ref()
            .map_or(0, |f| f.iter().map(|c| c.len() + 8).sum())
        + object_bytes(&event.row)
        + event.old.as_ref().map_or(0, object_bytes)
}

fn object_bytes(map: &Map<String, Value>) -> usize {
    map.iter().map(|(k, v)| k.len() + 8 + value_bytes(v)).sum()
}

fn value_bytes(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 8,
        Value::Array(items) => 8 + items.iter().map(value_bytes).sum::<usize>(),
        Value::Object(map) => 8 + object_bytes(map),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: FlushPolicy = FlushPolicy {
        max_events: 100,
        max_bytes: 1000,
        max_delay: Duration::from_millis(20),
    };

    fn gathered(events: usize, bytes: usize, at_commit: bool) -> Gathered {
        Gathered {
            events,
            bytes,
            at_commit,
        }
    }

    #[test]
    fn an_idle_input_at_a_commit_is_written_at_once() {
        let t = Instant::now();
        assert_eq!(POLICY.decide(gathered(1, 10, true), true, t, t), Flush::Now);
    }

    #[test]
    fn an_idle_input_inside_a_transaction_waits_for_the_rest_until_the_delay() {
        let t = Instant::now();
        let deadline = t + POLICY.max_delay;
        assert_eq!(
            POLICY.decide(gathered(1, 10, false), true, t, t),
            Flush::ReadUntil(deadline)
        );
        assert_eq!(
            POLICY.decide(gathered(1, 10, false), true, t, deadline),
            Flush::Now
        );
    }

    #[test]
    fn a_busy_input_keeps_gathering_until_a_limit() {
        let t = Instant::now();
        let later = t + Duration::from_secs(1);
        assert!(matches!(
            POLICY.decide(gathered(10, 10, true), false, t, later),
            Flush::ReadUntil(_)
        ));
        assert_eq!(
            POLICY.decide(gathered(100, 10, false), false, t, later),
            Flush::Now
        );
        assert_eq!(
            POLICY.decide(gathered(2, 1000, false), false, t, later),
            Flush::Now
        );
    }

    #[test]
    fn a_zero_delay_writes_what_was_queued_without_waiting_for_a_commit() {
        let zero = FlushPolicy {
            max_delay: Duration::ZERO,
            ..POLICY
        };
        let t = Instant::now();
        assert!(matches!(
            zero.decide(gathered(1, 1, false), false, t, t),
            Flush::ReadUntil(_)
        ));
        assert_eq!(zero.decide(gathered(1, 1, false), true, t, t), Flush::Now);
    }

    #[test]
    fn approximate_size_grows_with_the_values() {
        let small = crate::mapper::EntityEvent {
            row: serde_json::json!({"id": 1})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            ..sample()
        };
        let big = crate::mapper::EntityEvent {
            row: serde_json::json!({"id": 1, "blob": "x".repeat(1 << 20)})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            old: Some(
                serde_json::json!({"blob": "y".repeat(1 << 20)})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            ),
            ..sample()
        };
        assert!(approx_bytes(&small) < 300);
        assert!(approx_bytes(&big) > 2 << 20);
    }

    fn sample() -> crate::mapper::EntityEvent {
        use crate::types::{Action, EntityName, Lsn, TableName, Xid};
        crate::mapper::EntityEvent {
            commit_lsn: Lsn(1),
            seq: 0,
            xid: Xid(1),
            commit_time: crate::replication::pgoutput::PgTimestamp(0),
            entity: EntityName::new("Customer").expect("entity name"),
            table: TableName {
                schema: "public".into(),
                name: "customer".into(),
            },
            entity_id: "1".into(),
            action: Action::Updated,
            changed_fields: None,
            row: Map::new(),
            old: None,
            subject: None,
        }
    }
}
