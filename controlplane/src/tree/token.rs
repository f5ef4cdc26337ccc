//! `GetTree` page tokens (sans-IO): where in a tree's walk a page starts. A token names the
//! root it belongs to, an offset into the walk's order (breadth first, children in their
//! `Directory`'s order, each directory once: fixed by the tree), and the directory just
//! before the offset, so that a token resumes exactly where its page ended whether or not the
//! tree is still cached, and one whose tree changed meanwhile (a directory uploaded or
//! evicted, shifting the walk) is refused rather than silently skipping or repeating.

use kiln_reapi::digest::{Digest, DigestFunction};

/// Where the next page of a tree's walk starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    /// The tree's root.
    pub root: Digest,
    /// Directories of the walk before the page (at least one: the first page has no token).
    pub offset: u64,
    /// The first 8 bytes of the hash of the directory just before the page.
    pub before: [u8; 8],
}

/// The version prefix of every token.
const VERSION: &str = "t1";

/// Why a page token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token this server made.
    #[error("page_token {0:?} is not one this server gave out")]
    Malformed(String),
    /// A token of another tree.
    #[error("page_token {token:?} belongs to another tree than {root:?}")]
    OtherTree {
        /// The token.
        token: String,
        /// The root asked for.
        root: Digest,
    },
    /// The tree's walk is no longer what it was when the token was given.
    #[error("the tree under {0:?} changed since this page_token was given (a directory was uploaded or evicted); start again without a token")]
    Changed(Digest),
}

impl PageToken {
    /// The token for a page starting after `before` (the directory at `offset - 1`).
    pub fn new(root: Digest, offset: u64, before: &Digest) -> PageToken {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&before.hash[..8]);
        PageToken {
            root,
            offset,
            before: prefix,
        }
    }

    /// The token's text: `t1.{function}.{hash}.{size}.{offset}.{before}`.
    pub fn encode(&self) -> String {
        format!(
            "{VERSION}.{}.{}.{}.{}.{}",
            self.root.function.name(),
            self.root.hex(),
            self.root.size,
            self.offset,
            hex::encode(self.before)
        )
    }

    /// Parses a request's token for the tree under `root`; `None` for no token (the start).
    pub fn parse(text: &str, root: Digest) -> Result<Option<PageToken>, TokenError> {
        if text.is_empty() {
            return Ok(None);
        }
        let malformed = || TokenError::Malformed(text.chars().take(200).collect());
        let parts: Vec<&str> = text.split('.').collect();
        let [VERSION, function, hash, size, offset, before] = parts[..] else {
            return Err(malformed());
        };
        let function = DigestFunction::ALL
            .into_iter()
            .find(|f| f.name() == function)
            .ok_or_else(malformed)?;
        let size: u64 = size.parse().map_err(|_| malformed())?;
        let offset: u64 = offset.parse().map_err(|_| malformed())?;
        let mut prefix = [0u8; 8];
        hex::decode_to_slice(before, &mut prefix).map_err(|_| malformed())?;
        if offset == 0 {
            return Err(malformed());
        }
        let same = function == root.function && size == root.size && hash == root.hex();
        if !same {
            return Err(TokenError::OtherTree {
                token: text.chars().take(200).collect(),
                root,
            });
        }
        Ok(Some(PageToken {
            root,
            offset,
            before: prefix,
        }))
    }

    /// Where the page starts in a walk whose directories are `digests`: the offset, if the
    /// directory before it is still the one the token saw.
    pub fn resume(&self, digests: &[Digest]) -> Result<usize, TokenError> {
        let at = usize::try_from(self.offset).unwrap_or(usize::MAX);
        match digests.get(at.wrapping_sub(1)) {
            Some(d) if at < digests.len() && d.hash[..8] == self.before => Ok(at),
            _ => Err(TokenError::Changed(self.root)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(data: &[u8]) -> Digest {
        Digest::of(DigestFunction::Sha256, data)
    }

    #[test]
    fn a_token_reads_back_and_resumes_only_the_same_walk() {
        let r = d(b"tree");
        let walk = [d(b"a"), d(b"b"), d(b"c")];
        let t = PageToken::new(r, 2, &walk[1]);
        let parsed = PageToken::parse(&t.encode(), r).unwrap().unwrap();
        assert_eq!(parsed, t);
        assert_eq!(parsed.resume(&walk), Ok(2));
        assert_eq!(PageToken::parse("", r), Ok(None));
        // A directory uploaded before the offset shifts the walk: refused.
        let shifted = [d(b"a"), d(b"new"), d(b"b"), d(b"c")];
        assert_eq!(parsed.resume(&shifted), Err(TokenError::Changed(r)));
        // Past the end.
        assert_eq!(parsed.resume(&walk[..2]), Err(TokenError::Changed(r)));
    }

    #[test]
    fn malformed_and_foreign_tokens_are_refused() {
        let r = d(b"tree");
        let good = PageToken::new(r, 7, &d(b"x")).encode();
        let (head, before) = good.rsplit_once('.').unwrap();
        for bad in [
            "x".to_string(),
            "t1".to_string(),
            "t2.sha256.00.1.1.0000000000000000".to_string(),
            good.replace(".7.", ".-1."),
            good.replace(".7.", ".0."),
            good.replace("sha256", "md5"),
            format!("{good}x"),
            format!("{head}.{}", &before[..15]),
            format!("{good}.1"),
        ] {
            assert!(
                matches!(PageToken::parse(&bad, r), Err(TokenError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            PageToken::parse(&good, d(b"another tree")),
            Err(TokenError::OtherTree { .. })
        ));
    }
}
