//! The NATS JetStream sink: publishes a rendered message to the listener's subject with
//! `Nats-Msg-Id` = the event id, waits for the stream's acknowledgement and classifies the
//! result as a policy [`Outcome`] with a comment in the server's words.
//!
//! The connection is made on the first attempt and kept: the client reconnects by itself
//! (without limit, backing off up to 4 s). While it is down the listener is held before
//! its next attempt ([`NatsSink::ready`]): its notifications wait in `walhook.new` without
//! using up attempts, in order, while other listeners go on, and delivery resumes as soon
//! as the server is back. Many publishes are in flight at once
//! (one per concurrency slot); per-entity order comes from the claim, which hands out the
//! next change of an entity only after the previous one was recorded. A retry of a message
//! whose acknowledgement was lost is dropped by the stream's duplicate window, so the stream
//! holds each event once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{ConnectOptions, HeaderMap, HeaderName, HeaderValue};

use super::Started;
use crate::config::{ListenerConfig, NatsAuth, NatsConfig, Position};
use crate::delivery::Attempt;
use crate::delivery::format::Message;
use crate::delivery::policy::Outcome;
use crate::error::{Classify, ErrorClass};
use crate::queue::StoredEvent;
use crate::secret::SecretUrl;
use crate::tls::CaFile;

/// The event id: JetStream drops a message whose id it stored within the duplicate window.
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";
/// `Customer.Updated`: the event type, as in CloudEvents' `type`.
pub const EVENT_TYPE_HEADER: &str = "Walhook-Event-Type";
/// The event id again, for tools that correlate on it (as Azure Service Bus consumers do).
pub const DIAGNOSTIC_ID_HEADER: &str = "Diagnostic-Id";
/// The changed columns, comma separated; absent when unknown.
pub const CHANGED_FIELDS_HEADER: &str = "Walhook-Changed-Fields";
/// The body's media type.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
/// How often the client pings the server: a dead server is noticed within two of these.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How often a waiting attempt looks whether the connection is back.
const CONNECTED_POLL: Duration = Duration::from_millis(20);
/// Longest an attempt waits for a connection that is being made before saying so.
const CONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long an answer to "which stream captures this subject?" is reused: every message in
/// flight when a server restarts gets "no responders", and one lookup answers for all.
const LOOKUP_REUSE: Duration = Duration::from_secs(1);

/// What the JetStream API said about the stream that captures a subject.
#[derive(Clone, Debug)]
enum StreamLookup {
    /// This stream captures it.
    Captured(String),
    /// No stream captures it.
    NoStream,
    /// The API did not answer (why, in the client's words).
    NoAnswer(String),
}

/// Why a NATS listener's sink could not be built. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum NatsSinkError {
    /// The listener has no NATS settings (its url is not nats:// or tls://).
    #[error("listener {listener:?}: not a NATS listener")]
    NotNats {
        /// Listener name.
        listener: String,
    },
    /// The TLS or credential settings could not be turned into a client configuration.
    #[error("listener {listener:?}: cannot set up the NATS connection: {reason}")]
    Options {
        /// Listener name.
        listener: String,
        /// What went wrong.
        reason: String,
    },
}

impl Classify for NatsSinkError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Config
    }
}

/// The NATS sink of one listener; build once, share by reference, send many times.
pub struct NatsSink {
    listener: String,
    url: SecretUrl,
    // Boxed, like the connection: keeps `Sink`'s variants of similar size.
    settings: Box<NatsConfig>,
    ca_file: Option<CaFile>,
    /// The configured headers, sent with every message.
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    connection: Box<tokio::sync::OnceCell<Connection>>,
    /// The last connection problem the client reported, for comments.
    last_error: Arc<Mutex<Option<String>>>,
    /// Whether the listener is held for an outage (logged when it starts and ends).
    held: AtomicBool,
    /// Recent stream lookups by subject; held while one is made, so a burst makes one.
    lookups: Box<tokio::sync::Mutex<HashMap<String, (Instant, StreamLookup)>>>,
}

struct Connection {
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

/// Shows only what may be logged: the url with secrets redacted.
impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("listener", &self.listener)
            .field("url", &self.url.redacted())
            .field("subject", &self.settings.subject.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// Checks the listener's NATS settings; connects on the first attempt.
    pub fn new(listener: &ListenerConfig) -> Result<NatsSink, NatsSinkError> {
        let settings = listener
            .nats
            .clone()
            .ok_or_else(|| NatsSinkError::NotNats {
                listener: listener.name.clone(),
            })?;
        let mut headers = Vec::new();
        for (name, value) in &listener.headers {
            let invalid = |what: &str| NatsSinkError::Options {
                listener: listener.name.clone(),
                reason: format!("header {name} cannot be a NATS header ({what})"),
            };
            let n: HeaderName = name.as_str().parse().map_err(|_| invalid("its name"))?;
            let text = value.to_str().map_err(|_| invalid("its value"))?;
            let v: HeaderValue = text.parse().map_err(|_| invalid("its value"))?;
            headers.push((n, v));
        }
        let sink = NatsSink {
            listener: listener.name.clone(),
            url: listener.url.clone(),
            settings: Box::new(settings),
            ca_file: listener.ca_file.clone(),
            headers,
            timeout: listener.timeout,
            connection: Box::new(tokio::sync::OnceCell::new()),
            last_error: Arc::new(Mutex::new(None)),
            held: AtomicBool::new(false),
            lookups: Box::default(),
        };
        // Credentials and TLS settings are checked now, not at the first attempt.
        sink.options()?;
        Ok(sink)
    }

    /// The listener's url with secrets replaced, for messages.
    pub fn url_redacted(&self) -> &str {
        self.url.redacted()
    }

    /// The client options: credentials, TLS, and reconnecting for ever.
    fn options(&self) -> Result<ConnectOptions, NatsSinkError> {
        let last_error = self.last_error.clone();
        connect_options(
            &self.settings,
            self.ca_file.as_ref(),
            &self.listener,
            self.timeout,
        )
        .map(|o| {
            o.retry_on_initial_connect()
                .max_reconnects(None)
                .event_callback(move |event| {
                    let last_error = last_error.clone();
                    async move {
                        let text = match event {
                            async_nats::Event::ServerError(e) => Some(e.to_string()),
                            async_nats::Event::ClientError(e) => Some(e.to_string()),
                            async_nats::Event::Connected => None,
                            _ => return,
                        };
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = text;
                    }
                })
        })
        .map_err(|reason| NatsSinkError::Options {
            listener: self.listener.clone(),
            reason,
        })
    }

    async fn connection(&self) -> Result<&Connection, String> {
        self.connection
            .get_or_try_init(|| async {
                let options = self.options().map_err(|e| e.to_string())?;
                let client = options
                    .connect(self.url.expose().as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let jetstream = jetstream::ContextBuilder::new()
                    .timeout(self.timeout)
                    .build(client.clone());
                Ok(Connection { client, jetstream })
            })
            .await
    }

    /// Publishes `message` for `event` and waits for the stream's acknowledgement.
    pub async fn send(&self, event: &StoredEvent, message: Message) -> Attempt {
        self.start(event, message).await.outcome().await
    }

    /// Hands `message` for `event` to the connection and returns without waiting for the
    /// acknowledgement: messages started one after another reach the server in that
    /// order, and their acknowledgements can be awaited together.
    pub async fn start(&self, event: &StoredEvent, message: Message) -> Started<'_> {
        let started = Instant::now();
        let subject = self.settings.subject.render(&event.entity, event.action);
        let failed = |outcome: Outcome, comment: String| {
            super::Started::Done(attempt(outcome, Some(comment), started))
        };
        let connection = match self.connection().await {
            Ok(c) => c,
            Err(e) => {
                return failed(
                    Outcome::Unreachable,
                    format!("cannot connect to NATS at {}: {e}", self.endpoint()),
                );
            }
        };
        if !self.wait_connected(&connection.client).await {
            let why = self.connection_problem();
            return failed(
                Outcome::Unreachable,
                format!(
                    "not connected to NATS at {} ({why}); the client keeps reconnecting",
                    self.endpoint()
                ),
            );
        }
        let headers = match self.headers_for(event, &message) {
            Ok(h) => h,
            Err(problem) => {
                return failed(
                    Outcome::Unsendable,
                    format!("cannot publish to {subject}: {problem}"),
                );
            }
        };
        let publish = PublishMessage::build()
            .payload(message.body.into())
            .headers(headers);
        let ack = connection
            .jetstream
            .send_publish(subject.clone(), publish)
            .await;
        super::Started::Nats(Acking {
            sink: self,
            subject,
            started,
            ack,
        })
    }

    /// Returns once the client is connected (at once, usually). While the server cannot be
    /// reached this waits, logging the outage once after a grace period for (re)connecting.
    pub async fn ready(&self) {
        let Ok(connection) = self.connection().await else {
            // The attempt reports why there is no client.
            return;
        };
        let client = &connection.client;
        let since = Instant::now();
        loop {
            if client.connection_state() == async_nats::connection::State::Connected {
                if self.held.swap(false, Ordering::AcqRel) {
                    tracing::info!(
                        listener = %self.listener,
                        "NATS at {} is reachable again: listener {} resumes delivery",
                        self.endpoint(),
                        self.listener
                    );
                }
                return;
            }
            if since.elapsed() >= CONNECT_WAIT && !self.held.swap(true, Ordering::AcqRel) {
                let waiting = match self.settings.position {
                    Position::Queue => "holds its notifications in walhook.new",
                    Position::Cursor => "holds its cursor; the events wait in walhook.event",
                };
                tracing::warn!(
                    listener = %self.listener,
                    "NATS at {} is unreachable ({}): listener {} {waiting} until it is back",
                    self.endpoint(),
                    self.connection_problem(),
                    self.listener
                );
            }
            tokio::time::sleep(CONNECTED_POLL).await;
        }
    }

    fn connection_problem(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "connecting".to_owned())
    }

    /// Waits (briefly, within the attempt's time) for a connection being made or remade.
    async fn wait_connected(&self, client: &async_nats::Client) -> bool {
        let deadline = Instant::now() + self.timeout.min(CONNECT_WAIT);
        loop {
            if client.connection_state() == async_nats::connection::State::Connected {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(CONNECTED_POLL).await;
        }
    }

    /// The message's headers: `Nats-Msg-Id`, content type, event type, diagnostic id,
    /// changed fields, the format's attributes and the configured headers (which win).
    pub fn headers_for(&self, event: &StoredEvent, message: &Message) -> Result<HeaderMap, String> {
        let mut headers = HeaderMap::new();
        let mut set = |name: &str, value: &str| -> Result<(), String> {
            let n: HeaderName = name
                .parse()
                .map_err(|_| format!("{name:?} is not a valid NATS header name"))?;
            let v: HeaderValue = value
                .parse()
                .map_err(|_| format!("the value of header {name} contains a line break"))?;
            headers.insert(n, v);
            Ok(())
        };
        set(MESSAGE_ID_HEADER, &message.id)?;
        set(CONTENT_TYPE_HEADER, &message.content_type)?;
        set(
            EVENT_TYPE_HEADER,
            &format!("{}.{}", event.entity, event.action_name()),
        )?;
        set(DIAGNOSTIC_ID_HEADER, &event.event_id.to_string())?;
        if let Some(fields) = &event.changed_fields {
            set(CHANGED_FIELDS_HEADER, &fields.join(","))?;
        }
        for (name, value) in &message.attributes {
            set(name, value)?;
        }
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        Ok(headers)
    }

    /// The outcome class and a one-line comment for a publish that was not acknowledged.
    async fn publish_failure(
        &self,
        subject: &str,
        e: &jetstream::context::PublishError,
    ) -> (Outcome, String) {
        let endpoint = self.endpoint();
        let server_words = std::error::Error::source(e).map(ToString::to_string);
        match e.kind() {
            PublishErrorKind::StreamNotFound => self.no_responders(subject).await,
            PublishErrorKind::MaxPayloadExceeded => (
                Outcome::Unsendable,
                format!(
                    "the message for {subject} is larger than {endpoint} accepts ({}); raise max_payload on the server or exclude large columns",
                    server_words.unwrap_or_else(|| "max_payload".to_owned())
                ),
            ),
            PublishErrorKind::TimedOut => (
                Outcome::TimedOut,
                format!(
                    "no acknowledgement for {subject} from {endpoint} within {}",
                    humantime::format_duration(self.timeout)
                ),
            ),
            PublishErrorKind::BrokenPipe => (
                Outcome::TransportError,
                format!(
                    "the connection to {endpoint} was lost before the acknowledgement for {subject}"
                ),
            ),
            kind => {
                let api =
                    std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
                let (outcome, hint) = match api.map(jetstream::Error::error_code) {
                    Some(
                        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                        | ErrorCode::STREAM_SEALED
                        | ErrorCode::STREAM_NOT_MATCH,
                    ) => (Outcome::Rejected, ""),
                    // A full stream (limits with discard = new) or JetStream store: the
                    // message is fine and goes in once there is room.
                    Some(
                        ErrorCode::STREAM_STORE_FAILED
                        | ErrorCode::INSUFFICIENT_RESOURCES
                        | ErrorCode::STORAGE_RESOURCES_EXCEEDED
                        | ErrorCode::MEMORY_RESOURCES_EXCEEDED
                        | ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
                    ) => (
                        Outcome::ListenerError,
                        "; the stream or the server's JetStream storage is full: walhook retries until there is room (raise the stream's limits, set discard = old, or free storage)",
                    ),
                    _ => (Outcome::ListenerError, ""),
                };
                let words = server_words.unwrap_or_else(|| kind.to_string());
                (
                    outcome,
                    format!("{endpoint} refused the message for {subject}: {words}{hint}"),
                )
            }
        }
    }

    /// After "no responders" to a publish: fails it for good only when the JetStream API
    /// says that no stream captures `subject`. A server that is starting or stopping also
    /// answers "no responders" (JetStream not serving yet, or any more) for a subject its
    /// streams capture, and those publishes must be retried.
    async fn no_responders(&self, subject: &str) -> (Outcome, String) {
        let endpoint = self.endpoint();
        match self.stream_capturing(subject).await {
            StreamLookup::NoStream => (
                Outcome::Rejected,
                format!(
                    "no JetStream stream captures subject {subject} on {endpoint} (the server answered: no responders); add the subject to a stream, or set [listener.nats.stream] and run `walhook setup` (`walhook check` names what is missing)"
                ),
            ),
            StreamLookup::Captured(stream) => (
                Outcome::ListenerError,
                format!(
                    "no JetStream responder for {subject} on {endpoint}, although stream {stream} captures it (was the server starting or stopping?); retrying"
                ),
            ),
            StreamLookup::NoAnswer(why) => (
                Outcome::ListenerError,
                format!(
                    "no JetStream responder for {subject} on {endpoint}, and its JetStream API did not answer either ({why}): the server is starting or stopping, or JetStream is off; retrying"
                ),
            ),
        }
    }

    /// Asks the JetStream API which stream captures `subject`, or reuses an answer younger
    /// than [`LOOKUP_REUSE`].
    async fn stream_capturing(&self, subject: &str) -> StreamLookup {
        let mut lookups = self.lookups.lock().await;
        lookups.retain(|_, (at, _)| at.elapsed() < LOOKUP_REUSE);
        if let Some((_, found)) = lookups.get(subject) {
            return found.clone();
        }
        let found = match self.connection().await {
            Ok(c) => match c.jetstream.stream_by_subject(subject).await {
                Ok(stream) => StreamLookup::Captured(stream),
                Err(e) if matches!(e.kind(), GetStreamByNameErrorKind::NotFound) => {
                    StreamLookup::NoStream
                }
                Err(e) => StreamLookup::NoAnswer(e.to_string()),
            },
            Err(e) => StreamLookup::NoAnswer(e),
        };
        lookups.insert(subject.to_owned(), (Instant::now(), found.clone()));
        found
    }

    /// `host:port` of the server (no credentials).
    fn endpoint(&self) -> String {
        endpoint(&self.url)
    }
}

/// An attempt that began at `started` and ended now (NATS has no status codes).
fn attempt(outcome: Outcome, comment: Option<String>, started: Instant) -> Attempt {
    Attempt {
        outcome,
        status_code: None,
        comment,
        retry_after: None,
        latency: started.elapsed(),
    }
}

/// A published message waiting for its acknowledgement.
pub struct Acking<'a> {
    sink: &'a NatsSink,
    subject: String,
    started: Instant,
    ack: Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>,
}

impl Acking<'_> {
    /// Waits for the stream's acknowledgement (within the listener's timeout).
    pub async fn outcome(self) -> Attempt {
        let ack = match self.ack {
            Ok(future) => future.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(_) => attempt(Outcome::Accepted, None, self.started),
            Err(e) => {
                let (outcome, comment) = self.sink.publish_failure(&self.subject, &e).await;
                attempt(outcome, Some(comment), self.started)
            }
        }
    }
}

/// `nats://host:port` of a listener url, without credentials.
pub fn endpoint(url: &SecretUrl) -> String {
    let url = url.expose();
    let host = url.host_str().unwrap_or("?");
    format!("{}://{host}:{}", url.scheme(), url.port().unwrap_or(4222))
}

/// Client options for a NATS listener: its credentials, TLS (the built-in and OS roots plus
/// `ca_file`), a client name and timeouts. The error never carries a secret.
pub fn connect_options(
    settings: &NatsConfig,
    ca_file: Option<&CaFile>,
    listener: &str,
    timeout: Duration,
) -> Result<ConnectOptions, String> {
    let options = match &settings.auth {
        None => ConnectOptions::new(),
        Some(NatsAuth::Credentials(creds)) => ConnectOptions::with_credentials(creds.expose())
            .map_err(|_| "the credentials file cannot be read as NATS credentials".to_owned())?,
        Some(NatsAuth::NKey(seed)) => ConnectOptions::with_nkey(seed.expose().to_owned()),
        Some(NatsAuth::Token(token)) => ConnectOptions::with_token(token.expose().to_owned()),
        Some(NatsAuth::UserPassword { user, password }) => {
            ConnectOptions::with_user_and_password(user.clone(), password.expose().to_owned())
        }
    };
    let tls = crate::tls::client_config(ca_file)
        .map_err(|e| format!("cannot set up TLS for the NATS connection: {e}"))?;
    Ok(options
        .name(format!("walhook {listener}"))
        .require_tls(settings.require_tls)
        .tls_client_config(tls)
        .ping_interval(PING_INTERVAL)
        .connection_timeout(timeout)
        .request_timeout(Some(timeout)))
}
