//! Sinks: the transports that carry a rendered [`Message`] to a listener and report the
//! attempt in transport-neutral terms (an [`Attempt`] with a policy [`Outcome`]).
//!
//! One file per transport; [`Sink`] is the exhaustive list. Everything a transport needs
//! beyond the message (its connection, headers, signatures, authentication, the wording of
//! its failure comments) lives in its file. A new sink is a new file here, one variant of
//! [`Sink`] and of [`SinkError`] with their match arms below, and the config that selects it.
//!
//! Building a sink only checks its settings (a bad one is a config error). Connecting
//! belongs to sending: a peer that is down is an attempt's outcome, retried by the policy,
//! never a reason for delivery to stop.
//!
//! [`Outcome`]: super::policy::Outcome

pub mod auth;
mod azure;
pub mod http;
pub mod nats;

use super::format::Message;
use super::{Attempt, policy};
use crate::config::ListenerConfig;
use crate::error::{Classify, ErrorClass};
use crate::queue::StoredEvent;

pub use azure::sas_token;
pub use http::{HttpSink, HttpSinkError, Trace, TracedResponse};
pub use nats::{Acking, NatsSink, NatsSinkError};

/// A message handed to its transport, its outcome still to come (see [`Sink::start`]).
pub enum Started<'a> {
    /// The attempt is over already (HTTP, or a message that could not be sent).
    Done(Attempt),
    /// Published to NATS, waiting for the stream's acknowledgement.
    Nats(Acking<'a>),
}

impl Started<'_> {
    /// Whether the transport took the message (or delivered it already): false for one that
    /// could not even be handed over, after which an ordered sender stops.
    pub fn handed_over(&self) -> bool {
        match self {
            Started::Done(attempt) => attempt.outcome == policy::Outcome::Accepted,
            Started::Nats(_) => true,
        }
    }

    /// How the attempt ended.
    pub async fn outcome(self) -> Attempt {
        match self {
            Started::Done(attempt) => attempt,
            Started::Nats(acking) => acking.outcome().await,
        }
    }
}

/// Why a listener's sink could not be built. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The HTTP sink's settings (url, headers, secret, client).
    #[error(transparent)]
    Http(#[from] HttpSinkError),
    /// The NATS sink's settings (credentials, TLS, headers).
    #[error(transparent)]
    Nats(#[from] NatsSinkError),
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        match self {
            SinkError::Http(e) => e.class(),
            SinkError::Nats(e) => e.class(),
        }
    }
}

/// A listener's transport: built once per listener, shared, used for every attempt.
// One per listener, never moved once built: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Sink {
    /// HTTP POST to the listener's url.
    Http(HttpSink),
    /// Publish to NATS JetStream (a `nats://` or `tls://` url).
    Nats(NatsSink),
}

impl Sink {
    /// The sink a listener's config asks for, checked and ready to send.
    pub fn for_listener(listener: &ListenerConfig) -> Result<Sink, SinkError> {
        if listener.nats.is_some() {
            return Ok(Sink::Nats(NatsSink::new(listener)?));
        }
        Ok(Sink::Http(HttpSink::new(listener)?))
    }

    /// Sends one message (one notification or one batch) and reports how it went. Bounded
    /// in time by the listener's `timeout`. `event` is what the message is about (the
    /// first of a batch): brokers route and label by it (subject, headers).
    pub async fn send(&self, event: &StoredEvent, message: Message) -> Attempt {
        match self {
            Sink::Http(s) => s.send(message).await,
            Sink::Nats(s) => s.send(event, message).await,
        }
    }

    /// Starts sending one message: returns once the transport has it, in order. A broker's
    /// acknowledgement is awaited through [`Started::outcome`], so a caller can keep many
    /// messages in flight whose order on the wire is the order of these calls; HTTP
    /// finishes the whole attempt here.
    pub async fn start(&self, event: &StoredEvent, message: Message) -> Started<'_> {
        match self {
            Sink::Http(s) => Started::Done(s.send(message).await),
            Sink::Nats(s) => s.start(event, message).await,
        }
    }

    /// Returns once the transport can take messages. HTTP always can (each attempt
    /// reports its own failure); a broker whose connection is down holds the listener here
    /// until it is back, so an outage costs no attempts and keeps the listener's position.
    pub async fn ready(&self) {
        match self {
            Sink::Http(_) => {}
            Sink::Nats(s) => s.ready().await,
        }
    }

    /// The HTTP sink, for exchanges only HTTP has (Event Grid's validation handshake).
    pub fn as_http(&self) -> Option<&HttpSink> {
        match self {
            Sink::Http(s) => Some(s),
            Sink::Nats(_) => None,
        }
    }

    /// Where messages go, with secrets redacted: for comments and logs.
    pub fn target(&self) -> &str {
        match self {
            Sink::Http(s) => s.url_redacted(),
            Sink::Nats(s) => s.url_redacted(),
        }
    }
}
