//! `mlart_decode_paged`: the raw decode op over caller-owned memory.

use super::engine::{engine_ref, mlart_engine};
use super::error::mlart_error;
use super::panic::{ffi_result, ffi_value};
use super::types::*;
use super::{check_disjoint, check_ptr, read_struct, slice, slice_mut, Region};
use crate::backend::cuda::CudaBackend;
use crate::decode::desc::DecodeOutput;
use crate::decode::{Decode, DecodeShape, IndexedKeys, KvCache};
use crate::error::{Error, Result};
use crate::format::{Dtype, KvFormat, KvLayout, Memory};
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
    /// A block is `mlart_kv_block_bytes(kv_format, d_qk, block_size)` bytes.
    pub num_blocks: i32,
    /// Tokens per block (>= 1, any size).
    pub block_size: i32,
    /// Block ids of each sequence; entries past a sequence's length are not
    /// read. Dense decode only (not read when `indices` is set).
    pub block_table: *const i32,
    /// Entries per row of `block_table` (>= 1).
    pub block_table_stride: i32,
    /// Tokens of each sequence, in [0, block_table_stride * block_size].
    /// Dense decode only.
    pub seqlens: *const i32,
    /// Sparse attention (DeepSeek Sparse Attention): when set, query token i
    /// of sequence b attends exactly to the cache positions
    /// `indices[b][i][0 .. topk)` (`block * block_size + offset`; -1 = none;
    /// duplicates count twice) instead of a block table. causal must be false.
    pub indices: *const i32,
    /// Entries per query in `indices`.
    pub topk: i32,
    /// Optional [batch]: only the first topk_length[b] entries of `indices`
    /// are used (the rest are not read).
    pub topk_length: *const i32,
    /// Optional second cache (same format, its own block size) whose
    /// indexed keys join the same softmax (sparse decode only).
    pub extra_kv: *const c_void,
    /// Blocks in `extra_kv`.
    pub extra_num_blocks: i32,
    /// Tokens per block of `extra_kv`.
    pub extra_block_size: i32,
    /// Indices into `extra_kv` [batch, s_q, extra_topk], like `indices`.
    pub extra_indices: *const i32,
    /// Entries per query in `extra_indices`.
    pub extra_topk: i32,
    /// Optional [batch] prefix lengths of `extra_indices`.
    pub extra_topk_length: *const i32,
    /// Optional per-head attention sink [h_q]: out *= 1 / (1 + exp(sink[h] - lse))
    /// (+inf gives 0, -inf no change); `lse` is returned unscaled.
    pub attn_sink: *const f32,
    /// Element type of `out`; default `MLART_DTYPE_BF16`.
    pub out_dtype: mlart_dtype,
    /// Output; every element is written.
    pub out: *mut c_void,
    /// Optional natural-log log-sum-exp of the scaled scores; +inf for a
    /// query that sees no key (whose output is 0).
    pub lse: *mut f32,
    /// CUDA stream (`CUstream`) for a CUDA engine with `MLART_MEMORY_DEVICE`
    /// pointers: the call only enqueues its kernels there (no host sync, no
    /// allocation once the engine's workspace has grown, so it can be
    /// captured in a CUDA graph); bad device-resident block ids and indices
    /// are then masked, not reported. NULL: the call waits and reports them.
    /// Host-memory calls and CPU engines always finish before returning.
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

/// Host memory only on a CPU engine.
pub(crate) fn check_memory(raw: mlart_memory) -> Result<()> {
    match Memory::from_raw("memory", raw)? {
        Memory::Host => Ok(()),
        Memory::Device => Err(Error::unsupported(
            "memory = MLART_MEMORY_DEVICE but this engine runs on the CPU and reads host memory only",
        )),
    }
}

/// Dense decode: the sparse-only fields must be unset.
fn no_sparse_fields(a: &mlart_decode_args) -> Result<()> {
    for (name, set) in [
        ("topk_length", !a.topk_length.is_null()),
        ("extra_kv", !a.extra_kv.is_null()),
        ("extra_indices", !a.extra_indices.is_null()),
        ("extra_topk_length", !a.extra_topk_length.is_null()),
    ] {
        if set {
            return Err(Error::invalid(format!(
                "{name} is set but indices is NULL: it belongs to sparse decode"
            )));
        }
    }
    Ok(())
}

pub(crate) fn dev(p: *const c_void) -> u64 {
    p as usize as u64
}

/// `name` must be set: device pointers cannot be checked further here.
pub(crate) fn required(p: *const c_void, name: &str) -> Result<u64> {
    if p.is_null() {
        return Err(Error::null(name));
    }
    Ok(dev(p))
}

/// A decode over the engine's device memory: every scalar is validated
/// here; the contents (block ids, lengths, indices) are checked by the
/// kernels, which mask bad entries and report them (after a synchronous
/// call) as INVALID_ARGUMENT.
fn decode_paged_device(
    cuda: &CudaBackend,
    a: &mlart_decode_args,
    shape: DecodeShape,
    layout: KvLayout,
    num_blocks: usize,
) -> Result<()> {
    use crate::backend::cuda::args::{DenseDev, DeviceDecode, IndexedDev, KeysDev};
    let q_dtype = Dtype::from_raw("q_dtype", a.q_dtype)?.check_activation("q_dtype")?;
    let out_dtype = Dtype::from_raw("out_dtype", a.out_dtype)?.check_activation("out_dtype")?;
    let q = required(a.q, "q")?;
    let out = required(a.out as *const c_void, "out")?;
    let kv = required(a.kv, "kv")?;
    let keys = if a.indices.is_null() {
        no_sparse_fields(a)?;
        KeysDev::Dense(DenseDev {
            block_table: required(a.block_table as *const c_void, "block_table")?,
            stride: positive("block_table_stride", a.block_table_stride)?,
            seqlens: required(a.seqlens as *const c_void, "seqlens")?,
        })
    } else {
        if shape.causal {
            return Err(Error::invalid(
                "causal = true with indices set: sparse decode has no causal mask",
            ));
        }
        let main = IndexedDev {
            layout,
            kv,
            num_blocks,
            indices: dev(a.indices as *const c_void),
            topk: positive("topk", a.topk)?,
            topk_length: dev(a.topk_length as *const c_void),
        };
        let extra = if a.extra_kv.is_null() {
            if !a.extra_indices.is_null() || !a.extra_topk_length.is_null() {
                return Err(Error::invalid(
                    "extra_indices or extra_topk_length is set but extra_kv is NULL",
                ));
            }
            None
        } else {
            let xlayout = KvLayout::new(
                layout.format,
                shape.d_qk,
                positive("extra_block_size", a.extra_block_size)?,
                "kv_format",
            )?;
            Some(IndexedDev {
                layout: xlayout,
                kv: dev(a.extra_kv),
                num_blocks: positive("extra_num_blocks", a.extra_num_blocks)?,
                indices: required(a.extra_indices as *const c_void, "extra_indices")?,
                topk: positive("extra_topk", a.extra_topk)?,
                topk_length: dev(a.extra_topk_length as *const c_void),
            })
        };
        KeysDev::Sparse { main, extra }
    };
    cuda.decode_device(&DeviceDecode {
        shape,
        q_dtype,
        out_dtype,
        layout,
        q,
        kv,
        num_blocks,
        keys,
        sink: dev(a.attn_sink as *const c_void),
        out,
        lse: dev(a.lse as *const c_void),
        stream: dev(a.stream),
    })
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

/// `v >= 1` as a size, naming `name` otherwise.
pub(crate) fn positive(name: &str, v: i32) -> Result<usize> {
    if v < 1 {
        return Err(Error::invalid(format!("{name} = {v} must be >= 1")));
    }
    Ok(v as usize)
}

/// Borrows an optional `[n]` array argument (NULL = absent).
///
/// # Safety
/// A non-NULL `p` must point to `n` readable elements.
pub(crate) unsafe fn optional<'a, T>(p: *const T, n: usize, name: &str) -> Result<Option<&'a [T]>> {
    if p.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded contract.
        unsafe { slice(p, n, name) }.map(Some)
    }
}

fn decode_paged(engine: *const mlart_engine, args: *const mlart_decode_args) -> Result<()> {
    // SAFETY: engine handle contract.
    let engine = unsafe { engine_ref(engine) }?;
    // SAFETY: a non-NULL args points to a caller struct.
    let a = unsafe { read_struct(args, "args", "mlart_decode_args_init") }?;
    let memory = Memory::from_raw("memory", a.memory)?;
    let cuda = engine.inner.backend().cuda();
    if cuda.is_none() {
        check_memory(a.memory)?;
    }
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
    let num_blocks = positive("num_blocks", a.num_blocks)?;
    let layout = KvLayout::new(
        format,
        shape.d_qk,
        positive("block_size", a.block_size)?,
        "kv_format",
    )?;
    if let (Some(c), Memory::Device) = (cuda, memory) {
        return decode_paged_device(c, &a, shape, layout, num_blocks);
    }
    // SAFETY: mlart_decode_args contract: kv holds num_blocks blocks.
    let kv = unsafe { slice(a.kv as *const u8, layout.cache_bytes(num_blocks)?, "kv") }?;
    let cache = KvCache::new(layout, kv, num_blocks)?;
    let mut inputs = vec![Region::of("kv", kv)];
    // SAFETY: attn_sink holds h_q floats when set.
    let sink = unsafe { optional(a.attn_sink, shape.h_q, "attn_sink") }?;
    if let Some(s) = sink {
        inputs.push(Region::of("attn_sink", s));
    }

    if a.indices.is_null() {
        no_sparse_fields(&a)?;
        let stride = positive("block_table_stride", a.block_table_stride)?;
        // SAFETY: block_table holds batch * stride entries.
        let table = unsafe { slice(a.block_table, shape.batch * stride, "block_table") }?;
        // SAFETY: seqlens holds batch entries.
        let seqlens = unsafe { slice(a.seqlens, shape.batch, "seqlens") }?;
        inputs.extend([
            Region::of("block_table", table),
            Region::of("seqlens", seqlens),
        ]);
        // SAFETY: q/out/lse contract.
        let mut act =
            unsafe { activations(&shape, a.q_dtype, a.q, a.out_dtype, a.out, a.lse, &inputs) }?;
        let mut d = Decode::dense(shape, act.q_dtype, act.q, cache, table, stride, seqlens)?;
        if let Some(s) = sink {
            d = d.with_sink(s)?;
        }
        return engine.inner.decode(&d, &mut act.out);
    }

    // Sparse: block_table and seqlens are not read.
    let topk = positive("topk", a.topk)?;
    let rows = shape.batch * shape.s_q;
    // SAFETY: indices holds batch * s_q * topk entries.
    let indices = unsafe {
        slice(
            a.indices,
            crate::error::checked_size("indices", &[rows, topk])?,
            "indices",
        )
    }?;
    // SAFETY: topk_length holds batch entries when set.
    let topk_length = unsafe { optional(a.topk_length, shape.batch, "topk_length") }?;
    inputs.push(Region::of("indices", indices));
    inputs.extend(topk_length.map(|l| Region::of("topk_length", l)));
    let main = IndexedKeys {
        kv: cache,
        indices,
        topk,
        topk_length,
    };
    let extra = if a.extra_kv.is_null() {
        if !a.extra_indices.is_null() || !a.extra_topk_length.is_null() {
            return Err(Error::invalid(
                "extra_indices or extra_topk_length is set but extra_kv is NULL",
            ));
        }
        None
    } else {
        let blocks = positive("extra_num_blocks", a.extra_num_blocks)?;
        let layout = KvLayout::new(
            format,
            shape.d_qk,
            positive("extra_block_size", a.extra_block_size)?,
            "kv_format",
        )?;
        // SAFETY: extra_kv holds extra_num_blocks blocks of the same format.
        let xkv = unsafe {
            slice(
                a.extra_kv as *const u8,
                layout.cache_bytes(blocks)?,
                "extra_kv",
            )
        }?;
        let xtopk = positive("extra_topk", a.extra_topk)?;
        if a.extra_indices.is_null() {
            return Err(Error::null("extra_indices"));
        }
        let n = crate::error::checked_size("extra_indices", &[rows, xtopk])?;
        // SAFETY: extra_indices holds batch * s_q * extra_topk entries.
        let xind = unsafe { slice(a.extra_indices, n, "extra_indices") }?;
        // SAFETY: extra_topk_length holds batch entries when set.
        let xlen = unsafe { optional(a.extra_topk_length, shape.batch, "extra_topk_length") }?;
        inputs.extend([
            Region::of("extra_kv", xkv),
            Region::of("extra_indices", xind),
        ]);
        inputs.extend(xlen.map(|l| Region::of("extra_topk_length", l)));
        Some(IndexedKeys {
            kv: KvCache::new(layout, xkv, blocks)?,
            indices: xind,
            topk: xtopk,
            topk_length: xlen,
        })
    };
    // SAFETY: q/out/lse contract.
    let mut act =
        unsafe { activations(&shape, a.q_dtype, a.q, a.out_dtype, a.out, a.lse, &inputs) }?;
    let mut d = Decode::sparse(shape, act.q_dtype, act.q, main, extra)?;
    if let Some(s) = sink {
        d = d.with_sink(s)?;
    }
    engine.inner.decode(&d, &mut act.out)
}

/// Multi-head latent attention decode over a paged KV cache the caller owns.
///
/// For each sequence b, query token i and head h:
/// `out[b,i,h,:] = softmax_t(scale * q[b,i,h,:] . K[t,:]) @ K[t,:d_v]` over the
/// keys t the query sees: dense, all of `seqlens[b]` (or the causal prefix)
/// with `K[t] = kv[block_table[b][t / block_size]][t % block_size]`; sparse,
/// the positions listed in `indices` (and `extra_indices`). FP8 caches are
/// dequantized on the fly; every format works in both modes. A query that
/// sees no key gets out = 0 and lse = +inf. Cache slots past a sequence's
/// length and blocks not referenced may hold anything (NaN included): they
/// are never read. Every pointer, size and used block id is validated before
/// any read; on error nothing is written. On a CPU engine the call returns
/// when `out` and `lse` are complete.
///
/// On a CUDA engine, `memory = MLART_MEMORY_HOST` pointers are staged
/// through engine memory (the call waits); `MLART_MEMORY_DEVICE` pointers are
/// read in place: the scalars are validated here, and so is every buffer
/// against the driver's record of its allocation (a host pointer or a buffer
/// too small for the call is an INVALID_ARGUMENT naming it); the contents
/// (lengths, block ids, indices) are checked by the kernels (see `stream`).
/// The cache must be 16-byte aligned. The GPU computes with bf16 (f16 for F16 caches) tensor-core
/// operands and f32 accumulation: results match the CPU's to bf16 precision.
#[no_mangle]
pub extern "C" fn mlart_decode_paged(
    engine: *mut mlart_engine,
    args: *const mlart_decode_args,
) -> *mut mlart_error {
    ffi_result("mlart_decode_paged", || decode_paged(engine, args))
}
