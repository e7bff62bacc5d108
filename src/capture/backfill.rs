//! Backfill chunks in the replication stream (`walhook backfill`): which ones are genuine.
//!
//! Any role may call `pg_logical_emit_message`, so a message with the backfill prefix proves
//! nothing by itself. Each backfill has a random token in `walhook.backfill`, which only
//! roles that can read walhook's schema see; a chunk becomes events only when it carries its
//! backfill's token.

use std::collections::HashMap;

use uuid::Uuid;

use super::mapper::Chunk;
use crate::db::Source;
use crate::error::{ErrorClass, ServiceError};

const RUN_TOKEN: &str = "SELECT token FROM walhook.backfill WHERE id = $1";

/// Backfills looked up so far; more than this and the cache starts over.
const MAX_KNOWN: usize = 1024;

/// The tokens of the backfills seen in the stream, by id (`None`: no such backfill).
#[derive(Debug, Default)]
pub(super) struct Runs {
    known: HashMap<i64, Option<Uuid>>,
}

impl Runs {
    /// Whether `chunk` carries the token of a backfill recorded in `walhook.backfill`. A
    /// backfill's row commits before its first chunk, so a lookup that finds none is final.
    pub(super) async fn genuine(
        &mut self,
        chunk: &Chunk,
        source: &Source,
    ) -> Result<bool, ServiceError> {
        if let Some(token) = self.known.get(&chunk.run) {
            return Ok(*token == Some(chunk.token));
        }
        let client = source.connect().await?;
        let row = client
            .query_opt(RUN_TOKEN, &[&chunk.run])
            .await
            .map_err(|e| lookup_failed(&e))?;
        let token: Option<Uuid> = match row {
            Some(r) => Some(r.try_get(0).map_err(|e| lookup_failed(&e))?),
            None => None,
        };
        if self.known.len() >= MAX_KNOWN {
            self.known.clear();
        }
        self.known.insert(chunk.run, token);
        Ok(token == Some(chunk.token))
    }
}

fn lookup_failed(e: &tokio_postgres::Error) -> ServiceError {
    ServiceError::new(
        ErrorClass::Transient,
        format!("cannot look up a backfill in walhook.backfill: {e}"),
    )
}
