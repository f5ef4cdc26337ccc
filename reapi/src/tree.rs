//! The rules for one `Directory` of an input tree: every name is a single path component,
//! no name appears twice among its files, directories and symlinks, and every symlink's
//! target stays inside the input root. Both the scheduler's walk and the worker's
//! materialisation apply them, so a bad tree is `INVALID_ARGUMENT` before anything is run or
//! written.

use crate::paths::{symlink_target, PathError};
use kiln_proto::reapi::Directory;
use std::collections::HashSet;

/// A `Directory` Kiln will not lay out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// A name that is not one path component.
    #[error("invalid name {name:?} in directory {dir:?}: a name is one path component of at most 255 bytes, not empty, '.' or '..'")]
    Name {
        /// The directory's path below the input root.
        dir: String,
        /// The name.
        name: String,
    },
    /// The same name twice.
    #[error("duplicate name {name:?} in directory {dir:?}")]
    Duplicate {
        /// The directory's path below the input root.
        dir: String,
        /// The name.
        name: String,
    },
    /// A symlink pointing outside the input root.
    #[error("symlink {name:?} in directory {dir:?}: {source}")]
    Symlink {
        /// The directory's path below the input root.
        dir: String,
        /// The symlink's name.
        name: String,
        /// What is wrong with its target.
        source: PathError,
    },
    /// A directory deeper than [`MAX_DEPTH`].
    #[error("directory {dir:?} is more than {MAX_DEPTH} levels below the input root")]
    TooDeep {
        /// The directory's path below the input root.
        dir: String,
    },
}

/// The deepest directory of an input tree (the root is at 0): every walk of a laid-out tree
/// holds a directory handle per level, so the depth bounds the files a walk keeps open.
pub const MAX_DEPTH: usize = 256;

/// Whether `name` is one path component.
pub fn valid_name(name: &str) -> bool {
    !(name.is_empty()
        || name.len() > crate::paths::MAX_NAME_BYTES
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0'))
}

/// Checks one directory found `depth` levels below the input root; `place` names it in
/// errors (its path, or its digest).
pub fn check_directory(dir: &Directory, depth: usize, place: &str) -> Result<(), TreeError> {
    let here = || place.to_string();
    if depth > MAX_DEPTH {
        return Err(TreeError::TooDeep { dir: here() });
    }
    let mut names: HashSet<&str> = HashSet::new();
    let all = dir
        .files
        .iter()
        .map(|f| f.name.as_str())
        .chain(dir.directories.iter().map(|d| d.name.as_str()))
        .chain(dir.symlinks.iter().map(|s| s.name.as_str()));
    for name in all {
        if !valid_name(name) {
            return Err(TreeError::Name {
                dir: here(),
                name: name.chars().take(300).collect(),
            });
        }
        if !names.insert(name) {
            return Err(TreeError::Duplicate {
                dir: here(),
                name: name.to_string(),
            });
        }
    }
    for s in &dir.symlinks {
        symlink_target(depth, &s.target).map_err(|source| TreeError::Symlink {
            dir: here(),
            name: s.name.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::{DirectoryNode, FileNode, SymlinkNode};

    fn file(name: &str) -> FileNode {
        FileNode {
            name: name.into(),
            ..Default::default()
        }
    }

    fn link(name: &str, target: &str) -> SymlinkNode {
        SymlinkNode {
            name: name.into(),
            target: target.into(),
            node_properties: None,
        }
    }

    #[test]
    fn names_are_single_unique_components() {
        let ok = Directory {
            files: vec![file("a"), file("b")],
            directories: vec![DirectoryNode {
                name: "c".into(),
                digest: None,
            }],
            symlinks: vec![link("d", "a")],
            ..Default::default()
        };
        assert_eq!(check_directory(&ok, 0, ""), Ok(()));
        let too_long = "n".repeat(256);
        assert!(valid_name(&too_long[1..]), "255 bytes is a name");
        for bad in ["", ".", "..", "x/y", "nul\0", &too_long] {
            let d = Directory {
                files: vec![file(bad)],
                ..Default::default()
            };
            assert!(
                matches!(check_directory(&d, 0, ""), Err(TreeError::Name { .. })),
                "{bad:?}"
            );
        }
        // The same name as a file and as a directory.
        let dup = Directory {
            files: vec![file("x")],
            directories: vec![DirectoryNode {
                name: "x".into(),
                digest: None,
            }],
            ..Default::default()
        };
        let e = check_directory(&dup, 1, "p").unwrap_err();
        assert_eq!(e.to_string(), "duplicate name \"x\" in directory \"p\"");
    }

    #[test]
    fn trees_are_bounded_in_depth() {
        let empty = Directory::default();
        assert!(check_directory(&empty, MAX_DEPTH, "deep").is_ok());
        assert!(matches!(
            check_directory(&empty, MAX_DEPTH + 1, "deeper"),
            Err(TreeError::TooDeep { .. })
        ));
    }

    #[test]
    fn symlinks_stay_inside_the_root_at_their_depth() {
        let d = Directory {
            symlinks: vec![link("up", "../sibling")],
            ..Default::default()
        };
        assert_eq!(check_directory(&d, 1, "pkg"), Ok(()));
        assert!(matches!(
            check_directory(&d, 0, ""),
            Err(TreeError::Symlink { .. })
        ));
        let abs = Directory {
            symlinks: vec![link("etc", "/etc")],
            ..Default::default()
        };
        let e = check_directory(&abs, 2, "deep/er").unwrap_err();
        assert!(e.to_string().contains("is absolute"), "{e}");
    }
}
