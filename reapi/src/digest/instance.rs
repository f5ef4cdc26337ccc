//! Instance names: the namespace a request addresses. Blobs and action results under different
//! instance names are kept apart.

use std::sync::Arc;

/// Longest instance name accepted, in bytes.
pub const MAX_INSTANCE_NAME_LEN: usize = 512;

/// A validated instance name (may be empty, the default instance). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceName(Arc<str>);

/// Why an instance name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceNameError {
    /// Longer than [`MAX_INSTANCE_NAME_LEN`].
    #[error("instance name is {0} bytes long; the limit is {MAX_INSTANCE_NAME_LEN}")]
    TooLong(usize),
    /// Contains a control character.
    #[error("instance name {0:?} contains a control character")]
    ControlCharacter(String),
    /// Contains a path segment REAPI reserves (`blobs`, `uploads`, ...).
    #[error("instance name {0:?} contains the reserved path segment {1:?}")]
    ReservedSegment(String, &'static str),
}

/// Path segments REAPI forbids in instance names (they delimit resource names).
const RESERVED: [&str; 7] = [
    "blobs",
    "uploads",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
    "compressed-blobs",
];

impl InstanceName {
    /// Validates a name from a request.
    pub fn new(name: &str) -> Result<InstanceName, InstanceNameError> {
        if name.len() > MAX_INSTANCE_NAME_LEN {
            return Err(InstanceNameError::TooLong(name.len()));
        }
        if name.chars().any(char::is_control) {
            return Err(InstanceNameError::ControlCharacter(name.to_string()));
        }
        if let Some(reserved) = name
            .split('/')
            .find_map(|seg| RESERVED.iter().find(|r| **r == seg))
        {
            return Err(InstanceNameError::ReservedSegment(
                name.to_string(),
                reserved,
            ));
        }
        Ok(InstanceName(Arc::from(name)))
    }

    /// Whether `other` is this very name (the same allocation, as clones of one parsed name
    /// are): a cheap first test before comparing the text.
    pub fn same(&self, other: &InstanceName) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The default (empty) instance.
    pub fn default_instance() -> InstanceName {
        InstanceName(Arc::from(""))
    }

    /// The name as sent by the client.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for InstanceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl std::fmt::Display for InstanceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
