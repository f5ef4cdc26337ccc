//! Where things live under the data directory. The CAS and the action cache use the same
//! shape of tree, each with its own temp directory (wiped at start-up):
//!
//! ```text
//! {data_dir}/cas/{instance dir}/{function}/{first hash byte, hex}/{hash}-{size}
//! {data_dir}/cas/{instance dir}/INSTANCE        (the instance name, verbatim)
//! {data_dir}/tmp/{00..3f}/                       (uploads in progress)
//! {data_dir}/ac/...  and  {data_dir}/ac-tmp/    (action results, keyed by action digest)
//! ```
//!
//! An instance directory is `i_` followed by the name with every byte outside `[A-Za-z0-9_-]`
//! percent-encoded, or `h_` and a hash of the name when that would be too long for a file name.
//! The `INSTANCE` file holds the real name, so the start-up scan never has to decode a path.

use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};
use std::path::{Path, PathBuf};

/// Name of the file that records an instance directory's instance name.
pub const INSTANCE_FILE: &str = "INSTANCE";

/// Temp files are spread over this many subdirectories: creating a file locks its directory,
/// so concurrent uploads in one directory would queue on that lock.
pub const TEMP_FANOUT: u8 = 64;

/// Longest encoded instance directory name before falling back to a hash.
const MAX_DIR_NAME: usize = 120;

/// Paths of one tree of digest-named files (the CAS, or the action cache).
#[derive(Debug, Clone)]
pub struct Layout {
    tree: PathBuf,
    tmp: PathBuf,
}

impl Layout {
    /// The CAS under `data_dir`.
    pub fn cas(data_dir: &Path) -> Layout {
        Layout {
            tree: data_dir.join("cas"),
            tmp: data_dir.join("tmp"),
        }
    }

    /// The action cache under `data_dir`.
    pub fn action_cache(data_dir: &Path) -> Layout {
        Layout {
            tree: data_dir.join("ac"),
            tmp: data_dir.join("ac-tmp"),
        }
    }

    /// Root of all committed files.
    pub fn tree_dir(&self) -> &Path {
        &self.tree
    }

    /// The index snapshot written at a clean stop (`cas.index` beside `cas/`).
    pub fn index_file(&self) -> PathBuf {
        self.tree.with_extension("index")
    }

    /// Where files are written before they are committed.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// The subdirectories of [`Layout::tmp_dir`] that hold temp files.
    pub fn temp_dirs(&self) -> impl Iterator<Item = PathBuf> + '_ {
        (0..TEMP_FANOUT).map(|i| self.tmp.join(hex::encode([i])))
    }

    /// The directory of one instance.
    pub fn instance_dir(&self, instance: &InstanceName) -> PathBuf {
        self.tree.join(instance_dir_name(instance))
    }

    /// The directory a blob's file lives in.
    pub fn blob_dir(&self, key: &BlobKey) -> PathBuf {
        self.instance_dir(&key.instance)
            .join(key.digest.function.name())
            .join(hex::encode([key.digest.hash[0]]))
    }

    /// The file that holds a committed blob.
    pub fn blob_path(&self, key: &BlobKey) -> PathBuf {
        self.blob_dir(key).join(blob_file_name(&key.digest))
    }

    /// Creates a blob's directory, and its instance's name file, if missing; returns the
    /// directories it created (their parents need syncing for the creation to be durable).
    pub fn ensure_blob_dir(&self, key: &BlobKey) -> std::io::Result<Vec<PathBuf>> {
        let dir = self.blob_dir(key);
        let mut created = Vec::new();
        for d in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if !d.starts_with(&self.tree) || d.exists() {
                continue;
            }
            match std::fs::create_dir(d) {
                Ok(()) => created.push(d.to_path_buf()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let name_file = self.instance_dir(&key.instance).join(INSTANCE_FILE);
        if !name_file.exists() {
            // Its bytes synced before the rename (once per instance): the start-up scan needs
            // the name to read the directory, and the commit's syncs cover only the rename.
            let tmp = self.temp_path();
            let written = std::fs::File::create(&tmp).and_then(|mut file| {
                std::io::Write::write_all(&mut file, key.instance.as_str().as_bytes())?;
                file.sync_data()
            });
            if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &name_file)) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        Ok(created)
    }

    /// A fresh temporary path for an upload, in one of the [`Layout::temp_dirs`].
    pub fn temp_path(&self) -> PathBuf {
        let id = uuid::Uuid::new_v4();
        self.tmp
            .join(hex::encode([id.as_bytes()[0] % TEMP_FANOUT]))
            .join(format!("{}.part", id.simple()))
    }

    /// Creates the temp directories, removing whatever an earlier run left in them (uploads
    /// in progress when it stopped); returns how many files it removed.
    pub fn reset_temp_dirs(&self) -> std::io::Result<u64> {
        std::fs::create_dir_all(&self.tmp)?;
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.tmp)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                for inner in std::fs::read_dir(&path)? {
                    if std::fs::remove_file(inner?.path()).is_ok() {
                        removed += 1;
                    }
                }
            } else if std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        for dir in self.temp_dirs() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(removed)
    }
}

/// `{hash}-{size}`.
pub fn blob_file_name(digest: &Digest) -> String {
    format!("{}-{}", digest.hex(), digest.size)
}

/// Parses a blob file name back into a digest under `function`.
pub fn parse_blob_file_name(function: DigestFunction, name: &str) -> Option<Digest> {
    let (hash, size) = name.split_once('-')?;
    let size: i64 = size.parse().ok()?;
    Digest::parse(function, hash, size).ok()
}

/// The directory name for an instance (see the module docs).
pub fn instance_dir_name(instance: &InstanceName) -> String {
    let mut out = String::from("i_");
    for b in instance.as_str().bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() <= MAX_DIR_NAME {
        return out;
    }
    let hash =
        kiln_reapi::digest::Hasher::hash(DigestFunction::Sha256, instance.as_str().as_bytes());
    format!("h_{}", hex::encode(&hash[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_dirs_are_safe_and_distinct() {
        let names = ["", "main", "a/b", "a%2Fb", "..", ".", "a b", "ü"];
        let mut seen = std::collections::HashSet::new();
        for n in names {
            let dir = instance_dir_name(&InstanceName::new(n).unwrap());
            assert!(
                !dir.contains('/') && !dir.contains('.') && dir.len() <= MAX_DIR_NAME,
                "{dir}"
            );
            assert!(seen.insert(dir), "collision for {n:?}");
        }
        let long = InstanceName::new(&"x/".repeat(100)).unwrap();
        assert!(instance_dir_name(&long).starts_with("h_"));
    }

    #[test]
    fn blob_dirs_are_created_with_their_instance_name() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::cas(tmp.path());
        layout.reset_temp_dirs().unwrap();
        let key = BlobKey::new(
            InstanceName::new("team/a").unwrap(),
            Digest::of(DigestFunction::Sha256, b"x"),
        );
        let created = layout.ensure_blob_dir(&key).unwrap();
        assert_eq!(created.last(), Some(&layout.blob_dir(&key)));
        assert!(created.iter().all(|d| d.starts_with(layout.tree_dir())));
        let name = std::fs::read_to_string(layout.instance_dir(&key.instance).join(INSTANCE_FILE))
            .unwrap();
        assert_eq!(name, "team/a");
        assert!(
            layout.ensure_blob_dir(&key).unwrap().is_empty(),
            "second call creates nothing"
        );
    }

    #[test]
    fn blob_names_round_trip() {
        let d = Digest::of(DigestFunction::Blake3, b"abc");
        let name = blob_file_name(&d);
        assert_eq!(parse_blob_file_name(DigestFunction::Blake3, &name), Some(d));
        assert_eq!(parse_blob_file_name(DigestFunction::Blake3, "junk"), None);
        assert_eq!(
            parse_blob_file_name(DigestFunction::Blake3, &format!("{}--1", d.hex())),
            None
        );
        let layout = Layout::cas(Path::new("/data"));
        let key = BlobKey::new(InstanceName::new("ci").unwrap(), d);
        let path = layout.blob_path(&key);
        assert!(
            path.starts_with("/data/cas/i_ci/blake3/"),
            "{}",
            path.display()
        );
    }
}
