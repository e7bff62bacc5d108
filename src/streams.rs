//! JetStream streams for NATS listeners: `walhook check` verifies that a stream captures
//! every subject a listener publishes to (and that its duplicate window covers a retry after
//! a crash); `walhook setup` creates the stream set in `[listener.nats.stream]`, or adds the
//! subjects it lacks.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::{Config, ListenerConfig, NatsConfig, Retention, Storage, StreamSettings};
use crate::delivery::dispatcher::DEFAULT_LEASE_EXTRA;
use crate::delivery::sink::nats::{connect_options, endpoint};
use crate::error::{Classify, ErrorClass};
use crate::setup::{CheckItem, Verdict};
use crate::types::Action;

/// Longest `walhook check` or `walhook setup` waits for a NATS server.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `walhook setup` could not prepare a listener's stream.
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: {problem}; {fix}")]
pub struct StreamError {
    /// Listener name.
    pub listener: String,
    /// What went wrong, in the server's words where it gave some.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

impl Classify for StreamError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Transient
    }
}

/// The NATS listeners of `config` with their settings.
fn nats_listeners(config: &Config) -> impl Iterator<Item = (&ListenerConfig, &NatsConfig)> {
    config
        .listeners
        .iter()
        .filter_map(|l| l.nats.as_ref().map(|n| (l, n)))
}

/// Every subject `listener` publishes to, from the entities and actions it receives.
pub fn subjects(config: &Config, listener: &ListenerConfig, nats: &NatsConfig) -> Vec<String> {
    let mut out = BTreeSet::new();
    for entity in &config.entities {
        if listener
            .entities
            .as_ref()
            .is_some_and(|chosen| !chosen.contains(&entity.name))
        {
            continue;
        }
        let actions: Vec<Action> = entity
            .actions
            .iter()
            .copied()
            .filter(|a| listener.actions.contains(a))
            .collect();
        if nats.subject.uses_action() {
            for action in actions {
                out.insert(nats.subject.render(entity.name.as_str(), action));
            }
        } else if let Some(action) = actions.first() {
            out.insert(nats.subject.render(entity.name.as_str(), *action));
        }
    }
    out.into_iter().collect()
}

/// Connects to a listener's server, without retrying: for check and setup.
async fn connect(
    listener: &ListenerConfig,
    nats: &NatsConfig,
) -> Result<jetstream::Context, String> {
    let options = connect_options(
        nats,
        listener.ca_file.as_ref(),
        &listener.name,
        ADMIN_TIMEOUT,
    )?;
    let client = tokio::time::timeout(
        ADMIN_TIMEOUT * 2,
        options.connect(listener.url.expose().as_str()),
    )
    .await
    .map_err(|_| format!("no answer within {}s", ADMIN_TIMEOUT.as_secs() * 2))?
    .map_err(|e| e.to_string())?;
    Ok(jetstream::ContextBuilder::new()
        .timeout(ADMIN_TIMEOUT)
        .build(client))
}

/// One check item per NATS listener: connected, every subject captured, duplicate window.
pub async fn check(config: &Config) -> Vec<CheckItem> {
    let mut items = Vec::new();
    for (listener, nats) in nats_listeners(config) {
        items.extend(check_listener(config, listener, nats).await);
    }
    items
}

fn item(name: String, verdict: Verdict, detail: String, fix: Option<String>) -> CheckItem {
    CheckItem {
        name,
        verdict,
        detail,
        fix,
    }
}

async fn check_listener(
    config: &Config,
    listener: &ListenerConfig,
    nats: &NatsConfig,
) -> Vec<CheckItem> {
    let name = format!("nats listener {}", listener.name);
    let at = endpoint(&listener.url);
    let js = match connect(listener, nats).await {
        Ok(js) => js,
        Err(e) => {
            return vec![item(
                name,
                Verdict::Fail,
                format!("cannot connect to {at}: {e}"),
                Some("start nats-server with JetStream (-js), or check the listener's url, credentials and ca_file".to_owned()),
            )];
        }
    };
    let subjects = subjects(config, listener, nats);
    let mut captured: Vec<(String, String)> = Vec::new();
    let mut missing = Vec::new();
    for subject in &subjects {
        match js.stream_by_subject(subject.clone()).await {
            Ok(stream) => captured.push((subject.clone(), stream)),
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                missing.push(subject.clone())
            }
            Err(e) => {
                return vec![item(
                    name,
                    Verdict::Fail,
                    format!("the JetStream API on {at} did not answer: {e}"),
                    Some("enable JetStream on the server (nats-server -js, or a jetstream {} block) for walhook's account".to_owned()),
                )];
            }
        }
    }
    if !missing.is_empty() {
        return vec![item(
            name,
            Verdict::Fail,
            format!(
                "no JetStream stream on {at} captures {}: publishing there fails",
                missing.join(", ")
            ),
            Some(missing_fix(config, listener, nats, &missing)),
        )];
    }
    let streams: BTreeSet<&str> = captured.iter().map(|(_, s)| s.as_str()).collect();
    let mut items = vec![item(
        name.clone(),
        Verdict::Ok,
        format!(
            "{} subject(s) ({}) captured on {at} by stream {}",
            subjects.len(),
            nats.subject,
            streams.iter().copied().collect::<Vec<_>>().join(", ")
        ),
        None,
    )];
    // A retry after a crash comes once the lease expires: the window must outlast it.
    let needed = listener.timeout + DEFAULT_LEASE_EXTRA + Duration::from_secs(30);
    for stream_name in streams {
        let Ok(mut s) = js.get_stream(stream_name).await else {
            continue;
        };
        let Ok(info) = s.info().await else { continue };
        let window = info.config.duplicate_window;
        if window < needed {
            items.push(item(
                format!("nats stream {stream_name}"),
                Verdict::Warn,
                format!(
                    "duplicate window {} is shorter than a retry after a crash can take ({}: the listener timeout plus the {}s lease); such a retry is stored twice",
                    humantime::format_duration(window),
                    humantime::format_duration(needed),
                    DEFAULT_LEASE_EXTRA.as_secs()
                ),
                Some(format!(
                    "raise the stream's duplicate window to at least {} (nats stream edit {stream_name} --dupe-window {}s)",
                    humantime::format_duration(needed),
                    needed.as_secs()
                )),
            ));
        }
    }
    items
}

fn missing_fix(
    config: &Config,
    listener: &ListenerConfig,
    nats: &NatsConfig,
    missing: &[String],
) -> String {
    match &nats.stream {
        Some(s)
            if missing
                .iter()
                .all(|m| s.subjects.iter().any(|p| subject_matches(p, m))) =>
        {
            format!(
                "run `walhook setup --config {}` to create stream {} (or add its subjects {}) on the server",
                config.path.display(),
                s.name,
                s.subjects.join(", ")
            )
        }
        Some(s) => format!(
            "[listener.nats.stream] subjects of listener {} ({}) do not cover {}: add them (or remove subjects for the default {}), then run `walhook setup`",
            listener.name,
            s.subjects.join(", "),
            missing.join(", "),
            nats.subject.wildcard()
        ),
        None => format!(
            "add a stream: set [listener.nats.stream] name = \"WALHOOK\" for listener {} and run `walhook setup`, or create one yourself: nats stream add WALHOOK --subjects '{}'",
            listener.name,
            nats.subject.wildcard()
        ),
    }
}

/// Whether NATS subject filter `filter` matches `subject` (`*` one token, `>` the rest).
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The stream configuration walhook creates for `s`.
fn stream_config(s: &StreamSettings) -> stream::Config {
    stream::Config {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        retention: match s.retention {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::Interest => stream::RetentionPolicy::Interest,
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        },
        storage: match s.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        num_replicas: s.replicas,
        max_age: s.max_age,
        duplicate_window: s.duplicate_window,
        ..Default::default()
    }
}

/// What `walhook setup --print-sql` says about streams: SQL comments, since streams are
/// not SQL.
pub fn describe_plan(config: &Config) -> String {
    let mut out = String::new();
    for (listener, nats) in nats_listeners(config) {
        if let Some(s) = &nats.stream {
            out.push_str(&format!(
                "\n-- NATS listener {}: `walhook setup` also creates JetStream stream {} on {} if missing\n--   (subjects {}, retention {:?}, storage {:?}, replicas {}, max age {}, duplicate window {})\n",
                listener.name,
                s.name,
                endpoint(&listener.url),
                s.subjects.join(", "),
                s.retention,
                s.storage,
                s.replicas,
                humantime::format_duration(s.max_age),
                humantime::format_duration(s.duplicate_window),
            ));
        }
    }
    out
}

/// Creates each configured stream that is missing, or adds the configured subjects an
/// existing one lacks; returns one line per listener saying what was done, and whether
/// anything changed.
pub async fn setup(config: &Config) -> Result<Vec<(bool, String)>, StreamError> {
    let mut done = Vec::new();
    for (listener, nats) in nats_listeners(config) {
        let Some(settings) = &nats.stream else {
            continue;
        };
        let at = endpoint(&listener.url);
        let fail = |problem: String, fix: &str| StreamError {
            listener: listener.name.clone(),
            problem,
            fix: fix.to_owned(),
        };
        let js = connect(listener, nats).await.map_err(|e| {
            fail(
                format!("cannot connect to {at}: {e}"),
                "start nats-server with JetStream (-js), or check the listener's url, credentials and ca_file",
            )
        })?;
        match js.get_stream(&settings.name).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| {
                    fail(
                        format!("cannot read stream {}: {e}", settings.name),
                        "check that walhook's NATS user may use the JetStream API",
                    )
                })?;
                let mut config = info.config.clone();
                let lacking: Vec<String> = settings
                    .subjects
                    .iter()
                    .filter(|s| !config.subjects.contains(s))
                    .cloned()
                    .collect();
                if lacking.is_empty() {
                    done.push((
                        false,
                        format!(
                            "JetStream stream {} on {at} already captures {}",
                            settings.name,
                            settings.subjects.join(", ")
                        ),
                    ));
                    continue;
                }
                config.subjects.extend(lacking.iter().cloned());
                js.update_stream(config).await.map_err(|e| {
                    fail(
                        format!("cannot add subjects {} to stream {}: {e}", lacking.join(", "), settings.name),
                        "add them by hand (nats stream edit), or give walhook's NATS user the right to manage streams",
                    )
                })?;
                done.push((
                    true,
                    format!(
                        "added subjects {} to JetStream stream {} on {at}",
                        lacking.join(", "),
                        settings.name
                    ),
                ));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref api)
                        if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                js.create_stream(stream_config(settings)).await.map_err(|e| {
                    fail(
                        format!("cannot create stream {}: {e}", settings.name),
                        "check that no other stream captures the same subjects and that walhook's NATS user may create streams",
                    )
                })?;
                done.push((
                    true,
                    format!(
                        "created JetStream stream {} on {at} capturing {}",
                        settings.name,
                        settings.subjects.join(", ")
                    ),
                ));
            }
            Err(e) => {
                return Err(fail(
                    format!("the JetStream API on {at} did not answer: {e}"),
                    "enable JetStream on the server (nats-server -js) for walhook's account",
                ));
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_filters_match_tokens_and_tails() {
        assert!(subject_matches("api.event.*", "api.event.customer"));
        assert!(!subject_matches("api.event.*", "api.event.customer.v2"));
        assert!(subject_matches("api.>", "api.event.customer.v2"));
        assert!(!subject_matches("api.event.*", "api.events.customer"));
        assert!(!subject_matches("api.event", "api.event.customer"));
        assert!(subject_matches("api.event.customer", "api.event.customer"));
    }
}
