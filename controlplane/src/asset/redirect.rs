//! Redirects, followed by Kiln itself rather than by the HTTP client, so that the headers a
//! request's qualifiers give (credentials, as often as not: `Authorization`, `Private-Token`,
//! `X-JFrog-Art-Api`, cookies) go only to the origin of the URL they were given for. A redirect
//! to another origin (another scheme, host or port: a CDN, a pre-signed object-store URL) gets
//! none of them, as browsers and curl treat `Authorization`.

use iri_string::types::{UriAbsoluteStr, UriReferenceStr};

/// `location` (a redirect's `Location`: absolute, or relative to `base`) resolved against
/// `base` as RFC 3986 section 5 says; the fragment dropped (it never reaches a server).
pub fn resolve(base: &str, location: &str) -> Result<String, String> {
    let reference = UriReferenceStr::new(location.trim())
        .map_err(|e| format!("a redirect to {location:?}, which is not a URL: {e}"))?;
    let base = UriAbsoluteStr::new(base.split('#').next().unwrap_or(base))
        .map_err(|e| format!("{base:?} is not an absolute URL: {e}"))?;
    let resolved = reference.resolve_against(base).to_string();
    let resolved = resolved.split('#').next().unwrap_or(&resolved).to_string();
    let scheme = resolved
        .split(':')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "a redirect to {resolved:?}, which is not an http or https URL"
        ));
    }
    Ok(resolved)
}

/// Whether `a` and `b` share an origin: scheme, host and port (the scheme's default port
/// when none is written).
pub fn same_origin(a: &str, b: &str) -> bool {
    match (origin(a), origin(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri.port_u16().or(match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })?;
    Some((scheme, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve_as_rfc_3986_says() {
        let base = "https://example.com/a/b/file.tar.gz?x=1#frag";
        for (location, expected) in [
            ("https://cdn.example.net/o/1", "https://cdn.example.net/o/1"),
            ("//mirror.example.org/f", "https://mirror.example.org/f"),
            ("/root/f", "https://example.com/root/f"),
            ("other.zip", "https://example.com/a/b/other.zip"),
            ("../up", "https://example.com/a/up"),
            ("?y=2", "https://example.com/a/b/file.tar.gz?y=2"),
            ("next#part", "https://example.com/a/b/next"),
        ] {
            assert_eq!(resolve(base, location).unwrap(), expected, "{location}");
        }
        for bad in ["ftp://example.com/f", "file:///etc/passwd", "a b c"] {
            assert!(resolve(base, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        let a = "https://example.com/x";
        for same in [
            "https://example.com/y?z",
            "https://EXAMPLE.com:443/",
            "https://example.com",
        ] {
            assert!(same_origin(a, same), "{same}");
        }
        for other in [
            "http://example.com/x",
            "https://example.com:8443/x",
            "https://cdn.example.com/x",
            "https://example.com.evil.net/x",
            "not a url",
        ] {
            assert!(!same_origin(a, other), "{other}");
        }
    }
}
