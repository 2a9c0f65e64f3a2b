//! `mlart_kv_pool`: the managed paged KV cache and its sequences.

use super::decode::{activations, optional, positive, required};
use super::engine::{engine_ref, mlart_engine};
use super::error::mlart_error;
use super::panic::{ffi_result, ffi_value};
use super::types::*;
use super::{non_negative, read_struct, read_versioned, slice, Region};
use crate::decode::DecodeShape;
use crate::error::{Error, Result};
use crate::format::{Dtype, KvFormat, Memory};
use crate::kv::{KvPool, PoolOptions, PoolSparse};
use std::ffi::c_void;

/// A pool of KV-cache blocks for several layers, holding sequences
/// identified by caller-chosen `uint64_t` ids.
///
/// Thread-safety: every function taking a pool may be called concurrently
/// from any threads. Mutations (sequence create/free/fork/truncate, append)
/// are serialized against each other and against decodes; decodes and
/// queries (length, stats) run concurrently with each other. A decode sees
/// either all or none of a concurrent append. `mlart_kv_pool_free` must not
/// race with other calls on the same pool.
pub struct mlart_kv_pool {
    inner: KvPool,
}

/// Options for `mlart_kv_pool_create`. Fill with `mlart_kv_pool_options_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_kv_pool_options {
    /// `sizeof(mlart_kv_pool_options)`.
    pub struct_size: u32,
    /// Row format; default `MLART_KV_FORMAT_BF16`.
    pub kv_format: mlart_kv_format,
    /// Elements per row; default 576 (DeepSeek V2/V3: 512 latent + 64 rope).
    pub d_qk: i32,
    /// Layers, each with its own cache; default 1.
    pub num_layers: i32,
    /// Tokens per block; default 64.
    pub block_size: i32,
    /// Blocks in the pool (shared by all sequences; one block covers
    /// `block_size` tokens in every layer). Required: default 0 is rejected.
    pub num_blocks: i32,
    /// Elements of a DeepSeek-V3.2 indexer key per token and layer
    /// (`mlart_model_props.index_head_dim`, 128), or 0 (default) for none.
    /// A V3.2 model's forward needs a pool with its value: the pool then
    /// keeps each token's indexer key beside its cache row (4 bytes more
    /// than index_head_dim, in the cache's memory: a CUDA engine's pool
    /// keeps them on the GPU, which also scores them) and accepts rows only
    /// from that forward.
    /// Since 0.4: a struct_size of 24 (the earlier layout, which ends
    /// before this field) is still accepted, and the field is then 0.
    pub index_head_dim: i32,
}

/// `sizeof(mlart_kv_pool_options)` before `index_head_dim` was appended.
const POOL_OPTIONS_SIZE_BEFORE_INDEX: usize =
    std::mem::offset_of!(mlart_kv_pool_options, index_head_dim);
const _: () = assert!(POOL_OPTIONS_SIZE_BEFORE_INDEX == 24);

/// Occupancy of a pool. Set `struct_size` with `mlart_kv_pool_stats_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_kv_pool_stats {
    /// `sizeof(mlart_kv_pool_stats)`.
    pub struct_size: u32,
    /// Blocks in the pool.
    pub blocks_total: i64,
    /// Blocks held by at least one sequence.
    pub blocks_used: i64,
    /// Blocks available for appends.
    pub blocks_free: i64,
    /// Live sequences.
    pub sequences: i64,
    /// Bytes of one block across all layers.
    pub bytes_per_block: i64,
    /// Bytes of cache memory owned by the pool.
    pub bytes_total: i64,
}

/// Arguments of `mlart_kv_pool_decode`: like `mlart_decode_args`, with the
/// pool supplying the cache, block table and lengths. Fill with
/// `mlart_kv_pool_decode_args_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_kv_pool_decode_args {
    /// `sizeof(mlart_kv_pool_decode_args)`.
    pub struct_size: u32,
    /// Layer whose cache to attend to.
    pub layer: i32,
    /// Number of sequences.
    pub batch: i32,
    /// Sequence ids [batch] (repeats allowed).
    pub seq_ids: *const u64,
    /// Query tokens per sequence (>= 1).
    pub s_q: i32,
    /// Query heads (>= 1).
    pub h_q: i32,
    /// Value dimension (<= the pool's d_qk).
    pub d_v: i32,
    /// Scale of q.k; 0 (default) means 1/sqrt(d_qk).
    pub softmax_scale: f32,
    /// Bottom-right-aligned causal mask among the s_q query tokens.
    pub causal: bool,
    /// Where `q`, `out` and `lse` live; default `MLART_MEMORY_HOST`.
    /// `MLART_MEMORY_DEVICE` (a CUDA engine's pool): memory of that engine's
    /// GPU, 16-byte aligned, and the call is ordered on `stream`. `seq_ids`,
    /// `indices`, `topk_length` and `attn_sink` are host memory either way
    /// (the pool translates the sequences and positions on the host).
    pub memory: mlart_memory,
    /// Element type of `q`; default `MLART_DTYPE_BF16`.
    pub q_dtype: mlart_dtype,
    /// Queries [batch, s_q, h_q, d_qk].
    pub q: *const c_void,
    /// Optional sparse attention: per query token, logical token positions
    /// [batch, s_q, topk] of its sequence (0 .. length-1 in `layer`; -1 = none).
    /// The pool translates them; causal must be false.
    pub indices: *const i32,
    /// Entries per query in `indices`.
    pub topk: i32,
    /// Optional [batch]: only the first topk_length[b] entries of `indices` are used.
    pub topk_length: *const i32,
    /// Optional per-head attention sink [h_q]: out *= 1 / (1 + exp(sink[h] - lse)); lse unchanged.
    pub attn_sink: *const f32,
    /// Element type of `out`; default `MLART_DTYPE_BF16`.
    pub out_dtype: mlart_dtype,
    /// Output [batch, s_q, h_q, d_v].
    pub out: *mut c_void,
    /// Optional lse [batch, h_q, s_q].
    pub lse: *mut f32,
    /// CUDA stream (`CUstream`) for `MLART_MEMORY_DEVICE`: the engine's
    /// work starts after what is enqueued there, and the stream continues
    /// after it (the call returns once it is enqueued; it stages the block
    /// tables, so a stream being captured into a CUDA graph is refused).
    /// NULL: the call waits for the result. Ignored for host memory.
    pub stream: *mut c_void,
}

/// Fills `options` with the defaults. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_kv_pool_options_init(options: *mut mlart_kv_pool_options) {
    ffi_value("mlart_kv_pool_options_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(o) = unsafe { options.as_mut() } {
            *o = mlart_kv_pool_options {
                struct_size: std::mem::size_of::<mlart_kv_pool_options>() as u32,
                kv_format: MLART_KV_FORMAT_BF16,
                d_qk: 576,
                num_layers: 1,
                block_size: 64,
                num_blocks: 0,
                index_head_dim: 0,
            };
        }
    })
}

/// Zeroes `stats` and sets its `struct_size`. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_kv_pool_stats_init(stats: *mut mlart_kv_pool_stats) {
    ffi_value("mlart_kv_pool_stats_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(s) = unsafe { stats.as_mut() } {
            *s = mlart_kv_pool_stats {
                struct_size: std::mem::size_of::<mlart_kv_pool_stats>() as u32,
                blocks_total: 0,
                blocks_used: 0,
                blocks_free: 0,
                sequences: 0,
                bytes_per_block: 0,
                bytes_total: 0,
            };
        }
    })
}

/// Fills `args` with the defaults. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_kv_pool_decode_args_init(args: *mut mlart_kv_pool_decode_args) {
    ffi_value("mlart_kv_pool_decode_args_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(a) = unsafe { args.as_mut() } {
            *a = mlart_kv_pool_decode_args {
                struct_size: std::mem::size_of::<mlart_kv_pool_decode_args>() as u32,
                layer: 0,
                batch: 0,
                seq_ids: std::ptr::null(),
                s_q: 1,
                h_q: 0,
                d_v: 0,
                softmax_scale: 0.0,
                causal: false,
                memory: MLART_MEMORY_HOST,
                q_dtype: MLART_DTYPE_BF16,
                q: std::ptr::null(),
                indices: std::ptr::null(),
                topk: 0,
                topk_length: std::ptr::null(),
                attn_sink: std::ptr::null(),
                out_dtype: MLART_DTYPE_BF16,
                out: std::ptr::null_mut(),
                lse: std::ptr::null_mut(),
                stream: std::ptr::null_mut(),
            };
        }
    })
}

/// Borrows the pool behind a handle.
///
/// # Safety
/// A non-NULL `pool` must be a live handle from `mlart_kv_pool_create`.
pub(crate) unsafe fn pool_ref<'a>(pool: *const mlart_kv_pool) -> Result<&'a KvPool> {
    // SAFETY: forwarded contract.
    unsafe { pool.as_ref() }
        .map(|p| &p.inner)
        .ok_or_else(|| Error::null("pool"))
}

fn pool_options(o: &mlart_kv_pool_options) -> Result<PoolOptions> {
    let format = KvFormat::from_raw("options->kv_format", o.kv_format)?;
    let pos = |name: &str, v: i32| -> Result<usize> {
        if v < 1 {
            return Err(Error::invalid(format!(
                "options->{name} = {v} must be >= 1"
            )));
        }
        Ok(v as usize)
    };
    Ok(PoolOptions {
        format,
        d_qk: pos("d_qk", o.d_qk)?,
        num_layers: pos("num_layers", o.num_layers)?,
        block_size: pos("block_size", o.block_size)?,
        num_blocks: pos("num_blocks", o.num_blocks)?,
        index_dim: non_negative("options->index_head_dim", o.index_head_dim as i64)?,
    })
}

/// Creates a pool whose memory the engine's backend owns: host memory on a
/// CPU engine, GPU memory on a CUDA engine (appends are converted on the host
/// and copied; decodes read the cache in place). The pool keeps the engine
/// alive. On success `*out` receives the pool.
#[no_mangle]
pub extern "C" fn mlart_kv_pool_create(
    engine: *mut mlart_engine,
    options: *const mlart_kv_pool_options,
    out: *mut *mut mlart_kv_pool,
) -> *mut mlart_error {
    ffi_result("mlart_kv_pool_create", || {
        // SAFETY: engine handle contract.
        let engine = unsafe { engine_ref(engine) }?;
        // SAFETY: a non-NULL options points to a caller struct of struct_size
        // bytes of plain data.
        let o = unsafe {
            read_versioned(
                options,
                "options",
                "mlart_kv_pool_options_init",
                mlart_kv_pool_options_init,
                &[POOL_OPTIONS_SIZE_BEFORE_INDEX],
            )
        }?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let pool = KvPool::new(engine.inner.clone(), pool_options(&o)?)?;
        // SAFETY: out is non-NULL and writable (caller contract).
        unsafe { out.write(Box::into_raw(Box::new(mlart_kv_pool { inner: pool }))) };
        Ok(())
    })
}

/// Releases a pool and all its sequences. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_kv_pool_free(pool: *mut mlart_kv_pool) {
    ffi_value("mlart_kv_pool_free", (), || {
        if !pool.is_null() {
            // SAFETY: produced by mlart_kv_pool_create, freed once (caller contract).
            drop(unsafe { Box::from_raw(pool) });
        }
    })
}

/// Reports the pool's occupancy. `out->struct_size` must be set.
#[no_mangle]
pub extern "C" fn mlart_kv_pool_stats_get(
    pool: *const mlart_kv_pool,
    out: *mut mlart_kv_pool_stats,
) -> *mut mlart_error {
    ffi_result("mlart_kv_pool_stats_get", || {
        // SAFETY: pool handle contract.
        let p = unsafe { pool_ref(pool) }?;
        // SAFETY: a non-NULL out points to a caller struct.
        let mut s = unsafe {
            read_struct(
                out as *const mlart_kv_pool_stats,
                "out",
                "mlart_kv_pool_stats_init",
            )
        }?;
        let st = p.stats();
        s.blocks_total = st.blocks_total as i64;
        s.blocks_used = st.blocks_used as i64;
        s.blocks_free = st.blocks_free as i64;
        s.sequences = st.sequences as i64;
        s.bytes_per_block = st.bytes_per_block as i64;
        s.bytes_total = st.bytes_total as i64;
        // SAFETY: out is non-NULL and writable.
        unsafe { out.write_unaligned(s) };
        Ok(())
    })
}

/// Creates an empty sequence `seq_id` (an id not in use).
#[no_mangle]
pub extern "C" fn mlart_kv_seq_create(pool: *mut mlart_kv_pool, seq_id: u64) -> *mut mlart_error {
    // SAFETY: pool handle contract.
    ffi_result("mlart_kv_seq_create", || {
        unsafe { pool_ref(pool) }?.create_seq(seq_id)
    })
}

/// Frees sequence `seq_id`; blocks no other sequence shares become free.
#[no_mangle]
pub extern "C" fn mlart_kv_seq_free(pool: *mut mlart_kv_pool, seq_id: u64) -> *mut mlart_error {
    // SAFETY: pool handle contract.
    ffi_result("mlart_kv_seq_free", || {
        unsafe { pool_ref(pool) }?.free_seq(seq_id)
    })
}

/// Creates `dst_id` as a copy of `src_id` in O(blocks): full blocks are
/// shared, and the first append into a shared block copies it
/// (copy-on-write), so the two sequences never see each other's appends.
#[no_mangle]
pub extern "C" fn mlart_kv_seq_fork(
    pool: *mut mlart_kv_pool,
    src_id: u64,
    dst_id: u64,
) -> *mut mlart_error {
    // SAFETY: pool handle contract.
    ffi_result("mlart_kv_seq_fork", || {
        unsafe { pool_ref(pool) }?.fork(src_id, dst_id)
    })
}

/// Cuts every layer of `seq_id` to at most `length` tokens (speculative
/// decode rollback) and frees blocks no longer needed.
#[no_mangle]
pub extern "C" fn mlart_kv_seq_truncate(
    pool: *mut mlart_kv_pool,
    seq_id: u64,
    length: i64,
) -> *mut mlart_error {
    // SAFETY: pool handle contract.
    ffi_result("mlart_kv_seq_truncate", || {
        unsafe { pool_ref(pool) }?.truncate(seq_id, length)
    })
}

/// Tokens stored in `layer` of `seq_id`, written to `*out_length`.
#[no_mangle]
pub extern "C" fn mlart_kv_seq_length(
    pool: *const mlart_kv_pool,
    seq_id: u64,
    layer: i32,
    out_length: *mut i64,
) -> *mut mlart_error {
    ffi_result("mlart_kv_seq_length", || {
        // SAFETY: pool handle contract.
        let p = unsafe { pool_ref(pool) }?;
        if out_length.is_null() {
            return Err(Error::null("out_length"));
        }
        let n = p.len(seq_id, layer as i64)?;
        // SAFETY: non-NULL and writable (caller contract).
        unsafe { out_length.write(n as i64) };
        Ok(())
    })
}

/// Appends `n_tokens` rows `[n_tokens, d_qk]` of `dtype` (F32, BF16 or F16)
/// to `layer` of `seq_id`, converting to the pool's format (`rows` may be
/// NULL when `n_tokens` is 0). A full pool
/// returns `MLART_STATUS_POOL_EXHAUSTED`; on any error nothing changes.
#[no_mangle]
pub extern "C" fn mlart_kv_append(
    pool: *mut mlart_kv_pool,
    seq_id: u64,
    layer: i32,
    n_tokens: i32,
    dtype: mlart_dtype,
    rows: *const c_void,
) -> *mut mlart_error {
    ffi_result("mlart_kv_append", || {
        // SAFETY: pool handle contract.
        let p = unsafe { pool_ref(pool) }?;
        let n = non_negative("n_tokens", n_tokens as i64)?;
        let dtype = Dtype::from_raw("dtype", dtype)?.check_activation("dtype")?;
        let bytes = crate::error::checked_size("rows", &[n, p.options().d_qk, dtype.size()])?;
        // Appending nothing needs no buffer.
        let src: &[u8] = if n == 0 && rows.is_null() {
            &[]
        } else {
            // SAFETY: rows holds n_tokens * d_qk elements (caller contract).
            unsafe { slice(rows as *const u8, bytes, "rows") }?
        };
        p.append(seq_id, layer as i64, n, dtype, src)
    })
}

fn pool_decode(pool: *const mlart_kv_pool, args: *const mlart_kv_pool_decode_args) -> Result<()> {
    // SAFETY: pool handle contract.
    let p = unsafe { pool_ref(pool) }?;
    // SAFETY: a non-NULL args points to a caller struct.
    let a = unsafe { read_struct(args, "args", "mlart_kv_pool_decode_args_init") }?;
    let memory = Memory::from_raw("memory", a.memory)?;
    let d_qk = p.options().d_qk as i32;
    let shape = DecodeShape::new(
        a.batch,
        a.s_q,
        a.h_q,
        d_qk,
        a.d_v,
        a.softmax_scale,
        a.causal,
    )?;
    // SAFETY: seq_ids holds batch entries (caller contract).
    let ids = unsafe { slice(a.seq_ids, shape.batch, "seq_ids") }?;
    let mut inputs = vec![Region::of("seq_ids", ids)];
    // SAFETY: attn_sink holds h_q floats when set.
    let sink = unsafe { optional(a.attn_sink, shape.h_q, "attn_sink") }?;
    inputs.extend(sink.map(|s| Region::of("attn_sink", s)));
    let sparse = if a.indices.is_null() {
        if !a.topk_length.is_null() {
            return Err(Error::invalid(
                "topk_length is set but indices is NULL: it belongs to sparse decode",
            ));
        }
        None
    } else {
        let topk = positive("topk", a.topk)?;
        let n = crate::error::checked_size("indices", &[shape.batch, shape.s_q, topk])?;
        // SAFETY: indices holds batch * s_q * topk entries.
        let indices = unsafe { slice(a.indices, n, "indices") }?;
        // SAFETY: topk_length holds batch entries when set.
        let topk_length = unsafe { optional(a.topk_length, shape.batch, "topk_length") }?;
        inputs.push(Region::of("indices", indices));
        inputs.extend(topk_length.map(|l| Region::of("topk_length", l)));
        Some(PoolSparse {
            indices,
            topk,
            topk_length,
        })
    };
    if memory == Memory::Device {
        // q, out and lse in the engine's GPU memory: their sizes and
        // alignment are the CUDA backend's to check; the rest is host memory.
        let q_dtype = Dtype::from_raw("q_dtype", a.q_dtype)?.check_activation("q_dtype")?;
        let out_dtype = Dtype::from_raw("out_dtype", a.out_dtype)?.check_activation("out_dtype")?;
        let q = required(a.q, "q")?;
        let out = required(a.out as *const c_void, "out")?;
        return p.decode_device_memory(
            a.layer as i64,
            ids,
            shape,
            q_dtype,
            q,
            sparse,
            sink,
            out,
            out_dtype,
            a.lse as u64,
            a.stream as u64,
        );
    }
    // SAFETY: q/out/lse contract.
    let mut act =
        unsafe { activations(&shape, a.q_dtype, a.q, a.out_dtype, a.out, a.lse, &inputs) }?;
    p.decode(
        a.layer as i64,
        ids,
        shape,
        act.q_dtype,
        act.q,
        sparse,
        sink,
        &mut act.out,
    )
}

/// Decodes one layer for a list of sequences held by the pool; the same
/// semantics as `mlart_decode_paged`, with the block table and lengths
/// taken from the pool (each sequence's current length in that layer).
/// On a CUDA engine the queries, output and lse may be device memory
/// (`args.memory`, `args.stream`).
#[no_mangle]
pub extern "C" fn mlart_kv_pool_decode(
    pool: *mut mlart_kv_pool,
    args: *const mlart_kv_pool_decode_args,
) -> *mut mlart_error {
    ffi_result("mlart_kv_pool_decode", || pool_decode(pool, args))
}
