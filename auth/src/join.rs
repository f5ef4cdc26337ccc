//! Enrolment state, kept next to the token file: one-time join tokens (`kiln join-token
//! create`: a secret stored as its SHA-256, roles, an expiry, and who used it) and the
//! enrolled workers (name, the SHA-256 of the certificate issued to it, its roles, whether it
//! was revoked). A certificate is honoured only while its fingerprint is enrolled and not
//! revoked, so `kiln worker revoke NAME` cuts a worker off without a revocation list.

use crate::tokens::{hash, new_secret, update, TokenError};
use crate::Role;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Why a join token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// No such token.
    #[error("unknown join token")]
    Unknown,
    /// Used already (tokens are single-use).
    #[error(
        "this join token was used already (by {0:?}); make a new one with `kiln join-token create`"
    )]
    Used(String),
    /// Past its expiry.
    #[error("this join token expired; make a new one with `kiln join-token create`")]
    Expired,
    /// A worker of that name is enrolled already.
    #[error("a worker named {0:?} is enrolled already (revoke it first, or pick another name)")]
    NameTaken(String),
}

/// One join token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinToken {
    /// SHA-256 of the secret, hex.
    pub sha256: String,
    /// Roles the enrolled worker gets (on every instance).
    pub roles: Vec<Role>,
    /// Seconds since the epoch after which it is refused.
    pub expires: u64,
    /// The worker that used it.
    #[serde(default)]
    pub used_by: Option<String>,
}

/// One enrolled worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    /// Its name (its certificate's common name).
    pub name: String,
    /// SHA-256 of the certificate issued to it, hex.
    pub fingerprint: String,
    /// Its roles (on every instance).
    pub roles: Vec<Role>,
    /// Cut off by `kiln worker revoke`.
    #[serde(default)]
    pub revoked: bool,
}

/// The enrolment file.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Enrolment {
    /// Join tokens.
    #[serde(default)]
    pub join: Vec<JoinToken>,
    /// Enrolled workers.
    #[serde(default)]
    pub worker: Vec<Enrolled>,
}

impl Enrolment {
    /// Reads the file (a missing file is empty).
    pub fn load(path: &Path) -> Result<Enrolment, TokenError> {
        crate::tokens::read_toml(path)
    }

    /// The enrolled worker whose certificate has this fingerprint.
    pub fn by_fingerprint(&self, fingerprint: &str) -> Option<&Enrolled> {
        self.worker.iter().find(|w| w.fingerprint == fingerprint)
    }

    /// Adds a join token valid for `ttl_secs` from `now`; returns its secret.
    pub fn create_token(
        path: &Path,
        roles: &[Role],
        now: u64,
        ttl_secs: u64,
    ) -> Result<String, TokenError> {
        update(path, |file: &mut Enrolment| {
            let secret = new_secret()?.replacen("kiln_", "kiln_join_", 1);
            file.join.push(JoinToken {
                sha256: hash(&secret),
                roles: roles.to_vec(),
                expires: now.saturating_add(ttl_secs),
                used_by: None,
            });
            Ok((secret, true))
        })
    }

    /// Checks a join token for a worker named `name`, marks it used, and records the worker
    /// with the fingerprint `issue` returns for the certificate it makes (called only if the
    /// token is good). Returns what `issue` returned.
    pub fn redeem<T>(
        path: &Path,
        secret: &str,
        name: &str,
        now: u64,
        issue: impl FnOnce(&[Role]) -> Result<(T, String), TokenError>,
    ) -> Result<Result<T, JoinError>, TokenError> {
        update(path, |file: &mut Enrolment| {
            let wanted = hash(secret);
            let Some(token) = file.join.iter_mut().find(|t| t.sha256 == wanted) else {
                return Ok((Err(JoinError::Unknown), false));
            };
            if let Some(by) = &token.used_by {
                return Ok((Err(JoinError::Used(by.clone())), false));
            }
            if now > token.expires {
                return Ok((Err(JoinError::Expired), false));
            }
            if file.worker.iter().any(|w| w.name == name && !w.revoked) {
                return Ok((Err(JoinError::NameTaken(name.to_string())), false));
            }
            token.used_by = Some(name.to_string());
            let roles = token.roles.clone();
            let (issued, fingerprint) = issue(&roles)?;
            // A revoked entry stays: its certificate must keep failing.
            file.worker.retain(|w| w.name != name || w.revoked);
            file.worker.push(Enrolled {
                name: name.to_string(),
                fingerprint,
                roles,
                revoked: false,
            });
            Ok((Ok(issued), true))
        })
    }

    /// Revokes the worker named `name` (every certificate it was issued).
    pub fn revoke(path: &Path, name: &str) -> Result<(), TokenError> {
        update(path, |file: &mut Enrolment| {
            let mut found = false;
            for w in file.worker.iter_mut().filter(|w| w.name == name) {
                w.revoked = true;
                found = true;
            }
            if !found {
                return Err(TokenError::Unknown(name.to_string()));
            }
            Ok(((), true))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_are_single_use_expire_and_enrolments_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enrolment.toml");
        let roles = [Role::Worker, Role::CacheRead];
        let secret = Enrolment::create_token(&path, &roles, 1000, 3600).unwrap();
        assert!(secret.starts_with("kiln_join_"));
        assert!(!std::fs::read_to_string(&path).unwrap().contains(&secret));
        let issue = |fp: &str| {
            let fp = fp.to_string();
            move |r: &[Role]| Ok((r.to_vec(), fp))
        };
        assert_eq!(
            Enrolment::redeem(&path, "kiln_join_nope", "mac1", 1001, issue("a")).unwrap(),
            Err(JoinError::Unknown)
        );
        let got = Enrolment::redeem(&path, &secret, "mac1", 1001, issue("fp1")).unwrap();
        assert_eq!(got, Ok(roles.to_vec()));
        assert_eq!(
            Enrolment::redeem(&path, &secret, "mac2", 1002, issue("fp2")).unwrap(),
            Err(JoinError::Used("mac1".into()))
        );
        let late = Enrolment::create_token(&path, &roles, 1000, 10).unwrap();
        assert_eq!(
            Enrolment::redeem(&path, &late, "mac3", 1011, issue("fp3")).unwrap(),
            Err(JoinError::Expired)
        );
        let again = Enrolment::create_token(&path, &roles, 1000, 3600).unwrap();
        assert_eq!(
            Enrolment::redeem(&path, &again, "mac1", 1001, issue("fp4")).unwrap(),
            Err(JoinError::NameTaken("mac1".into()))
        );
        let file = Enrolment::load(&path).unwrap();
        assert_eq!(file.by_fingerprint("fp1").unwrap().name, "mac1");
        Enrolment::revoke(&path, "mac1").unwrap();
        assert!(
            Enrolment::load(&path)
                .unwrap()
                .by_fingerprint("fp1")
                .unwrap()
                .revoked
        );
        // A revoked name may enrol again (with a new certificate).
        let got = Enrolment::redeem(&path, &again, "mac1", 1001, issue("fp5")).unwrap();
        assert!(got.is_ok());
        let file = Enrolment::load(&path).unwrap();
        assert!(
            file.by_fingerprint("fp1").unwrap().revoked,
            "the old certificate stays revoked"
        );
        assert!(!file.by_fingerprint("fp5").unwrap().revoked);
    }

    #[test]
    fn racing_redemptions_of_one_token_enrol_one_worker_and_lose_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth/enrolment.toml");
        let secret = Enrolment::create_token(&path, &[Role::Worker], 100, 3600).unwrap();
        // Eight workers race for one token while eight more tokens are being made.
        let winners: usize = std::thread::scope(|s| {
            let redeemers: Vec<_> = (0..8)
                .map(|i| {
                    let (path, secret) = (&path, &secret);
                    s.spawn(move || {
                        let name = format!("mac-{i}");
                        Enrolment::redeem(path, secret, &name, 200, |_| Ok(((), format!("fp-{i}"))))
                            .unwrap()
                            .is_ok()
                    })
                })
                .collect();
            for _ in 0..8 {
                let path = &path;
                s.spawn(move || Enrolment::create_token(path, &[Role::Worker], 100, 60).unwrap());
            }
            redeemers
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(winners, 1, "a join token is single-use even under a race");
        let file = Enrolment::load(&path).unwrap();
        assert_eq!(file.worker.len(), 1);
        assert_eq!(file.join.len(), 9, "no token made meanwhile was lost");
    }
}
