//! One event: what changed, every notification of it, and the payload each listener
//! received.
//!
//! walhook does not store the bodies it sends. The page renders them again from the stored
//! event with the dispatcher's own payload code, so they are byte for byte what was sent,
//! as long as the event row and the payload settings (`[source] system_name`, the
//! listener's format) are unchanged since; the page says so.

use std::time::SystemTime;

use axum::extract::{Path, State};
use maud::{Markup, html};
use uuid::Uuid;

use super::auth::Viewer;
use super::layout::{self, Section, or_dash};
use super::notifications::rows_table;
use super::{Console, PageError};
use crate::config::ListenerConfig;
use crate::delivery::format::{Format, Message};
use crate::queue::StoredEvent;
use crate::queue::browse::{EventDetail, event_detail};

/// The message the dispatcher sends `listener` for `event`, rendered by the same
/// [`Format`] the dispatcher uses.
fn sent_payload(listener: &ListenerConfig, event: &StoredEvent, source_system: &str) -> Message {
    Format::for_listener(listener, source_system).render(event)
}

/// GET /ui/events/{id}.
pub(super) async fn page(
    State(console): State<Console>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Markup, PageError> {
    let uuid = Uuid::parse_str(&id)
        .map_err(|_| PageError::BadRequest(format!("{id:?} is not an event id (a uuid)")))?;
    let db = console.db().await?;
    let Some(detail) = event_detail(&db, uuid).await? else {
        return Err(PageError::NotFound(format!(
            "walhook.event holds no event {uuid}: it was never queued here, or retention pruned it."
        )));
    };
    let now = SystemTime::now();
    let title = format!(
        "{} {} {}",
        detail.event.entity,
        detail.event.entity_id,
        detail.event.action.as_str()
    );
    let body = html! {
        (facts(&detail))
        section {
            h2 { "Notifications" }
            @if detail.notifications.is_empty() {
                p { "No listener was notified of this event (none subscribed to it then), or retention pruned the notifications." }
            } @else {
                (rows_table(&detail.notifications, now))
            }
        }
        (payloads(&console, &detail))
    };
    Ok(layout::page(&title, Section::Notifications, &viewer, body))
}

fn facts(d: &EventDetail) -> Markup {
    let e = &d.event;
    html! {
        dl.facts {
            dt { "Event id" } dd { code.event-id { (e.event_id) } }
            dt { "Entity" } dd { (e.entity) " " code.entity-id { (e.entity_id) } }
            dt { "Action" } dd { (e.action.as_str()) }
            dt { "Changed fields" } dd {
                @match &e.changed_fields {
                    Some(f) if f.is_empty() => "none",
                    Some(f) => (f.join(", ")),
                    None => "unknown (no old row)",
                }
            }
            dt { "Subject" } dd { (or_dash(e.subject.as_deref())) }
            dt { "Source" } dd { code { (e.source_table) } ", transaction " (d.xid) ", commit LSN " code { (e.commit_lsn) } ", change #" (e.seq) }
            dt { "Committed" } dd { (layout::time(e.commit_time)) }
            dt { "Queued" } dd { (layout::time(d.queued_at)) }
        }
    }
}

fn payloads(console: &Console, d: &EventDetail) -> Markup {
    let config = console.config();
    let source_system = console.source_system();
    let mut listeners: Vec<&str> = d
        .notifications
        .iter()
        .map(|n| n.listener.as_str())
        .collect();
    listeners.sort_unstable();
    listeners.dedup();
    html! {
        section {
            h2 { "Payloads" }
            p.hint {
                "walhook does not store the bodies it sends: each is rendered here from the stored event with the dispatcher's own payload code, "
                "byte for byte what the listener received, unless the event row, [source] system_name or the listener's format changed since. "
                "Headers are not shown (they may carry secrets)."
            }
            @for name in listeners {
                article.payload data-listener=(name) {
                    h3 { (name) }
                    @match config.listeners.iter().find(|l| l.name == name) {
                        None => p { "This listener is no longer configured; its format is unknown." },
                        Some(l) => {
                            @let message = sent_payload(l, &d.event, &source_system);
                            @let body = &message.body;
                            p { "POST " code { (l.url.redacted()) } ", " code { "content-type: " (message.content_type) } ", " (body.len()) " bytes" }
                            @for (name, value) in &message.attributes {
                                p { code { (name) ": " (value) } }
                            }
                            pre.payload-body { (String::from_utf8_lossy(body)) }
                            details {
                                summary { "Formatted" }
                                pre { (pretty(body)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `body` as indented JSON, or as text when it is not JSON.
fn pretty(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}
