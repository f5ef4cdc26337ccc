//! The ActionCache service: results stored durably on disk ([`store`]), served only when
//! complete ([`completeness`]).

mod cache;
pub mod completeness;
mod service;
pub mod store;

pub use cache::ActionCache;
pub use service::{ActionCacheService, DataPlaneHits};
pub use store::{AcSettings, AcStore};
