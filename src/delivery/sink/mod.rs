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

pub mod http;

use super::Attempt;
use super::format::Message;
use crate::config::ListenerConfig;
use crate::error::{Classify, ErrorClass};

pub use http::{HttpSink, HttpSinkError};

/// Why a listener's sink could not be built. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The HTTP sink's settings (url, headers, secret, client).
    #[error(transparent)]
    Http(#[from] HttpSinkError),
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        match self {
            SinkError::Http(e) => e.class(),
        }
    }
}

/// A listener's transport: built once per listener, shared, used for every attempt.
#[derive(Debug)]
pub enum Sink {
    /// HTTP POST to the listener's url.
    Http(HttpSink),
}

impl Sink {
    /// The sink a listener's config asks for, checked and ready to send.
    pub fn for_listener(listener: &ListenerConfig) -> Result<Sink, SinkError> {
        Ok(Sink::Http(HttpSink::new(listener)?))
    }

    /// Sends one message (one notification or one batch) and reports how it went. Bounded
    /// in time by the listener's `timeout`.
    pub async fn send(&self, message: Message) -> Attempt {
        match self {
            Sink::Http(s) => s.send(message).await,
        }
    }

    /// Where messages go, with secrets redacted: for comments and logs.
    pub fn target(&self) -> &str {
        match self {
            Sink::Http(s) => s.url_redacted(),
        }
    }
}
