//! A temp file that is removed when dropped: a call that fails or is cancelled leaves none.

use std::path::PathBuf;

/// The file at this path, removed when this is dropped.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
