//! The token in an `authorization` header: `Bearer TOKEN` (gRPC clients, Prometheus), or
//! HTTP Basic with the token as the password (what a browser sends for the status page; the
//! user name is ignored).

use crate::Denied;
use base64::Engine;

/// The token `value` carries.
pub(crate) fn token(value: &[u8]) -> Result<String, Denied> {
    let value = std::str::from_utf8(value)
        .map_err(|_| Denied::unauthenticated("the authorization header is not text"))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| Denied::unauthenticated("the Basic credentials are not base64 text"))?;
        let (_user, password) = decoded
            .split_once(':')
            .ok_or_else(|| Denied::unauthenticated("the Basic credentials must be USER:TOKEN"))?;
        return Ok(password.to_string());
    }
    Err(Denied::unauthenticated(
        "the authorization header must be \"Bearer TOKEN\" (or Basic with the token as the password)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_carry_the_token() {
        assert_eq!(token(b"Bearer kiln_abc").unwrap(), "kiln_abc");
        assert_eq!(token(b"bearer  kiln_abc ").unwrap(), "kiln_abc");
        // "me:kiln_abc" in base64.
        assert_eq!(token(b"Basic bWU6a2lsbl9hYmM=").unwrap(), "kiln_abc");
        // ":kiln_abc": no user name.
        assert_eq!(token(b"Basic OmtpbG5fYWJj").unwrap(), "kiln_abc");
        for bad in [
            &b"kiln_abc"[..],
            b"Token kiln_abc",
            b"Basic !!!",
            b"Basic a2lsbl9hYmM=", // "kiln_abc": no colon
            b"Bearer \xff",
        ] {
            let e = token(bad).unwrap_err();
            assert!(e.unauthenticated, "{bad:?}");
        }
    }
}
