//! One test event to a listener, outside the queue: what `walhook test-listener` and the
//! console's "Send test event" button both do (one code path). The event goes out in the
//! listener's format, with its headers, signature and authentication, as a delivery would,
//! but nothing is recorded in the queue; a sample gets a fresh event id each time, so
//! receivers that drop duplicates take it.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};
use uuid::Uuid;

use super::format::Format;
use super::sink::{Sink, SinkError, Trace, TracedResponse};
use super::{Attempt, Verdict};
use crate::config::{Config, EntityConfig, ListenerConfig};
use crate::error::{Classify, ErrorClass};
use crate::queue::StoredEvent;
use crate::types::{Action, Lsn};

/// Why no test event could be made or sent. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum TestSendError {
    /// The configuration has no entity to make a sample of.
    #[error("no [[entity]] is configured")]
    NoEntity,
    /// The entity asked for is not configured.
    #[error("no [[entity]] is named {name:?}; the entities are: {known}")]
    UnknownEntity {
        /// The name asked for.
        name: String,
        /// The configured entities, comma separated.
        known: String,
    },
    /// The listener does not take events of the entity asked for.
    #[error(
        "listener {listener:?} does not receive {entity} events (its entities are {theirs}); choose one of them with --entity"
    )]
    NotReceived {
        /// The listener.
        listener: String,
        /// The entity asked for.
        entity: String,
        /// The listener's entities, comma separated.
        theirs: String,
    },
    /// The listener's transport could not be built from its settings.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl Classify for TestSendError {
    fn class(&self) -> ErrorClass {
        match self {
            TestSendError::Sink(e) => e.class(),
            _ => ErrorClass::Config,
        }
    }
}

/// The entity of a test event: `wanted`, else the listener's first, else the first
/// configured.
pub fn test_entity<'c>(
    config: &'c Config,
    listener: &ListenerConfig,
    wanted: Option<&str>,
) -> Result<&'c EntityConfig, TestSendError> {
    let name = match (wanted, &listener.entities) {
        (Some(w), _) => w.to_owned(),
        (None, Some(list)) if !list.is_empty() => list[0].as_str().to_owned(),
        (None, _) => match config.entities.first() {
            Some(e) => e.name.as_str().to_owned(),
            None => return Err(TestSendError::NoEntity),
        },
    };
    let entity = config
        .entities
        .iter()
        .find(|e| e.name.as_str() == name)
        .ok_or_else(|| TestSendError::UnknownEntity {
            known: config
                .entities
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            name: name.clone(),
        })?;
    if let Some(list) = &listener.entities
        && !list.contains(&entity.name)
    {
        return Err(TestSendError::NotReceived {
            listener: listener.name.clone(),
            entity: name,
            theirs: list
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(entity)
}

/// A sample event of `entity`: Created, id "1", a row of its id columns, a fresh event id.
pub fn sample_event(entity: &EntityConfig) -> StoredEvent {
    let id_columns = entity.id.clone().unwrap_or_else(|| vec!["id".to_owned()]);
    let mut row = Map::new();
    for c in &id_columns {
        row.insert(c.clone(), Value::String("1".into()));
    }
    let entity_id = if id_columns.len() == 1 {
        "1".to_owned()
    } else {
        Value::Array(
            id_columns
                .iter()
                .map(|_| Value::String("1".into()))
                .collect(),
        )
        .to_string()
    };
    StoredEvent {
        event_id: Uuid::new_v4(),
        commit_lsn: Lsn(0),
        seq: 0,
        commit_time: SystemTime::now(),
        entity: entity.name.as_str().to_owned(),
        subject: entity
            .subject
            .as_ref()
            .map(|s| s.replace("{id}", &entity_id)),
        entity_id,
        action: Action::Created,
        derived: None,
        changed_fields: Some(id_columns),
        row: Value::Object(row),
        old: None,
        source_table: format!("{}.{}", entity.table.schema, entity.table.name),
    }
}

/// A listener's format and transport, ready to send test events.
#[derive(Debug)]
pub struct TestSender {
    format: Format,
    sink: Sink,
    batch: bool,
}

/// How one test send went: what the command line prints and the console shows.
#[derive(Clone, Debug)]
pub struct TestOutcome {
    /// The attempt: outcome, status code, failure comment, latency.
    pub attempt: Attempt,
    /// HTTP only: the request and answers as exchanged, secrets masked.
    pub trace: Option<Trace>,
    /// The body as sent.
    pub body: Vec<u8>,
    /// Where it went, secrets redacted.
    pub target: String,
}

impl TestOutcome {
    /// Whether the listener accepted the event.
    pub fn delivered(&self) -> bool {
        self.attempt.verdict() == Verdict::Delivered
    }

    /// Whether walhook would try such a failure again (false when delivered).
    pub fn would_retry(&self) -> bool {
        self.attempt.verdict() == Verdict::Retry
    }

    /// What went wrong, in plain words; `None` when delivered.
    pub fn failure(&self) -> Option<String> {
        if self.delivered() {
            return None;
        }
        Some(
            self.attempt
                .comment
                .clone()
                .unwrap_or_else(|| self.attempt.outcome.describe().to_owned()),
        )
    }

    /// Time from sending to the end of the answer (or the failure).
    pub fn latency(&self) -> Duration {
        self.attempt.latency
    }

    /// The listener's final answer (HTTP), headers and body scrubbed of secrets.
    pub fn answer(&self) -> Option<&TracedResponse> {
        self.trace.as_ref()?.responses.last()
    }
}

impl TestSender {
    /// Builds the listener's format and transport; `Err` when its settings cannot make one.
    pub fn new(listener: &ListenerConfig, source_system: &str) -> Result<Self, TestSendError> {
        let format = Format::for_listener(listener, source_system);
        let batch = listener.batch_size > 1 && format.batches();
        let sink = Sink::for_listener(listener)?;
        Ok(TestSender {
            format,
            sink,
            batch,
        })
    }

    /// Whether the event goes out as a batch of one (the listener takes batches).
    pub fn batch(&self) -> bool {
        self.batch
    }

    /// How requests are authenticated, in words without secrets (`None`: not at all).
    pub fn auth_description(&self) -> Option<String> {
        self.sink.as_http().and_then(|s| s.auth_description())
    }

    /// Sends `event` once, bounded by the listener's timeout, and reports how it went.
    pub async fn send(&self, event: &StoredEvent) -> TestOutcome {
        let message = if self.batch {
            self.format.render_batch(&[event])
        } else {
            self.format.render(event)
        };
        let body = message.body.clone();
        let target = self.sink.target().to_owned();
        let (attempt, trace) = match &self.sink {
            Sink::Http(http) => {
                let (attempt, trace) = http.exchange(message).await;
                (attempt, Some(trace))
            }
            Sink::Nats(_) => (self.sink.send(event, message).await, None),
        };
        TestOutcome {
            attempt,
            trace,
            body,
            target,
        }
    }
}

/// Sends a sample event of the listener's first entity (the console's button): the event
/// and how it went.
pub async fn send_sample(
    config: &Config,
    listener: &ListenerConfig,
) -> Result<(StoredEvent, TestOutcome), TestSendError> {
    let event = sample_event(test_entity(config, listener, None)?);
    let sender = TestSender::new(listener, &config.source.source_system())?;
    let outcome = sender.send(&event).await;
    Ok((event, outcome))
}
