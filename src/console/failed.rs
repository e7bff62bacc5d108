//! The dead-letter queue: Failed notifications, to retry (back to New, as `walhook retry`
//! does) or to discard with a reason (as `walhook discard` does); one code path each, in
//! `queue::admin`.

use std::time::SystemTime;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::auth::{Viewer, WriteForm};
use super::layout::{self, Section, csrf, or_dash, when};
use super::overview::enc;
use super::{Console, PageError};
use crate::queue::admin::{
    DiscardReason, NotificationStatus, RetrySelection, discard_failed, retry_failed,
};
use crate::queue::browse::{Cursor, PageAt, SearchFilter, search};

/// Rows per page.
const PAGE: i64 = 100;

/// Query of the Failed page: a listener, a page, and the outcome of the last action.
#[derive(Debug, Default, Deserialize)]
pub(super) struct FailedQuery {
    listener: Option<String>,
    before: Option<String>,
    requeued: Option<usize>,
    discarded: Option<usize>,
    skipped: Option<usize>,
}

/// GET /ui/failed.
pub(super) async fn page(
    State(console): State<Console>,
    viewer: Viewer,
    Query(q): Query<FailedQuery>,
) -> Result<Markup, PageError> {
    let listener = q.listener.as_deref().filter(|l| !l.is_empty());
    let at = match q.before.as_deref().filter(|b| !b.is_empty()) {
        None => PageAt::First,
        Some(b) => PageAt::Before(Cursor::decode(b).ok_or_else(|| {
            PageError::BadRequest("the page link is damaged: open the Failed page again".into())
        })?),
    };
    let filter = SearchFilter {
        statuses: vec![NotificationStatus::Failed],
        listener: listener.map(str::to_owned),
        ..SearchFilter::default()
    };
    let db = console.db().await?;
    let page = search(&db, &filter, at, PAGE).await?;
    let config = console.config();
    let now = SystemTime::now();
    let listener_field = listener.unwrap_or("");
    let body = html! {
        (outcome(&q))
        form.search method="get" action="/ui/failed" {
            label { "Listener"
                select name="listener" {
                    option value="" selected[listener.is_none()] { "any" }
                    @for l in &config.listeners {
                        option value=(l.name) selected[listener == Some(l.name.as_str())] { (l.name) }
                    }
                }
            }
            button type="submit" { "Show" }
        }
        @if page.rows.is_empty() {
            p { "No Failed notifications" @if let Some(l) = listener { " for " (l) } "." }
        } @else {
            form.failed method="post" action="/ui/failed/retry" {
                (csrf(&viewer))
                input type="hidden" name="listener" value=(listener_field);
                table.notifications {
                    thead { tr {
                        th { input type="checkbox" data-select-all="id" aria-label="select all"; }
                        th.num { "Id" } th { "Listener" } th { "Entity" } th { "Entity id" } th { "Action" }
                        th { "Failed" } th.num { "Attempts" } th.num { "HTTP" } th { "Comment" }
                    } }
                    tbody {
                        @for r in &page.rows {
                            tr id=(format!("n{}", r.id)) {
                                td { input type="checkbox" name="id" value=(r.id) aria-label=(format!("select {}", r.id)); }
                                td.num {
                                    @match r.event_uuid {
                                        Some(u) => a href=(format!("/ui/events/{u}#n{}", r.id)) { (r.id) },
                                        None => (r.id),
                                    }
                                }
                                td { (r.listener) }
                                td { (r.entity) }
                                td.entity-id { (r.entity_id) }
                                td { (or_dash(r.action.as_deref())) }
                                td { (when(now, r.at)) }
                                td.num { (r.attempts) }
                                td.num { (or_dash(r.status_code)) }
                                td.comment { (r.comment.as_deref().unwrap_or("–")) }
                            }
                        }
                    }
                }
                div.actions {
                    button #retry-selected type="submit" formaction="/ui/failed/retry" formnovalidate {
                        "Retry selected"
                    }
                    label { "Reason "
                        input name="reason" required maxlength=(DiscardReason::MAX_CHARS) placeholder="why these are given up on";
                    }
                    button.danger #discard-selected type="submit" formaction="/ui/failed/discard" data-confirm="Discard the selected notifications? They will never be delivered." {
                        "Discard selected"
                    }
                }
            }
            @if let Some(l) = listener {
                form.all method="post" action="/ui/failed/retry" {
                    (csrf(&viewer))
                    input type="hidden" name="listener" value=(l);
                    input type="hidden" name="all" value="1";
                    button type="submit" data-confirm=(format!("Retry every Failed notification of {l}?")) {
                        "Retry all Failed of " (l)
                    }
                }
            }
            nav.pager {
                @if page.newer.is_some() {
                    a rel="first" href=(link(listener, None)) { "← Newest" }
                }
                @if let Some(c) = page.older {
                    a rel="next" href=(link(listener, Some(c))) { "Older →" }
                }
            }
        }
    };
    Ok(layout::page("Failed", Section::Failed, &viewer, body))
}

fn link(listener: Option<&str>, before: Option<Cursor>) -> String {
    let mut q = Vec::new();
    if let Some(l) = listener {
        q.push(format!("listener={}", enc(l)));
    }
    if let Some(c) = before {
        q.push(format!("before={}", c.encode()));
    }
    format!("/ui/failed?{}", q.join("&"))
}

fn outcome(q: &FailedQuery) -> Markup {
    let skipped = q.skipped.unwrap_or(0);
    html! {
        @if let Some(n) = q.requeued {
            p.notice role="status" { "Requeued " (n) " notification(s) to New; they are delivered again with a full set of attempts." }
        }
        @if let Some(n) = q.discarded {
            p.notice role="status" { "Discarded " (n) " notification(s); they are in walhook.discarded with your reason." }
        }
        @if skipped > 0 {
            p.error role="alert" { (skipped) " selected notification(s) were no longer Failed (delivered, requeued or discarded meanwhile) and were left as they are." }
        }
    }
}

/// The listener and the selection of a posted form, or what is wrong with it.
fn selection(form: &WriteForm) -> Result<(Option<String>, RetrySelection), String> {
    let listener = form
        .get("listener")
        .filter(|l| !l.is_empty())
        .map(str::to_owned);
    if form.get("all") == Some("1") {
        return match listener {
            None => Err("Retrying or discarding all needs a listener.".to_owned()),
            Some(l) => Ok((Some(l), RetrySelection::All)),
        };
    }
    let ids = form
        .all("id")
        .map(|id| {
            id.parse::<i64>()
                .map_err(|_| format!("{id:?} is not a notification id."))
        })
        .collect::<Result<Vec<i64>, String>>()?;
    if ids.is_empty() {
        return Err("Select at least one notification first.".to_owned());
    }
    Ok((listener, RetrySelection::Ids(ids)))
}

/// The selection of a posted form, or the page saying what is wrong with it.
fn selection_or_page(form: &WriteForm) -> Result<(Option<String>, RetrySelection), Box<Response>> {
    selection(form).map_err(|problem| {
        Box::new(layout::error_page(
            StatusCode::BAD_REQUEST,
            Some(&form.viewer),
            &problem,
        ))
    })
}

fn back(listener: Option<&str>, outcome: &str, n: usize, skipped: usize) -> Response {
    let mut target = format!("/ui/failed?{outcome}={n}&skipped={skipped}");
    if let Some(l) = listener {
        target.push_str(&format!("&listener={}", enc(l)));
    }
    Redirect::to(&target).into_response()
}

/// POST /ui/failed/retry.
pub(super) async fn retry(State(console): State<Console>, form: WriteForm) -> Response {
    let (listener, selection) = match selection_or_page(&form) {
        Ok(s) => s,
        Err(page) => return *page,
    };
    let result = async {
        let db = console.db().await?;
        Ok::<_, PageError>(retry_failed(&db, listener.as_deref(), &selection).await?)
    }
    .await;
    match result {
        Ok(out) => {
            tracing::info!(
                requeued = out.requeued.len(),
                "console: requeued Failed notifications"
            );
            back(
                listener.as_deref(),
                "requeued",
                out.requeued.len(),
                out.not_requeued.len(),
            )
        }
        Err(e) => e.into_response(),
    }
}

/// POST /ui/failed/discard.
pub(super) async fn discard(State(console): State<Console>, form: WriteForm) -> Response {
    let (listener, selection) = match selection_or_page(&form) {
        Ok(s) => s,
        Err(page) => return *page,
    };
    let Some(reason) = form.get("reason").and_then(DiscardReason::new) else {
        return layout::error_page(
            StatusCode::BAD_REQUEST,
            Some(&form.viewer),
            "Say why the notifications are discarded: the reason is kept with them.",
        );
    };
    let result = async {
        let db = console.db().await?;
        Ok::<_, PageError>(discard_failed(&db, listener.as_deref(), &selection, &reason).await?)
    }
    .await;
    match result {
        Ok(out) => {
            tracing::info!(
                discarded = out.discarded.len(),
                reason = reason.as_str(),
                "console: discarded Failed notifications"
            );
            back(
                listener.as_deref(),
                "discarded",
                out.discarded.len(),
                out.not_discarded.len(),
            )
        }
        Err(e) => e.into_response(),
    }
}
