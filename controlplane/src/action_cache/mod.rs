//! The ActionCache service: results stored durably on disk ([`store`], each file in the
//! checked format of [`entry`]) and, with `[redis]`, in Redis too ([`shared`]), served only
//! when complete ([`completeness`]).

mod cache;
pub mod completeness;
pub mod entry;
mod service;
pub mod shared;
pub mod store;

pub use cache::ActionCache;
pub use service::{ActionCacheService, DataPlaneHits};
pub use store::{AcSettings, AcStore};
