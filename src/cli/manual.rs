//! Manual sends for integrators debugging their side: `walhook test-listener` (one sample or
//! stored event, in the listener's format and authentication, with the exchange shown and
//! secrets masked) and `walhook retry --event` (a stored event queued again for a listener).

use std::time::Duration;

use clap::Args;
use uuid::Uuid;

use super::{ConfigArg, Failure};
use crate::config::{Config, ListenerConfig};
use crate::delivery::sink::Trace;
use crate::delivery::test_send::{TestSender, sample_event, test_entity};
use crate::error::ErrorClass;
use crate::queue::resend::{Resent, latest_event, resend, stored_event};

/// Most of a request or answer body printed.
const SHOWN_BODY: usize = 64 * 1024;

/// `walhook test-listener`.
#[derive(Args, Debug)]
pub(super) struct TestListenerArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The listener to send to (its name in the configuration).
    name: String,
    /// The entity of the event (default: the listener's first entity).
    #[arg(long)]
    entity: Option<String>,
    /// Send the latest stored event of this entity id instead of a sample.
    #[arg(long, conflicts_with = "event")]
    id: Option<String>,
    /// Send this stored event (its event id) instead of a sample.
    #[arg(long)]
    event: Option<Uuid>,
}

fn usage(message: String) -> Failure {
    Failure {
        class: ErrorClass::Config,
        message,
    }
}

/// The listener named `name`, or an error listing the configured ones.
pub(super) fn find_listener<'c>(
    config: &'c Config,
    name: &str,
) -> Result<&'c ListenerConfig, Failure> {
    config
        .listeners
        .iter()
        .find(|l| l.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
            usage(if names.is_empty() {
                format!(
                    "no listener is named {name:?}: {} has no [[listener]]",
                    config.path.display()
                )
            } else {
                format!(
                    "no listener is named {name:?} in {}; the listeners are: {}",
                    config.path.display(),
                    names.join(", ")
                )
            })
        })
}

pub(super) async fn run_test_listener(args: TestListenerArgs) -> Result<i32, Failure> {
    let config = Config::load(&args.config.config)?;
    let listener = find_listener(&config, &args.name)?;
    let (event, what) = match (&args.event, &args.id) {
        (None, None) => {
            let entity = test_entity(&config, listener, args.entity.as_deref())?;
            (sample_event(entity), "a sample event")
        }
        (Some(event_id), _) => {
            let (_, client) = args.config.load_and_connect().await?;
            let e = stored_event(&client, *event_id).await?.ok_or_else(|| {
                usage(format!(
                    "no stored event has id {event_id} (never captured, or pruned after [queue] retention)"
                ))
            })?;
            (e, "the stored event")
        }
        (None, Some(id)) => {
            let entity = test_entity(&config, listener, args.entity.as_deref())?;
            let (_, client) = args.config.load_and_connect().await?;
            let e = latest_event(&client, entity.name.as_str(), id).await?.ok_or_else(|| {
                usage(format!(
                    "no stored event of {} {id:?} (none captured yet, or pruned after [queue] retention); leave out --id to send a sample",
                    entity.name
                ))
            })?;
            (e, "the latest stored event")
        }
    };

    let sender = TestSender::new(listener, &config.source.source_system())?;
    println!(
        "sending {what} {}.{} (id {:?}, event {}) to listener {:?}{}{}",
        event.entity,
        event.action,
        event.entity_id,
        event.event_id,
        listener.name,
        if sender.batch() {
            " as a batch of one"
        } else {
            ""
        },
        sender
            .auth_description()
            .map(|a| format!(", authenticated with {a}"))
            .unwrap_or_default()
    );
    let outcome = sender.send(&event).await;
    match &outcome.trace {
        Some(trace) => print!(
            "{}",
            render_exchange(trace, &outcome.body, outcome.latency())
        ),
        None => println!(
            "\npublished to {} ({} ms)\n",
            outcome.target,
            outcome.latency().as_millis()
        ),
    }
    match outcome.failure() {
        None => {
            println!("delivered: the listener accepted the event");
            Ok(0)
        }
        Some(comment) => {
            let after = if outcome.would_retry() {
                "walhook would retry it"
            } else {
                "walhook would not retry it"
            };
            println!("failed: {comment} ({after})");
            Ok(1)
        }
    }
}

/// The request and the answers as text: headers, then a blank line and the body.
fn render_exchange(trace: &Trace, body: &[u8], latency: Duration) -> String {
    let mut out = String::new();
    if trace.request_line.is_empty() {
        out.push_str("(nothing was sent)\n\n");
        return out;
    }
    out.push('\n');
    out.push_str(&trace.request_line);
    out.push('\n');
    for (k, v) in &trace.request_headers {
        out.push_str(&format!("{k}: {v}\n"));
    }
    out.push('\n');
    out.push_str(&shown_body(body));
    out.push_str("\n\n");
    let last = trace.responses.len().saturating_sub(1);
    for (i, r) in trace.responses.iter().enumerate() {
        if i == last {
            out.push_str(&format!("{} ({} ms)\n", r.status_line, latency.as_millis()));
        } else {
            out.push_str(&format!(
                "{} (walhook renewed its credentials and sent the request again)\n",
                r.status_line
            ));
        }
        for (k, v) in &r.headers {
            out.push_str(&format!("{k}: {v}\n"));
        }
        out.push('\n');
        if !r.body.is_empty() {
            out.push_str(&shown_body(r.body.as_bytes()));
            out.push_str("\n\n");
        }
    }
    out
}

fn shown_body(body: &[u8]) -> String {
    let cut = &body[..body.len().min(SHOWN_BODY)];
    let mut text = match std::str::from_utf8(cut) {
        Ok(t) => t.to_owned(),
        Err(_) => return format!("({} bytes, not text)", body.len()),
    };
    if body.len() > SHOWN_BODY {
        text.push_str(&format!("\n… ({} more bytes)", body.len() - SHOWN_BODY));
    }
    text
}

/// `walhook retry --event EVENT_ID --listener L`.
pub(super) async fn run_resend(
    config: &ConfigArg,
    event_id: Uuid,
    listener: &str,
) -> Result<i32, Failure> {
    let (config, client) = config.load_and_connect().await?;
    let l = find_listener(&config, listener)?;
    let Some(event) = stored_event(&client, event_id).await? else {
        println!(
            "not sent: no stored event has id {event_id} (never captured, or pruned after [queue] retention)"
        );
        return Ok(1);
    };
    if let Some(list) = &l.entities
        && !list.iter().any(|e| e.as_str() == event.entity)
    {
        println!(
            "not sent: listener {listener:?} does not receive {} events (its entities are {})",
            event.entity,
            list.iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(1);
    }
    match resend(&client, event_id, listener).await? {
        Resent::Created(id) => {
            println!(
                "queued event {event_id} ({}.{} {:?}) for listener {listener:?} as notification {id}; its earlier notifications stay in walhook.processed / walhook.failed",
                event.entity, event.action, event.entity_id
            );
            Ok(0)
        }
        Resent::AlreadyPending(id) => {
            println!(
                "not queued: event {event_id} already waits for listener {listener:?} in walhook.new (notification {id})"
            );
            Ok(1)
        }
        Resent::NoSuchEvent => {
            println!("not sent: no stored event has id {event_id}");
            Ok(1)
        }
    }
}
