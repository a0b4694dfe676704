//! Errors that reach SQL. Each names the field and the rule; `report` turns
//! one into an ERROR with a fitting SQLSTATE.

use pgrx::prelude::*;
use pgrx::spi::SpiError;
use thiserror::Error;

use crate::filters::FilterError;
use crate::limits::TooLarge;
use crate::links::LinkError;
use crate::retry::ScheduleError;
use crate::rules::RuleError;
use crate::signing::SecretError;
use crate::target::UrlError;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("{0}")]
    Filter(#[from] FilterError),
    #[error("{0}")]
    Secret(#[from] SecretError),
    #[error("{0}")]
    Schedule(#[from] ScheduleError),
    #[error("{0}")]
    TooLarge(#[from] TooLarge),
    #[error("{0}")]
    Rule(#[from] RuleError),
    #[error("invalid {field}: {rule}")]
    Invalid {
        field: std::borrow::Cow<'static, str>,
        rule: String,
    },
    #[error("invalid url: {0}")]
    Url(UrlError),
    #[error("{0}")]
    Duplicate(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    LimitReached(String),
    #[error(transparent)]
    Spi(#[from] SpiError),
    #[error("could not read column {0}")]
    Column(String),
}

impl Error {
    pub fn invalid(field: &'static str, rule: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// `invalid` for a field named at run time (a column of the row).
    pub fn invalid_field(field: String, rule: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            rule: rule.into(),
        }
    }

    fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            Error::Duplicate(_) => ERRCODE_UNIQUE_VIOLATION,
            Error::NotFound(_) => ERRCODE_FOREIGN_KEY_VIOLATION,
            Error::LimitReached(_) => ERRCODE_CHECK_VIOLATION,
            Error::Spi(_) | Error::Column(_) => ERRCODE_INTERNAL_ERROR,
            _ => ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }

    /// Raises this error as a Postgres ERROR (does not return).
    pub fn report(self) -> ! {
        ereport!(PgLogLevel::ERROR, self.sqlstate(), self.to_string());
        unreachable!("ereport(ERROR) does not return")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Keeps Rust backtraces out of error reports. pgrx attaches one to an ERROR's
/// DETAIL whenever the server was started with RUST_BACKTRACE set (a Rust
/// developer's shell); clients and the server log get the message alone.
pub fn quiet_backtraces() {
    // SAFETY: called from _PG_init, before this library starts any thread;
    // PostgreSQL processes are single-threaded at that point.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
}

/// Unwraps a result at the SQL boundary, raising the error as an ERROR.
pub trait OrReport<T> {
    fn or_report(self) -> T;
}

impl<T> OrReport<T> for Result<T> {
    fn or_report(self) -> T {
        self.unwrap_or_else(|e| e.report())
    }
}
