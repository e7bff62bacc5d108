//! Search: notifications by status, listener, entity, entity id, event id and time range,
//! newest first, in keyset pages (`before` / `after` cursors) that cost the same on page
//! one and page ten thousand.

use std::time::SystemTime;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use super::auth::Viewer;
use super::layout::{self, Section, or_dash, when};
use super::{Console, PageError};
use crate::queue::admin::NotificationStatus;
use crate::queue::browse::{
    Cursor, NotificationRow, PageAt, SearchFilter, SearchPage, event_of_notification, search,
};

/// Rows per page.
const PAGE: i64 = 50;

/// The search form's fields, as they arrive in the query string.
#[derive(Clone, Debug, Default, Deserialize)]
pub(super) struct SearchQuery {
    status: Option<String>,
    listener: Option<String>,
    entity: Option<String>,
    entity_id: Option<String>,
    event: Option<String>,
    from: Option<String>,
    to: Option<String>,
    before: Option<String>,
    after: Option<String>,
}

/// A form field's value, `None` when empty.
fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A time typed into the form: a date and time (UTC unless it names an offset), or a
/// duration back from now like `2h`.
fn parse_when(s: &str, now: SystemTime) -> Option<SystemTime> {
    if let Ok(d) = crate::config::parse_duration(s) {
        return now.checked_sub(d);
    }
    crate::human::parse_time(s)
}

impl SearchQuery {
    /// The filter and the page, or what is wrong with the form.
    fn parse(&self, now: SystemTime) -> Result<(SearchFilter, PageAt), String> {
        let mut f = SearchFilter::default();
        if let Some(s) = given(&self.status) {
            let status = NotificationStatus::parse(s).ok_or_else(|| {
                format!("unknown status {s:?}: choose New, Processed, Failed or Discarded")
            })?;
            f.statuses = vec![status];
        }
        f.listener = given(&self.listener).map(str::to_owned);
        f.entity = given(&self.entity).map(str::to_owned);
        f.entity_id = given(&self.entity_id).map(str::to_owned);
        if let Some(s) = given(&self.event) {
            f.event = Some(Uuid::parse_str(s).map_err(|_| {
                format!("event id {s:?} is not a uuid like 0b9c3c2e-7f59-5d7b-9f43-3b1f1a2b3c4d")
            })?);
        }
        for (field, value, out) in [
            ("from", &self.from, &mut f.from),
            ("to", &self.to, &mut f.to),
        ] {
            if let Some(s) = given(value) {
                *out = Some(parse_when(s, now).ok_or_else(|| {
                    format!("{field} {s:?} is not a time: write 2024-05-01 12:00 (UTC), 2024-05-01T14:00:00+02:00, or a duration back from now like 2h")
                })?);
            }
        }
        let cursor = |s: &str| {
            Cursor::decode(s)
                .ok_or_else(|| "the page link is damaged: start the search again".to_owned())
        };
        let at = match (given(&self.before), given(&self.after)) {
            (Some(b), _) => PageAt::Before(cursor(b)?),
            (None, Some(a)) => PageAt::After(cursor(a)?),
            (None, None) => PageAt::First,
        };
        Ok((f, at))
    }

    /// The query string of this search on another page.
    fn link(&self, before: Option<Cursor>, after: Option<Cursor>) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("status", &self.status),
            ("listener", &self.listener),
            ("entity", &self.entity),
            ("entity_id", &self.entity_id),
            ("event", &self.event),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if let Some(v) = given(v) {
                out.append_pair(k, v);
            }
        }
        if let Some(c) = before {
            out.append_pair("before", &c.encode());
        }
        if let Some(c) = after {
            out.append_pair("after", &c.encode());
        }
        format!("/ui/notifications?{}", out.finish())
    }
}

/// GET /ui/notifications.
pub(super) async fn page(
    State(console): State<Console>,
    viewer: Viewer,
    Query(q): Query<SearchQuery>,
) -> Result<Markup, PageError> {
    let now = SystemTime::now();
    let parsed = q.parse(now);
    let results = match &parsed {
        Ok((filter, at)) => {
            let db = console.db().await?;
            Some(search(&db, filter, *at, PAGE).await?)
        }
        Err(_) => None,
    };
    let config = console.config();
    let body = html! {
        (form(&q, &config))
        @if let Err(problem) = &parsed {
            p.error role="alert" { (problem) }
        }
        @if let Some(page) = &results {
            (results_table(&q, page, now))
        }
    };
    Ok(layout::page(
        "Notifications",
        Section::Notifications,
        &viewer,
        body,
    ))
}

fn form(q: &SearchQuery, config: &crate::config::Config) -> Markup {
    let status = given(&q.status).unwrap_or("");
    let listener = given(&q.listener).unwrap_or("");
    html! {
        form.search method="get" action="/ui/notifications" {
            label { "Status"
                select name="status" {
                    option value="" selected[status.is_empty()] { "any" }
                    @for s in NotificationStatus::ALL {
                        option value=(s.as_str()) selected[status == s.as_str()] { (s.as_str()) }
                    }
                }
            }
            label { "Listener"
                select name="listener" {
                    option value="" selected[listener.is_empty()] { "any" }
                    @for l in &config.listeners {
                        option value=(l.name) selected[listener == l.name] { (l.name) }
                    }
                    @if !listener.is_empty() && !config.listeners.iter().any(|l| l.name == listener) {
                        option value=(listener) selected { (listener) }
                    }
                }
            }
            label { "Entity"
                input name="entity" list="entities" value=(given(&q.entity).unwrap_or(""));
                datalist #entities {
                    @for e in &config.entities { option value=(e.name.as_str()) {} }
                }
            }
            label { "Entity id" input name="entity_id" value=(given(&q.entity_id).unwrap_or("")); }
            label { "Event id" input name="event" size="36" value=(given(&q.event).unwrap_or("")) placeholder="uuid"; }
            label { "From" input name="from" value=(given(&q.from).unwrap_or("")) placeholder="2024-05-01 12:00 or 2h"; }
            label { "To" input name="to" value=(given(&q.to).unwrap_or("")) placeholder="UTC, or 30m ago as 30m"; }
            button type="submit" { "Search" }
        }
    }
}

fn results_table(q: &SearchQuery, page: &SearchPage, now: SystemTime) -> Markup {
    html! {
        @if page.unknown_event {
            p { "walhook.event holds no event with this id: it was never queued here, or retention pruned it." }
        } @else if page.rows.is_empty() {
            p { "No notifications match." }
        } @else {
            (rows_table(&page.rows, now))
        }
        nav.pager {
            @if let Some(c) = page.newer { a rel="prev" href=(q.link(None, Some(c))) { "← Newer" } }
            @if let Some(c) = page.older { a rel="next" href=(q.link(Some(c), None)) { "Older →" } }
        }
    }
}

/// The table of notifications shared with the event page.
pub(super) fn rows_table(rows: &[NotificationRow], now: SystemTime) -> Markup {
    html! {
        table.notifications {
            thead { tr {
                th.num { "Id" } th { "Status" } th { "Listener" } th { "Entity" } th { "Entity id" }
                th { "Action" } th { "Created" } th { "Status since" } th.num { "Attempts" }
                th.num { "HTTP" } th.num { "Latency" } th { "Comment" }
            } }
            tbody {
                @for r in rows {
                    tr id=(format!("n{}", r.id)) data-status=(r.status.as_str()) {
                        td.num {
                            @match r.event_uuid {
                                Some(u) => a href=(format!("/ui/events/{u}#n{}", r.id)) { (r.id) },
                                None => (r.id),
                            }
                        }
                        td { span class=(format!("badge st-{}", r.status.as_str().to_lowercase())) { (r.status.as_str()) } }
                        td { (r.listener) }
                        td { (r.entity) }
                        td.entity-id { (r.entity_id) }
                        td { (or_dash(r.action.as_deref())) }
                        td { (when(now, Some(r.created_at))) }
                        td {
                            (when(now, r.at))
                            @if let Some(next) = r.next_attempt_at {
                                br; small { "next attempt " (layout::ago(now, next)) }
                            }
                        }
                        td.num { (r.attempts) }
                        td.num { (or_dash(r.status_code)) }
                        td.num { (r.latency_ms.map_or_else(|| "–".to_owned(), |ms| format!("{ms} ms"))) }
                        td.comment {
                            @if let Some(reason) = &r.reason { "discarded: " (reason) @if r.comment.is_some() { br; } }
                            (r.comment.as_deref().unwrap_or(if r.reason.is_some() { "" } else { "–" }))
                        }
                    }
                }
            }
        }
    }
}

/// GET /ui/notifications/{id}: to the event page of notification `id`.
pub(super) async fn by_id(
    State(console): State<Console>,
    _viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let id: i64 = id
        .parse()
        .map_err(|_| PageError::BadRequest(format!("{id:?} is not a notification id")))?;
    let db = console.db().await?;
    match event_of_notification(&db, id).await? {
        Some(uuid) => Ok(Redirect::to(&format!("/ui/events/{uuid}#n{id}")).into_response()),
        None => Err(PageError::NotFound(format!(
            "Notification {id} does not exist, or its event was pruned by retention."
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse_into_filters_and_report_bad_fields() {
        let now = SystemTime::now();
        let q = SearchQuery {
            status: Some("Failed".into()),
            listener: Some("crm".into()),
            entity_id: Some(" 42 ".into()),
            from: Some("2h".into()),
            to: Some("2024-05-01 12:00".into()),
            entity: Some(String::new()),
            ..SearchQuery::default()
        };
        let (f, at) = q.parse(now).unwrap();
        assert_eq!(f.statuses, vec![NotificationStatus::Failed]);
        assert_eq!(f.entity_id.as_deref(), Some("42"));
        assert_eq!(f.entity, None);
        assert_eq!(
            f.from,
            now.checked_sub(std::time::Duration::from_secs(7200))
        );
        assert_eq!(f.to, humantime::parse_rfc3339("2024-05-01T12:00:00Z").ok());
        assert_eq!(at, PageAt::First);

        for (bad, expect) in [
            (
                SearchQuery {
                    status: Some("Lost".into()),
                    ..Default::default()
                },
                "unknown status",
            ),
            (
                SearchQuery {
                    event: Some("42".into()),
                    ..Default::default()
                },
                "not a uuid",
            ),
            (
                SearchQuery {
                    from: Some("yesterday".into()),
                    ..Default::default()
                },
                "from \"yesterday\" is not a time",
            ),
            (
                SearchQuery {
                    before: Some("x".into()),
                    ..Default::default()
                },
                "damaged",
            ),
        ] {
            let e = bad.parse(now).unwrap_err();
            assert!(e.contains(expect), "{e}");
        }
    }

    #[test]
    fn page_links_keep_the_filter() {
        let q = SearchQuery {
            entity_id: Some("a&b".into()),
            before: Some("1_1".into()),
            ..SearchQuery::default()
        };
        let c = Cursor {
            created_at: std::time::UNIX_EPOCH,
            id: 7,
        };
        assert_eq!(
            q.link(Some(c), None),
            "/ui/notifications?entity_id=a%26b&before=0_7"
        );
    }
}
