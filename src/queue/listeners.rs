//! Mirrors the configured listeners into `walhook.listener`, so SQL users can join on them.

use tokio_postgres::Client;

use super::{QueueError, db_error};
use crate::config::ListenerConfig;
use crate::queue::Subscription;

/// Upserts every configured listener (enabled) and disables the ones no longer configured;
/// their rows stay so that old notifications still join to a name.
const SYNC_LISTENERS: &str = "WITH cfg AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS c(name, url, entities)
), upserted AS (
    INSERT INTO walhook.listener AS l (name, url, entities, enabled, added_at, updated_at)
    SELECT name, url, string_to_array(entities, ','), true, now(), now() FROM cfg
    ON CONFLICT (name) DO UPDATE SET
        url = EXCLUDED.url, entities = EXCLUDED.entities, enabled = true,
        updated_at = CASE
            WHEN (l.url, l.entities, l.enabled) IS DISTINCT FROM (EXCLUDED.url, EXCLUDED.entities, true)
            THEN now() ELSE l.updated_at END
    RETURNING 1
)
UPDATE walhook.listener SET enabled = false, updated_at = now()
WHERE enabled AND name <> ALL ($1::text[])";

/// Writes the listeners of the current config to `walhook.listener`.
pub async fn sync_listeners(
    client: &Client,
    listeners: &[ListenerConfig],
) -> Result<(), QueueError> {
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let urls: Vec<&str> = listeners.iter().map(|l| l.url.redacted()).collect();
    let entities: Vec<Option<String>> = listeners
        .iter()
        .map(|l| {
            l.entities
                .as_ref()
                .map(|es| es.iter().map(|e| e.as_str()).collect::<Vec<_>>().join(","))
        })
        .collect();
    client
        .execute(SYNC_LISTENERS, &[&names, &urls, &entities])
        .await
        .map_err(db_error("mirroring listeners into walhook.listener", None))?;
    Ok(())
}

/// The fan-out subscriptions of the configured listeners.
pub fn subscriptions(listeners: &[ListenerConfig]) -> Vec<Subscription> {
    listeners
        .iter()
        .map(|l| Subscription {
            listener: l.name.clone(),
            entities: l.entities.clone(),
            actions: l.actions.clone(),
            derived_actions: l.derived_actions.clone(),
            filter: l.filter.clone(),
            debounce: l.debounce,
            cursor: l.keeps_cursor(),
        })
        .collect()
}
