//! "Send test event" on the listeners page: one sample event to the listener through
//! `delivery::test_send`, the code path of `walhook test-listener`, then back to the page
//! (redirect after POST, so reloading sends nothing) where the result is shown to the
//! viewer who asked.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};

use super::Console;
use super::auth::WriteForm;
use super::layout;
use crate::delivery::test_send::{TestOutcome, send_sample};

/// Results kept for the page after the redirect; older ones are dropped first.
const KEPT: usize = 64;

/// Most of the listener's answer shown, in characters.
const SHOWN_ANSWER: usize = 2000;

/// A test send as the page shows it. Nothing in it is secret: the sink scrubs answers and
/// comments of the listener's secrets.
#[derive(Clone, Debug)]
pub(super) struct TestReport {
    listener: String,
    /// What was sent, in words.
    event: String,
    /// How it went, or why nothing was sent.
    result: Result<Sent, String>,
}

#[derive(Clone, Debug)]
struct Sent {
    /// The failure in plain words; `None` when delivered.
    failure: Option<String>,
    would_retry: bool,
    /// The final answer's status line, like `HTTP 200 OK` (HTTP listeners).
    status: Option<String>,
    latency: Duration,
    /// The start of the final answer's body, when it had one.
    answer: Option<String>,
}

impl Sent {
    fn from_outcome(outcome: &TestOutcome) -> Sent {
        let answer = outcome
            .answer()
            .map(|a| a.body.as_str())
            .filter(|b| !b.is_empty())
            .map(excerpt);
        Sent {
            failure: outcome.failure(),
            would_retry: outcome.would_retry(),
            status: outcome.answer().map(|a| a.status_line.clone()),
            latency: outcome.latency(),
            answer,
        }
    }
}

/// At most [`SHOWN_ANSWER`] characters of `text`, marked when cut.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(SHOWN_ANSWER) {
        None => text.to_owned(),
        Some((at, _)) => format!("{}\n… ({} more bytes)", &text[..at], text.len() - at),
    }
}

struct Kept {
    id: String,
    session: String,
    report: TestReport,
}

/// The latest test results, each readable only by the session that sent it.
#[derive(Default)]
pub(super) struct TestResults {
    kept: Mutex<VecDeque<Kept>>,
}

impl std::fmt::Debug for TestResults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestResults").finish_non_exhaustive()
    }
}

impl TestResults {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `report` for `session`; returns the id the page asks for it by.
    fn keep(&self, session: &str, report: TestReport) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut kept = self.lock();
        if kept.len() >= KEPT {
            kept.pop_front();
        }
        kept.push_back(Kept {
            id: id.clone(),
            session: session.to_owned(),
            report,
        });
        id
    }

    /// The report `id` of `session`, if it is still kept.
    pub(super) fn get(&self, session: &str, id: &str) -> Option<TestReport> {
        self.lock()
            .iter()
            .find(|k| k.id == id && k.session == session)
            .map(|k| k.report.clone())
    }
}

/// POST /ui/listeners/test: sends a sample event to the listener named in the form.
pub(super) async fn send(State(console): State<Console>, form: WriteForm) -> Response {
    let config = console.config();
    let Some(listener) = form
        .get("listener")
        .and_then(|name| config.listeners.iter().find(|l| l.name == name))
    else {
        return layout::error_page(
            StatusCode::BAD_REQUEST,
            Some(&form.viewer),
            "There is no such listener in the current configuration: open the Listeners page again.",
        );
    };
    let report = match send_sample(&config, listener).await {
        Ok((event, outcome)) => {
            tracing::info!(
                listener = %listener.name,
                delivered = outcome.delivered(),
                "console: test event sent"
            );
            TestReport {
                listener: listener.name.clone(),
                event: format!(
                    "a sample {}.{} event (id {:?}, event {})",
                    event.entity, event.action, event.entity_id, event.event_id
                ),
                result: Ok(Sent::from_outcome(&outcome)),
            }
        }
        Err(e) => TestReport {
            listener: listener.name.clone(),
            event: "nothing".to_owned(),
            result: Err(e.to_string()),
        },
    };
    let id = console
        .inner
        .test_results
        .keep(form.viewer.session(), report);
    Redirect::to(&format!("/ui/listeners?test={id}")).into_response()
}

/// The result of a test send, for the top of the listeners page.
pub(super) fn render(report: &TestReport) -> Markup {
    let name = &report.listener;
    html! {
        section.test-result data-listener=(name) data-delivered=(matches!(&report.result, Ok(s) if s.failure.is_none())) {
            h2 { "Test event to " (name) }
            @match &report.result {
                Err(why) => p.error role="alert" { "No test event was sent: " (why) "." },
                Ok(sent) => {
                    @match &sent.failure {
                        None => p.notice role="status" {
                            "Delivered: the listener accepted " (report.event)
                            @if let Some(s) = &sent.status { " with " (s) }
                            " in " (sent.latency.as_millis()) " ms."
                        },
                        Some(failure) => p.error role="alert" {
                            "Not delivered: " (failure) " (after " (sent.latency.as_millis()) " ms). "
                            @if sent.would_retry { "walhook would retry such a failure." }
                            @else { "walhook would not retry such a failure." }
                        },
                    }
                    @if let Some(answer) = &sent.answer {
                        h3 { "The listener answered" }
                        pre.answer { (answer) }
                    }
                }
            }
            p.hint { "Sent as a delivery would send it (format, headers, signature, authentication), and recorded nowhere in the queue: " code { "walhook test-listener " (name) } " does the same." }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(listener: &str) -> TestReport {
        TestReport {
            listener: listener.to_owned(),
            event: "nothing".to_owned(),
            result: Err("no [[entity]] is configured".to_owned()),
        }
    }

    #[test]
    fn a_result_is_shown_only_to_its_session_and_only_the_latest_are_kept() {
        let results = TestResults::default();
        let first = results.keep("session-a", report("first"));
        assert!(results.get("session-a", &first).is_some());
        assert!(results.get("session-b", &first).is_none());
        assert!(results.get("session-a", "unknown").is_none());
        for _ in 0..KEPT {
            results.keep("session-a", report("later"));
        }
        assert!(results.get("session-a", &first).is_none());
        assert_eq!(results.lock().len(), KEPT);
    }

    #[test]
    fn long_answers_are_cut_between_characters_and_say_so() {
        assert_eq!(excerpt("thanks"), "thanks");
        let long = "é".repeat(SHOWN_ANSWER + 10);
        let cut = excerpt(&long);
        assert!(cut.starts_with(&"é".repeat(SHOWN_ANSWER)));
        assert!(cut.ends_with("\n… (20 more bytes)"), "{cut}");
    }
}
