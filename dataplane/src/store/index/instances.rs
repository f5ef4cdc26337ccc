//! The instance names an index's blobs are under, numbered so that a node holds four bytes
//! instead of a name.

use kiln_reapi::digest::InstanceName;

/// The instance names the index's blobs are under, each numbered, with a count of the blobs
/// that use it (a number is reused once its last blob is gone). Names come from clients, so
/// they are looked up with SipHash; the last name looked up is remembered, since one request's
/// keys share one parsed name.
#[derive(Default)]
pub(crate) struct Instances {
    names: Vec<Option<(InstanceName, u32)>>,
    numbers: std::collections::HashMap<InstanceName, u32>,
    free: Vec<u32>,
    last: std::cell::RefCell<Option<(InstanceName, u32)>>,
}

impl Instances {
    /// The number of `name`, if any blob is under it.
    pub(crate) fn number(&self, name: &InstanceName) -> Option<u32> {
        if let Some((last, n)) = &*self.last.borrow() {
            if last.same(name) {
                return Some(*n);
            }
        }
        let n = *self.numbers.get(name)?;
        *self.last.borrow_mut() = Some((name.clone(), n));
        Some(n)
    }

    /// The number of `name`, counting one more blob under it.
    pub(crate) fn acquire(&mut self, name: &InstanceName) -> u32 {
        if let Some(&n) = self.numbers.get(name) {
            if let Some((_, count)) = &mut self.names[n as usize] {
                *count += 1;
            }
            return n;
        }
        let n = match self.free.pop() {
            Some(n) => n,
            None => {
                self.names.push(None);
                u32::try_from(self.names.len() - 1).expect("fewer than 2^32 instance names")
            }
        };
        self.names[n as usize] = Some((name.clone(), 1));
        self.numbers.insert(name.clone(), n);
        n
    }

    /// One blob fewer under number `n`.
    pub(crate) fn release(&mut self, n: u32) {
        let Some((name, count)) = &mut self.names[n as usize] else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.numbers.remove(&*name);
        self.names[n as usize] = None;
        self.free.push(n);
        let mut last = self.last.borrow_mut();
        if last.as_ref().is_some_and(|(_, l)| *l == n) {
            *last = None;
        }
    }

    /// Names in use.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.numbers.len()
    }

    /// The name numbered `n`, which is in use.
    pub(crate) fn name(&self, n: u32) -> &InstanceName {
        &self.names[n as usize]
            .as_ref()
            .expect("a live node's instance is numbered")
            .0
    }
}
