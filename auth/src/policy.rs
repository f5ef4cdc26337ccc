//! The policy both planes ask: who is calling (a bearer token, else a client certificate's
//! name, else nobody) and whether that caller may call a method on an instance.
//! Missing or unknown credentials are `UNAUTHENTICATED`; a caller without the role the method
//! needs on the request's instance is `PERMISSION_DENIED`, naming the method and instance.

use crate::join::Enrolment;
use crate::method::{need, Need};
use crate::tokens::{TokenError, Tokens};
use crate::{Grant, Role};
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

/// A caller, once identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `token:NAME`, `cert:NAME`, `worker:NAME` (enrolled), `anonymous`, or `anyone` when
    /// authorization is off.
    pub name: String,
    /// What it may do.
    pub grants: Vec<Grant>,
    unrestricted: bool,
    credential: Credential,
}

/// What a principal was identified by, to tell later whether it still holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Credential {
    #[default]
    None,
    /// A token, by hash.
    Token(String),
    /// An enrolled certificate, by fingerprint.
    Enrolled(String),
}

impl Principal {
    /// A caller allowed everything (authorization off).
    pub fn unrestricted() -> Principal {
        Principal {
            name: "anyone".into(),
            grants: Vec::new(),
            unrestricted: true,
            credential: Credential::None,
        }
    }

    /// A caller with no role at all (one that is enrolling).
    pub fn nobody(name: &str) -> Principal {
        Principal {
            name: name.to_string(),
            grants: Vec::new(),
            unrestricted: false,
            credential: Credential::None,
        }
    }

    /// Whether it holds `role` on `instance`.
    pub fn holds(&self, role: Role, instance: &str) -> bool {
        self.unrestricted || self.grants.iter().any(|g| g.covers(role, instance))
    }

    /// Whether the principal holds `role` on every instance.
    pub fn holds_everywhere(&self, role: Role) -> bool {
        self.unrestricted
            || self
                .grants
                .iter()
                .any(|g| g.role == role && g.instance.is_none())
    }

    fn meets(&self, need: Need, instance: &str) -> bool {
        match need {
            Need::Role(role) => self.holds(role, instance),
            Need::AnyRole => {
                self.unrestricted
                    || self
                        .grants
                        .iter()
                        .any(|g| g.instance.as_deref().is_none_or(|i| i == instance))
            }
        }
    }
}

/// A refused call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    /// `UNAUTHENTICATED` (no or bad credentials) rather than `PERMISSION_DENIED`.
    pub unauthenticated: bool,
    /// What to tell the caller.
    pub message: String,
}

impl kiln_reapi::status::Classify for Denied {
    fn kind(&self) -> kiln_reapi::status::ErrorKind {
        if self.unauthenticated {
            kiln_reapi::status::ErrorKind::Unauthenticated
        } else {
            kiln_reapi::status::ErrorKind::Denied
        }
    }
}

impl Denied {
    pub(crate) fn unauthenticated(message: impl Into<String>) -> Denied {
        Denied {
            unauthenticated: true,
            message: message.into(),
        }
    }
}

/// Roles for client certificates by name (their subject's common name): an exact name, or a
/// prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRule {
    /// The name or `prefix*`.
    pub name: String,
    /// What such a certificate may do.
    pub grants: Vec<Grant>,
}

impl CertificateRule {
    fn matches(&self, name: &str) -> bool {
        match self.name.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.name == name,
        }
    }
}

/// How callers are identified and what they may do.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Off: every caller may do everything (the loopback default).
    pub enabled: bool,
    /// The token file.
    pub tokens_file: PathBuf,
    /// Roles of client certificates, first match wins.
    pub certificates: Vec<CertificateRule>,
    /// Roles of callers with no credentials at all (none by default: they are refused).
    pub anonymous: Vec<Grant>,
    /// Join tokens and enrolled workers (`kiln join-token`, `kiln worker revoke`).
    pub enrolment_file: PathBuf,
}

/// The policy, with the token file re-read when it changes.
#[derive(Debug)]
pub struct Policy {
    settings: Settings,
    tokens: RwLock<Tokens>,
    stamp: Mutex<(Option<Stamp>, Option<Stamp>)>,
    internal: RwLock<Tokens>,
    enrolment: RwLock<Enrolment>,
}

/// What "the token file changed" compares: modification and change times, inode and size
/// (both writers replace the file by rename, so a rewrite always has a new inode).
type Stamp = (SystemTime, i64, i64, u64, u64);

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.modified().ok()?,
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
        m.len(),
    ))
}

impl Policy {
    /// A policy from settings (reads the token file when enabled).
    pub fn open(settings: Settings) -> Result<Policy, TokenError> {
        // Stat first: a change landing while the file is read is seen by the next check.
        let stamps = (
            stamp(&settings.tokens_file),
            stamp(&settings.enrolment_file),
        );
        let (tokens, enrolment) = if settings.enabled {
            (
                Tokens::load(&settings.tokens_file)?,
                Enrolment::load(&settings.enrolment_file)?,
            )
        } else {
            (Tokens::default(), Enrolment::default())
        };
        Ok(Policy {
            settings,
            tokens: RwLock::new(tokens),
            stamp: Mutex::new(stamps),
            internal: RwLock::new(Tokens::default()),
            enrolment: RwLock::new(enrolment),
        })
    }

    /// Authorization off: everyone may do everything.
    pub fn disabled() -> Policy {
        Policy {
            settings: Settings::default(),
            tokens: RwLock::new(Tokens::default()),
            stamp: Mutex::new((None, None)),
            internal: RwLock::new(Tokens::default()),
            enrolment: RwLock::new(Enrolment::default()),
        }
    }

    /// Any caller the connection lets in may read the CAS, and do nothing else: a worker's
    /// CAS as it serves its peers (they only read, and check every byte they read). Over
    /// mutual TLS, that is every holder of a certificate from the farm CA.
    pub fn read_only() -> Policy {
        let mut policy = Policy::disabled();
        policy.settings.enabled = true;
        let read = Grant::all(&[Role::CacheRead], &[]);
        policy.settings.anonymous = read.clone();
        policy.settings.certificates = vec![CertificateRule {
            name: "*".into(),
            grants: read,
        }];
        policy
    }

    /// The fingerprints of enrolled workers' certificates that were revoked (`kiln worker
    /// revoke`), sorted: the scheduler passes them to the workers, whose CAS must refuse
    /// them too.
    pub fn revoked_fingerprints(&self) -> Vec<String> {
        let enrolment = self.enrolment.read().unwrap_or_else(|e| e.into_inner());
        let mut revoked: Vec<String> = enrolment
            .worker
            .iter()
            .filter(|w| w.revoked)
            .map(|w| w.fingerprint.clone())
            .collect();
        revoked.sort_unstable();
        revoked
    }

    /// Refuses certificates with these fingerprints from now on, besides those refused
    /// already (a worker's CAS, told by the scheduler which workers were revoked). The list
    /// only grows: a revoked certificate stays revoked (a worker enrolling again gets a new
    /// one), so a shorter list — the server's enrolment file unreadable for a while — lets
    /// no revoked certificate back in.
    pub fn refuse_fingerprints(&self, fingerprints: &[String]) {
        let mut enrolment = self.enrolment.write().unwrap_or_else(|e| e.into_inner());
        for f in fingerprints {
            if enrolment.by_fingerprint(f).is_none() {
                enrolment.worker.push(crate::join::Enrolled {
                    name: "a revoked worker".into(),
                    fingerprint: f.clone(),
                    roles: Vec::new(),
                    revoked: true,
                });
            }
        }
    }

    /// Makes a token that lives in this process only (for the worker inside `kiln serve`),
    /// with `roles` on every instance; returns its secret.
    pub fn internal_token(&self, name: &str, roles: &[Role]) -> Result<String, TokenError> {
        let secret = crate::tokens::new_secret()?;
        self.internal
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(crate::tokens::TokenEntry {
                name: name.to_string(),
                sha256: crate::tokens::hash(&secret),
                roles: roles.to_vec(),
                instances: Vec::new(),
            });
        Ok(secret)
    }

    /// Whether callers are checked at all.
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// Re-reads the token and enrolment files if they changed; returns whether either did.
    /// Called off the data plane (the control plane checks every second), so identifying a
    /// caller never touches the disk. A file that cannot be read any more fails closed: no
    /// file token, and no enrolled certificate, is accepted until it can.
    pub fn reload_if_changed(&self) -> bool {
        if !self.settings.enabled {
            return false;
        }
        let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        let now = (
            stamp(&self.settings.tokens_file),
            stamp(&self.settings.enrolment_file),
        );
        if now == *last {
            return false;
        }
        if now.0 != last.0 {
            let tokens = Tokens::load(&self.settings.tokens_file).unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot read the token file; refusing every file token until it can be read");
                Tokens::default()
            });
            *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = tokens;
            tracing::info!("token file reloaded");
        }
        if now.1 != last.1 {
            match Enrolment::load(&self.settings.enrolment_file) {
                Ok(enrolment) => {
                    *self.enrolment.write().unwrap_or_else(|e| e.into_inner()) = enrolment;
                    tracing::info!("enrolment file reloaded");
                }
                // Unreadable (a typo in a hand edit): the last one read stays in force. An
                // empty one would forget the revoked certificates, which would then get what
                // the [[auth.certificates]] rules give the names their workers chose.
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the enrolment file; the one read before stays in force until it can be read")
                }
            }
        }
        *last = now;
        true
    }

    /// Whether what identified `principal` still holds (a token not revoked, an enrolled
    /// certificate not revoked): long-lived calls (a worker's session) end when it does not.
    pub fn still_valid(&self, principal: &Principal) -> bool {
        match &principal.credential {
            Credential::None => true,
            Credential::Token(hash) => {
                self.internal
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .has_hash(hash)
                    || self
                        .tokens
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .has_hash(hash)
            }
            Credential::Enrolled(fingerprint) => self
                .enrolment
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .by_fingerprint(fingerprint)
                .is_some_and(|w| !w.revoked),
        }
    }

    /// Identifies a caller from its verified client certificate (common name and SHA-256
    /// fingerprint), if it presented one, and its `authorization` header (if any). A token
    /// wins over a certificate; an enrolled certificate over the name rules.
    pub fn identify(
        &self,
        certificate: Option<(&str, &str)>,
        authorization: Option<&[u8]>,
    ) -> Result<Principal, Denied> {
        if !self.settings.enabled {
            return Ok(Principal::unrestricted());
        }
        if let Some(value) = authorization {
            let secret = crate::header::token(value)?;
            let secret = secret.as_str();
            if let Some(entry) = self
                .internal
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .find(secret)
            {
                return Ok(Principal {
                    name: format!("internal:{}", entry.name),
                    grants: entry.grants(),
                    unrestricted: false,
                    credential: Credential::Token(entry.sha256.clone()),
                });
            }
            let tokens = self.tokens.read().unwrap_or_else(|e| e.into_inner());
            let entry = tokens.find(secret).ok_or_else(|| {
                Denied::unauthenticated("unknown or revoked token (see `kiln token list`)")
            })?;
            return Ok(Principal {
                name: format!("token:{}", entry.name),
                grants: entry.grants(),
                unrestricted: false,
                credential: Credential::Token(entry.sha256.clone()),
            });
        }
        if let Some((name, fingerprint)) = certificate {
            if let Some(w) = self
                .enrolment
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .by_fingerprint(fingerprint)
            {
                if w.revoked {
                    return Err(Denied::unauthenticated(format!(
                        "the certificate of worker {:?} was revoked; enrol again with a new join token",
                        w.name
                    )));
                }
                return Ok(Principal {
                    name: format!("worker:{}", w.name),
                    grants: Grant::all(&w.roles, &[]),
                    unrestricted: false,
                    credential: Credential::Enrolled(fingerprint.to_string()),
                });
            }
            let grants = self
                .settings
                .certificates
                .iter()
                .find(|r| r.matches(name))
                .map(|r| r.grants.clone())
                .unwrap_or_default();
            return Ok(Principal {
                name: format!("cert:{name}"),
                grants,
                unrestricted: false,
                credential: Credential::None,
            });
        }
        if self.settings.anonymous.is_empty() {
            return Err(Denied::unauthenticated(
                "credentials required: a client certificate or \"authorization: Bearer TOKEN\"",
            ));
        }
        Ok(Principal {
            name: "anonymous".into(),
            grants: self.settings.anonymous.clone(),
            unrestricted: false,
            credential: Credential::None,
        })
    }

    /// Whether `principal` may call the method at `path` on `instance` (see [`authorize`]).
    pub fn authorize(
        &self,
        principal: &Principal,
        path: &str,
        instance: &str,
    ) -> Result<(), Denied> {
        authorize(principal, path, Some(instance))
    }
}

/// Whether `principal` may call the method at `path` on `instance`; `None` for calls that
/// name no instance (operations by name, the worker API), which need the role on any instance.
pub fn authorize(principal: &Principal, path: &str, instance: Option<&str>) -> Result<(), Denied> {
    let Some(need) = need(path) else {
        return Ok(());
    };
    let allowed = match instance {
        Some(i) => principal.meets(need, i),
        None => {
            principal.unrestricted
                || match need {
                    Need::Role(role) => principal.grants.iter().any(|g| g.role == role),
                    Need::AnyRole => !principal.grants.is_empty(),
                }
        }
    };
    if allowed {
        return Ok(());
    }
    let wants = match need {
        Need::Role(role) => format!("the {} role", role.name()),
        Need::AnyRole => "a role".to_string(),
    };
    let place = match instance {
        Some(i) => format!("on instance {i:?}"),
        None => "on any instance".to_string(),
    };
    Err(Denied {
        unauthenticated: false,
        message: format!(
            "{} may not call {path}: that needs {wants} {place}",
            principal.name
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_policy_lets_any_caller_read_and_refuses_revoked_certificates() {
        let p = Policy::read_only();
        for caller in [
            p.identify(Some(("w2", "fp-2")), None),
            p.identify(None, None),
        ] {
            let caller = caller.unwrap();
            assert!(p.authorize(&caller, READ, "").is_ok());
            assert!(p.authorize(&caller, WRITE, "").is_err(), "read-only");
        }
        p.refuse_fingerprints(&["fp-2".into()]);
        let refused = p.identify(Some(("w2", "fp-2")), None).unwrap_err();
        assert!(refused.message.contains("revoked"), "{refused:?}");
        assert!(p.identify(Some(("w3", "fp-3")), None).is_ok());
        assert_eq!(p.revoked_fingerprints(), vec!["fp-2".to_string()]);
        p.refuse_fingerprints(&[]);
        p.refuse_fingerprints(&["fp-4".into()]);
        assert!(
            p.identify(Some(("w2", "fp-2")), None).is_err(),
            "a shorter list lets no one back in"
        );
        assert_eq!(
            p.revoked_fingerprints(),
            vec!["fp-2".to_string(), "fp-4".to_string()]
        );
    }

    const READ: &str = "/google.bytestream.ByteStream/Read";
    const WRITE: &str = "/google.bytestream.ByteStream/Write";
    const UPDATE_AC: &str = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
    const CAPS: &str = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities";

    fn policy(dir: &std::path::Path) -> (Policy, String) {
        let tokens_file = dir.join("tokens.toml");
        let secret = Tokens::create(
            &tokens_file,
            "ci",
            &[Role::CacheRead, Role::CacheWrite],
            &["main".into()],
        )
        .unwrap();
        let settings = Settings {
            enabled: true,
            tokens_file,
            certificates: vec![
                CertificateRule {
                    name: "worker-*".into(),
                    grants: Grant::all(&[Role::Worker, Role::CacheRead, Role::CacheWrite], &[]),
                },
                CertificateRule {
                    name: "reader".into(),
                    grants: Grant::all(&[Role::CacheRead], &["main".into()]),
                },
            ],
            anonymous: Vec::new(),
            enrolment_file: dir.join("enrolment.toml"),
        };
        (Policy::open(settings).unwrap(), secret)
    }

    #[test]
    fn callers_are_identified_and_each_role_checked_per_instance() {
        let dir = tempfile::tempdir().unwrap();
        let (p, secret) = policy(dir.path());
        let bearer = format!("Bearer {secret}");
        let ci = p.identify(None, Some(bearer.as_bytes())).unwrap();
        assert_eq!(ci.name, "token:ci");
        assert_eq!(p.authorize(&ci, READ, "main"), Ok(()));
        assert_eq!(p.authorize(&ci, WRITE, "main"), Ok(()));
        assert_eq!(p.authorize(&ci, CAPS, "main"), Ok(()));
        let e = p.authorize(&ci, READ, "other").unwrap_err();
        assert!(!e.unauthenticated);
        assert!(
            e.message.contains("token:ci")
                && e.message.contains(READ)
                && e.message.contains("\"other\""),
            "{e}"
        );
        assert!(
            p.authorize(&ci, CAPS, "other").is_err(),
            "no role at all on that instance"
        );
        let e = p.authorize(&ci, UPDATE_AC, "main").unwrap_err();
        assert!(e.message.contains("ac-write"), "{e}");
        // Certificates by exact name or prefix; an unknown name holds nothing.
        let w = p.identify(Some(("worker-mac1", "fp-w")), None).unwrap();
        assert_eq!(
            p.authorize(&w, "/kiln.worker.v1.WorkerApi/Session", ""),
            Ok(())
        );
        let r = p.identify(Some(("reader", "fp-r")), None).unwrap();
        assert!(p.authorize(&r, WRITE, "main").is_err());
        let stranger = p.identify(Some(("stranger", "fp-s")), None).unwrap();
        assert!(p.authorize(&stranger, READ, "").is_err());
        // A token wins over a certificate.
        assert_eq!(
            p.identify(Some(("reader", "fp-r")), Some(bearer.as_bytes()))
                .unwrap()
                .name,
            "token:ci"
        );
        // No, malformed or unknown credentials: unauthenticated.
        for bad in [
            None,
            Some(&b"Basic abc"[..]),
            Some(&b"Bearer kiln_nope"[..]),
            Some(&[0xff, 0xfe][..]),
        ] {
            let e = p.identify(None, bad).unwrap_err();
            assert!(e.unauthenticated, "{bad:?}: {e}");
        }
        // Paths Kiln does not serve are not its to refuse.
        assert_eq!(p.authorize(&stranger, "/x.Y/Z", ""), Ok(()));
    }

    #[test]
    fn off_means_everyone_and_revocation_applies_without_a_restart() {
        let off = Policy::disabled();
        let anyone = off.identify(None, None).unwrap();
        assert_eq!(off.authorize(&anyone, UPDATE_AC, "x"), Ok(()));
        let dir = tempfile::tempdir().unwrap();
        let (p, secret) = policy(dir.path());
        let bearer = format!("Bearer {secret}");
        assert!(p.identify(None, Some(bearer.as_bytes())).is_ok());
        Tokens::revoke(&dir.path().join("tokens.toml"), "ci").unwrap();
        // Identifying never reads the file; the reload does.
        assert!(p.identify(None, Some(bearer.as_bytes())).is_ok());
        assert!(p.reload_if_changed());
        assert!(
            p.identify(None, Some(bearer.as_bytes())).is_err(),
            "revoked"
        );
        assert!(!p.reload_if_changed(), "nothing new");
        // An unreadable file fails closed.
        let other =
            Tokens::create(&dir.path().join("tokens.toml"), "late", &[Role::Admin], &[]).unwrap();
        std::fs::write(dir.path().join("tokens.toml"), "not = [toml").unwrap();
        assert!(p.reload_if_changed());
        assert!(p
            .identify(None, Some(format!("Bearer {other}").as_bytes()))
            .is_err());

        // An enrolment file that cannot be read leaves the one read before in force: a
        // revoked worker (named like a [[auth.certificates]] rule) stays revoked.
        let file = dir.path().join("enrolment.toml");
        let mut enrolment = crate::join::Enrolment::default();
        enrolment.worker.push(crate::join::Enrolled {
            name: "worker-mac3".into(),
            fingerprint: "fp-mac3".into(),
            roles: vec![Role::Worker],
            revoked: true,
        });
        std::fs::write(&file, toml::to_string(&enrolment).unwrap()).unwrap();
        assert!(p.reload_if_changed());
        let revoked = || p.identify(Some(("worker-mac3", "fp-mac3")), None);
        assert!(revoked().is_err(), "revoked");
        assert_eq!(p.revoked_fingerprints(), vec!["fp-mac3".to_string()]);
        std::fs::write(&file, "worker = [ not toml").unwrap();
        assert!(p.reload_if_changed());
        assert!(revoked().is_err(), "still revoked");
        assert_eq!(p.revoked_fingerprints(), vec!["fp-mac3".to_string()]);
    }
}
