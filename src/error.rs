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
