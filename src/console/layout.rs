//! The page shell, navigation, formatting helpers and the static CSS and JS.
//!
//! Pages are maud templates: every value spliced into them is HTML-escaped by maud unless
//! wrapped in `PreEscaped`, which this console never does with data (only with the
//! embedded stylesheet's path constants, which are literals).

use std::time::SystemTime;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::auth::{CSRF_FIELD, Viewer};

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

/// The sections of the navigation bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// `/ui`.
    Overview,
    /// `/ui/notifications` and event pages.
    Notifications,
    /// `/ui/failed`.
    Failed,
    /// `/ui/listeners`.
    Listeners,
}

const SECTIONS: [(Section, &str, &str); 4] = [
    (Section::Overview, "/ui", "Overview"),
    (Section::Notifications, "/ui/notifications", "Notifications"),
    (Section::Failed, "/ui/failed", "Failed"),
    (Section::Listeners, "/ui/listeners", "Listeners"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="referrer" content="same-origin";
            title { (title) " · walhook" }
            link rel="stylesheet" href="/ui/static/console.css";
            script src="/ui/static/console.js" defer {}
        }
    }
}

/// A console page for a logged-in viewer.
pub fn page(title: &str, section: Section, viewer: &Viewer, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top {
                    a.brand href="/ui" { "walhook" }
                    nav {
                        @for (s, href, label) in SECTIONS {
                            @if s == section {
                                a.current href=(href) aria-current="page" { (label) }
                            } @else {
                                a href=(href) { (label) }
                            }
                        }
                    }
                    form.logout method="post" action="/ui/logout" {
                        (csrf(viewer))
                        button type="submit" { "Log out" }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
                footer { "walhook " (env!("CARGO_PKG_VERSION")) }
            }
        }
    }
}

/// A page without navigation (the login form).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body { (body) }
        }
    }
}

/// The hidden CSRF field every form posts.
pub fn csrf(viewer: &Viewer) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(viewer.csrf); }
}

/// An error page: what went wrong, in plain words.
pub fn error_page(status: StatusCode, viewer: Option<&Viewer>, problem: &str) -> Response {
    let body = html! { p.error role="alert" { (problem) } };
    let markup = match viewer {
        Some(v) => page("Something went wrong", Section::Overview, v, body),
        None => bare("Something went wrong", body),
    };
    (status, markup).into_response()
}

/// `2024-05-01 12:34:56Z`.
pub fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replacen('T', " ", 1)
}

/// `3m12s ago` (or `in 5s` for future times) relative to `now`.
pub fn ago(now: SystemTime, t: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(d) => format!("{} ago", crate::human::age(d)),
        Err(e) => format!("in {}", crate::human::age(e.duration())),
    }
}

/// A time with its age as a tooltip-free second line.
pub fn when(now: SystemTime, t: Option<SystemTime>) -> Markup {
    html! {
        @match t {
            Some(t) => { time datetime=(humantime::format_rfc3339_seconds(t).to_string()) { (self::time(t)) } br; small { (ago(now, t)) } }
            None => { "–" }
        }
    }
}

/// An optional value, or a dash.
pub fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| v.to_string())
}

/// `/ui/static/console.css`.
pub async fn css() -> Response {
    static_file("text/css; charset=utf-8", CSS)
}

/// `/ui/static/console.js`.
pub async fn js() -> Response {
    static_file("text/javascript; charset=utf-8", JS)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spliced_values_are_escaped() {
        let viewer = Viewer::for_tests("\"><script>alert(1)</script>");
        let html = page(
            "<b>title</b>",
            Section::Failed,
            &viewer,
            html! { p { ("<img src=x onerror=alert(1)>") } },
        )
        .into_string();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(!html.contains("<b>title"), "{html}");
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
        assert!(html.contains("&quot;&gt;&lt;script&gt;"), "{html}");
    }

    #[test]
    fn the_script_stays_small() {
        assert!(JS.len() < 4096, "console.js is {} bytes", JS.len());
    }
}
