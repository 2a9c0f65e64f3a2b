//! Pure description of a decode call: the validated descriptor
//! ([`desc::Decode`]) and the split-KV work plan ([`plan::SplitPlan`]).
//! Nothing here touches threads, devices or C.

pub mod desc;
pub mod plan;

pub use desc::{Decode, DecodeShape, DenseKeys, IndexedKeys, Keys, KvCache, SparseKeys};
pub use plan::{SplitPlan, WorkItem};
