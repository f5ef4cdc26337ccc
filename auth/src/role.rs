//! Roles and grants.

use serde::{Deserialize, Serialize};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read the CAS (ByteStream Read, BatchReadBlobs, FindMissingBlobs, GetTree, SplitBlob),
    /// read the action cache (GetActionResult), and GetCapabilities.
    CacheRead,
    /// Write the CAS (ByteStream Write, QueryWriteStatus, BatchUpdateBlobs, SpliceBlob, and the
    /// Remote Asset API's Fetch, which downloads into it).
    CacheWrite,
    /// Write the action cache (UpdateActionResult) and the Remote Asset API's associations
    /// (Push), both of which later callers trust.
    AcWrite,
    /// Run actions (Execute, WaitExecution) and see operations.
    Execute,
    /// Be a worker (the worker API).
    Worker,
    /// The admin listener's status page, and its metrics when asked from another host.
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [
        Role::CacheRead,
        Role::CacheWrite,
        Role::AcWrite,
        Role::Execute,
        Role::Worker,
        Role::Admin,
    ];

    /// The role's name, as in configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::CacheRead => "cache-read",
            Role::CacheWrite => "cache-write",
            Role::AcWrite => "ac-write",
            Role::Execute => "execute",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    /// Roles that cover the whole farm and cannot be limited to instances: a worker runs
    /// actions of every instance, and the status page and metrics describe all of them.
    pub fn farm_wide(self) -> bool {
        matches!(self, Role::Worker | Role::Admin)
    }

    /// The first farm-wide role in `roles`, if `instances` would limit it.
    pub fn scoped_farm_wide(roles: &[Role], instances: &[String]) -> Option<Role> {
        roles
            .iter()
            .copied()
            .find(|r| r.farm_wide() && !instances.is_empty())
    }

    /// Parses a role name.
    pub fn parse(name: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown role {name:?}; roles are {}",
                    Role::ALL.map(Role::name).join(", ")
                )
            })
    }
}

/// A role on one instance, or on every instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The role.
    pub role: Role,
    /// The instance name it applies to; `None` for all.
    pub instance: Option<String>,
}

impl Grant {
    /// The grants of `roles` on each of `instances` (all instances when empty).
    pub fn all(roles: &[Role], instances: &[String]) -> Vec<Grant> {
        let mut out = Vec::new();
        for role in roles {
            if instances.is_empty() {
                out.push(Grant {
                    role: *role,
                    instance: None,
                });
            }
            for i in instances {
                out.push(Grant {
                    role: *role,
                    instance: Some(i.clone()),
                });
            }
        }
        out
    }

    /// Whether this grant covers `role` on `instance`.
    pub fn covers(&self, role: Role, instance: &str) -> bool {
        self.role == role && self.instance.as_deref().is_none_or(|i| i == instance)
    }
}
