//! PostgreSQL server versions: which walhook supports, and which pgoutput options each knows.

use std::fmt;

/// Oldest major version walhook supports: `wal_status` of slots and
/// `publish_via_partition_root` appeared in 13.
pub const MIN_SUPPORTED_MAJOR: u32 = 13;
/// Major version the test suite runs against.
pub const TESTED_MAJOR: u32 = 15;
/// pgoutput sends logical decoding messages (walhook's heartbeats) from 14 on.
const MESSAGES_SINCE_MAJOR: u32 = 14;
/// Logical slots can be synchronized to physical standbys (`failover`) from 17 on, so a
/// promotion keeps the slot instead of leaving a gap.
const FAILOVER_SLOTS_SINCE_MAJOR: u32 = 17;

/// A server version as `server_version_num` counts it (150004 for 15.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32);

impl ServerVersion {
    /// Reads `server_version` as libpq does: "15.4", "16beta1", "9.6.24",
    /// "15.4 (Debian 15.4-1)". `None` when it does not start with a number.
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let mut parts = text.split(|c: char| !c.is_ascii_digit());
        let major: u32 = parts.next()?.parse().ok()?;
        let rest: Vec<u32> = text
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .strip_prefix('.')
            .map(|r| {
                r.split('.')
                    .map_while(|p| {
                        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                        digits.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let num = if major >= 10 {
            major * 10_000 + rest.first().copied().unwrap_or(0)
        } else {
            major * 10_000
                + rest.first().copied().unwrap_or(0) * 100
                + rest.get(1).copied().unwrap_or(0)
        };
        Some(ServerVersion(num))
    }

    /// The major version (15 for 150004; 9 for 9.6).
    pub fn major(self) -> u32 {
        self.0 / 10_000
    }

    /// Whether this server creates logical slots with `failover = true`.
    pub fn has_failover_slots(self) -> bool {
        self.major() >= FAILOVER_SLOTS_SINCE_MAJOR
    }

    /// Whether walhook supports this server.
    pub fn is_supported(self) -> bool {
        self.major() >= MIN_SUPPORTED_MAJOR
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.0 % 10_000)
    }
}

/// The START_REPLICATION options for pgoutput on `version`: only what that version knows,
/// since an unknown option is an error.
pub fn pgoutput_options(version: ServerVersion, publication_literal: &str) -> String {
    let mut o = format!("proto_version '1', publication_names {publication_literal}");
    if version.major() >= MESSAGES_SINCE_MAJOR {
        o.push_str(", messages 'true'");
    }
    o
}

/// The replication command that creates the pgoutput slot `slot_ident` (already quoted) on
/// `version`: with `FAILOVER` where the server knows it, in the option list syntax that
/// 15 introduced; the legacy keyword form before (it is all 13 and 14 accept).
pub fn create_slot_command(version: ServerVersion, slot_ident: &str) -> String {
    if version.has_failover_slots() {
        format!(
            "CREATE_REPLICATION_SLOT {slot_ident} LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER)"
        )
    } else {
        format!("CREATE_REPLICATION_SLOT {slot_ident} LOGICAL pgoutput NOEXPORT_SNAPSHOT")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_version_is_read_as_libpq_does() {
        assert_eq!(ServerVersion::parse("15.4"), Some(ServerVersion(150004)));
        assert_eq!(
            ServerVersion::parse("15.4 (Debian 15.4-1.pgdg120+1)"),
            Some(ServerVersion(150004))
        );
        assert_eq!(ServerVersion::parse("16beta1"), Some(ServerVersion(160000)));
        assert_eq!(ServerVersion::parse("9.6.24"), Some(ServerVersion(90624)));
        assert_eq!(ServerVersion::parse("17"), Some(ServerVersion(170000)));
        assert_eq!(ServerVersion::parse("devel"), None);
        assert_eq!(ServerVersion::parse(""), None);
        assert_eq!(ServerVersion(150004).major(), 15);
        assert_eq!(ServerVersion(150004).to_string(), "15.4");
    }

    #[test]
    fn supported_versions_start_at_thirteen() {
        assert!(!ServerVersion(120017).is_supported());
        assert!(ServerVersion(130000).is_supported());
        assert!(ServerVersion(180001).is_supported());
    }

    #[test]
    fn messages_option_is_sent_from_fourteen_on() {
        let o13 = pgoutput_options(ServerVersion(130012), "'p'");
        assert_eq!(o13, "proto_version '1', publication_names 'p'");
        let o14 = pgoutput_options(ServerVersion(140000), "'p'");
        assert_eq!(
            o14,
            "proto_version '1', publication_names 'p', messages 'true'"
        );
    }

    #[test]
    fn slots_are_created_with_failover_from_17_on() {
        assert_eq!(
            create_slot_command(ServerVersion(150004), "\"w\""),
            "CREATE_REPLICATION_SLOT \"w\" LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_command(ServerVersion(170002), "\"w\""),
            "CREATE_REPLICATION_SLOT \"w\" LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER)"
        );
        assert!(!ServerVersion(160000).has_failover_slots());
    }
}
