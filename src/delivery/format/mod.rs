//! Formats: how a listener's events become one message (body, content type and the
//! attributes the format defines), independent of the transport that carries it.
//!
//! One file per format; [`Format`] is the exhaustive list the dispatcher matches on. A new
//! format is a new file here, one variant in [`Format`] (and its arms below) and one
//! variant of [`ListenerFormat`] in the config.

pub mod cloudevents;

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::ListenerFormat;
use crate::queue::StoredEvent;

pub use cloudevents::CloudEvents;

/// A rendered message, ready for a sink: what one event or one batch of events becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Identifies the message for receivers that drop duplicates (`webhook-id`,
    /// `Nats-Msg-Id`): the event id, or an id derived from a batch's event ids.
    pub id: String,
    /// The bytes the listener receives.
    pub body: Vec<u8>,
    /// The body's media type.
    pub content_type: Cow<'static, str>,
    /// Attributes the format carries beside the body (CloudEvents binary mode's `ce-*`),
    /// lower-case names; a sink sends them as headers or message properties.
    pub attributes: Vec<(Cow<'static, str>, String)>,
}

/// A listener's payload format.
#[derive(Clone, Debug)]
pub enum Format {
    /// CloudEvents 1.0, structured or binary content mode.
    CloudEvents(CloudEvents),
}

impl Format {
    /// The format a listener's config asks for; `source_system` names the database.
    pub fn for_listener(format: &ListenerFormat, source_system: &str) -> Format {
        match format {
            ListenerFormat::CloudEvents(mode) => {
                Format::CloudEvents(CloudEvents::new(source_system, *mode))
            }
        }
    }

    /// The message for one event.
    pub fn render(&self, event: &StoredEvent) -> Message {
        match self {
            Format::CloudEvents(f) => f.render(event),
        }
    }

    /// One message carrying `events` in order (for listeners that take batches).
    pub fn render_batch(&self, events: &[&StoredEvent]) -> Message {
        match self {
            Format::CloudEvents(f) => f.render_batch(events),
        }
    }
}

/// `2024-05-01T12:34:56.123456Z`. Times before 1970 (impossible for a commit) print as
/// the epoch rather than panicking.
pub(crate) fn rfc3339_micros(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Howard Hinnant's days-to-civil algorithm, for days since 1970-01-01 (non-negative).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn time_formatting_handles_leap_days_and_the_epoch() {
        assert_eq!(rfc3339_micros(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T23:59:59.000001Z
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199) + Duration::from_micros(1);
        assert_eq!(rfc3339_micros(t), "2024-02-29T23:59:59.000001Z");
        assert_eq!(
            rfc3339_micros(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000000Z"
        );
    }
}
