//! Kiln's error for a failed call to Redis, and how it is told to clients and the log.

use kiln_reapi::status::{Classify, ErrorKind};

/// A failed call to Redis: `UNAVAILABLE` to clients, naming Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Redis (or connecting to it) took longer than `redis.timeout_ms`.
    #[error("Redis at {at} did not answer within {ms} ms")]
    Timeout {
        /// Where Redis is (without credentials).
        at: String,
        /// The bound.
        ms: u64,
    },
    /// Redis answered with an error, or could not be reached.
    #[error("Redis at {at}: {message}")]
    Failed {
        /// Where Redis is (without credentials).
        at: String,
        /// What went wrong.
        message: String,
    },
    /// Redis could not be reached a moment ago: the call was not tried (see [`BACKOFF`]).
    #[error("Redis at {at} is unreachable ({why}); trying again within a second")]
    Down {
        /// Where Redis is (without credentials).
        at: String,
        /// The last failure.
        why: String,
    },
    /// The configured URL is not one.
    #[error("redis.url: {0}")]
    Url(String),
}

impl RedisError {
    /// Whether the call was not even tried (Redis failed a moment ago): worth no more than a
    /// debug line, the failure itself having been reported.
    pub fn is_known_down(&self) -> bool {
        matches!(self, RedisError::Down { .. })
    }

    /// Logs a failure `what` about `subject` (an action, a blob, an operation): a warning, or
    /// a debug line when the call was not even tried ([`RedisError::is_known_down`]).
    pub fn log(&self, subject: &dyn std::fmt::Debug, what: &str) {
        if self.is_known_down() {
            tracing::debug!(subject = ?subject, error = %self, "{what}");
        } else {
            tracing::warn!(subject = ?subject, error = %self, "{what}");
        }
    }
}

impl Classify for RedisError {
    fn kind(&self) -> ErrorKind {
        match self {
            RedisError::Url(_) => ErrorKind::Internal,
            _ => ErrorKind::Unavailable,
        }
    }

    fn client_message(&self) -> String {
        self.to_string()
    }
}
