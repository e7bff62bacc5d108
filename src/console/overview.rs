//! The overview: capture state, slot lag, the last hour's rates and latencies, and each
//! listener's queue (the same report as `walhook status`).

use std::time::{Duration, SystemTime};

use axum::extract::State;
use maud::{Markup, html};

use super::auth::Viewer;
use super::chart::{self, Series};
use super::history::ListenerActivity;
use super::layout::{self, Section, ago, or_dash, when};
use super::{Console, PageError};
use crate::queue::status::{ErrorOf, ListenerStatus, Status, status};

/// Recent activity that decides a listener's health badge.
pub(super) const HEALTH_SPAN: Duration = Duration::from_secs(300);

/// GET /ui.
pub(super) async fn page(State(console): State<Console>, viewer: Viewer) -> Markup {
    let config = console.config();
    let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
    let report = match console.db().await {
        Ok(db) => status(&db, &names, &config.source.slot)
            .await
            .map_err(PageError::from),
        Err(e) => Err(e),
    };
    let now = SystemTime::now();
    let activity = console.inner.deps.history.listener_activity(HEALTH_SPAN);
    let body = html! {
        (capture(&console, report.as_ref().ok()))
        section.charts {
            (charts(&console, now))
        }
        section {
            h2 { "Listeners" }
            @match &report {
                Ok(r) => (listener_table(r, &activity)),
                Err(e) => p.error role="alert" { (problem(e)) },
            }
        }
    };
    layout::page("Overview", Section::Overview, &viewer, body)
}

fn problem(e: &PageError) -> String {
    match e {
        PageError::Unavailable(m) | PageError::NotFound(m) | PageError::BadRequest(m) => {
            format!("The queue database cannot be read right now: {m}")
        }
    }
}

fn capture(console: &Console, report: Option<&Status>) -> Markup {
    let health = &console.inner.deps.health;
    let ready = health.readiness();
    html! {
        section {
            h2 { "Capture" }
            dl.facts {
                dt { "Replication" }
                dd {
                    @if health.streaming() { span.badge.ok { "streaming" } }
                    @else { span.badge.bad { "not streaming" } }
                }
                dt { "Queue database" }
                dd {
                    @if health.queue_reachable() { span.badge.ok { "reachable" } }
                    @else { span.badge.bad { "not reachable" } }
                }
                @if let Err(why) = &ready {
                    dt { "Not ready because" }
                    dd.error { (why) }
                }
                @if let Some(r) = report {
                    dt { "Slot " code { (r.slot.name) } }
                    dd {
                        @match &r.slot.found {
                            None => { span.badge.bad { "missing" } " run " code { "walhook setup" } " to create it" }
                            Some(d) => {
                                @if d.active { "active" @if let Some(pid) = d.active_pid { " (pid " (pid) ")" } }
                                @else { span.badge.warn { "not active" } " no walhook streams from it" }
                                "; lag " strong { (d.lag_bytes.map_or_else(|| "–".to_owned(), crate::human::bytes)) }
                                "; retained WAL " (d.retained_bytes.map_or_else(|| "–".to_owned(), crate::human::bytes))
                                "; confirmed flush " code { (or_dash(d.confirmed_flush_lsn)) }
                            }
                        }
                    }
                    dt { "Events" }
                    dd {
                        (r.events.total) " in walhook.event"
                        @if let Some(t) = r.events.latest_commit_time {
                            "; latest commit " (layout::time(t)) " (" (ago(r.now, t)) ")"
                        }
                    }
                }
            }
        }
    }
}

fn charts(console: &Console, now: SystemTime) -> Markup {
    let intervals = console.inner.deps.history.intervals();
    let points =
        |f: fn(&super::history::Interval) -> Option<f64>| -> Vec<(SystemTime, Option<f64>)> {
            intervals.iter().map(|i| (i.end, f(i))).collect()
        };
    html! {
        (chart::line_chart(
            "Events per second (last hour)",
            now,
            &[
                Series { label: "queued", class: "s1", points: points(|i| Some(i.events_per_sec)) },
                Series { label: "delivered", class: "s2", points: points(|i| Some(i.delivered_per_sec)) },
            ],
            chart::per_second,
        ))
        (chart::line_chart(
            "Delivery latency, commit to 2xx (last hour)",
            now,
            &[
                Series { label: "mean", class: "s1", points: points(|i| i.latency_mean) },
                Series { label: "p95", class: "s2", points: points(|i| i.latency_p95) },
            ],
            chart::seconds,
        ))
    }
}

/// A listener's health from its recent attempts.
pub(super) fn health_badge(a: Option<&ListenerActivity>) -> Markup {
    let a = a.copied().unwrap_or_default();
    let failing = a.retried + a.failed;
    html! {
        @if a.delivered == 0 && failing == 0 { span.badge { "idle" } }
        @else if failing == 0 { span.badge.ok { "healthy" } }
        @else if a.delivered == 0 { span.badge.bad { "failing" } }
        @else { span.badge.warn { "degraded" } }
    }
}

fn listener_table(report: &Status, activity: &[(String, ListenerActivity)]) -> Markup {
    let of = |l: &ListenerStatus| activity.iter().find(|(n, _)| *n == l.name).map(|(_, a)| a);
    html! {
        @if report.listeners.is_empty() {
            p { "No listeners are configured and none have notifications." }
        } @else {
            table.listeners {
                thead { tr {
                    th { "Listener" } th { "Health (5 min)" } th.num { "New" } th.num { "Due" } th.num { "Retrying" }
                    th.num { "Processed" } th.num { "Failed" } th { "Oldest undelivered" } th { "Last error" }
                } }
                tbody {
                    @for l in &report.listeners {
                        tr data-listener=(l.name) {
                            td {
                                a href=(format!("/ui/notifications?listener={}", enc(&l.name))) { (l.name) }
                                @if !l.configured { " " small { "(not configured)" } }
                            }
                            td { (health_badge(of(l))) }
                            td.num { (l.new) }
                            td.num { (l.due) }
                            td.num { (l.waiting) }
                            td.num { (l.processed) }
                            td.num.failed {
                                @if l.failed > 0 {
                                    a.bad href=(format!("/ui/failed?listener={}", enc(&l.name))) { (l.failed) }
                                } @else { "0" }
                            }
                            td { (l.oldest_undelivered_age(report.now).map_or_else(|| "–".to_owned(), crate::human::age)) }
                            td.comment {
                                @if let Some(e) = &l.last_error {
                                    (when(report.now, Some(e.at))) br;
                                    @match e.of {
                                        ErrorOf::Notification(id) => {
                                            a href=(format!("/ui/notifications/{id}")) { "#" (id) } " " (e.status)
                                        }
                                        ErrorOf::HeldEvent(id) => {
                                            "cursor held at event " a href=(format!("/ui/events/{id}")) { "#" (id) }
                                        }
                                    }
                                    @if let Some(c) = e.status_code { ", HTTP " (c) }
                                    ": " (e.comment)
                                } @else { "–" }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Percent-encodes a query value.
pub(super) fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
