//! Domain newtypes shared by every stage of the pipeline.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log (`XLogRecPtr`), printed as PostgreSQL does: `16/B374D848`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid / "start from the slot's position" LSN.
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// The text was not an LSN of the form `XXX/XXX`.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', like 16/B374D848")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// A PostgreSQL transaction id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Xid(pub u32);

impl fmt::Display for Xid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A PostgreSQL object id (relation or type).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Oid(pub u32);

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The entity type named in events, e.g. `Customer`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct EntityName(String);

impl EntityName {
    /// Accepts names made of ASCII letters, digits, `_`, `-` and `.`, starting with a letter.
    pub fn new(name: &str) -> Result<Self, String> {
        let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok {
            Ok(EntityName(name.to_owned()))
        } else {
            Err(format!(
                "entity name {name:?} must start with a letter and contain only letters, digits, '_', '-' or '.'"
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EntityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A schema-qualified table name; both parts are unquoted identifiers as stored in the catalog.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TableName {
    /// Schema (namespace), e.g. `public`.
    pub schema: String,
    /// Table name, e.g. `customer`.
    pub name: String,
}

impl TableName {
    /// The name quoted for use in SQL: `"public"."customer"`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier, doubling embedded quotes.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (for the replication protocol, which has no bind parameters).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What happened to an entity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Action {
    /// A row was inserted.
    Created,
    /// A row was updated.
    Updated,
    /// A row was deleted.
    Deleted,
    /// The table was truncated (an entity receives it only when its `actions` ask for it).
    Truncated,
}

impl Action {
    /// The name used in event types and in the queue tables: `Created`, `Updated`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Created => "Created",
            Action::Updated => "Updated",
            Action::Deleted => "Deleted",
            Action::Truncated => "Truncated",
        }
    }

    /// The lower-case name used in the configuration: `created`, `updated`, …
    pub fn config_name(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Deleted => "deleted",
            Action::Truncated => "truncated",
        }
    }

    /// All actions, in config order.
    pub const ALL: [Action; 4] = [
        Action::Created,
        Action::Updated,
        Action::Deleted,
        Action::Truncated,
    ];

    /// The row actions an entity captures when its `actions` are not set.
    pub const ROW: [Action; 3] = [Action::Created, Action::Updated, Action::Deleted];
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_postgres_text_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
    }

    #[test]
    fn lsn_rejects_malformed_text() {
        for bad in ["", "/", "1/", "/1", "x/1", "1/2/3", "123456789/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
    }

    #[test]
    fn entity_names_are_restricted_to_safe_characters() {
        assert!(EntityName::new("Customer").is_ok());
        assert!(EntityName::new("9x").is_err());
        assert!(EntityName::new("a b").is_err());
    }
}
