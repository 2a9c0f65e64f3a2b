//! `mlart_model`: loading a DeepSeek checkpoint's attention layers and
//! running the MLA layer forward against a KV pool.

use super::engine::{engine_ref, mlart_engine};
use super::error::mlart_error;
use super::panic::{ffi_result, ffi_value};
use super::pool::{mlart_kv_pool, pool_ref};
use super::types::*;
use super::{
    check_disjoint, non_negative, read_versioned, slice, slice_mut, write_struct_prefix, Region,
};
use crate::error::{checked_size, Error, Result};
use crate::format::{load_slice, store_slice, Dtype};
use crate::model::level::Level;
use crate::model::{Activations, LoadOptions, Model, WeightCompute};
use std::ffi::{c_char, c_void, CStr};
use std::path::Path;

/// Load progress: `fraction` in [0, 1], `stage` names the tensor just
/// loaded (valid during the call). Return false to cancel the load
/// (`MLART_STATUS_CANCELLED`).
pub type mlart_progress_fn =
    Option<extern "C" fn(fraction: f32, stage: *const c_char, user_data: *mut c_void) -> bool>;

/// A loaded model: the attention weights of a range of layers, absorbed
/// for decode.
///
/// Thread-safety: immutable after loading; any number of threads may run
/// `mlart_model_forward` at once on disjoint sets of sequences. Forwards
/// that share a sequence must not overlap: each reads the sequence's length
/// (its token positions) before appending. `mlart_model_free` must not race
/// with other calls on the model.
/// A model keeps its engine alive.
///
/// Memory: besides its weights, a model keeps the temporaries of its
/// forwards for reuse until it is freed, as much as its largest concurrent
/// forwards used (for DeepSeek-V3, about 1.1 MB per token of a pass,
/// measured 563 MB after a 512-token pass; a pass is at most 512 tokens of
/// one sequence).
pub struct mlart_model {
    inner: Model,
}

/// Options for `mlart_model_load`. Fill with `mlart_model_options_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_model_options {
    /// `sizeof(mlart_model_options)`.
    pub struct_size: u32,
    /// First layer to load; default 0.
    pub first_layer: i32,
    /// Layers to load; 0 (default) = all from `first_layer` on.
    pub num_layers: i32,
    /// false (default): keep projection weights in their stored precision
    /// (bf16, f16, f32, or FP8 with block scales); true: convert them at
    /// load to `weight_dtype` (F32, BF16 or F16).
    pub convert_weights: bool,
    /// Target of `convert_weights`.
    pub weight_dtype: mlart_dtype,
    /// Optional load progress callback.
    pub progress: mlart_progress_fn,
    /// Passed to `progress`.
    pub progress_user_data: *mut c_void,
    /// How the projections take their activations; default
    /// MLART_ACTIVATIONS_PRECISE. Since 0.2: a struct_size of 40 (the 0.1
    /// layout, which ends before this field) is still accepted, and the
    /// field is then not read.
    pub activations: mlart_activations,
    /// Ignored: the 0.4 layout's tail padding, which a caller built
    /// against that header may leave uninitialized.
    pub reserved0: u32,
    /// Where a CUDA engine's model runs its projections: -1 (default) as
    /// `MLART_CUDA_PROJECTIONS` says, else mlart's default (the CPU until
    /// the GPU kernels are verified on hardware); 0: the CPU; 1: the GPU
    /// (bf16 and FP8 weights; f32/f16 ones stay on the CPU, which
    /// `mlart_model_props.projections_on_gpu` shows). Ignored by CPU
    /// engines.
    /// Since 0.5: a struct_size of 48 (the 0.4 layout, which ends before
    /// this field) or 40 is still accepted, and the field is then -1.
    pub gpu_projections: i32,
    /// Ignored: the 0.5 layout's tail padding, which a caller built
    /// against that header may leave uninitialized.
    pub reserved1: u32,
    /// The most bytes of up-projected keys (K and V of every head) one
    /// `mlart_model_forward` call keeps between the passes of a long
    /// prompt (a sequence's new tokens past 512 run in passes; the
    /// sequences of a call are taken one at a time). 0 (default): 1 GiB,
    /// which holds 13,056 positions of DeepSeek-V3 over a BF16 or FP8
    /// pool (80 KB a position; twice that over F32/F16). A pass
    /// up-projects only its own positions while the whole context fits;
    /// past it, the positions beyond the kept ones are up-projected again
    /// in every pass, which costs time, not correctness. Less than one
    /// 64-position block's rows (5 MB for V3) keeps none; UINT64_MAX
    /// sets no limit. Only the CPU's prefill keeps keys.
    /// Since 0.6: a struct_size of 56 (the 0.5 layout, whose tail padding
    /// is `reserved1`), 48 or 40 is still accepted, and the field is then 0.
    pub kept_keys_bytes: u64,
}

/// `sizeof(mlart_model_options)` before `activations` was appended.
const MODEL_OPTIONS_SIZE_BEFORE_ACTIVATIONS: usize =
    std::mem::offset_of!(mlart_model_options, activations);
// That first layout ended with a pointer at offset 32: 40 bytes.
const _: () = assert!(MODEL_OPTIONS_SIZE_BEFORE_ACTIVATIONS == 40);
/// `sizeof(mlart_model_options)` of 0.4 (0.2, 0.3), before `gpu_projections`.
const MODEL_OPTIONS_SIZE_0_4: usize = std::mem::offset_of!(mlart_model_options, gpu_projections);
const _: () = assert!(MODEL_OPTIONS_SIZE_0_4 == 48);
/// `sizeof(mlart_model_options)` of 0.5: 52 bytes of fields padded to 56
/// (that padding is now `reserved1`), before `kept_keys_bytes`.
const MODEL_OPTIONS_SIZE_0_5: usize = std::mem::offset_of!(mlart_model_options, kept_keys_bytes);
const _: () = assert!(MODEL_OPTIONS_SIZE_0_5 == 56);

/// What a model is. Set `struct_size` with `mlart_model_props_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_model_props {
    /// `sizeof(mlart_model_props)`.
    pub struct_size: u32,
    /// Layers in the checkpoint (`num_hidden_layers`).
    pub num_layers: i32,
    /// First loaded layer.
    pub first_layer: i32,
    /// Loaded layers.
    pub loaded_layers: i32,
    pub hidden_size: i32,
    pub num_heads: i32,
    /// 0 when the model has no query low-rank projection (V2-Lite).
    pub q_lora_rank: i32,
    pub kv_lora_rank: i32,
    pub qk_nope_head_dim: i32,
    pub qk_rope_head_dim: i32,
    pub v_head_dim: i32,
    /// Cache row width a pool needs: kv_lora_rank + qk_rope_head_dim.
    pub d_qk: i32,
    pub rope_theta: f64,
    /// Whether YaRN rope scaling is on, and its parameters.
    pub yarn: bool,
    pub yarn_factor: f64,
    pub yarn_original_max_position: i64,
    pub yarn_beta_fast: f64,
    pub yarn_beta_slow: f64,
    pub yarn_mscale: f64,
    pub yarn_mscale_all_dim: f64,
    /// The attention softmax scale used (qk_head_dim^-0.5, times m^2 with YaRN).
    pub softmax_scale: f64,
    /// Projection weights in memory: F32, BF16, F16 or FP8_E4M3.
    pub weight_dtype: mlart_dtype,
    /// Bytes of weights held in memory.
    pub bytes_loaded: u64,
    /// How the projections take their activations (`mlart_model_options`).
    /// Since 0.2, as the next field.
    pub activations: mlart_activations,
    /// The vector code of the projections: the engine's CPU kernel variant
    /// (MLART_CPU_ISA forces it) capped by the CPU — SCALAR (portable
    /// code), AVX2, AVX512 or AVX512_BF16 (FP8 dot products and the prefill
    /// GEMM on `vdpbf16ps`).
    pub projection_isa: mlart_cpu_isa,
    /// DeepSeek-V3.2's sparse-attention indexer (`index_n_heads`,
    /// `index_head_dim`, `index_topk`); all 0 for models without one. A
    /// pool for this model needs `index_head_dim` in its options. Since
    /// 0.4; a struct_size of 0.1 or 0.2/0.3 gets only its prefix written.
    pub index_n_heads: i32,
    pub index_head_dim: i32,
    pub index_topk: i32,
    /// 1 when the projections run on the GPU (a CUDA engine, asked for by
    /// `mlart_model_options.gpu_projections` or `MLART_CUDA_PROJECTIONS`,
    /// bf16 or FP8 weights); then the whole layer runs there over a pool of
    /// the same engine, and `mlart_model_forward` takes device memory. 0
    /// otherwise. Since 0.5, in what was the 0.4 layout's tail padding (so
    /// both have one size); a 0.1–0.3 struct_size gets only its prefix.
    pub projections_on_gpu: i32,
    /// The bytes of up-projected keys a forward keeps between the passes
    /// of a long prompt (`mlart_model_options.kept_keys_bytes`, with 0
    /// resolved to its default of 1 GiB). Since 0.6; a 0.4/0.5 struct_size
    /// (160) or an older one gets only its prefix written.
    pub kept_keys_bytes: u64,
}

/// `sizeof(mlart_model_props)` in 0.1, before `activations` and
/// `projection_isa` were appended: a caller built against that header
/// gets only those bytes written.
const MODEL_PROPS_SIZE_0_1: usize = std::mem::offset_of!(mlart_model_props, activations);
// The 0.1 layout ended with the u64 bytes_loaded at offset 128.
const _: () = assert!(MODEL_PROPS_SIZE_0_1 == 136);
/// `sizeof(mlart_model_props)` in 0.2 and 0.3, before the indexer fields.
const MODEL_PROPS_SIZE_0_3: usize = std::mem::offset_of!(mlart_model_props, index_n_heads);
const _: () = assert!(MODEL_PROPS_SIZE_0_3 == 144);
// 0.4 ended with index_topk at 152, padded to 160; the 0.5 field fits there.
const _: () = assert!(std::mem::offset_of!(mlart_model_props, projections_on_gpu) == 156);
/// `sizeof(mlart_model_props)` in 0.4 and 0.5, before `kept_keys_bytes`.
const MODEL_PROPS_SIZE_0_5: usize = std::mem::offset_of!(mlart_model_props, kept_keys_bytes);
const _: () = assert!(MODEL_PROPS_SIZE_0_5 == 160);
const _: () = assert!(std::mem::size_of::<mlart_model_props>() == 168);

/// Arguments of `mlart_model_forward`. Fill with `mlart_forward_args_init`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct mlart_forward_args {
    /// `sizeof(mlart_forward_args)`.
    pub struct_size: u32,
    /// Absolute layer index (must be loaded); its cache is pool layer
    /// `layer - first_layer`.
    pub layer: i32,
    /// Number of sequences.
    pub batch: i32,
    /// Distinct sequence ids [batch], existing in the pool.
    pub seq_ids: *const u64,
    /// New tokens per sequence [batch], each >= 1 (1 = decode step, more =
    /// a prefill chunk). Positions continue each sequence's length.
    pub n_tokens: *const i32,
    /// Element type of `x` (F32, BF16 or F16); default F32.
    pub x_dtype: mlart_dtype,
    /// Hidden states [sum(n_tokens), hidden_size], sequence by sequence.
    pub x: *const c_void,
    /// Element type of `out`; default F32.
    pub out_dtype: mlart_dtype,
    /// Attention block output [sum(n_tokens), hidden_size].
    pub out: *mut c_void,
    /// Optional, DeepSeek-V3.2 models only: receives the positions each new
    /// token attended to, as the indexer chose them, [sum(n_tokens),
    /// index_topk] int32, ascending, -1 after the last (a token at position
    /// p < index_topk attends to all of 0..p). Since 0.4: a struct_size of
    /// 64 (the earlier layout, which ends before this field) is still
    /// accepted, and the field is then NULL.
    pub index_out: *mut i32,
    /// Where `x` and `out` live; default `MLART_MEMORY_HOST`. With
    /// `MLART_MEMORY_DEVICE` (a CUDA engine whose model runs its
    /// projections on the GPU, over a pool of the same engine) they are
    /// device memory of that GPU, 16-byte aligned, and the whole layer runs
    /// there with no host round trip of the hidden states; the other
    /// pointers (`seq_ids`, `n_tokens`, `index_out`) stay host memory. A
    /// call of more than 512 tokens of one sequence runs in passes; if one
    /// fails, `out` holds the rows of the passes before it (the pool is
    /// still unchanged). Bad block ids in a pool are impossible here, so
    /// the attention's device-side error word is not read back. Since 0.5: a
    /// struct_size of 72 (the 0.4 layout, which ends before this field) or
    /// 64 is still accepted, and the field is then HOST.
    pub memory: mlart_memory,
    /// CUDA stream (`CUstream`) for `MLART_MEMORY_DEVICE`: the engine's
    /// work starts after what is enqueued there and the stream continues
    /// after it; the call returns without waiting. It may not be capturing
    /// a CUDA graph (the call copies host data). NULL: `x` must be ready
    /// when the call is made (work that writes it on other streams
    /// finished), and the call returns when `out` is written. Ignored for
    /// host memory.
    pub stream: *mut c_void,
}

/// `sizeof(mlart_forward_args)` before `index_out` was appended.
const FORWARD_ARGS_SIZE_BEFORE_INDEX: usize = std::mem::offset_of!(mlart_forward_args, index_out);
const _: () = assert!(FORWARD_ARGS_SIZE_BEFORE_INDEX == 64);
/// `sizeof(mlart_forward_args)` of 0.4, before `memory` was appended.
const FORWARD_ARGS_SIZE_0_4: usize = std::mem::offset_of!(mlart_forward_args, memory);
const _: () = assert!(FORWARD_ARGS_SIZE_0_4 == 72);

/// Fills `options` with the defaults. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_model_options_init(options: *mut mlart_model_options) {
    ffi_value("mlart_model_options_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(o) = unsafe { options.as_mut() } {
            *o = mlart_model_options {
                struct_size: std::mem::size_of::<mlart_model_options>() as u32,
                first_layer: 0,
                num_layers: 0,
                convert_weights: false,
                weight_dtype: MLART_DTYPE_BF16,
                progress: None,
                progress_user_data: std::ptr::null_mut(),
                activations: MLART_ACTIVATIONS_PRECISE,
                reserved0: 0,
                gpu_projections: -1,
                reserved1: 0,
                kept_keys_bytes: 0,
            };
        }
    })
}

/// Zeroes `props` and sets its `struct_size`. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_model_props_init(props: *mut mlart_model_props) {
    ffi_value("mlart_model_props_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(p) = unsafe { props.as_mut() } {
            // SAFETY: every field is an integer, float or bool: zero is valid.
            *p = unsafe { std::mem::zeroed() };
            p.struct_size = std::mem::size_of::<mlart_model_props>() as u32;
        }
    })
}

/// Fills `args` with the defaults. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_forward_args_init(args: *mut mlart_forward_args) {
    ffi_value("mlart_forward_args_init", (), || {
        // SAFETY: a non-NULL pointer points to a writable struct (caller contract).
        if let Some(a) = unsafe { args.as_mut() } {
            *a = mlart_forward_args {
                struct_size: std::mem::size_of::<mlart_forward_args>() as u32,
                layer: 0,
                batch: 0,
                seq_ids: std::ptr::null(),
                n_tokens: std::ptr::null(),
                x_dtype: MLART_DTYPE_F32,
                x: std::ptr::null(),
                out_dtype: MLART_DTYPE_F32,
                out: std::ptr::null_mut(),
                index_out: std::ptr::null_mut(),
                memory: MLART_MEMORY_HOST,
                stream: std::ptr::null_mut(),
            };
        }
    })
}

/// Loads `config.json` and the attention tensors of a Hugging Face style
/// DeepSeek V2/V2-Lite/V3/V3.2 checkpoint directory (`model.safetensors` or
/// shards listed in `model.safetensors.index.json`; other tensors are not
/// read). `options` may be NULL. On success `*out` receives the model.
#[no_mangle]
pub extern "C" fn mlart_model_load(
    engine: *mut mlart_engine,
    path: *const c_char,
    options: *const mlart_model_options,
    out: *mut *mut mlart_model,
) -> *mut mlart_error {
    ffi_result("mlart_model_load", || {
        // SAFETY: engine handle contract.
        let engine = unsafe { engine_ref(engine) }?;
        if path.is_null() {
            return Err(Error::null("path"));
        }
        // SAFETY: a non-NULL path is a NUL-terminated string (caller contract).
        let path = unsafe { CStr::from_ptr(path) }
            .to_str()
            .map_err(|_| Error::invalid("path is not valid UTF-8"))?;
        if out.is_null() {
            return Err(Error::null("out"));
        }
        let o = if options.is_null() {
            let mut o = std::mem::MaybeUninit::<mlart_model_options>::uninit();
            mlart_model_options_init(o.as_mut_ptr());
            // SAFETY: initialized by mlart_model_options_init just above.
            unsafe { o.assume_init() }
        } else {
            // SAFETY: a non-NULL options points to a caller struct of
            // struct_size bytes of plain data.
            unsafe {
                read_versioned(
                    options,
                    "options",
                    "mlart_model_options_init",
                    mlart_model_options_init,
                    &[
                        MODEL_OPTIONS_SIZE_BEFORE_ACTIVATIONS,
                        MODEL_OPTIONS_SIZE_0_4,
                        MODEL_OPTIONS_SIZE_0_5,
                    ],
                )
            }?
        };
        let compute = if o.convert_weights {
            let d = Dtype::from_raw("options->weight_dtype", o.weight_dtype)?;
            if d == Dtype::Fp8E4m3 {
                return Err(Error::unsupported(
                    "options->weight_dtype = FP8_E4M3: weights convert to F32, BF16 or F16 (FP8 checkpoints stay FP8 when convert_weights is false)",
                ));
            }
            WeightCompute::Convert(d)
        } else {
            WeightCompute::AsStored
        };
        let mut report = |fraction: f32, stage: &str| -> bool {
            match o.progress {
                Some(cb) => {
                    let stage = std::ffi::CString::new(stage).unwrap_or_default();
                    cb(fraction, stage.as_ptr(), o.progress_user_data)
                }
                None => true,
            }
        };
        let opts = LoadOptions {
            first_layer: non_negative("options->first_layer", o.first_layer as i64)?,
            num_layers: non_negative("options->num_layers", o.num_layers as i64)?,
            compute,
            activations: match o.activations {
                MLART_ACTIVATIONS_PRECISE => Activations::Precise,
                MLART_ACTIVATIONS_BF16 => Activations::Bf16,
                v => {
                    return Err(Error::invalid(format!(
                        "options->activations = {v} is not a valid mlart_activations (PRECISE=0, BF16=1)"
                    )))
                }
            },
            progress: Some(&mut report),
            gpu_projections: match o.gpu_projections {
                -1 => None,
                0 => Some(false),
                1 => Some(true),
                v => {
                    return Err(Error::invalid(format!(
                        "options->gpu_projections = {v} must be -1 (default), 0 (CPU) or 1 (GPU)"
                    )))
                }
            },
            kept_keys_bytes: match o.kept_keys_bytes {
                0 => crate::model::prefill::KEPT_KEYS_BYTES,
                // Beyond the address space: no limit.
                v => usize::try_from(v).unwrap_or(usize::MAX),
            },
        };
        let model = Model::load(engine.inner.clone(), Path::new(path), opts)?;
        // SAFETY: out is non-NULL and writable (caller contract).
        unsafe { out.write(Box::into_raw(Box::new(mlart_model { inner: model }))) };
        Ok(())
    })
}

/// Releases a model. NULL is ignored.
#[no_mangle]
pub extern "C" fn mlart_model_free(model: *mut mlart_model) {
    ffi_value("mlart_model_free", (), || {
        if !model.is_null() {
            // SAFETY: produced by mlart_model_load, freed once (caller contract).
            drop(unsafe { Box::from_raw(model) });
        }
    })
}

/// Borrows the model behind a handle.
///
/// # Safety
/// A non-NULL `model` must be a live handle from `mlart_model_load`.
unsafe fn model_ref<'a>(model: *const mlart_model) -> Result<&'a Model> {
    // SAFETY: forwarded contract.
    unsafe { model.as_ref() }
        .map(|m| &m.inner)
        .ok_or_else(|| Error::null("model"))
}

/// Describes a loaded model. `out->struct_size` must be set.
#[no_mangle]
pub extern "C" fn mlart_model_info(
    model: *const mlart_model,
    out: *mut mlart_model_props,
) -> *mut mlart_error {
    ffi_result("mlart_model_info", || {
        // SAFETY: model handle contract.
        let m = unsafe { model_ref(model) }?;
        // SAFETY: a non-NULL out points to a caller struct of struct_size
        // bytes of plain data.
        let mut p = unsafe {
            read_versioned(
                out as *const mlart_model_props,
                "out",
                "mlart_model_props_init",
                mlart_model_props_init,
                &[
                    MODEL_PROPS_SIZE_0_1,
                    MODEL_PROPS_SIZE_0_3,
                    MODEL_PROPS_SIZE_0_5,
                ],
            )
        }?;
        let c = &m.config;
        let i = |v: usize| v.min(i32::MAX as usize) as i32;
        p.num_layers = i(c.num_layers);
        p.first_layer = i(m.first_layer);
        p.loaded_layers = i(m.layers.len());
        p.hidden_size = i(c.hidden_size);
        p.num_heads = i(c.num_heads);
        p.q_lora_rank = i(c.q_lora_rank.unwrap_or(0));
        p.kv_lora_rank = i(c.kv_lora_rank);
        p.qk_nope_head_dim = i(c.qk_nope_head_dim);
        p.qk_rope_head_dim = i(c.qk_rope_head_dim);
        p.v_head_dim = i(c.v_head_dim);
        p.d_qk = i(c.d_qk());
        p.rope_theta = c.rope_theta;
        p.yarn = c.yarn.is_some();
        if let Some(y) = &c.yarn {
            p.yarn_factor = y.factor;
            p.yarn_original_max_position = y.original_max_position_embeddings as i64;
            p.yarn_beta_fast = y.beta_fast;
            p.yarn_beta_slow = y.beta_slow;
            p.yarn_mscale = y.mscale;
            p.yarn_mscale_all_dim = y.mscale_all_dim;
        }
        p.softmax_scale = c.softmax_scale();
        p.weight_dtype = m.weight_dtype.raw();
        p.bytes_loaded = m.bytes_loaded as u64;
        p.activations = match m.activations {
            Activations::Precise => MLART_ACTIVATIONS_PRECISE,
            Activations::Bf16 => MLART_ACTIVATIONS_BF16,
        };
        p.projection_isa = match m.level {
            Level::Portable => MLART_CPU_ISA_SCALAR,
            Level::Avx2 => MLART_CPU_ISA_AVX2,
            Level::Avx512 => MLART_CPU_ISA_AVX512,
            Level::Avx512Bf16 => MLART_CPU_ISA_AVX512_BF16,
        };
        if let Some(ix) = &c.indexer {
            p.index_n_heads = i(ix.heads);
            p.index_head_dim = i(ix.head_dim);
            p.index_topk = i(ix.topk);
        }
        p.projections_on_gpu = m.projections_on_gpu() as i32;
        p.kept_keys_bytes = m.kept_keys_bytes as u64;
        // SAFETY: out is non-NULL (checked by read_versioned) and has
        // struct_size writable bytes, which p.struct_size holds.
        unsafe { write_struct_prefix(out, &p, p.struct_size as usize) };
        Ok(())
    })
}

fn forward(
    model: *const mlart_model,
    pool: *const mlart_kv_pool,
    args: *const mlart_forward_args,
) -> Result<()> {
    // SAFETY: handle contracts.
    let m = unsafe { model_ref(model) }?;
    // SAFETY: handle contracts.
    let p = unsafe { pool_ref(pool) }?;
    // SAFETY: a non-NULL args points to a caller struct of struct_size
    // bytes of plain data.
    let a = unsafe {
        read_versioned(
            args,
            "args",
            "mlart_forward_args_init",
            mlart_forward_args_init,
            &[FORWARD_ARGS_SIZE_BEFORE_INDEX, FORWARD_ARGS_SIZE_0_4],
        )
    }?;
    let memory = crate::format::Memory::from_raw("memory", a.memory)?;
    if a.batch < 1 {
        return Err(Error::invalid(format!("batch = {} must be >= 1", a.batch)));
    }
    let batch = a.batch as usize;
    // SAFETY: seq_ids and n_tokens hold batch entries (caller contract).
    let ids = unsafe { slice(a.seq_ids, batch, "seq_ids") }?;
    // SAFETY: as above.
    let counts = unsafe { slice(a.n_tokens, batch, "n_tokens") }?;
    let mut n = Vec::with_capacity(batch);
    for (i, &c) in counts.iter().enumerate() {
        if c < 1 {
            return Err(Error::invalid(format!("n_tokens[{i}] = {c} must be >= 1")));
        }
        n.push(c as usize);
    }
    let total: usize = n.iter().sum();
    let hid = m.config.hidden_size;
    let x_dtype = Dtype::from_raw("x_dtype", a.x_dtype)?.check_activation("x_dtype")?;
    let out_dtype = Dtype::from_raw("out_dtype", a.out_dtype)?.check_activation("out_dtype")?;
    let x_len = checked_size("x", &[total, hid, x_dtype.size()])?;
    let out_len = checked_size("out", &[total, hid, out_dtype.size()])?;
    if memory == crate::format::Memory::Device {
        return forward_device(m, p, &a, ids, counts, &n, x_dtype, out_dtype);
    }
    // SAFETY: x holds sum(n_tokens) * hidden elements (caller contract).
    let x = unsafe { slice(a.x as *const u8, x_len, "x") }?;
    let out_region = Region {
        name: "out",
        start: a.out as usize,
        len: out_len,
    };
    let inputs = [
        Region::of("x", x),
        Region::of("seq_ids", ids),
        Region::of("n_tokens", counts),
    ];
    check_disjoint(&out_region, &inputs)?;
    let index_region = index_out_region(m, &a, total)?;
    let index_len = index_region.len;
    check_disjoint(
        &index_region,
        &[inputs[0], inputs[1], inputs[2], out_region],
    )?;
    // SAFETY: out holds sum(n_tokens) * hidden elements, disjoint from the inputs.
    let out = unsafe { slice_mut(a.out as *mut u8, out_len, "out") }?;
    let mut xf = vec![0f32; total * hid];
    load_slice(x_dtype, x, &mut xf);
    let mut index: Vec<i32> = Vec::new();
    crate::backend::try_grow(&mut index, "index_out staging", index_len / 4)?;
    let y = m.forward_with(
        p,
        a.layer as i64,
        ids,
        &n,
        &xf,
        (index_len > 0).then_some(&mut index[..]),
    )?;
    store_slice(out_dtype, &y, out);
    if index_len > 0 {
        // SAFETY: index_out holds sum(n_tokens) * index_topk int32 (caller
        // contract), disjoint from the other arguments (checked above).
        let dst = unsafe { slice_mut(a.index_out, index.len(), "index_out") }?;
        dst.copy_from_slice(&index);
    }
    Ok(())
}

/// `args.index_out` as a region: `[total, index_topk]` int32 for a V3.2
/// model, empty when NULL; an error when set for a model without indexer.
fn index_out_region(m: &Model, a: &mlart_forward_args, total: usize) -> Result<Region<'static>> {
    let len = match (&m.config.indexer, a.index_out.is_null()) {
        (_, true) => 0,
        (Some(ix), false) => checked_size("index_out", &[total, ix.topk, 4])?,
        (None, false) => {
            return Err(Error::invalid(format!(
                "index_out is set but this model ({}) has no sparse-attention indexer",
                m.config.model_type
            )))
        }
    };
    Ok(Region {
        name: "index_out",
        start: a.index_out as usize,
        len,
    })
}

/// [`forward`] with `x` and `out` in the engine's GPU memory.
#[allow(clippy::too_many_arguments)]
fn forward_device(
    m: &Model,
    p: &crate::kv::KvPool,
    a: &mlart_forward_args,
    ids: &[u64],
    counts: &[i32],
    n: &[usize],
    x_dtype: Dtype,
    out_dtype: Dtype,
) -> Result<()> {
    if m.engine.backend().cuda().is_none() {
        return super::decode::check_memory(a.memory);
    }
    // NULL gets its own message; the model checks that the ranges are
    // memory of its GPU.
    for (name, ptr) in [("x", a.x), ("out", a.out as *const c_void)] {
        if ptr.is_null() {
            return Err(Error::null(name));
        }
    }
    // The model checks that x and out are memory of its GPU, aligned and
    // apart (after their ranges are known to be real).
    let total: usize = n.iter().sum();
    let index_region = index_out_region(m, a, total)?;
    let index_len = index_region.len;
    check_disjoint(
        &index_region,
        &[Region::of("seq_ids", ids), Region::of("n_tokens", counts)],
    )?;
    let mut index: Vec<i32> = Vec::new();
    crate::backend::try_grow(&mut index, "index_out staging", index_len / 4)?;
    m.forward_device(
        p,
        a.layer as i64,
        ids,
        n,
        a.x as u64,
        x_dtype,
        a.out as u64,
        out_dtype,
        a.stream as u64,
        (index_len > 0).then_some(&mut index[..]),
    )?;
    if index_len > 0 {
        // SAFETY: index_out holds sum(n_tokens) * index_topk int32 (caller
        // contract), disjoint from the other host arguments (checked above).
        let dst = unsafe { slice_mut(a.index_out, index.len(), "index_out") }?;
        dst.copy_from_slice(&index);
    }
    Ok(())
}

/// Runs the MLA attention block of one layer for a batch of sequences:
/// projections, norms, RoPE (YaRN), appending the new `[c | k_pe]` rows to
/// the pool (quantized per its format), causal attention over each
/// sequence's cache, and the output projection. The pool's d_qk must be
/// kv_lora_rank + qk_rope_head_dim. Over a BF16 or FP8 pool the attention
/// takes bf16 queries and gives a bf16 latent output (P in bf16), as
/// DeepSeek's reference does; over an F32 or F16 pool it stays in f32.
/// On error the pool is unchanged and `out` is not written.
///
/// Decode steps attend in DeepSeek's absorbed form. On the CPU, a
/// sequence's chunk of at least 128 tokens, or one at least as long as its
/// earlier context, attends in the expanded form instead (each head's K
/// and V up-projected from the cache; 3.4x fewer attention FLOPs for V3):
/// the same attention up to rounding. A call of more than 512 tokens runs
/// in passes of a sequence's tokens; in the expanded form it keeps the
/// sequence's up-projected K and V between passes (80 KB a position for
/// V3 over a BF16 or FP8 pool, 160 KB over F32 or F16), for as many of
/// its first positions as fit in `mlart_model_options.kept_keys_bytes`
/// (1 GiB by default), and up-projects the others again in each pass.
///
/// On a CUDA engine whose model runs its projections on the GPU, over a
/// pool of the same engine, the whole layer runs on the GPU; `x` and `out`
/// may then be device memory (`args.memory`, `args.stream`).
#[no_mangle]
pub extern "C" fn mlart_model_forward(
    model: *mut mlart_model,
    pool: *mut mlart_kv_pool,
    args: *const mlart_forward_args,
) -> *mut mlart_error {
    ffi_result("mlart_model_forward", || forward(model, pool, args))
}
