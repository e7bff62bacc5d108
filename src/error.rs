//! The one error classification every module maps its errors onto.
//!
//! Retry loops read [`ErrorClass`] instead of matching on concrete error types, so the
//! policy ("reconnect with backoff", "stop and tell the operator") lives in one table.

/// How the service reacts to an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying after a pause: network errors, server restarts, lock conflicts.
    Transient,
    /// Retrying cannot help until something outside walhook changes (privileges, schema).
    Permanent,
    /// The configuration is wrong; exit with [`EX_CONFIG`] so systemd stops restarting.
    Config,
}

/// Implemented by every module error.
pub trait Classify {
    /// Which class this error belongs to.
    fn class(&self) -> ErrorClass;
}

/// sysexits.h `EX_CONFIG`: configuration error.
pub const EX_CONFIG: i32 = 78;
/// sysexits.h `EX_UNAVAILABLE`: a prerequisite in the database is missing.
pub const EX_UNAVAILABLE: i32 = 69;

impl ErrorClass {
    /// The process exit code for an error of this class that ends the process.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorClass::Config => EX_CONFIG,
            ErrorClass::Permanent => EX_UNAVAILABLE,
            ErrorClass::Transient => 1,
        }
    }
}

/// The class of a server error identified by its SQLSTATE: the one table every module
/// reads, so a code is retried or reported the same way wherever it turns up.
pub fn sqlstate_class(code: &str) -> ErrorClass {
    const TRANSIENT_CODES: &[&str] = &[
        "40001", // serialization_failure
        "40P01", // deadlock_detected
        "55P03", // lock_not_available
        "55006", // object_in_use: e.g. the slot is still held by a previous connection
        "57014", // query_canceled (statement timeout)
        "25006", // read_only_sql_transaction: a failover is in progress
    ];
    const TRANSIENT_CLASSES: &[&str] = &[
        "08",  // connection exception
        "53",  // insufficient resources: disk full, out of memory, too many connections
        "57P", // operator intervention: shutdown, crash, starting up
        "58",  // system error (I/O)
    ];
    if TRANSIENT_CODES.contains(&code) || TRANSIENT_CLASSES.iter().any(|c| code.starts_with(c)) {
        ErrorClass::Transient
    } else if code.starts_with("28") || code == "3D000" {
        // invalid authorization, database does not exist: fix [source]
        ErrorClass::Config
    } else {
        ErrorClass::Permanent
    }
}

/// The class of a tokio-postgres error: by SQLSTATE, and transient when there is none
/// (the connection broke or could not be made).
pub fn pg_error_class(e: &tokio_postgres::Error) -> ErrorClass {
    e.code()
        .map_or(ErrorClass::Transient, |c| sqlstate_class(c.code()))
}

/// Why the service (or one of its loops) stopped with an error: a class and one line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    /// The classification of the underlying error.
    pub class: ErrorClass,
    /// One line naming the problem and the fix.
    pub message: String,
    /// Set when the session cannot run yet for a reason that is not a failure: the
    /// capture loop waits and retries on the hold's own schedule, logging it once.
    pub hold: Option<Hold>,
}

/// Why capture waits without counting as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Another process streams the slot: stand by (deliveries go on) and take over within
    /// seconds once it is gone.
    Standby,
    /// This database is a copy of the one the queue was recorded on: refuse to run until
    /// `walhook setup --adopt`.
    Cloned,
}

impl ServiceError {
    /// An error of `class` with a one-line message.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ServiceError {
            class,
            message: message.into(),
            hold: None,
        }
    }

    /// Keeps the class and message of a module error.
    pub fn from_err<E: Classify + std::fmt::Display>(e: E) -> Self {
        ServiceError::new(e.class(), e.to_string())
    }

    /// A transient error: worth a reconnect.
    pub fn transient(message: impl Into<String>) -> Self {
        ServiceError::new(ErrorClass::Transient, message)
    }
}

impl Classify for ServiceError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_one_class_each() {
        for code in [
            "08006", "53100", "57P01", "57P03", "58030", "40001", "40P01", "55006", "57014",
        ] {
            assert_eq!(sqlstate_class(code), ErrorClass::Transient, "{code}");
        }
        for code in ["28P01", "28000", "3D000"] {
            assert_eq!(sqlstate_class(code), ErrorClass::Config, "{code}");
        }
        for code in ["42501", "42P01", "23505"] {
            assert_eq!(sqlstate_class(code), ErrorClass::Permanent, "{code}");
        }
    }
}
