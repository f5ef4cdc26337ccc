//! Errors from reading and checking a configuration.

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config value {key}: {why}")]
    Invalid { key: String, why: String },
}
