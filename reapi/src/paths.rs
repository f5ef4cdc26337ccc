//! Paths from protos, checked before any filesystem call. REAPI paths use `/`, are relative to
//! the input root (or to the working directory, itself relative to the input root), and must
//! stay inside the input root: an absolute path, an empty or `.` component, a NUL, or `..`
//! climbing above the root is refused. `..` inside the root is resolved lexically, so the
//! result never depends on symlinks the action may have made.

/// A path from a proto that Kiln will not use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {path:?} {why}")]
pub struct PathError {
    /// The field it came from.
    pub what: String,
    /// The path as sent.
    pub path: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// The longest file name the filesystems Kiln runs on take (`NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;
/// The longest path they take, with its terminating NUL (`PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4095;

/// Resolves `rel`, relative to the directory `base` (components below the input root), to
/// components below the input root; `what` names the field for the error.
pub fn resolve(what: &str, base: &[String], rel: &str) -> Result<Vec<String>, PathError> {
    let fail = |why| PathError {
        what: what.to_string(),
        path: rel.to_string(),
        why,
    };
    if rel.starts_with('/') {
        return Err(fail("is absolute; it must be relative to the input root"));
    }
    if rel.contains('\0') {
        return Err(fail("contains a NUL byte"));
    }
    if rel.len() > MAX_PATH_BYTES {
        return Err(fail("is longer than 4,095 bytes"));
    }
    let mut out = base.to_vec();
    if rel.is_empty() {
        return Ok(out);
    }
    for component in rel.split('/') {
        match component {
            "" => return Err(fail("has an empty component (a doubled or trailing '/')")),
            long if long.len() > MAX_NAME_BYTES => {
                return Err(fail("has a component longer than 255 bytes"))
            }
            "." => return Err(fail("has a '.' component")),
            ".." => {
                if out.pop().is_none() {
                    return Err(fail("leaves the input root"));
                }
            }
            name => out.push(name.to_string()),
        }
    }
    Ok(out)
}

/// Every output path a Command declares: `output_paths`, and the older `output_files` and
/// `output_directories`.
pub fn declared_outputs(command: &kiln_proto::reapi::Command) -> impl Iterator<Item = &String> {
    #[allow(deprecated)]
    command
        .output_paths
        .iter()
        .chain(&command.output_files)
        .chain(&command.output_directories)
}

/// Checks a path relative to the input root (a working directory); returns its components.
pub fn relative(what: &str, rel: &str) -> Result<Vec<String>, PathError> {
    resolve(what, &[], rel)
}

/// Checks an output path (relative to `working_directory`); it must stay inside the input
/// root. REAPI: "The empty string value is allowed, and it denotes the entire working
/// directory" (for output directories), so `""` resolves to the working directory.
pub fn output(working_directory: &[String], rel: &str) -> Result<Vec<String>, PathError> {
    resolve("output path", working_directory, rel)
}

/// Checks a symlink's target: the symlink lives in a directory `depth` levels below the input
/// root; its target must be relative and resolve inside the input root.
pub fn symlink_target(depth: usize, target: &str) -> Result<(), PathError> {
    if target.is_empty() {
        return Err(PathError {
            what: "symlink target".into(),
            path: String::new(),
            why: "is empty",
        });
    }
    // A trailing '/' or "a//b" in a target is harmless to the kernel; only climbing matters.
    let cleaned: Vec<&str> = target
        .split('/')
        .enumerate()
        .filter(|(i, c)| *i == 0 || !c.is_empty())
        .map(|(_, c)| c)
        .filter(|c| *c != ".")
        .collect();
    resolve(
        "symlink target",
        &vec![String::new(); depth],
        &cleaned.join("/"),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn working_directories_and_outputs_stay_inside_the_root() {
        assert_eq!(relative("wd", "").unwrap(), c(&[]));
        assert_eq!(relative("wd", "a/b").unwrap(), c(&["a", "b"]));
        for bad in [
            "/abs", "a//b", "a/", "./a", "a/./b", "..", "a/../..", "a\0b",
        ] {
            let e = relative("wd", bad).unwrap_err();
            assert_eq!(e.path, bad);
        }
        let wd = c(&["a", "b"]);
        assert_eq!(output(&wd, "out/x").unwrap(), c(&["a", "b", "out", "x"]));
        assert_eq!(output(&wd, "../../top").unwrap(), c(&["top"]));
        assert!(output(&wd, "../../../up").is_err(), "above the root");
        assert!(output(&wd, "/etc/passwd").is_err());
        assert_eq!(output(&wd, "").unwrap(), wd, "the whole working directory");
        assert_eq!(output(&c(&["a"]), "..").unwrap(), c(&[]), "the input root");
        let e = output(&wd, "../../../up").unwrap_err();
        assert_eq!(
            e.to_string(),
            "output path \"../../../up\" leaves the input root"
        );
        // What no filesystem takes: a component over NAME_MAX, a path over PATH_MAX.
        let name = "n".repeat(MAX_NAME_BYTES);
        assert!(output(&wd, &name).is_ok());
        let long = output(&wd, &format!("{name}n")).unwrap_err();
        assert!(long.to_string().contains("longer than 255 bytes"), "{long}");
        let path = vec!["p"; MAX_PATH_BYTES / 2 + 2].join("/");
        let long = output(&wd, &path).unwrap_err();
        assert!(
            long.to_string().contains("longer than 4,095 bytes"),
            "{long}"
        );
    }

    #[test]
    fn symlink_targets_must_resolve_inside_the_root() {
        let dir = 2;
        for ok in [
            "x",
            "../x",
            "../../x",
            "./x",
            "a//b",
            "d/",
            "../../pkg/sub/x",
        ] {
            assert!(symlink_target(dir, ok).is_ok(), "{ok}");
        }
        for bad in ["/etc/passwd", "../../../x", "", "a/../../../../x"] {
            assert!(symlink_target(dir, bad).is_err(), "{bad}");
        }
        assert!(
            symlink_target(0, "..").is_err(),
            "a root-level link to the parent"
        );
    }
}
