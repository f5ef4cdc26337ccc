//! `FetchDirectory` from origin: a downloaded tar (or gzip-compressed tar) unpacked, blocking,
//! into a tree of `Directory` messages and the files they name, ready to store in the CAS.
//! Every path is checked before it is used (no absolute path, no `..`, no component that is
//! not a name, at most [`MAX_DEPTH`] deep), symlink targets must stay inside the tree that is
//! answered (the subdirectory, when one is asked for), the unpacked file bytes are bounded (a
//! small archive cannot inflate past the limit), so are the bytes the tar reader takes between
//! two entries (headers, long names, PAX records, skipped data: [`MAX_BETWEEN_ENTRIES`]), the
//! entries, the bytes of names and the size of each `Directory`, and the whole unpack ends at
//! the fetch's deadline. Hard links become copies; devices, FIFOs and the like are left out.

mod metered;
mod tree;

use crate::temp_file::TempFile;
use bytes::Bytes;
use kiln_reapi::digest::{Digest, DigestFunction, Hasher};
use kiln_reapi::status::{Classify, ErrorKind};
use metered::{Meter, Metered};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;
use tree::{build, check_symlinks, collect_files, components, find, insert, Node};

/// Most entries in one archive.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Deepest path in one archive.
pub const MAX_DEPTH: usize = 128;
/// Most bytes of names and symlink targets in one archive.
pub const MAX_NAME_BYTES: usize = 64 << 20;
/// Most bytes the tar reader may take between two entries it hands out: headers, GNU long
/// names, PAX records, and the data of entries left out. (The crate reads long names and PAX
/// records whole into memory.)
pub const MAX_BETWEEN_ENTRIES: u64 = 1 << 20;
/// Largest `Directory` message: under the 4 MiB gRPC clients accept by default.
pub const MAX_DIRECTORY_BYTES: usize = 3 << 20;

/// The archive formats Kiln unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// A tar.
    Tar,
    /// A gzip-compressed tar.
    TarGz,
}

impl ArchiveKind {
    /// The format named by the `resource_type` qualifier, or else by the URL's ending.
    pub fn of(url: &str, resource_type: Option<&str>) -> Option<ArchiveKind> {
        match resource_type {
            Some("application/x-tar") => return Some(ArchiveKind::Tar),
            Some(
                "application/gzip"
                | "application/x-gzip"
                | "application/x-compressed-tar"
                | "application/x-tar+gzip",
            ) => return Some(ArchiveKind::TarGz),
            Some(_) | None => {}
        }
        let path = url.split(['?', '#']).next().unwrap_or(url);
        if path.ends_with(".tar.gz") || path.ends_with(".tgz") {
            Some(ArchiveKind::TarGz)
        } else if path.ends_with(".tar") {
            Some(ArchiveKind::Tar)
        } else {
            None
        }
    }
}

/// Why an archive was refused: its content, so it goes in the response's status.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// Not a readable archive, or one whose paths or links are not allowed.
    #[error("the archive {0}")]
    Bad(String),
    /// More bytes or entries than allowed.
    #[error("the archive unpacks to more than {0}")]
    TooLarge(String),
    /// The fetch's deadline passed while unpacking.
    #[error("unpacking the archive took longer than the fetch's timeout")]
    TimedOut,
    /// The `directory` qualifier names nothing in it.
    #[error("the archive has no directory {0:?}")]
    NoSuchDirectory(String),
    /// Writing a file here failed.
    #[error("unpacking: {0}")]
    Local(#[source] std::io::Error),
}

impl Classify for UnpackError {
    fn kind(&self) -> ErrorKind {
        match self {
            // A failed consistency check: the spec's ABORTED.
            UnpackError::Bad(_) => ErrorKind::Conflict,
            UnpackError::TooLarge(_) => ErrorKind::Exhausted,
            UnpackError::TimedOut => ErrorKind::TimedOut,
            UnpackError::NoSuchDirectory(_) => ErrorKind::Missing,
            UnpackError::Local(e) => ErrorKind::of_io(e),
        }
    }
}

/// An unpacked tree: the files to store (each in a temp file), every `Directory` message, and
/// the digest of the root (or of the subdirectory asked for).
pub struct Unpacked {
    /// Each distinct file once.
    pub files: Vec<(Digest, TempFile)>,
    /// Each distinct directory once, every one after the directories it names.
    pub directories: Vec<(Digest, Bytes)>,
    /// The tree's root.
    pub root: Digest,
}

/// Unpacks `archive`, hashing with `function`; at most `max_bytes` of file contents; temp
/// files at the paths `temp` gives; the root is `subdir` when given; refused once `deadline`
/// has passed.
pub fn unpack(
    archive: &Path,
    kind: ArchiveKind,
    function: DigestFunction,
    max_bytes: u64,
    temp: &dyn Fn() -> PathBuf,
    subdir: Option<&str>,
    deadline: Instant,
) -> Result<Unpacked, UnpackError> {
    let file = std::fs::File::open(archive).map_err(UnpackError::Local)?;
    let reader: Box<dyn Read> = match kind {
        ArchiveKind::Tar => Box::new(file),
        ArchiveKind::TarGz => Box::new(flate2::read::MultiGzDecoder::new(file)),
    };
    let meter = Rc::new(Cell::new(Meter::default()));
    let reader = Metered {
        inner: reader,
        meter: meter.clone(),
    };
    let bad = |why: String| UnpackError::Bad(why);
    let mut tar = tar::Archive::new(reader);
    let mut root: BTreeMap<String, Node> = BTreeMap::new();
    let mut files: BTreeMap<Digest, TempFile> = BTreeMap::new();
    let mut total = 0u64;
    let mut name_bytes = 0usize;
    let mut buf = vec![0u8; 256 << 10];
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("is not a tar: {e}")))?;
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(UnpackError::TooLarge(format!("{MAX_ENTRIES} entries")));
        }
        if Instant::now() >= deadline {
            return Err(UnpackError::TimedOut);
        }
        let mut entry = entry.map_err(|e| bad(format!("is damaged: {e}")))?;
        meter.set(Meter::default());
        // GNU sparse files in PAX form are not expanded by the reader: their contents would be
        // the sparse map, not the file.
        let sparse = entry
            .pax_extensions()
            .map_err(|e| bad(format!("is damaged: {e}")))?
            .is_some_and(|mut ext| {
                ext.any(|e| e.is_ok_and(|e| e.key_bytes().starts_with(b"GNU.sparse")))
            });
        if sparse {
            return Err(bad(
                "holds a PAX sparse file, which Kiln does not unpack".into()
            ));
        }
        let path = entry
            .path()
            .map_err(|e| bad(format!("has an unreadable path: {e}")))?
            .into_owned();
        let Some(at) = components(&path).map_err(bad)? else {
            continue; // "." itself
        };
        name_bytes += path.as_os_str().len();
        if name_bytes > MAX_NAME_BYTES {
            return Err(UnpackError::TooLarge(format!(
                "{MAX_NAME_BYTES} bytes of names"
            )));
        }
        let kind = entry.header().entry_type();
        let is_file = kind.is_file()
            || kind == tar::EntryType::Continuous
            || kind == tar::EntryType::GNUSparse;
        let node = if is_file {
            let dest = TempFile(temp());
            meter.set(Meter {
                in_file: true,
                between: 0,
            });
            let copied = copy_hashed(&mut entry, &dest.0, function, max_bytes - total, &mut buf);
            meter.set(Meter::default());
            let (digest, size) = copied?;
            total += size;
            let executable = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
            files.entry(digest).or_insert(dest);
            Node::File { digest, executable }
        } else if kind.is_dir() {
            Node::Dir(BTreeMap::new())
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| bad(format!("has an unreadable link: {e}")))?
                .ok_or_else(|| bad(format!("has a symlink without a target at {path:?}")))?;
            let target = target
                .to_str()
                .ok_or_else(|| {
                    bad(format!(
                        "has a symlink target that is not UTF-8 at {path:?}"
                    ))
                })?
                .to_string();
            // Its target is checked once the tree answered is known (`check_symlinks`).
            name_bytes += target.len();
            Node::Symlink(target)
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| bad(format!("has an unreadable link: {e}")))?
                .ok_or_else(|| bad(format!("has a hard link without a target at {path:?}")))?;
            let linked = components(&target)
                .map_err(bad)?
                .ok_or_else(|| bad(format!("has a hard link to the root at {path:?}")))?;
            match find(&root, &linked) {
                Some(Node::File { digest, executable }) => Node::File {
                    digest: *digest,
                    executable: *executable,
                },
                _ => {
                    return Err(bad(format!(
                        "has a hard link at {path:?} to no file before it"
                    )))
                }
            }
        } else {
            continue; // devices, FIFOs, global headers: nothing a tree holds
        };
        insert(&mut root, &at, node).map_err(|why| bad(format!("{why} at {path:?}")))?;
    }
    let mut top = &root;
    if let Some(dir) = subdir {
        let at = components(Path::new(dir))
            .map_err(|_| UnpackError::NoSuchDirectory(dir.to_string()))?;
        if let Some(at) = at {
            top = match find(&root, &at) {
                Some(Node::Dir(children)) => children,
                _ => return Err(UnpackError::NoSuchDirectory(dir.to_string())),
            };
        }
    }
    // Symlinks were checked against the archive's root; the tree answered may be below it.
    check_symlinks(top, 0).map_err(bad)?;
    let mut directories = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let root = build(top, function, &mut directories, &mut seen)?;
    // Only the files the chosen tree names are stored.
    let mut named = std::collections::BTreeSet::new();
    collect_files(top, &mut named);
    let files = files
        .into_iter()
        .filter(|(d, _)| named.contains(d))
        .collect();
    Ok(Unpacked {
        files,
        directories,
        root,
    })
}

/// Copies an entry's bytes into a new file while hashing them; at most `left` bytes.
fn copy_hashed(
    from: &mut impl Read,
    to: &Path,
    function: DigestFunction,
    left: u64,
    buf: &mut [u8],
) -> Result<(Digest, u64), UnpackError> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(UnpackError::Local)?;
    let mut hasher = Hasher::new(function);
    let mut size = 0u64;
    loop {
        let n = from
            .read(buf)
            .map_err(|e| UnpackError::Bad(format!("is damaged: {e}")))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > left {
            return Err(UnpackError::TooLarge(
                "remote_asset.max_fetch_bytes of files".into(),
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(UnpackError::Local)?;
    }
    Ok((
        Digest {
            function,
            hash: hasher.finalize(),
            size,
        },
        size,
    ))
}

#[cfg(test)]
mod tests;
