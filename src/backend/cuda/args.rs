//! A decode over device memory: the validated shape and formats plus raw
//! device addresses. The host-memory path stages its slices into engine
//! memory and builds one of these, so both paths launch the same way.

use crate::decode::DecodeShape;
use crate::format::{Dtype, KvLayout};

/// Device address; 0 means "absent" for the optional ones.
pub type DevPtr = u64;

#[derive(Clone, Copy, Debug)]
pub struct DenseDev {
    /// `[batch, stride]` i32.
    pub block_table: DevPtr,
    pub stride: usize,
    /// `[batch]` i32.
    pub seqlens: DevPtr,
}

#[derive(Clone, Copy, Debug)]
pub struct IndexedDev {
    pub layout: KvLayout,
    pub kv: DevPtr,
    pub num_blocks: usize,
    /// `[batch, s_q, topk]` i32.
    pub indices: DevPtr,
    pub topk: usize,
    /// Optional `[batch]` i32.
    pub topk_length: DevPtr,
}

#[derive(Clone, Copy, Debug)]
pub enum KeysDev {
    /// The main cache is `DeviceDecode::kv`.
    Dense(DenseDev),
    /// Main cache plus optional extra cache.
    Sparse {
        main: IndexedDev,
        extra: Option<IndexedDev>,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct DeviceDecode {
    pub shape: DecodeShape,
    pub q_dtype: Dtype,
    pub out_dtype: Dtype,
    pub layout: KvLayout,
    pub q: DevPtr,
    /// Main cache (dense), `[num_blocks, block]`.
    pub kv: DevPtr,
    pub num_blocks: usize,
    pub keys: KeysDev,
    /// Optional `[h_q]` f32.
    pub sink: DevPtr,
    pub out: DevPtr,
    /// Optional `[batch, h_q, s_q]` f32.
    pub lse: DevPtr,
    /// CUstream to enqueue on; 0 = the engine's own, and the call waits.
    pub stream: u64,
}
