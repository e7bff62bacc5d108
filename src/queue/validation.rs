//! `walhook.listener_validation`: the state of each Event Grid webhook's validation
//! handshake, shared by the dispatcher (which runs it), the admin endpoint (which takes
//! the validation GET) and `walhook status` (which reports it). The database's clock
//! decides whether a GET came within the 5-minute window.

use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use url::Url;

use super::{Needs, QueueError, db_error};

/// How long a listener has to GET the validationUrl after the validation event was sent.
pub const VALIDATION_WINDOW: Duration = Duration::from_secs(300);

const USE: Option<(Needs, Option<&super::Session>)> = Some((Needs::Use, None));

const SELECT: &str = "SELECT listener, state, fingerprint, requested_at,
       requested_at + interval '5 minutes', requested_at + interval '5 minutes' > now(),
       validated_at, validated_by, comment
FROM walhook.listener_validation";

const BEGIN: &str = "INSERT INTO walhook.listener_validation AS v
    (listener, fingerprint, state, code_sha256, requested_at, comment, updated_at)
VALUES ($1, $2, 'pending', $3, now(), $4, now())
ON CONFLICT (listener) DO UPDATE SET
    fingerprint = EXCLUDED.fingerprint, state = 'pending', code_sha256 = EXCLUDED.code_sha256,
    requested_at = now(), validated_at = NULL, validated_by = NULL,
    comment = EXCLUDED.comment, updated_at = now()";

const NOTE: &str = "UPDATE walhook.listener_validation SET comment = $3, updated_at = now()
WHERE listener = $1 AND code_sha256 = $2 AND state = 'pending'";

/// A second GET with the same code finds the row validated and changes nothing.
const VALIDATED: &str = "UPDATE walhook.listener_validation
SET state = 'validated',
    validated_at = CASE WHEN state = 'validated' THEN validated_at ELSE now() END,
    validated_by = CASE WHEN state = 'validated' THEN validated_by ELSE $3 END,
    comment = CASE WHEN state = 'validated' THEN comment ELSE $4 END,
    updated_at = now()
WHERE listener = $1 AND code_sha256 = $2
  AND (state = 'validated'
       OR (state = 'pending' AND ($3 = 'response' OR requested_at + interval '5 minutes' > now())))";

const FAILED: &str = "UPDATE walhook.listener_validation
SET state = 'failed', comment = $3, updated_at = now()
WHERE listener = $1 AND code_sha256 = $2 AND state = 'pending'";

const EXPIRED: &str = "UPDATE walhook.listener_validation
SET state = 'failed', comment = $2, updated_at = now()
WHERE listener = $1 AND state = 'pending' AND requested_at + interval '5 minutes' <= now()";

/// Where a listener's handshake stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValidationState {
    /// The validation event was sent; waiting for the code or the GET.
    Pending,
    /// The listener proved it wants the events.
    Validated,
    /// The last handshake failed (see the comment); another follows.
    Failed,
}

impl ValidationState {
    fn parse(s: &str) -> ValidationState {
        match s {
            "validated" => ValidationState::Validated,
            "pending" => ValidationState::Pending,
            _ => ValidationState::Failed,
        }
    }
}

/// One row of `walhook.listener_validation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validation {
    /// The listener's name.
    pub listener: String,
    /// Where its handshake stands.
    pub state: ValidationState,
    /// The url and headers it was made for (see [`fingerprint`]).
    pub fingerprint: String,
    /// When the latest validation event was sent.
    pub requested_at: Option<SystemTime>,
    /// Until when a GET to the validationUrl counts.
    pub deadline: Option<SystemTime>,
    /// Whether that deadline is still ahead (by the database's clock).
    pub window_open: bool,
    /// When it was validated.
    pub validated_at: Option<SystemTime>,
    /// `response` (the code echoed) or `get` (the validationUrl fetched).
    pub validated_by: Option<String>,
    /// What the latest handshake ended with.
    pub comment: Option<String>,
}

/// SHA-256 over a listener's url and headers: what a handshake validates. A change of
/// either means a new handshake. Hashed, so no header value is stored.
pub fn fingerprint(url: &Url, headers: &[(HeaderName, HeaderValue)]) -> String {
    let mut h = Sha256::new();
    h.update(b"walhook eventgrid validation v1\n");
    h.update(url.as_str().as_bytes());
    for (name, value) in headers {
        h.update(b"\n");
        h.update(name.as_str().as_bytes());
        h.update(b": ");
        h.update(value.as_bytes());
    }
    hex(&h.finalize())
}

/// SHA-256 of a validation code, as stored.
pub fn code_sha256(code: &str) -> String {
    hex(&Sha256::digest(code.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Opens a connection for validation bookkeeping (a handshake is rare and short).
pub async fn connect_validation(
    params: &crate::replication::conn::ConnectParams,
) -> Result<Client, QueueError> {
    crate::db::connect(params)
        .await
        .map_err(QueueError::connect)
}

fn row_to_validation(row: &tokio_postgres::Row) -> Result<Validation, QueueError> {
    let err = || db_error("reading walhook.listener_validation", USE);
    let state: String = row.try_get(1).map_err(err())?;
    Ok(Validation {
        listener: row.try_get(0).map_err(err())?,
        state: ValidationState::parse(&state),
        fingerprint: row.try_get(2).map_err(err())?,
        requested_at: row.try_get(3).map_err(err())?,
        deadline: row.try_get(4).map_err(err())?,
        window_open: row
            .try_get::<_, Option<bool>>(5)
            .map_err(err())?
            .unwrap_or(false),
        validated_at: row.try_get(6).map_err(err())?,
        validated_by: row.try_get(7).map_err(err())?,
        comment: row.try_get(8).map_err(err())?,
    })
}

/// The validation state of `listener`, if it ever had a handshake.
pub async fn read_validation(
    client: &Client,
    listener: &str,
) -> Result<Option<Validation>, QueueError> {
    let sql = format!("{SELECT} WHERE listener = $1");
    let row = client
        .query_opt(&sql, &[&listener])
        .await
        .map_err(db_error("reading walhook.listener_validation", USE))?;
    row.as_ref().map(row_to_validation).transpose()
}

/// Every listener's validation state, by name.
pub async fn read_validations(client: &Client) -> Result<Vec<Validation>, QueueError> {
    let sql = format!("{SELECT} ORDER BY listener");
    client
        .query(&sql, &[])
        .await
        .map_err(db_error("reading walhook.listener_validation", USE))?
        .iter()
        .map(row_to_validation)
        .collect()
}

/// Records a new handshake for `listener` (replacing any earlier one): pending, with the
/// hash of its code.
pub async fn begin_validation(
    client: &Client,
    listener: &str,
    fingerprint: &str,
    code_sha256: &str,
    comment: &str,
) -> Result<(), QueueError> {
    client
        .execute(BEGIN, &[&listener, &fingerprint, &code_sha256, &comment])
        .await
        .map_err(db_error(
            "recording an Event Grid validation handshake",
            USE,
        ))?;
    Ok(())
}

/// Updates the comment of the pending handshake with this code.
pub async fn note_validation(
    client: &Client,
    listener: &str,
    code_sha256: &str,
    comment: &str,
) -> Result<(), QueueError> {
    client
        .execute(NOTE, &[&listener, &code_sha256, &comment])
        .await
        .map_err(db_error(
            "recording an Event Grid validation handshake",
            USE,
        ))?;
    Ok(())
}

/// How a listener proved itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValidatedBy {
    /// It answered the validation event with the code.
    Response,
    /// It sent a GET to the validationUrl within the window.
    Get,
}

/// Marks the pending handshake with this code validated; `false` when there is none (a
/// newer handshake replaced it, it failed, or a GET came after the window). A handshake
/// already validated with this code stays as it is (`true`).
pub async fn mark_validated(
    client: &Client,
    listener: &str,
    code_sha256: &str,
    by: ValidatedBy,
) -> Result<bool, QueueError> {
    let (by, comment) = match by {
        ValidatedBy::Response => ("response", "the listener answered with the validation code"),
        ValidatedBy::Get => ("get", "the listener sent a GET to the validationUrl"),
    };
    let n = client
        .execute(VALIDATED, &[&listener, &code_sha256, &by, &comment])
        .await
        .map_err(db_error("recording an Event Grid validation", USE))?;
    Ok(n > 0)
}

/// Marks the pending handshake with this code failed, with what happened.
pub async fn mark_validation_failed(
    client: &Client,
    listener: &str,
    code_sha256: &str,
    comment: &str,
) -> Result<(), QueueError> {
    client
        .execute(FAILED, &[&listener, &code_sha256, &comment])
        .await
        .map_err(db_error(
            "recording an Event Grid validation handshake",
            USE,
        ))?;
    Ok(())
}

/// Marks `listener`'s pending handshake failed once its window is over (whoever sent it).
pub async fn expire_validation(
    client: &Client,
    listener: &str,
    comment: &str,
) -> Result<bool, QueueError> {
    let n = client
        .execute(EXPIRED, &[&listener, &comment])
        .await
        .map_err(db_error(
            "recording an Event Grid validation handshake",
            USE,
        ))?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_change_with_url_and_header_values_and_hide_them() {
        let url = Url::parse("https://example.com/hook").unwrap();
        let key = |v: &'static str| {
            vec![(
                HeaderName::from_static("x-api-key"),
                HeaderValue::from_static(v),
            )]
        };
        let a = fingerprint(&url, &key("one"));
        assert_eq!(a, fingerprint(&url, &key("one")));
        assert_ne!(a, fingerprint(&url, &key("two")));
        assert_ne!(a, fingerprint(&url, &[]));
        let other = Url::parse("https://example.com/hook2").unwrap();
        assert_ne!(a, fingerprint(&other, &key("one")));
        assert_eq!(a.len(), 64);
        assert_eq!(
            code_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
