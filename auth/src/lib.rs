//! Who may call what, with no I/O beyond reading the token file: the roles a caller holds on
//! which instances ([`role`]), the role each method needs ([`method`]), bearer tokens stored
//! hashed ([`tokens`]), and the policy that turns a certificate name or an `authorization`
//! header into a [`Principal`] and answers "may it call this method on this instance"
//! ([`policy`]), and who may see the admin listener's pages ([`admin`]). Both planes ask the same policy: the data plane on the core for blob
//! methods, the control plane for the calls handed to it.

pub mod admin;
mod header;
pub mod join;
pub mod method;
pub mod policy;
pub mod role;
pub mod tokens;

pub use policy::{Denied, Policy, Principal};
pub use role::{Grant, Role};
