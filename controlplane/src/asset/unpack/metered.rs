//! The tar reader's intake, metered: what it takes outside the file contents Kiln copies
//! (headers, long names, PAX records, the data of entries left out) is refused past
//! [`MAX_BETWEEN_ENTRIES`] between two entries.

use super::MAX_BETWEEN_ENTRIES;
use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

/// Counts what the tar reader takes outside the file contents Kiln copies: the bytes since the
/// last entry handed out, refused past [`MAX_BETWEEN_ENTRIES`].
pub(super) struct Metered<R> {
    pub(super) inner: R,
    pub(super) meter: Rc<Cell<Meter>>,
}

#[derive(Clone, Copy, Default)]
pub(super) struct Meter {
    /// Reading an entry's contents for Kiln (bounded by the file budget instead).
    pub(super) in_file: bool,
    /// Bytes taken since the last entry was handed out, outside file contents.
    pub(super) between: u64,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut m = self.meter.get();
        if !m.in_file {
            m.between += n as u64;
            if m.between > MAX_BETWEEN_ENTRIES {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_BETWEEN_ENTRIES} bytes of headers, long names or left-out data between two entries"
                )));
            }
            self.meter.set(m);
        }
        Ok(n)
    }
}
