//! Synchronous mode (`[source] synchronous = true`): walhook as a synchronous standby, so
//! a writer's COMMIT returns only once its events are in the queue. The server must name
//! walhook's application_name in `synchronous_standby_names`; walhook must know it is, or
//! its own queue commits would wait for itself.

use tokio_postgres::Client;

use super::{CheckItem, Facts, SetupError};
use crate::config::Config;
use crate::types::quote_literal;

const SQL_SETTINGS: &str = "SELECT current_setting('synchronous_standby_names'), \
     current_setting('synchronous_commit')";

/// The server's synchronous replication settings.
#[derive(Debug, Default)]
pub(super) struct SyncFacts {
    standby_names: String,
    commit: String,
}

pub(super) async fn gather(client: &Client) -> Result<SyncFacts, SetupError> {
    let row = client
        .query_one(SQL_SETTINGS, &[])
        .await
        .map_err(|source| SetupError::Query {
            what: "reading synchronous_standby_names".to_owned(),
            source,
        })?;
    let what = || "reading synchronous_standby_names".to_owned();
    Ok(SyncFacts {
        standby_names: row.try_get(0).map_err(|source| SetupError::Query {
            what: what(),
            source,
        })?,
        commit: row.try_get(1).map_err(|source| SetupError::Query {
            what: what(),
            source,
        })?,
    })
}

/// Whether `setting` (`FIRST 1 (a, "B")`, `ANY 2 (a, b)`, `a, b`, `*`) names `name`;
/// unquoted names match ignoring case, as the server matches them.
pub(crate) fn names_standby(setting: &str, name: &str) -> bool {
    let list = match (setting.find('('), setting.rfind(')')) {
        (Some(open), Some(close)) if open < close => &setting[open + 1..close],
        _ => setting,
    };
    list.split(',').map(str::trim).any(|n| {
        if n == "*" {
            return true;
        }
        match n.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\"") == name,
            None => n.eq_ignore_ascii_case(name),
        }
    })
}

fn application_name(config: &Config) -> String {
    config
        .source
        .connect_params()
        .map(|p| p.application_name().to_owned())
        .unwrap_or_else(|_| "walhook".to_owned())
}

/// The `walhook check` line; `None` when walhook is not and should not be synchronous.
pub(super) fn item(facts: &Facts, config: &Config) -> Option<CheckItem> {
    let f = &facts.synchronous;
    let app = application_name(config);
    let named = !f.standby_names.trim().is_empty() && names_standby(&f.standby_names, &app);
    let fix = format!(
        "ALTER SYSTEM SET synchronous_standby_names = {}; SELECT pg_reload_conf();",
        quote_literal(&app)
    );
    let name = "synchronous";
    match (config.source.synchronous, named) {
        (false, false) => None,
        (false, true) => Some(CheckItem::fail(
            name,
            format!(
                "synchronous_standby_names = {} names walhook ({app}), but [source] synchronous is false: walhook's own queue commits would wait for itself",
                quote_literal(&f.standby_names)
            ),
            "set synchronous = true under [source], or remove walhook from synchronous_standby_names",
        )),
        (true, false) => Some(CheckItem::fail(
            name,
            format!(
                "[source] synchronous = true, but synchronous_standby_names = {} does not name walhook's application_name {app}: COMMITs do not wait for walhook",
                quote_literal(&f.standby_names)
            ),
            fix,
        )),
        (true, true) if matches!(f.commit.as_str(), "off" | "local") => Some(CheckItem::warn(
            name,
            format!(
                "walhook ({app}) is a synchronous standby, but synchronous_commit = {}: COMMITs do not wait for it",
                f.commit
            ),
            "ALTER SYSTEM SET synchronous_commit = on; SELECT pg_reload_conf();",
        )),
        (true, true) => Some(CheckItem::ok(
            name,
            format!(
                "walhook ({app}) is a synchronous standby: a COMMIT returns once walhook has its events in the queue; while walhook is stopped or behind, COMMITs wait (on every table)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::names_standby;

    #[test]
    fn standby_name_lists_are_read_as_the_server_reads_them() {
        assert!(names_standby("walhook", "walhook"));
        assert!(names_standby("FIRST 1 (replica1, WALHOOK)", "walhook"));
        assert!(names_standby("ANY 2 (a, \"walhook\", b)", "walhook"));
        assert!(names_standby("*", "walhook"));
        assert!(!names_standby("\"Walhook\"", "walhook"));
        assert!(!names_standby("replica1, replica2", "walhook"));
    }
}
