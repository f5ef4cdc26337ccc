//! Who may see the admin listener's pages. The probes (`/healthz`, `/readyz`) are open, for
//! load balancers and service managers; `/metrics` is open to callers on the server's own
//! host (a local Prometheus agent) and otherwise needs the `admin` role; the status page and
//! everything else need the `admin` role. With authorization off, everything is open.

use crate::{Denied, Policy, Principal, Role};

/// What an admin path shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `/healthz`, `/readyz`.
    Probe,
    /// `/metrics`.
    Metrics,
    /// `/status`, `/` and anything else.
    Status,
}

impl Page {
    /// The page at `path`.
    pub fn of(path: &str) -> Page {
        match path {
            "/healthz" | "/readyz" => Page::Probe,
            "/metrics" => Page::Metrics,
            _ => Page::Status,
        }
    }
}

/// A request to the admin listener: where it comes from and what it carries.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The page asked for.
    pub page: Page,
    /// The path, for messages.
    pub path: &'a str,
    /// Whether the caller connected from a loopback address.
    pub loopback: bool,
    /// The verified client certificate's common name and SHA-256 fingerprint, if any.
    pub certificate: Option<(&'a str, &'a str)>,
    /// The `authorization` header, if any.
    pub authorization: Option<&'a [u8]>,
}

impl Policy {
    /// Whether `request` may be answered; who asked, when that mattered.
    pub fn admit_admin(&self, request: Request<'_>) -> Result<Option<Principal>, Denied> {
        if !self.enabled()
            || request.page == Page::Probe
            || (request.page == Page::Metrics && request.loopback)
        {
            return Ok(None);
        }
        let principal = self.identify(request.certificate, request.authorization)?;
        if principal.holds_everywhere(Role::Admin) {
            return Ok(Some(principal));
        }
        Err(Denied {
            unauthenticated: false,
            message: format!(
                "{} may not see {}: that needs the admin role",
                principal.name, request.path
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Settings;
    use crate::tokens::Tokens;

    #[test]
    fn probes_are_open_metrics_open_on_loopback_and_the_rest_needs_admin() {
        let dir = tempfile::tempdir().unwrap();
        let tokens_file = dir.path().join("tokens.toml");
        let admin = Tokens::create(&tokens_file, "ops", &[Role::Admin], &[]).unwrap();
        let ci = Tokens::create(
            &tokens_file,
            "ci",
            &[Role::CacheRead, Role::CacheWrite, Role::Execute],
            &[],
        )
        .unwrap();
        let policy = Policy::open(Settings {
            enabled: true,
            tokens_file,
            certificates: Vec::new(),
            anonymous: Vec::new(),
            enrolment_file: dir.path().join("enrolment.toml"),
        })
        .unwrap();
        let ask = |path: &'static str, loopback: bool, token: Option<&str>| {
            let header = token.map(|t| format!("Bearer {t}"));
            policy.admit_admin(Request {
                page: Page::of(path),
                path,
                loopback,
                certificate: None,
                authorization: header.as_deref().map(str::as_bytes),
            })
        };
        for path in ["/healthz", "/readyz"] {
            assert_eq!(ask(path, false, None), Ok(None), "{path}");
        }
        assert_eq!(ask("/metrics", true, None), Ok(None));
        for (path, loopback) in [("/metrics", false), ("/status", true), ("/", false)] {
            let none = ask(path, loopback, None).unwrap_err();
            assert!(none.unauthenticated, "{path}: {none}");
            let wrong = ask(path, loopback, Some(&ci)).unwrap_err();
            assert!(
                !wrong.unauthenticated && wrong.message.contains("admin role"),
                "{path}: {wrong}"
            );
            let ok = ask(path, loopback, Some(&admin)).unwrap().unwrap();
            assert_eq!(ok.name, "token:ops");
        }
        let off = Policy::disabled();
        let open = off.admit_admin(Request {
            page: Page::Status,
            path: "/status",
            loopback: false,
            certificate: None,
            authorization: None,
        });
        assert_eq!(open, Ok(None));
    }
}
