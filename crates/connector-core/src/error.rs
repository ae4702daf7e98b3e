//! The one error type of the workspace, with a [`ErrorKind`] and a [`RetryClass`].
//!
//! Connectors map their vendor's errors into it in one place (their `parse_error`); the sync
//! engine and the HTTP layer decide what to retry from [`Error::retry_class`] alone.
//! Messages never contain secret values: secrets are [`secrecy`] types and are never formatted.

use std::fmt;
use std::time::Duration;

/// What went wrong, coarsely. Drives retry decisions and CLI exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// Invalid configuration or input (a bad key, value or id). Never retried.
    Config,
    /// Authentication or authorization failed (bad password, revoked token). Never retried.
    Auth,
    /// The thing asked for does not exist (a table, a bucket, a repository).
    NotFound,
    /// The source asked us to slow down (HTTP 429, exhausted quota). Retried after a wait.
    RateLimited,
    /// A temporary failure: network error, timeout, HTTP 5xx, a dropped connection. Retried.
    Transient,
    /// The source answered with something we cannot use (bad data, unsupported type).
    Source,
    /// The knowledge store failed.
    Store,
    /// Persisting or reading sync state failed.
    State,
    /// The sync was cancelled.
    Cancelled,
    /// A bug or an unexpected condition.
    Internal,
}

impl ErrorKind {
    /// A short lowercase name (`rate_limited`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "config",
            ErrorKind::Auth => "auth",
            ErrorKind::NotFound => "not_found",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Transient => "transient",
            ErrorKind::Source => "source",
            ErrorKind::Store => "store",
            ErrorKind::State => "state",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

/// Whether an operation that failed with an error may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Retrying cannot help.
    Permanent,
    /// Retry with exponential backoff.
    Backoff,
    /// Retry, but not before the given delay (Retry-After, rate-limit reset).
    After(Duration),
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The workspace's error: a kind, a message that says what and where, an optional retry
/// delay, and an optional underlying cause.
pub struct Error {
    kind: ErrorKind,
    message: String,
    retry_after: Option<Duration>,
    source: Option<Source>,
}

/// `Result<T, connector_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), retry_after: None, source: None }
    }

    /// A configuration error.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }
    /// An authentication error.
    pub fn auth(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Auth, message)
    }
    /// A not-found error.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    /// A transient error, retried with backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }
    /// A rate-limit error, retried after `retry_after` when known.
    pub fn rate_limited(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        let mut e = Self::new(ErrorKind::RateLimited, message);
        e.retry_after = retry_after;
        e
    }
    /// An error in the data a source returned.
    pub fn source_error(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Source, message)
    }
    /// A knowledge-store error.
    pub fn store(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Store, message)
    }
    /// A state-persistence error.
    pub fn state(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::State, message)
    }
    /// The sync was cancelled.
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "sync cancelled")
    }
    /// An internal error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets the delay before a retry may succeed.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Prefixes the message with context (`table "docs": ...`).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the cause chain.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The delay requested by the source, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether and how to retry.
    pub fn retry_class(&self) -> RetryClass {
        match self.kind {
            ErrorKind::RateLimited | ErrorKind::Transient => match self.retry_after {
                Some(d) => RetryClass::After(d),
                None => RetryClass::Backoff,
            },
            _ => RetryClass::Permanent,
        }
    }

    /// True when a retry may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retry_class() != RetryClass::Permanent
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        let mut source = self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static));
        while let Some(s) = source {
            let text = s.to_string();
            if !text.is_empty() && !self.message.contains(&text) {
                write!(f, ": {text}")?;
            }
            source = s.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({}: {self})", self.kind.as_str())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as _)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::Config,
            std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::BrokenPipe => ErrorKind::Transient,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, "I/O error").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classes_follow_kinds() {
        let table = [
            (Error::config("x"), RetryClass::Permanent),
            (Error::auth("x"), RetryClass::Permanent),
            (Error::not_found("x"), RetryClass::Permanent),
            (Error::transient("x"), RetryClass::Backoff),
            (Error::rate_limited("x", None), RetryClass::Backoff),
            (
                Error::rate_limited("x", Some(Duration::from_secs(7))),
                RetryClass::After(Duration::from_secs(7)),
            ),
            (Error::store("x"), RetryClass::Permanent),
            (Error::cancelled(), RetryClass::Permanent),
        ];
        for (err, class) in table {
            assert_eq!(err.retry_class(), class, "{err:?}");
        }
    }

    #[test]
    fn display_includes_context_and_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = Error::from(io).context("connecting to 127.0.0.1:1");
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert_eq!(e.to_string(), "connecting to 127.0.0.1:1: I/O error: connection refused");
    }
}
