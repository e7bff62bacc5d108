//! Event Grid's endpoint validation handshake. Before an Event Grid webhook gets any event,
//! walhook POSTs a `Microsoft.EventGrid.SubscriptionValidationEvent` carrying a
//! `validationCode` and a `validationUrl`; the listener proves it wants the events by
//! answering `{"validationResponse": "<code>"}`, or by a GET to the validationUrl (served
//! by the admin endpoint, [`router`]) within 5 minutes. The state lives in
//! `walhook.listener_validation`, so it survives restarts and a listener is asked again
//! only when its url or headers change.
//!
//! Until then the dispatcher claims nothing for the listener: its notifications wait in
//! `walhook.new`. A failed handshake is tried again with the listener's backoff.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use url::Url;
use uuid::Uuid;

use super::format::EventGrid;
use super::policy::Outcome;
use super::sink::HttpSink;
use crate::config::{EventGridDelivery, ListenerConfig, ListenerFormat, VALIDATION_PATH};
use crate::db::Source;
use crate::error::{Classify, ErrorClass};
use crate::queue::{
    QueueError, VALIDATION_WINDOW, ValidatedBy, ValidationState, begin_validation, code_sha256,
    connect_validation, expire_validation, fingerprint, mark_validated, mark_validation_failed,
    note_validation, read_validation,
};

/// How often a pending handshake looks for the listener's GET.
const POLL: Duration = Duration::from_secs(1);
/// Database outages are retried this often while a handshake waits.
const DB_RETRY: Duration = Duration::from_secs(2);

/// How one pass of the handshake ended.
enum Pass {
    Validated,
    /// Not validated, in plain words; another handshake follows after a backoff.
    Failed(String),
    /// Another process replaced the handshake: look again at once.
    Again,
    Stopped,
}

/// One Event Grid webhook's handshake.
pub(crate) struct Handshake<'a> {
    pub(crate) listener: &'a ListenerConfig,
    pub(crate) format: &'a EventGrid,
    pub(crate) sink: &'a HttpSink,
    pub(crate) validation_url: &'a Url,
}

impl Handshake<'_> {
    /// Runs the handshake until the listener is validated (then opens `validated` and
    /// returns), or until `stop`. Failed handshakes are repeated with the listener's
    /// backoff; database outages are waited out. `Err` only for errors no wait can cure
    /// (a missing table or privilege).
    pub(crate) async fn run(
        &self,
        db: &Source,
        validated: &watch::Sender<bool>,
        stop: &CancellationToken,
    ) -> Result<(), QueueError> {
        let name = &self.listener.name;
        let fingerprint = fingerprint(self.listener.url.expose(), &self.listener.headers);
        let mut retry = self.listener.backoff.initial;
        let mut client: Option<Client> = None;
        let mut db_down = false;
        while !stop.is_cancelled() {
            let pass = async {
                let c = match client.take() {
                    Some(c) if !c.is_closed() => c,
                    _ => connect_validation(&db.current()).await?,
                };
                let pass = self.pass(&c, &fingerprint, stop).await;
                client = Some(c);
                pass
            };
            let wait = match pass.await {
                Ok(Pass::Validated) => {
                    validated.send_replace(true);
                    return Ok(());
                }
                Ok(Pass::Stopped) => return Ok(()),
                Ok(Pass::Again) => continue,
                Ok(Pass::Failed(why)) => {
                    db_down = false;
                    warn!(
                        listener = %name,
                        "Event Grid listener {name} is not validated: {why}; its notifications wait in walhook.new, and the handshake runs again in {}",
                        humantime::format_duration(retry)
                    );
                    let wait = retry;
                    retry = retry.saturating_mul(2).min(self.listener.backoff.max);
                    wait
                }
                Err(e) if e.class() == ErrorClass::Transient => {
                    if !db_down {
                        warn!(listener = %name, "Event Grid validation of listener {name} waits for the queue database: {e}");
                    }
                    db_down = true;
                    client = None;
                    DB_RETRY
                }
                Err(e) => return Err(e),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return Ok(()),
            }
        }
        Ok(())
    }

    /// Looks at the stored state and acts on it: done, wait for a GET, or a new handshake.
    async fn pass(
        &self,
        client: &Client,
        fingerprint: &str,
        stop: &CancellationToken,
    ) -> Result<Pass, QueueError> {
        let name = &self.listener.name;
        match read_validation(client, name).await? {
            Some(v) if v.fingerprint == fingerprint && v.state == ValidationState::Validated => {
                Ok(Pass::Validated)
            }
            // Sent before a restart, or by another process: its GET may still come.
            Some(v)
                if v.fingerprint == fingerprint
                    && v.state == ValidationState::Pending
                    && v.window_open =>
            {
                self.wait_for_get(client, fingerprint, stop).await
            }
            previous => {
                let why = match previous {
                    None => "first handshake",
                    Some(v) if v.fingerprint != fingerprint => "url or headers changed",
                    Some(_) => "trying again",
                };
                info!(listener = %name, "Event Grid listener {name}: sending the validation event ({why})");
                self.handshake(client, fingerprint, stop).await
            }
        }
    }

    /// Sends a validation event and judges the answer.
    async fn handshake(
        &self,
        client: &Client,
        fingerprint: &str,
        stop: &CancellationToken,
    ) -> Result<Pass, QueueError> {
        let name = &self.listener.name;
        let code = Uuid::new_v4().to_string();
        let hash = code_sha256(&code);
        let mut url = self.validation_url.clone();
        url.query_pairs_mut()
            .append_pair("listener", name)
            .append_pair("code", &code);
        begin_validation(
            client,
            name,
            fingerprint,
            &hash,
            "validation event sent; waiting for the listener's answer",
        )
        .await?;
        let message = self
            .format
            .validation(&code, url.as_str(), SystemTime::now());
        let (attempt, body) = tokio::select! {
            exchange = self.sink.exchange_body(message) => exchange,
            _ = stop.cancelled() => return Ok(Pass::Stopped),
        };
        let failed = |why: String| {
            let hash = &hash;
            async move {
                mark_validation_failed(client, name, hash, &why).await?;
                Ok::<_, QueueError>(Pass::Failed(why))
            }
        };
        if attempt.outcome != Outcome::Accepted {
            let said = attempt
                .comment
                .unwrap_or_else(|| attempt.outcome.describe().to_owned());
            return failed(format!("the validation event was not accepted: {said}")).await;
        }
        let status = attempt.status_code.unwrap_or(200);
        match validation_response(&body) {
            Some(echoed) if echoed == code => {
                if mark_validated(client, name, &hash, ValidatedBy::Response).await? {
                    info!(listener = %name, "Event Grid listener {name} is validated: it answered with the validation code");
                    Ok(Pass::Validated)
                } else {
                    Ok(Pass::Again)
                }
            }
            Some(_) => {
                failed(format!(
                    "it answered HTTP {status} with a validationResponse that is not the validation code it was sent"
                ))
                .await
            }
            None => {
                let deadline = humantime::format_rfc3339_seconds(SystemTime::now() + VALIDATION_WINDOW);
                let note = format!(
                    "it answered HTTP {status} without a validationResponse; waiting until {deadline} for a GET to the validationUrl"
                );
                info!(listener = %name, "Event Grid listener {name}: {note}");
                note_validation(client, name, &hash, &note).await?;
                self.wait_for_get(client, fingerprint, stop).await
            }
        }
    }

    /// Waits for the pending handshake's GET (made through the admin endpoint, maybe by
    /// another process) until its window closes.
    async fn wait_for_get(
        &self,
        client: &Client,
        fingerprint: &str,
        stop: &CancellationToken,
    ) -> Result<Pass, QueueError> {
        let name = &self.listener.name;
        loop {
            let v = read_validation(client, name).await?;
            match v {
                Some(v) if v.fingerprint != fingerprint => return Ok(Pass::Again),
                Some(v) if v.state == ValidationState::Validated => {
                    info!(listener = %name, "Event Grid listener {name} is validated: it sent a GET to the validationUrl");
                    return Ok(Pass::Validated);
                }
                Some(v) if v.state == ValidationState::Failed => {
                    return Ok(Pass::Failed(v.comment.unwrap_or_default()));
                }
                Some(v) if v.window_open => {}
                Some(_) => {
                    let why = format!(
                        "it neither answered with the validation code nor sent a GET to the validationUrl within {} minutes",
                        VALIDATION_WINDOW.as_secs() / 60
                    );
                    expire_validation(client, name, &why).await?;
                    return Ok(Pass::Failed(why));
                }
                None => return Ok(Pass::Again),
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.cancelled() => return Ok(Pass::Stopped),
            }
        }
    }
}

/// What `walhook status` says about an Event Grid webhook's validation: `None` for other
/// listeners; `(validated, line)` otherwise, the line starting "awaiting validation" until
/// the listener is validated for its current url and headers.
pub(crate) fn status_line(
    listener: &ListenerConfig,
    stored: Option<&crate::queue::Validation>,
) -> Option<(bool, String)> {
    let ListenerFormat::EventGrid(c) = &listener.format else {
        return None;
    };
    if !matches!(c.delivery, EventGridDelivery::Webhook { .. }) {
        return None;
    }
    let current = fingerprint(listener.url.expose(), &listener.headers);
    let line = match stored {
        None => (
            false,
            "awaiting validation: no validation event sent yet (walhook sends it when it starts delivering to this listener)".to_owned(),
        ),
        Some(v) if v.fingerprint != current => (
            false,
            "awaiting validation: the url or headers changed since the last handshake; walhook sends a new validation event when it runs with this configuration".to_owned(),
        ),
        Some(v) => match v.state {
            ValidationState::Validated => {
                let how = match v.validated_by.as_deref() {
                    Some("get") => "it sent a GET to the validationUrl",
                    _ => "it answered with the validation code",
                };
                let at = v
                    .validated_at
                    .map(|t| format!(" at {}", humantime::format_rfc3339_seconds(t)))
                    .unwrap_or_default();
                (true, format!("validated{at}: {how}"))
            }
            ValidationState::Pending => (
                false,
                format!(
                    "awaiting validation: {}",
                    v.comment.as_deref().unwrap_or("validation event sent")
                ),
            ),
            ValidationState::Failed => (
                false,
                format!(
                    "awaiting validation: the last handshake failed: {}; walhook tries again with the listener's backoff",
                    v.comment.as_deref().unwrap_or("no reason recorded")
                ),
            ),
        },
    };
    Some(line)
}

/// The `validationResponse` of an answer body (any letter case of the key, as .NET
/// serializers write it `ValidationResponse`).
fn validation_response(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("validationResponse"))?
        .1
        .as_str()
        .map(str::to_owned)
}

/// The admin route that takes the validation GET: `/eventgrid/validate?listener=…&code=…`.
pub(crate) fn router(source: Source) -> Router {
    Router::new()
        .route(&format!("/{VALIDATION_PATH}"), get(validate))
        .with_state(source)
}

async fn validate(
    State(source): State<Source>,
    Query(query): Query<HashMap<String, String>>,
) -> (StatusCode, String) {
    let (Some(listener), Some(code)) = (query.get("listener"), query.get("code")) else {
        return (
            StatusCode::BAD_REQUEST,
            "the validationUrl needs listener and code: use the URL from the validation event as it is\n".to_owned(),
        );
    };
    let marked = async {
        let client = source.connect().await.map_err(|e| e.message)?;
        mark_validated(&client, listener, &code_sha256(code), ValidatedBy::Get)
            .await
            .map_err(|e| e.to_string())
    };
    match marked.await {
        Ok(true) => (
            StatusCode::OK,
            "Webhook successfully validated as a subscription endpoint.\n".to_owned(),
        ),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            format!(
                "no validation of listener {listener:?} is waiting for this code: the {} minutes are over, or a newer validation event replaced it; use the validationUrl of the latest one\n",
                VALIDATION_WINDOW.as_secs() / 60
            ),
        ),
        Err(e) => {
            warn!("an Event Grid validation GET could not be recorded: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "walhook cannot record the validation right now; send the GET again\n".to_owned(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validation_response_is_found_in_any_key_case_and_nothing_else_counts() {
        assert_eq!(
            validation_response(br#"{"validationResponse":"abc"}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(
            validation_response(br#"{"ValidationResponse":"abc","x":1}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(validation_response(b""), None);
        assert_eq!(validation_response(b"abc"), None);
        assert_eq!(validation_response(br#"["abc"]"#), None);
        assert_eq!(validation_response(br#"{"validationResponse":1}"#), None);
    }
}
