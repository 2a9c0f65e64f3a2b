//! `mlart_decode_paged`: the raw decode op over caller-owned memory.

use super::engine::{engine_ref, mlart_engine};
use super::error::mlart_error;
use super::panic::{ffi_result, ffi_value};
use super::types::*;
use super::{check_disjoint, check_ptr, read_struct, slice, slice_mut, Region};
use crate::decode::desc::DecodeOutput;
use crate::decode::{DecodeShape, DenseDecode, KvCache};
use crate::error::{Error, Result};
use crate::format::{Dtype, KvFormat, Memory};
use std::ffi::c_void;

/// Arguments of `mlart_decode_paged`. Fill with `mlart_decode_args_init`,
/// then set the fields. Mirrors FlashMLA's `flash_mla_with_kvcache`.
///
/// Shapes (all contiguous, row-major):
/// `q [batch, s_q, h_q, d_qk]`, `kv [num_blocks, block_size, row]`,
/// `block_table [batch, block_table_stride]`, `seqlens [batch]`,
/// `out [batch, s_q, h_q, d_v]`, `lse [batch, h_q, s_q]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_decode_args {
    /// `sizeof(mlart_decode_args)`.
    pub struct_size: u32,
    /// Sequences in the batch (>= 1).
    pub batch: i32,
    /// Query tokens per sequence (>= 1; > 1 for MTP / speculative decode).
    pub s_q: i32,
    /// Query heads (>= 1, any number).
    pub h_q: i32,
    /// Query/key head dimension (576 for DeepSeek V3, 512 for MODEL1; <= 1024).
    pub d_qk: i32,
    /// Value dimension: the first d_v elements of each cache row (<= d_qk).
    pub d_v: i32,
    /// Scale of q.k; 0 (default) means 1/sqrt(d_qk).
    pub softmax_scale: f32,
    /// Bottom-right-aligned causal mask among the s_q query tokens: query i
    /// sees keys t < seqlen - (s_q - 1 - i). Default false.
    pub causal: bool,
    /// Where every pointer below lives; default `MLART_MEMORY_HOST`.
    pub memory: mlart_memory,
    /// Element type of `q`; default `MLART_DTYPE_BF16`.
    pub q_dtype: mlart_dtype,
    /// Queries.
    pub q: *const c_void,
    /// Cache row format; default `MLART_KV_FORMAT_BF16`.
    pub kv_format: mlart_kv_format,
    /// The paged cache.
    pub kv: *const c_void,
    /// Blocks in `kv` (>= 1); every block id used must be in [0, num_blocks).
    pub num_blocks: i32,
    /// Tokens per block (>= 1, any size).
    pub block_size: i32,
    /// Block ids of each sequence; entries past a sequence's length are not read.
    pub block_table: *const i32,
    /// Entries per row of `block_table` (>= 1).
    pub block_table_stride: i32,
    /// Tokens of each sequence, in [0, block_table_stride * block_size].
    pub seqlens: *const i32,
    /// Sparse attention indices [batch, s_q, topk] (reserved: must be NULL in this version).
    pub indices: *const i32,
    /// Entries per query in `indices`.
    pub topk: i32,
    /// Optional [batch] prefix lengths of `indices` (reserved: must be NULL).
    pub topk_length: *const i32,
    /// Optional second cache joining the same softmax (reserved: must be NULL).
    pub extra_kv: *const c_void,
    /// Blocks in `extra_kv`.
    pub extra_num_blocks: i32,
    /// Tokens per block of `extra_kv`.
    pub extra_block_size: i32,
    /// Indices into `extra_kv` [batch, s_q, extra_topk] (reserved: must be NULL).
    pub extra_indices: *const i32,
    /// Entries per query in `extra_indices`.
    pub extra_topk: i32,
    /// Optional [batch] prefix lengths of `extra_indices` (reserved: must be NULL).
    pub extra_topk_length: *const i32,
    /// Optional per-head attention sink [h_q] (reserved: must be NULL).
    pub attn_sink: *const f32,
    /// Element type of `out`; default `MLART_DTYPE_BF16`.
    pub out_dtype: mlart_dtype,
    /// Output; every element is written.
    pub out: *mut c_void,
    /// Optional natural-log log-sum-exp of the scaled scores; +inf for a
    /// query that sees no key (whose output is 0).
    pub lse: *mut f32,
    /// CUDA stream (CUDA engines); ignored by CPU engines, which always finish
    /// before returning.
    pub stream: *mut c_void,
}

/// Fills `args` with the defaults. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_decode_args_init(args: *mut mlart_decode_args) {
    ffi_value("mlart_decode_args_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(a) = unsafe { args.as_mut() } {
            *a = mlart_decode_args {
                struct_size: std::mem::size_of::<mlart_decode_args>() as u32,
                batch: 0,
                s_q: 1,
                h_q: 0,
                d_qk: 0,
                d_v: 0,
                softmax_scale: 0.0,
                causal: false,
                memory: MLART_MEMORY_HOST,
                q_dtype: MLART_DTYPE_BF16,
                q: std::ptr::null(),
                kv_format: MLART_KV_FORMAT_BF16,
                kv: std::ptr::null(),
                num_blocks: 0,
                block_size: 64,
                block_table: std::ptr::null(),
                block_table_stride: 0,
                seqlens: std::ptr::null(),
                indices: std::ptr::null(),
                topk: 0,
                topk_length: std::ptr::null(),
                extra_kv: std::ptr::null(),
                extra_num_blocks: 0,
                extra_block_size: 0,
                extra_indices: std::ptr::null(),
                extra_topk: 0,
                extra_topk_length: std::ptr::null(),
                attn_sink: std::ptr::null(),
                out_dtype: MLART_DTYPE_BF16,
                out: std::ptr::null_mut(),
                lse: std::ptr::null_mut(),
                stream: std::ptr::null_mut(),
            };
        }
    })
}

/// Rejects the sparse-attention fields this version does not implement yet.
pub(crate) fn reject_sparse(fields: &[(&str, bool)]) -> Result<()> {
    for &(name, set) in fields {
        if set {
            return Err(Error::unsupported(format!(
                "{name} is set, but sparse attention (indices, extra cache, attention sink) is not supported by this version of mlart yet"
            )));
        }
    }
    Ok(())
}

/// Host memory only on a CPU engine.
pub(crate) fn check_memory(raw: mlart_memory) -> Result<()> {
    match Memory::from_raw("memory", raw)? {
        Memory::Host => Ok(()),
        Memory::Device => Err(Error::unsupported(
            "memory = MLART_MEMORY_DEVICE but this engine runs on the CPU and reads host memory only",
        )),
    }
}

/// The caller's query, output and lse buffers, validated against `shape`.
pub(crate) struct Activations<'a> {
    pub q_dtype: Dtype,
    pub q: &'a [u8],
    pub out: DecodeOutput<'a>,
}

/// # Safety
/// Pointers must satisfy the `mlart_decode_args` contract for `shape`.
pub(crate) unsafe fn activations<'a>(
    shape: &DecodeShape,
    q_dtype: mlart_dtype,
    q: *const c_void,
    out_dtype: mlart_dtype,
    out: *mut c_void,
    lse: *mut f32,
    inputs: &[Region<'_>],
) -> Result<Activations<'a>> {
    let q_dtype = Dtype::from_raw("q_dtype", q_dtype)?.check_activation("q_dtype")?;
    let out_dtype = Dtype::from_raw("out_dtype", out_dtype)?.check_activation("out_dtype")?;
    // SAFETY: caller contract on q's size for this shape.
    let q = unsafe { slice(q as *const u8, shape.q_elems() * q_dtype.size(), "q") }?;
    check_ptr(out as *const u8, "out")?;
    if !lse.is_null() {
        check_ptr(lse as *const f32, "lse")?;
    }
    // Check aliasing on the raw ranges, before any `&mut` to them exists.
    let out_region = Region {
        name: "out",
        start: out as usize,
        len: shape.out_elems() * out_dtype.size(),
    };
    let lse_region = Region {
        name: "lse",
        start: lse as usize,
        len: shape.lse_elems() * std::mem::size_of::<f32>(),
    };
    let mut readers = vec![Region::of("q", q)];
    readers.extend(inputs.iter().map(|r| Region {
        name: r.name,
        start: r.start,
        len: r.len,
    }));
    check_disjoint(&out_region, &readers)?;
    if !lse.is_null() {
        readers.push(out_region);
        check_disjoint(&lse_region, &readers)?;
    }
    // SAFETY: caller contract on out's size; disjoint from every input (checked above).
    let out = unsafe { slice_mut(out as *mut u8, shape.out_elems() * out_dtype.size(), "out") }?;
    let lse = if lse.is_null() {
        None
    } else {
        // SAFETY: caller contract on lse's size; disjoint from out and inputs (checked above).
        Some(unsafe { slice_mut(lse, shape.lse_elems(), "lse") }?)
    };
    Ok(Activations {
        q_dtype,
        q,
        out: DecodeOutput::new(shape, out_dtype, out, lse)?,
    })
}

fn decode_paged(engine: *const mlart_engine, args: *const mlart_decode_args) -> Result<()> {
    // SAFETY: engine handle contract.
    let engine = unsafe { engine_ref(engine) }?;
    // SAFETY: a non-NULL args points to a caller struct.
    let a = unsafe { read_struct(args, "args", "mlart_decode_args_init") }?;
    check_memory(a.memory)?;
    reject_sparse(&[
        ("indices", !a.indices.is_null()),
        ("topk_length", !a.topk_length.is_null()),
        ("extra_kv", !a.extra_kv.is_null()),
        ("extra_indices", !a.extra_indices.is_null()),
        ("extra_topk_length", !a.extra_topk_length.is_null()),
        ("attn_sink", !a.attn_sink.is_null()),
    ])?;
    let shape = DecodeShape::new(
        a.batch,
        a.s_q,
        a.h_q,
        a.d_qk,
        a.d_v,
        a.softmax_scale,
        a.causal,
    )?;
    let format = KvFormat::from_raw("kv_format", a.kv_format)?;
    let positive = |name: &str, v: i32| -> Result<usize> {
        if v < 1 {
            return Err(Error::invalid(format!("{name} = {v} must be >= 1")));
        }
        Ok(v as usize)
    };
    let num_blocks = positive("num_blocks", a.num_blocks)?;
    let block_size = positive("block_size", a.block_size)?;
    let stride = positive("block_table_stride", a.block_table_stride)?;
    let kv_bytes = KvCache::bytes_for(format, shape.d_qk, num_blocks, block_size)?;
    // SAFETY: mlart_decode_args contract: kv holds num_blocks * block_size rows.
    let kv = unsafe { slice(a.kv as *const u8, kv_bytes, "kv") }?;
    // SAFETY: block_table holds batch * stride entries.
    let table = unsafe { slice(a.block_table, shape.batch * stride, "block_table") }?;
    // SAFETY: seqlens holds batch entries.
    let seqlens = unsafe { slice(a.seqlens, shape.batch, "seqlens") }?;
    let inputs = [
        Region::of("kv", kv),
        Region::of("block_table", table),
        Region::of("seqlens", seqlens),
    ];
    // SAFETY: q/out/lse contract.
    let mut act =
        unsafe { activations(&shape, a.q_dtype, a.q, a.out_dtype, a.out, a.lse, &inputs) }?;
    let cache = KvCache::new(format, shape.d_qk, kv, num_blocks, block_size)?;
    let d = DenseDecode::new(shape, act.q_dtype, act.q, cache, table, stride, seqlens)?;
    engine.inner.decode(&d, &mut act.out)
}

/// Multi-head latent attention decode over a paged KV cache the caller owns.
///
/// For each sequence b, query token i and head h:
/// `out[b,i,h,:] = softmax_t(scale * q[b,i,h,:] . K[t,:]) @ K[t,:d_v]` over the
/// keys t the query sees (all of `seqlens[b]`, or the causal prefix), with
/// `K[t] = kv[block_table[b][t / block_size]][t % block_size]`. A query that
/// sees no key gets out = 0 and lse = +inf. Cache slots past a sequence's
/// length and blocks not referenced may hold anything (NaN included): they
/// are never read. Every pointer, size and used block id is validated before
/// any read; on error nothing is written. On a CPU engine the call returns
/// when `out` and `lse` are complete.
#[no_mangle]
pub extern "C" fn mlart_decode_paged(
    engine: *mut mlart_engine,
    args: *const mlart_decode_args,
) -> *mut mlart_error {
    ffi_result("mlart_decode_paged", || decode_paged(engine, args))
}
