//! Listeners: each configured listener's settings (secrets left out), health and delivery
//! rate from the last hour's samples, an Event Grid webhook's validation state (as
//! `walhook status` words it), and a "Send test event" button (see [`super::test_send`]).

use std::time::Duration;

use axum::extract::{Query, State};
use maud::{Markup, html};
use serde::Deserialize;

use super::auth::Viewer;
use super::chart;
use super::history::ListenerActivity;
use super::layout::{self, Section, csrf};
use super::overview::{HEALTH_SPAN, enc, health_badge};
use super::{Console, PageError, test_send};
use crate::config::{CloudEventsMode, Config, EventGridDelivery, ListenerConfig, ListenerFormat};
use crate::delivery::validation::status_line;
use crate::queue::{Validation, read_validations};

/// Query of the listeners page: the test send whose result to show.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ListenersQuery {
    test: Option<String>,
}

/// GET /ui/listeners.
pub(super) async fn page(
    State(console): State<Console>,
    viewer: Viewer,
    Query(q): Query<ListenersQuery>,
) -> Markup {
    let config = console.config();
    let history = &console.inner.deps.history;
    let recent = history.listener_activity(HEALTH_SPAN);
    let hour = history.listener_activity(Duration::from_secs(3600));
    let find = |all: &[(String, ListenerActivity)], name: &str| {
        all.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    };
    let tested = q
        .test
        .as_deref()
        .and_then(|id| console.inner.test_results.get(viewer.session(), id));
    let validations = validations(&console, &config).await;
    let body = html! {
        @if let Some(report) = &tested {
            (test_send::render(report))
        }
        @if config.listeners.is_empty() {
            p { "No listeners are configured." }
        }
        @for l in &config.listeners {
            @let r = find(&recent, &l.name);
            @let h = find(&hour, &l.name).unwrap_or_default();
            section.listener data-listener=(l.name) {
                h2 { (l.name) " " (health_badge(r.as_ref())) }
                dl.facts {
                    dt { "Delivered" }
                    dd {
                        (chart::per_second(r.unwrap_or_default().delivered_per_sec())) " over 5 minutes, "
                        (chart::per_second(h.delivered_per_sec())) " over the hour sampled so far ("
                        (h.delivered) " delivered, " (h.retried) " failed attempts retried, " (h.failed) " given up)"
                    }
                    (validation(l, &validations))
                    (settings(l))
                }
                form.test-send method="post" action="/ui/listeners/test" {
                    (csrf(&viewer))
                    input type="hidden" name="listener" value=(l.name);
                    button type="submit" { "Send test event" }
                    " "
                    small { "a sample event, now, outside the queue (as " code { "walhook test-listener" } " does)" }
                }
                p {
                    a href=(format!("/ui/notifications?listener={}", enc(&l.name))) { "Notifications" } " · "
                    a href=(format!("/ui/failed?listener={}", enc(&l.name))) { "Failed" }
                }
            }
        }
    };
    layout::page("Listeners", Section::Listeners, &viewer, body)
}

/// The stored validation handshakes, read only when an Event Grid webhook is configured;
/// `Err` says why they cannot be read (the rest of the page does not need the database).
async fn validations(console: &Console, config: &Config) -> Result<Vec<Validation>, String> {
    if config
        .listeners
        .iter()
        .all(|l| status_line(l, None).is_none())
    {
        return Ok(Vec::new());
    }
    let db = console.db().await.map_err(|e| match e {
        PageError::Unavailable(m) | PageError::NotFound(m) | PageError::BadRequest(m) => m,
    })?;
    read_validations(&db).await.map_err(|e| e.to_string())
}

/// An Event Grid webhook's validation state; nothing for other listeners.
fn validation(l: &ListenerConfig, stored: &Result<Vec<Validation>, String>) -> Markup {
    let line = match stored {
        Ok(all) => status_line(l, all.iter().find(|v| v.listener == l.name)),
        Err(why) => status_line(l, None).map(|_| (false, why.clone())),
    };
    let Some((validated, line)) = line else {
        return html! {};
    };
    let (state, badge, detail) = match (stored, validated) {
        (Err(_), _) => (
            "unknown",
            "unknown",
            format!("the queue database cannot be read: {line}"),
        ),
        (Ok(_), true) => ("validated", "validated", rest(&line, "validated")),
        (Ok(_), false) => (
            "awaiting",
            "awaiting validation",
            rest(&line, "awaiting validation"),
        ),
    };
    html! {
        dt { "Validation" }
        dd.validation data-state=(state) {
            @match state {
                "validated" => span.badge.ok { (badge) },
                "awaiting" => span.badge.warn { (badge) },
                _ => span.badge { (badge) },
            }
            " " (detail)
        }
    }
}

/// `line` without its leading `word` and the colon after it.
fn rest(line: &str, word: &str) -> String {
    line.strip_prefix(word)
        .map(|r| r.trim_start_matches(':').trim_start())
        .unwrap_or(line)
        .to_owned()
}

/// What the configuration says about the listener, without its secrets: the URL redacted,
/// header names and values left out, only whether payloads are signed.
fn settings(l: &ListenerConfig) -> Markup {
    let format = match l.format {
        ListenerFormat::CloudEvents(CloudEventsMode::Structured) => {
            "CloudEvents 1.0 (structured JSON)"
        }
        ListenerFormat::CloudEvents(CloudEventsMode::Binary) => {
            "CloudEvents 1.0 (binary: ce-* headers, data as the body)"
        }
        ListenerFormat::EventGrid(ref c) => match c.delivery {
            EventGridDelivery::Topic { .. } => "Azure Event Grid schema, to an Event Grid topic",
            EventGridDelivery::Webhook { .. } => {
                "Azure Event Grid schema, webhook (validation handshake first)"
            }
        },
        ListenerFormat::ServiceBus(_) => "Azure Service Bus messages, one topic per entity",
        ListenerFormat::Form(_) => "a posted HTML form (application/x-www-form-urlencoded)",
        ListenerFormat::Template(_) => "a body from the listener's template",
    };
    html! {
        dt { "URL" } dd { code { (l.url.redacted()) } }
        dt { "Format" } dd { (format) }
        dt { "Entities" } dd {
            @match &l.entities {
                None => "all",
                Some(e) => (e.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(", ")),
            }
            "; actions " (l.actions.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", "))
        }
        dt { "Rate limit" } dd {
            @match l.rate_limit {
                None => "none",
                Some(r) => { (r.count) " per " (crate::human::age(r.per)) }
            }
            "; up to " (l.concurrency) " in flight"
        }
        dt { "Retries" } dd {
            (l.max_attempts) " attempts, backoff " (crate::human::age(l.backoff.initial)) " doubling up to "
            (crate::human::age(l.backoff.max)) ", timeout " (crate::human::age(l.timeout))
        }
        dt { "Debounce" } dd {
            @if let Some(d) = l.debounce { (crate::human::age(d.window)) } @else { "off" }
        }
        dt { "Signed" } dd {
            @if l.secret.is_some() { "yes (Standard Webhooks)" } @else { "no" }
            @if !l.headers.is_empty() { "; " (l.headers.len()) " extra header(s), not shown" }
        }
    }
}
