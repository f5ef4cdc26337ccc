//! Bearer tokens: `kiln token create` makes a secret, prints it once, and stores only its
//! SHA-256 with the token's name, roles and instances in a TOML file (mode 0600) that the
//! server re-reads when it changes. A token is presented as `authorization: Bearer SECRET`.

use crate::{Grant, Role};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A failure reading or writing the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a token file.
    #[error("{path}: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A token with that name exists already.
    #[error("a token named {0:?} exists already (revoke it first)")]
    Exists(String),
    /// No token has that name.
    #[error("no token named {0:?}")]
    Unknown(String),
    /// `worker` or `admin` limited to some instances: the scheduler dispatches by platform,
    /// not by instance, so such a worker would still receive (and report results for) every
    /// instance; the admin pages show every instance.
    #[error("the {} role cannot be limited to instances: it covers the whole farm", .0.name())]
    ScopedFarmWide(Role),
    /// The certificate for an enrolment could not be made (the token stays unused).
    #[error("cannot issue the certificate: {0}")]
    Issue(String),
    /// The system's random source failed.
    #[error("no randomness for a token: {0}")]
    Random(String),
}

/// One stored token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// Who it is for (shown in logs and errors).
    pub name: String,
    /// SHA-256 of the secret, hex.
    pub sha256: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// The instances they apply to; empty for all.
    #[serde(default)]
    pub instances: Vec<String>,
}

impl TokenEntry {
    /// The grants this token carries.
    pub fn grants(&self) -> Vec<Grant> {
        Grant::all(&self.roles, &self.instances)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// The tokens of one file, by hash.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<String, TokenEntry>,
}

/// A fresh secret: `kiln_` and 256 random bits in hex.
pub fn new_secret() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(format!("kiln_{}", hex::encode(bytes)))
}

/// The SHA-256 of a secret, hex.
pub fn hash(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

fn read(path: &Path) -> Result<File, TokenError> {
    read_toml(path)
}

/// Reads a TOML file of `T` (a missing file is the default).
pub(crate) fn read_toml<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
) -> Result<T, TokenError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| TokenError::Format {
            path: path.to_path_buf(),
            why: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(TokenError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads the TOML file at `path`, lets `change` edit it, and writes it back when `change`
/// says it changed, all under an exclusive lock on the file's directory. Concurrent
/// commands and enrolments (two workers racing to redeem one join token, `kiln token
/// create` while the server enrols a worker) then neither lose each other's writes nor both
/// succeed. The directory is locked rather than a lock file, so that a file made under sudo
/// cannot lock the server out.
pub(crate) fn update<T, R>(
    path: &Path,
    change: impl FnOnce(&mut T) -> Result<(R, bool), TokenError>,
) -> Result<R, TokenError>
where
    T: serde::de::DeserializeOwned + Serialize + Default,
{
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let lock = std::fs::File::open(dir).map_err(io)?;
    lock.lock().map_err(io)?;
    let mut file = read_toml(path)?;
    let (result, changed) = change(&mut file)?;
    if changed {
        write_toml(path, &file)?;
    }
    Ok(result)
}

/// Writes `value` as TOML to `path` atomically, mode 0600 (keeping the owner of a file it
/// replaces).
fn write_toml<T: Serialize>(path: &Path, file: &T) -> Result<(), TokenError> {
    let io = |source| TokenError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let text = toml::to_string(file).map_err(|e| TokenError::Format {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let temp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io)?;
    // Run as another user (sudo), keep the file readable by the server that owns it.
    if let Ok(old) = std::fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        let _ = std::os::unix::fs::fchown(&f, Some(old.uid()), Some(old.gid()));
    }
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)
}

impl Tokens {
    /// Reads a token file (a missing file holds no tokens).
    pub fn load(path: &Path) -> Result<Tokens, TokenError> {
        let file = read(path)?;
        Ok(Tokens {
            by_hash: file
                .token
                .into_iter()
                .map(|t| (t.sha256.clone(), t))
                .collect(),
        })
    }

    /// Adds a token held in memory only.
    pub fn insert(&mut self, entry: TokenEntry) {
        self.by_hash.insert(entry.sha256.clone(), entry);
    }

    /// Whether a token with this hash is here.
    pub fn has_hash(&self, hash: &str) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// The token whose secret this is.
    pub fn find(&self, secret: &str) -> Option<&TokenEntry> {
        self.by_hash.get(&hash(secret))
    }

    /// Adds a token to the file at `path`; returns its secret (shown once, never stored).
    pub fn create(
        path: &Path,
        name: &str,
        roles: &[Role],
        instances: &[String],
    ) -> Result<String, TokenError> {
        if let Some(role) = Role::scoped_farm_wide(roles, instances) {
            return Err(TokenError::ScopedFarmWide(role));
        }
        update(path, |file: &mut File| {
            if file.token.iter().any(|t| t.name == name) {
                return Err(TokenError::Exists(name.to_string()));
            }
            let secret = new_secret()?;
            file.token.push(TokenEntry {
                name: name.to_string(),
                sha256: hash(&secret),
                roles: roles.to_vec(),
                instances: instances.to_vec(),
            });
            Ok((secret, true))
        })
    }

    /// Removes the token named `name` from the file at `path`.
    pub fn revoke(path: &Path, name: &str) -> Result<(), TokenError> {
        update(path, |file: &mut File| {
            let before = file.token.len();
            file.token.retain(|t| t.name != name);
            if file.token.len() == before {
                return Err(TokenError::Unknown(name.to_string()));
            }
            Ok(((), true))
        })
    }

    /// Every token's name, roles and instances (never a secret: none is stored).
    pub fn list(path: &Path) -> Result<Vec<TokenEntry>, TokenError> {
        Ok(read(path)?.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tokens_are_stored_hashed_found_by_secret_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth/tokens.toml");
        let secret = Tokens::create(
            &path,
            "ci",
            &[Role::CacheRead, Role::Execute],
            &["main".into()],
        )
        .unwrap();
        assert!(secret.starts_with("kiln_") && secret.len() == 5 + 64);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret), "the secret itself is never stored");
        assert!(text.contains(&hash(&secret)));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            Tokens::create(&path, "ci", &[Role::Admin], &[]),
            Err(TokenError::Exists(_))
        ));
        let other = Tokens::create(&path, "bob", &[Role::CacheWrite], &[]).unwrap();
        assert_ne!(other, secret);
        let tokens = Tokens::load(&path).unwrap();
        let ci = tokens.find(&secret).unwrap();
        assert_eq!(ci.name, "ci");
        assert_eq!(
            ci.grants(),
            vec![
                Grant {
                    role: Role::CacheRead,
                    instance: Some("main".into())
                },
                Grant {
                    role: Role::Execute,
                    instance: Some("main".into())
                },
            ]
        );
        assert!(tokens.find("kiln_wrong").is_none());
        Tokens::revoke(&path, "ci").unwrap();
        assert!(Tokens::load(&path).unwrap().find(&secret).is_none());
        assert!(Tokens::load(&path).unwrap().find(&other).is_some());
        assert!(matches!(
            Tokens::revoke(&path, "ci"),
            Err(TokenError::Unknown(_))
        ));
        assert!(matches!(
            Tokens::create(&path, "w", &[Role::Worker], &["main".into()]),
            Err(TokenError::ScopedFarmWide(Role::Worker))
        ));
        assert!(matches!(
            Tokens::create(
                &path,
                "a",
                &[Role::CacheRead, Role::Admin],
                &["main".into()]
            ),
            Err(TokenError::ScopedFarmWide(Role::Admin))
        ));
        std::fs::write(&path, "not = [valid").unwrap();
        assert!(matches!(
            Tokens::load(&path),
            Err(TokenError::Format { .. })
        ));
    }
}
