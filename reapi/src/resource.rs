//! ByteStream resource names, as REAPI defines them, parsed and built:
//!
//! - reads: `{instance}/blobs/{function/}{hash}/{size}`
//! - writes: `{instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata}`
//!
//! and their compressed forms, `compressed-blobs/{compressor}/` in place of `blobs/`. The
//! function segment is present for functions that cannot be inferred from the hash length
//! (`blake3`); `sha256` may be written or left out. Instance names may contain `/`.

use crate::compression::{Compressor, UnknownCompressor};
use crate::digest::{BlobKey, Digest, DigestError, DigestFunction, InstanceName};

/// A parsed read resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadResource {
    /// The blob to read.
    pub key: BlobKey,
    /// The form it is sent in.
    pub compressor: Compressor,
}

/// A parsed write resource name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResource {
    /// The blob being uploaded.
    pub key: BlobKey,
    /// The client's upload id (the `{uuid}` segment).
    pub upload_id: String,
    /// The form the data arrives in.
    pub compressor: Compressor,
}

impl ReadResource {
    /// The resource name that reads this blob.
    pub fn name(&self) -> String {
        read_name(
            self.key.instance.as_str(),
            self.compressor,
            self.key.digest.function,
            &self.key.digest.hex(),
            self.key.digest.size,
        )
    }
}

impl WriteResource {
    /// A fresh upload of `key` (a random upload id).
    pub fn new_upload(key: BlobKey) -> WriteResource {
        WriteResource {
            key,
            upload_id: uuid::Uuid::new_v4().to_string(),
            compressor: Compressor::Identity,
        }
    }

    /// The resource name that writes this upload.
    pub fn name(&self) -> String {
        write_name(
            self.key.instance.as_str(),
            &self.upload_id,
            self.compressor,
            self.key.digest.function,
            &self.key.digest.hex(),
            self.key.digest.size,
        )
    }

    /// The identity of this upload for resumption: instance, upload id and digest.
    pub fn upload_key(&self) -> String {
        format!(
            "{}\u{0}{}\u{0}{}",
            self.key.instance, self.upload_id, self.key.digest
        )
    }
}

/// Why a resource name is malformed. Mapped to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// No `blobs`/`uploads` segment where one is required.
    #[error("resource name {0:?} is not of the form {{instance}}/{1}")]
    Shape(String, &'static str),
    /// Names a compressor Kiln does not speak.
    #[error("resource name {name:?}: {source}")]
    Compressor {
        name: String,
        #[source]
        source: UnknownCompressor,
    },
    /// The digest part is wrong.
    #[error("resource name {name:?}: {source}")]
    Digest {
        name: String,
        #[source]
        source: DigestError,
    },
    /// The instance part is wrong.
    #[error("resource name {name:?}: {why}")]
    Instance { name: String, why: String },
}

const READ_SHAPE: &str = "blobs/{function/}{hash}/{size}";
const WRITE_SHAPE: &str = "uploads/{uuid}/blobs/{function/}{hash}/{size}";

/// `{instance}/blobs/{function/}{hash}/{size}` (or `compressed-blobs/{compressor}/` for
/// `blobs/`): the function segment is written for every function but SHA-256 (which servers
/// infer from the hash length, old ones included).
pub fn read_name(
    instance: &str,
    compressor: Compressor,
    function: DigestFunction,
    hash: &str,
    size: u64,
) -> String {
    format!(
        "{}{}{}{hash}/{size}",
        prefix(instance),
        blobs_segment(compressor),
        segment(function)
    )
}

/// `{instance}/uploads/{upload_id}/blobs/{function/}{hash}/{size}` (or
/// `compressed-blobs/{compressor}/` for `blobs/`).
pub fn write_name(
    instance: &str,
    upload_id: &str,
    compressor: Compressor,
    function: DigestFunction,
    hash: &str,
    size: u64,
) -> String {
    format!(
        "{}uploads/{upload_id}/{}{}{hash}/{size}",
        prefix(instance),
        blobs_segment(compressor),
        segment(function)
    )
}

/// The instance and its separator; nothing for the default (empty) instance.
fn prefix(instance: &str) -> String {
    if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    }
}

/// `blobs/` or `compressed-blobs/{compressor}/`.
fn blobs_segment(compressor: Compressor) -> String {
    match compressor.segment() {
        None => "blobs/".to_string(),
        Some(c) => format!("compressed-blobs/{c}/"),
    }
}

fn segment(function: DigestFunction) -> String {
    match function {
        DigestFunction::Sha256 => String::new(),
        other => format!("{}/", other.name()),
    }
}

/// Parses a ByteStream `Read` resource name.
pub fn parse_read(name: &str) -> Result<ReadResource, ResourceError> {
    let segments: Vec<&str> = name.split('/').collect();
    let at = segments
        .iter()
        .position(|s| *s == "blobs" || *s == "compressed-blobs")
        .ok_or_else(|| ResourceError::Shape(short(name), READ_SHAPE))?;
    let instance = instance(name, &segments[..at])?;
    let (compressor, after) = blobs(name, &segments[at..], READ_SHAPE)?;
    let (digest, rest) = digest(name, after, READ_SHAPE)?;
    if !rest.is_empty() {
        return Err(ResourceError::Shape(short(name), READ_SHAPE));
    }
    Ok(ReadResource {
        key: BlobKey::new(instance, digest),
        compressor,
    })
}

/// Parses a ByteStream `Write` resource name (trailing metadata segments are allowed and ignored).
pub fn parse_write(name: &str) -> Result<WriteResource, ResourceError> {
    let segments: Vec<&str> = name.split('/').collect();
    let at = segments
        .iter()
        .position(|s| *s == "uploads")
        .ok_or_else(|| ResourceError::Shape(short(name), WRITE_SHAPE))?;
    let instance = instance(name, &segments[..at])?;
    let upload_id = match segments.get(at + 1) {
        Some(id) if !id.is_empty() && id.len() <= 128 => id.to_string(),
        _ => return Err(ResourceError::Shape(short(name), WRITE_SHAPE)),
    };
    let (compressor, after) = blobs(name, segments.get(at + 2..).unwrap_or(&[]), WRITE_SHAPE)?;
    let (digest, _metadata) = digest(name, after, WRITE_SHAPE)?;
    Ok(WriteResource {
        key: BlobKey::new(instance, digest),
        upload_id,
        compressor,
    })
}

/// `blobs` or `compressed-blobs/{compressor}` at the start of `segments`: the form, and the
/// segments after it.
fn blobs<'a>(
    name: &str,
    segments: &'a [&'a str],
    shape: &'static str,
) -> Result<(Compressor, &'a [&'a str]), ResourceError> {
    match segments {
        ["blobs", rest @ ..] => Ok((Compressor::Identity, rest)),
        ["compressed-blobs", compressor, rest @ ..] => {
            let compressor = Compressor::from_segment(compressor).map_err(|source| {
                ResourceError::Compressor {
                    name: short(name),
                    source,
                }
            })?;
            Ok((compressor, rest))
        }
        _ => Err(ResourceError::Shape(short(name), shape)),
    }
}

fn instance(name: &str, segments: &[&str]) -> Result<InstanceName, ResourceError> {
    InstanceName::new(&segments.join("/")).map_err(|e| ResourceError::Instance {
        name: short(name),
        why: e.to_string(),
    })
}

/// Parses `{function/}{hash}/{size}` and returns the digest and the segments after it.
fn digest<'a>(
    name: &str,
    segments: &'a [&'a str],
    shape: &'static str,
) -> Result<(Digest, &'a [&'a str]), ResourceError> {
    let err = |source| ResourceError::Digest {
        name: short(name),
        source,
    };
    let first = segments
        .first()
        .ok_or_else(|| ResourceError::Shape(short(name), shape))?;
    let (function, rest) = match DigestFunction::from_resource_segment(first).map_err(err)? {
        Some(f) => (f, &segments[1..]),
        None => (DigestFunction::Sha256, segments),
    };
    let (hash, size) = match rest {
        [hash, size, ..] => (*hash, *size),
        _ => return Err(ResourceError::Shape(short(name), shape)),
    };
    let size: i64 = size
        .parse()
        .map_err(|_| err(DigestError::BadSize(size.chars().take(40).collect())))?;
    let digest = Digest::parse(function, hash, size).map_err(err)?;
    Ok((digest, &rest[2..]))
}

/// Resource names go into error messages; keep them bounded.
fn short(name: &str) -> String {
    if name.len() <= 300 {
        name.to_string()
    } else {
        let mut end = 300;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &name[..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn read_names() {
        let r = parse_read(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(r.key.instance.as_str(), "");
        assert_eq!(r.key.digest.function, DigestFunction::Sha256);
        let r = parse_read(&format!("main/ci/blobs/blake3/{H}/42")).unwrap();
        assert_eq!(r.key.instance.as_str(), "main/ci");
        assert_eq!(r.key.digest.function, DigestFunction::Blake3);
        assert_eq!(r.key.digest.size, 42);
        let r = parse_read(&format!("x/blobs/sha256/{H}/1")).unwrap();
        assert_eq!(r.key.digest.function, DigestFunction::Sha256);
    }

    #[test]
    fn write_names() {
        let w = parse_write(&format!("inst/uploads/abc-123/blobs/{H}/7")).unwrap();
        assert_eq!(w.upload_id, "abc-123");
        assert_eq!(w.key.instance.as_str(), "inst");
        let w = parse_write(&format!("uploads/u/blobs/blake3/{H}/7/some/metadata")).unwrap();
        assert_eq!(w.key.digest.function, DigestFunction::Blake3);
        assert_ne!(
            parse_write(&format!("uploads/u1/blobs/{H}/7"))
                .unwrap()
                .upload_key(),
            parse_write(&format!("uploads/u2/blobs/{H}/7"))
                .unwrap()
                .upload_key()
        );
    }

    #[test]
    fn built_names_parse_back() {
        for function in DigestFunction::ALL {
            for instance in ["", "main", "main/ci"] {
                let digest = Digest::of(function, b"kiln");
                let key = BlobKey::new(InstanceName::new(instance).unwrap(), digest);
                for compressor in [Compressor::Identity, Compressor::Zstd] {
                    let read = ReadResource {
                        key: key.clone(),
                        compressor,
                    };
                    assert_eq!(parse_read(&read.name()).unwrap(), read, "{}", read.name());
                    let write = WriteResource {
                        compressor,
                        ..WriteResource::new_upload(key.clone())
                    };
                    assert_eq!(
                        parse_write(&write.name()).unwrap(),
                        write,
                        "{}",
                        write.name()
                    );
                    assert_eq!(
                        read.name().contains("compressed-blobs/zstd/"),
                        compressor == Compressor::Zstd
                    );
                }
                let read = ReadResource {
                    key,
                    compressor: Compressor::Identity,
                };
                assert_eq!(
                    read.name().contains("blake3/"),
                    function == DigestFunction::Blake3
                );
            }
        }
        let a = WriteResource::new_upload(BlobKey::new(
            InstanceName::new("").unwrap(),
            Digest::of(DigestFunction::Sha256, b""),
        ));
        let b = WriteResource::new_upload(a.key.clone());
        assert_ne!(a.upload_id, b.upload_id, "each upload gets its own id");
        assert_eq!(
            read_name("i", Compressor::Identity, DigestFunction::Sha256, H, 7),
            format!("i/blobs/{H}/7")
        );
        assert_eq!(
            write_name("", "u", Compressor::Zstd, DigestFunction::Blake3, H, 7),
            format!("uploads/u/compressed-blobs/zstd/blake3/{H}/7")
        );
    }

    #[test]
    fn malformed_names() {
        let bad_reads = [
            String::new(),
            "blobs".to_string(),
            format!("blobs/{H}"),
            format!("blobs/{H}/-1"),
            format!("blobs/{H}/ten"),
            format!("blobs/{}/1", &H[..10]),
            format!("blobs/sha1/{H}/1"),
            format!("blobs/{H}/1/extra"),
            format!("uploads/u/blobs/{H}/1"),
        ];
        for name in bad_reads {
            assert!(parse_read(&name).is_err(), "{name:?} accepted");
        }
        for compressor in ["identity", "deflate", "brotli", "ZSTD", ""] {
            assert!(matches!(
                parse_read(&format!("compressed-blobs/{compressor}/{H}/1")),
                Err(ResourceError::Compressor { .. })
            ));
            assert!(matches!(
                parse_write(&format!("uploads/u/compressed-blobs/{compressor}/{H}/1")),
                Err(ResourceError::Compressor { .. })
            ));
        }
        assert!(parse_read("compressed-blobs/zstd").is_err());
        let bad_writes = [
            format!("blobs/{H}/1"),
            format!("uploads//blobs/{H}/1"),
            format!("uploads/u/{H}/1"),
            format!("uploads/u/blobs/{H}/-5"),
            format!("uploads/u/blobs/md5/{H}/5"),
        ];
        for name in bad_writes {
            assert!(parse_write(&name).is_err(), "{name:?} accepted");
        }
        let w = parse_write(&format!("i/uploads/u/compressed-blobs/zstd/{H}/1/meta")).unwrap();
        assert_eq!(w.compressor, Compressor::Zstd);
        assert_eq!(w.key.instance.as_str(), "i");
        let r = parse_read(&format!("compressed-blobs/zstd/blake3/{H}/1")).unwrap();
        assert_eq!(r.compressor, Compressor::Zstd);
        assert_eq!(r.key.digest.function, DigestFunction::Blake3);
    }

    #[test]
    fn long_names_are_truncated_in_errors() {
        let name = format!("{}/blobs/x/1", "é".repeat(400));
        let msg = parse_read(&name).unwrap_err().to_string();
        assert!(msg.len() < 700, "{}", msg.len());
    }
}
