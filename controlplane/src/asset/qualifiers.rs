//! The qualifiers of a Remote Asset request (sans-IO), as the lexicon and Bazel's remote
//! downloader use them:
//!
//! - `checksum.sri`: Subresource Integrity checksums (`sha256-…`, `sha384-…`, `sha512-…`,
//!   whitespace-separated; one that validates is enough);
//! - `http_header:NAME` and `http_header_url:N:NAME`: headers sent to every URL, or to the
//!   N-th; `bazel.auth_headers` (older Bazels): a JSON object of URL to headers;
//! - `resource_type`, `bazel.canonical_id`: select the content (part of what an association is
//!   remembered under) and can be fetched from origin;
//! - `directory`, `vcs.branch`, `vcs.commit`: select content that only a push can supply.
//!
//! Any other name is refused, naming it, as the spec requires of a server.

use base64::Engine;
use kiln_proto::asset::Qualifier;
use std::collections::BTreeMap;

/// A SRI hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SriAlgorithm {
    /// `sha256-`
    Sha256,
    /// `sha384-`
    Sha384,
    /// `sha512-`
    Sha512,
}

impl SriAlgorithm {
    /// The prefix's name.
    pub fn name(self) -> &'static str {
        match self {
            SriAlgorithm::Sha256 => "sha256",
            SriAlgorithm::Sha384 => "sha384",
            SriAlgorithm::Sha512 => "sha512",
        }
    }
}

/// One SRI checksum.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sri {
    /// Its algorithm.
    pub algorithm: SriAlgorithm,
    /// The hash.
    pub hash: Vec<u8>,
}

impl std::fmt::Display for Sri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.hash);
        write!(f, "{}-{b64}", self.algorithm.name())
    }
}

/// Why qualifiers were refused (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QualifierError {
    /// Names Kiln does not support (every one in the request).
    #[error("{}", .0.iter().map(|n| format!("\"{n}\" not supported")).collect::<Vec<_>>().join(", "))]
    Unsupported(Vec<String>),
    /// A name given twice.
    #[error("qualifier \"{0}\" is given more than once")]
    Duplicate(String),
    /// A value that does not parse.
    #[error("qualifier \"{name}\": {why}")]
    BadValue { name: String, why: String },
}

impl QualifierError {
    /// The qualifier's name.
    pub fn name(&self) -> &str {
        match self {
            QualifierError::Unsupported(n) => n.first().map_or("", String::as_str),
            QualifierError::Duplicate(n) => n,
            QualifierError::BadValue { name, .. } => name,
        }
    }
}

/// Selectors that only a push can satisfy (Kiln does not clone repositories).
const PUSH_ONLY: [&str; 3] = ["directory", "vcs.branch", "vcs.commit"];

/// Selectors that a fetch from origin satisfies.
const FETCHABLE: [&str; 2] = ["resource_type", "bazel.canonical_id"];

/// `resource_type`s of repositories, which only a push can satisfy.
const REPOSITORY_TYPES: [&str; 1] = ["application/x-git"];

/// Whether a qualifier named `name` carries headers to send (not remembered).
pub(super) fn is_header(name: &str) -> bool {
    name == "bazel.auth_headers"
        || name.starts_with("http_header:")
        || name.starts_with("http_header_url:")
}

/// Whether Kiln understands a qualifier named `name`.
fn supported(name: &str) -> bool {
    name == "checksum.sri"
        || is_header(name)
        || FETCHABLE.contains(&name)
        || PUSH_ONLY.contains(&name)
}

/// A request's qualifiers, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Qualifiers {
    /// `checksum.sri`: one must validate.
    pub sri: Vec<Sri>,
    /// Headers for every URL.
    pub headers: Vec<(String, String)>,
    /// Headers for the URL at an index.
    pub url_headers: Vec<(usize, String, String)>,
    /// Headers for a URL by its text (`bazel.auth_headers`).
    pub auth_headers: BTreeMap<String, Vec<(String, String)>>,
    /// Qualifiers that select the content: an association is remembered under them.
    pub selectors: BTreeMap<String, String>,
}

impl Qualifiers {
    /// Parses `qualifiers` of a request naming `uris` URLs.
    pub fn parse(qualifiers: &[Qualifier], uris: usize) -> Result<Qualifiers, QualifierError> {
        // Every unsupported name, before any other complaint, as the spec asks.
        let unsupported: Vec<String> = qualifiers
            .iter()
            .filter(|q| !supported(&q.name))
            .map(|q| q.name.clone())
            .collect();
        if !unsupported.is_empty() {
            return Err(QualifierError::Unsupported(unsupported));
        }
        let mut out = Qualifiers::default();
        let mut seen = std::collections::HashSet::new();
        for q in qualifiers {
            let name = q.name.as_str();
            if !seen.insert(name) {
                return Err(QualifierError::Duplicate(name.to_string()));
            }
            let bad = |why: &str| QualifierError::BadValue {
                name: name.to_string(),
                why: why.to_string(),
            };
            if name == "checksum.sri" {
                out.sri = parse_sri(&q.value).map_err(|why| bad(&why))?;
            } else if let Some(header) = name.strip_prefix("http_header:") {
                out.headers.push((
                    header_name(header).map_err(|w| bad(&w))?,
                    value(&q.value).map_err(|w| bad(&w))?,
                ));
            } else if let Some(rest) = name.strip_prefix("http_header_url:") {
                let (index, header) = rest
                    .split_once(':')
                    .ok_or_else(|| bad("the form is http_header_url:INDEX:NAME"))?;
                let index: usize = index
                    .parse()
                    .map_err(|_| bad("the URL index is not a number"))?;
                if index >= uris {
                    return Err(bad("the URL index is past the request's URLs"));
                }
                out.url_headers.push((
                    index,
                    header_name(header).map_err(|w| bad(&w))?,
                    value(&q.value).map_err(|w| bad(&w))?,
                ));
            } else if name == "bazel.auth_headers" {
                out.auth_headers = parse_auth_headers(&q.value).map_err(|w| bad(&w))?;
            } else {
                // A selector (every other supported name is one).
                out.selectors.insert(name.to_string(), q.value.clone());
            }
        }
        Ok(out)
    }

    /// Whether content with these selectors can come from a download of the URL (for a
    /// `directory`, an archive unpacked, whose `directory` qualifier picks a subdirectory).
    pub fn fetchable(&self, directory: bool) -> bool {
        // A repository is not a file a download gives (its URL answers with a web page).
        let repository = self
            .selectors
            .get("resource_type")
            .is_some_and(|t| REPOSITORY_TYPES.contains(&t.as_str()));
        !repository
            && self
                .selectors
                .keys()
                .all(|k| FETCHABLE.contains(&k.as_str()) || (directory && k == "directory"))
    }

    /// The headers for `url`, the request's URL at `index`: one value per name, the most
    /// specific winning (`http_header_url:` over `bazel.auth_headers` over `http_header:`).
    pub fn headers_for(&self, index: usize, url: &str) -> Vec<(String, String)> {
        let mut out: BTreeMap<String, String> = self.headers.iter().cloned().collect();
        if let Some(auth) = self.auth_headers.get(url) {
            out.extend(auth.iter().cloned());
        }
        out.extend(
            self.url_headers
                .iter()
                .filter(|(i, _, _)| *i == index)
                .map(|(_, n, v)| (n.clone(), v.clone())),
        );
        out.into_iter().collect()
    }
}

/// Most different checksums one `checksum.sri` may name (each is remembered with what it
/// matched).
const MAX_SRI: usize = 8;

/// Parses a `checksum.sri` value: whitespace-separated `ALG-BASE64` tokens, options after `?`
/// ignored, unknown algorithms ignored (as SRI says); at least one must be usable.
fn parse_sri(value: &str) -> Result<Vec<Sri>, String> {
    let mut out = Vec::new();
    for token in value.split_whitespace() {
        let token = token.split('?').next().unwrap_or(token);
        let Some((alg, b64)) = token.split_once('-') else {
            return Err(format!("{token:?} is not ALGORITHM-BASE64"));
        };
        let (algorithm, len) = match alg {
            "sha256" => (SriAlgorithm::Sha256, 32),
            "sha384" => (SriAlgorithm::Sha384, 48),
            "sha512" => (SriAlgorithm::Sha512, 64),
            _ => continue,
        };
        let hash = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| format!("{token:?} is not valid base64"))?;
        if hash.len() != len {
            return Err(format!("{token:?} is not a {alg} hash"));
        }
        let sri = Sri { algorithm, hash };
        if !out.contains(&sri) {
            out.push(sri);
        }
        if out.len() > MAX_SRI {
            return Err(format!("more than {MAX_SRI} different checksums"));
        }
    }
    if out.is_empty() {
        return Err("no sha256, sha384 or sha512 checksum in it".into());
    }
    Ok(out)
}

/// Parses `bazel.auth_headers`: `{"URL": {"Header": "value", …}, …}`.
fn parse_auth_headers(value: &str) -> Result<BTreeMap<String, Vec<(String, String)>>, String> {
    let parsed: BTreeMap<String, BTreeMap<String, String>> = serde_json::from_str(value)
        .map_err(|e| format!("not a JSON object of URLs to headers: {e}"))?;
    parsed
        .into_iter()
        .map(|(url, headers)| {
            let headers = headers
                .into_iter()
                .map(|(n, v)| Ok((header_name(&n)?, self::value(&v)?)))
                .collect::<Result<Vec<_>, String>>()?;
            Ok((url, headers))
        })
        .collect()
}

/// A header name, as HTTP allows it.
fn header_name(name: &str) -> Result<String, String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|n| n.as_str().to_string())
        .map_err(|_| format!("{name:?} is not a valid HTTP header name"))
}

/// A header value, as HTTP allows it.
fn value(value: &str) -> Result<String, String> {
    http::HeaderValue::from_str(value)
        .map(|_| value.to_string())
        .map_err(|_| "the value is not a valid HTTP header value".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str, value: &str) -> Qualifier {
        Qualifier {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn bazel_qualifiers_parse() {
        let sri = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        let parsed = Qualifiers::parse(
            &[
                q("checksum.sri", &format!("md5-xxxx {sri}")),
                q("http_header:Authorization", "Bearer t"),
                q("http_header_url:1:X-Mirror", "yes"),
                q("bazel.canonical_id", "id"),
            ],
            2,
        )
        .unwrap();
        assert_eq!(parsed.sri.len(), 1);
        assert_eq!(parsed.sri[0].to_string(), sri);
        assert_eq!(
            parsed.headers_for(0, "u0"),
            vec![("authorization".into(), "Bearer t".into())]
        );
        assert_eq!(parsed.headers_for(1, "u1").len(), 2);
        let older = Qualifiers::parse(
            &[q(
                "bazel.auth_headers",
                r#"{"https://a/x": {"Authorization": "Basic abc"}}"#,
            )],
            1,
        )
        .unwrap();
        assert_eq!(
            older.headers_for(0, "https://a/x"),
            vec![("authorization".into(), "Basic abc".into())]
        );
        assert!(older.headers_for(0, "https://b/y").is_empty());
        assert!(parsed.fetchable(false));
        let pushed = Qualifiers::parse(&[q("vcs.commit", "abc")], 1).unwrap();
        assert!(!pushed.fetchable(true));
        let sub = Qualifiers::parse(&[q("directory", "a/b")], 1).unwrap();
        assert!(sub.fetchable(true) && !sub.fetchable(false));
    }

    #[test]
    fn bad_qualifiers_name_themselves() {
        let cases = [
            (vec![q("frobnicate", "1")], "frobnicate"),
            (
                vec![q("resource_type", "a"), q("resource_type", "b")],
                "resource_type",
            ),
            (vec![q("checksum.sri", "md5-AAAA")], "checksum.sri"),
            (vec![q("checksum.sri", "sha256-AAAA")], "checksum.sri"),
            (vec![q("checksum.sri", "sha256-!!!")], "checksum.sri"),
            (vec![q("http_header_url:3:X", "v")], "http_header_url:3:X"),
            (vec![q("http_header_url:X", "v")], "http_header_url:X"),
            (vec![q("http_header:bad name", "v")], "http_header:bad name"),
            (vec![q("http_header:X", "line\nbreak")], "http_header:X"),
            (
                vec![q("bazel.auth_headers", "[1, 2]")],
                "bazel.auth_headers",
            ),
        ];
        for (qs, name) in cases {
            let err = Qualifiers::parse(&qs, 1).unwrap_err();
            assert_eq!(err.name(), name, "{err}");
        }
        assert_eq!(
            Qualifiers::parse(&[q("frobnicate", "1")], 1)
                .unwrap_err()
                .to_string(),
            "\"frobnicate\" not supported"
        );
        // Every unsupported name is named, not only the first.
        assert_eq!(
            Qualifiers::parse(
                &[q("frobnicate", "1"), q("resource_type", "x"), q("zap", "2")],
                1
            )
            .unwrap_err(),
            QualifierError::Unsupported(vec!["frobnicate".into(), "zap".into()])
        );
        // Even after a duplicate or a bad value.
        assert_eq!(
            Qualifiers::parse(
                &[
                    q("resource_type", "a"),
                    q("resource_type", "b"),
                    q("checksum.sri", "sha256-!!!"),
                    q("zap", "2")
                ],
                1
            )
            .unwrap_err(),
            QualifierError::Unsupported(vec!["zap".into()])
        );
        // A checksum given twice is kept once; more than eight different ones are refused.
        let sri = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        let twice = Qualifiers::parse(&[q("checksum.sri", &format!("{sri} {sri}"))], 1).unwrap();
        assert_eq!(twice.sri.len(), 1);
        let many: Vec<String> = (0..9u8)
            .map(|i| {
                let hash = [i; 32];
                format!(
                    "sha256-{}",
                    base64::engine::general_purpose::STANDARD.encode(hash)
                )
            })
            .collect();
        let err = Qualifiers::parse(&[q("checksum.sri", &many.join(" "))], 1).unwrap_err();
        assert!(err.to_string().contains("more than 8"), "{err}");
        assert!(Qualifiers::parse(&[q("checksum.sri", &many[..8].join(" "))], 1).is_ok());
        // A repository is not a blob a download gives.
        let git = Qualifiers::parse(&[q("resource_type", "application/x-git")], 1).unwrap();
        assert!(!git.fetchable(false) && !git.fetchable(true));
        let tar = Qualifiers::parse(&[q("resource_type", "application/x-tar")], 1).unwrap();
        assert!(tar.fetchable(false) && tar.fetchable(true));
        // One value per header name, the per-URL one winning for its URL.
        let both = Qualifiers::parse(
            &[
                q("http_header:X-A", "all"),
                q("http_header_url:0:x-a", "first"),
            ],
            2,
        )
        .unwrap();
        assert_eq!(
            both.headers_for(0, "u"),
            vec![("x-a".into(), "first".into())]
        );
        assert_eq!(both.headers_for(1, "v"), vec![("x-a".into(), "all".into())]);
    }
}
