//! Listeners: each configured listener's settings (secrets left out), health and delivery
//! rate from the last hour's samples.

use std::time::Duration;

use axum::extract::State;
use maud::{Markup, html};

use super::Console;
use super::auth::Viewer;
use super::chart;
use super::history::ListenerActivity;
use super::layout::{self, Section};
use super::overview::{HEALTH_SPAN, enc, health_badge};
use crate::config::{CloudEventsMode, EventGridDelivery, ListenerConfig, ListenerFormat};

/// GET /ui/listeners.
pub(super) async fn page(State(console): State<Console>, viewer: Viewer) -> Markup {
    let config = console.config();
    let history = &console.inner.deps.history;
    let recent = history.listener_activity(HEALTH_SPAN);
    let hour = history.listener_activity(Duration::from_secs(3600));
    let find = |all: &[(String, ListenerActivity)], name: &str| {
        all.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    };
    let body = html! {
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
                    (settings(l))
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
