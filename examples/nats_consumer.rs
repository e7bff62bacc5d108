//! A small consumer of walhook's events in NATS JetStream: a durable pull consumer on one
//! subject (or a wildcard), explicit acks, redelivery after `ack_wait`, and a dead-letter
//! subject for messages that failed `max_deliver` times.
//!
//!     cargo run --example nats_consumer -- nats://127.0.0.1:4222 WALHOOK crm api.event.customer
//!
//! Arguments: server url, stream, durable consumer name, subject filter. It prints one JSON
//! line per message (subject, stream sequence, delivery count, headers, body) and acks it.
//! A message whose handling fails is not acked (here: a body that is not JSON is `nak`ed);
//! JetStream redelivers it after `ack_wait`, up to `max_deliver` times, then publishes a
//! MAX_DELIVERIES advisory. The dead-letter task listens for those advisories, reads the
//! message from the stream by its sequence and republishes it to `dead.<subject>` with a
//! `Walhook-Dead-Letter-Of` header (the consumer itself has moved past it). Because the
//! durable consumer keeps its position on the server, a restarted consumer continues where
//! the last one acked.
//!
//! walhook publishes each event with `Nats-Msg-Id` = the event id; consumers that must not
//! process one twice (redelivery after a crash between work and ack) keep the ids they did.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::pull};
use futures_util::StreamExt as _;

/// One message as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The subject it was published to.
    pub subject: String,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// How many times it was delivered (1 the first time).
    pub delivered: i64,
    /// Its headers (the last value of each).
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

/// How long the server waits for an ack before it redelivers.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// Deliveries before a message goes to the dead-letter subject.
pub const MAX_DELIVER: i64 = 5;

/// The durable pull consumer `durable` on `stream`, created when missing, receiving the
/// messages of `filter` from the first one on.
pub async fn durable_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    ack_wait: Duration,
    max_deliver: i64,
) -> Result<jetstream::consumer::Consumer<pull::Config>, async_nats::Error> {
    let stream = js.get_stream(stream).await?;
    let consumer = stream
        .get_or_create_consumer(
            durable,
            pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: filter.to_owned(),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_deliver,
                ..Default::default()
            },
        )
        .await?;
    Ok(consumer)
}

/// Fetches up to `max` messages (waiting at most `wait` for them), passing each to
/// `handle`: acked when it returns `Ok`, `nak`ed (redelivered at once) otherwise.
pub async fn fetch(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    max: usize,
    wait: Duration,
    mut handle: impl FnMut(&Received) -> Result<(), String>,
) -> Result<Vec<Received>, async_nats::Error> {
    let mut batch = consumer
        .fetch()
        .max_messages(max)
        .expires(wait)
        .messages()
        .await?;
    let mut out = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message?;
        let (stream_sequence, delivered) = {
            let info = message.info()?;
            (info.stream_sequence, info.delivered)
        };
        let headers = message
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .filter_map(|(name, values)| {
                        Some((name.to_string(), values.last()?.as_str().to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let received = Received {
            subject: message.subject.to_string(),
            stream_sequence,
            delivered,
            headers,
            body: message.payload.to_vec(),
        };
        match handle(&received) {
            Ok(()) => message.ack().await?,
            Err(_) => message.ack_with(jetstream::AckKind::Nak(None)).await?,
        }
        out.push(received);
    }
    Ok(out)
}

/// Moves messages that reached `max_deliver` on `durable` to `dead.<subject>`, until the
/// connection closes: the dead-letter pattern of JetStream (max deliveries + advisory).
pub async fn forward_dead_letters(
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    durable: String,
) -> Result<(), async_nats::Error> {
    let advisory = format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}");
    let mut advisories = client.subscribe(advisory).await?;
    let source = js.get_stream(&stream).await?;
    while let Some(a) = advisories.next().await {
        let parsed: serde_json::Value = serde_json::from_slice(&a.payload)?;
        let Some(seq) = parsed["stream_seq"].as_u64() else {
            continue;
        };
        let original = source.get_raw_message(seq).await?;
        let mut headers = original.headers.clone();
        headers.insert("Walhook-Dead-Letter-Of", format!("{stream}/{seq}").as_str());
        client
            .publish_with_headers(
                format!("dead.{}", original.subject),
                headers,
                original.payload.clone(),
            )
            .await?;
    }
    Ok(())
}

#[allow(dead_code)] // The tests include this file for the functions above.
#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, stream, durable, filter] = args.as_slice() else {
        eprintln!("usage: nats_consumer URL STREAM DURABLE SUBJECT");
        std::process::exit(2);
    };
    let client = async_nats::connect(url.as_str()).await?;
    let js = jetstream::new(client.clone());
    let consumer = durable_consumer(&js, stream, durable, filter, ACK_WAIT, MAX_DELIVER).await?;
    tokio::spawn(forward_dead_letters(
        client,
        js,
        stream.clone(),
        durable.clone(),
    ));
    loop {
        fetch(&consumer, 100, Duration::from_secs(5), |m| {
            // The work: here, print the event. A body that is not JSON counts as failed.
            let body: serde_json::Value =
                serde_json::from_slice(&m.body).map_err(|e| e.to_string())?;
            let line = serde_json::json!({
                "subject": m.subject,
                "seq": m.stream_sequence,
                "delivered": m.delivered,
                "headers": m.headers,
                "body": body,
            });
            println!("{line}");
            Ok(())
        })
        .await?;
    }
}
