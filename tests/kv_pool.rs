//! The managed KV pool (`mlart_kv_pool_*`, `mlart_kv_seq_*`, `mlart_kv_append`)
//! exercised through its C ABI, against a float64 reference written here.
//!
//! The reference model keeps, for every sequence and layer, the rows that
//! were appended twice: as the caller gave them (rounded to the input dtype)
//! and as the pool stores them (then rounded to the pool's row format; for
//! the FP8 formats quantized by this file's own e4m3 quantizer), and
//! recomputes attention with plain f64 loops, dense or sparse (logical
//! positions, `topk_length`, attention sink). Nothing of the library is
//! reused for the expected values.

use half::{bf16, f16};
use mlart::ffi::engine::*;
use mlart::ffi::error::*;
use mlart::ffi::pool::*;
use mlart::ffi::types::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::ffi::{c_void, CStr};
use std::ptr;

// ---------------------------------------------------------------- errors

/// Reads and frees an error; `None` for success.
fn take_err(e: *mut mlart_error) -> Option<(mlart_status, String)> {
    if e.is_null() {
        return None;
    }
    let code = mlart_error_code(e);
    let msg_ptr = mlart_error_message(e);
    assert!(!msg_ptr.is_null());
    // SAFETY: a live error's message is a NUL-terminated string valid until
    // mlart_error_free, which comes after this copy.
    let msg = unsafe { CStr::from_ptr(msg_ptr) }
        .to_string_lossy()
        .into_owned();
    mlart_error_free(e);
    Some((code, msg))
}

#[track_caller]
fn ok(e: *mut mlart_error) {
    if let Some((code, msg)) = take_err(e) {
        panic!("unexpected error (status {code}): {msg}");
    }
}

#[track_caller]
fn expect_err(e: *mut mlart_error, status: mlart_status, needle: &str) -> String {
    let Some((code, msg)) = take_err(e) else {
        panic!("expected status {status} with {needle:?}, but the call succeeded");
    };
    assert_eq!(code, status, "status of error {msg:?}");
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
    msg
}

// ---------------------------------------------------------------- dtypes

fn round_to(dtype: mlart_dtype, v: f32) -> f32 {
    match dtype {
        MLART_DTYPE_F32 => v,
        MLART_DTYPE_BF16 => bf16::from_f32(v).to_f32(),
        MLART_DTYPE_F16 => f16::from_f32(v).to_f32(),
        _ => unreachable!(),
    }
}

fn encode(dtype: mlart_dtype, vals: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(vals.len() * 4);
    for &v in vals {
        match dtype {
            MLART_DTYPE_F32 => out.extend_from_slice(&v.to_le_bytes()),
            MLART_DTYPE_BF16 => out.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes()),
            MLART_DTYPE_F16 => out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
            _ => unreachable!(),
        }
    }
    out
}

fn decode_bytes(dtype: mlart_dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        MLART_DTYPE_F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        MLART_DTYPE_BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect(),
        MLART_DTYPE_F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect(),
        _ => unreachable!(),
    }
}

fn dtype_size(dtype: mlart_dtype) -> usize {
    if dtype == MLART_DTYPE_F32 {
        4
    } else {
        2
    }
}

/// The element type a pool of `fmt` stores rows in.
fn format_dtype(fmt: mlart_kv_format) -> mlart_dtype {
    match fmt {
        MLART_KV_FORMAT_F32 => MLART_DTYPE_F32,
        MLART_KV_FORMAT_BF16 => MLART_DTYPE_BF16,
        MLART_KV_FORMAT_F16 => MLART_DTYPE_F16,
        _ => unreachable!(),
    }
}

const DTYPES: [mlart_dtype; 3] = [MLART_DTYPE_F32, MLART_DTYPE_BF16, MLART_DTYPE_F16];
const FORMATS: [mlart_kv_format; 3] = [
    MLART_KV_FORMAT_F32,
    MLART_KV_FORMAT_BF16,
    MLART_KV_FORMAT_F16,
];
const FP8_FORMATS: [mlart_kv_format; 2] = [MLART_KV_FORMAT_FP8_V32, MLART_KV_FORMAT_FP8_MODEL1];
const ALL_FORMATS: [mlart_kv_format; 5] = [
    MLART_KV_FORMAT_F32,
    MLART_KV_FORMAT_BF16,
    MLART_KV_FORMAT_F16,
    MLART_KV_FORMAT_FP8_V32,
    MLART_KV_FORMAT_FP8_MODEL1,
];

fn is_fp8(fmt: mlart_kv_format) -> bool {
    FP8_FORMATS.contains(&fmt)
}

/// The row width a test uses for `fmt`: fixed by the FP8 formats, else `d`.
fn d_qk_for(fmt: mlart_kv_format, d: usize) -> usize {
    match fmt {
        MLART_KV_FORMAT_FP8_V32 => 576,
        MLART_KV_FORMAT_FP8_MODEL1 => 512,
        _ => d,
    }
}

/// The largest d_v a test uses with rows of `d_qk`.
fn d_v_for(d_qk: usize) -> usize {
    d_qk.min(512)
}

// ---------------------------------------------------------------- fp8

/// FP8 layouts as documented in mlart.h: (quantized elements, tile width).
/// The rest of the row (the 64-element rope) is stored as bf16.
fn fp8_tiles(fmt: mlart_kv_format) -> (usize, usize) {
    match fmt {
        MLART_KV_FORMAT_FP8_V32 => (512, 128),
        MLART_KV_FORMAT_FP8_MODEL1 => (448, 64),
        _ => unreachable!(),
    }
}

/// OCP E4M3 ("fn") of `x`, rounded to nearest even, saturating at +-448.
fn e4m3_round(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let a = x.abs();
    let r = if a >= 448.0 {
        448.0
    } else if a == 0.0 {
        0.0
    } else {
        // 3 mantissa bits; below 2^-6 the spacing stays 2^-9 (subnormals).
        let e = a.log2().floor().max(-6.0);
        let quantum = (e - 3.0).exp2();
        ((a / quantum).round_ties_even() * quantum).min(448.0)
    };
    r.copysign(x)
}

/// The value one FP8 row element `src` is stored as: per tile, scale =
/// 2^ceil(log2(max(amax / 448, 1e-4))) and value = e4m3(x / scale) * scale;
/// the rope tail is bf16.
fn fp8_stored_row(fmt: mlart_kv_format, src: &[f32]) -> Vec<f32> {
    let (nope, tile) = fp8_tiles(fmt);
    let mut out = Vec::with_capacity(src.len());
    for t in src[..nope].chunks_exact(tile) {
        // As FlashMLA does in float32; NaN does not count towards amax.
        let amax = t.iter().fold(0f32, |m, x| m.max(x.abs()));
        let v = (amax / 448.0).max(1e-4f32) as f64;
        let scale = v.log2().ceil().exp2();
        out.extend(
            t.iter()
                .map(|&x| (e4m3_round((x as f64 / scale) as f32 as f64) * scale) as f32),
        );
    }
    out.extend(src[nope..].iter().map(|&x| bf16::from_f32(x).to_f32()));
    out
}

/// Bytes of one block of `fmt` (the layouts of mlart.h, computed here).
fn block_bytes(fmt: mlart_kv_format, d_qk: usize, bs: usize) -> usize {
    match fmt {
        MLART_KV_FORMAT_FP8_V32 => 656 * bs,
        // Rows of 448 + 2 * 64 bytes, then 8 scale bytes per token, padded to 576.
        MLART_KV_FORMAT_FP8_MODEL1 => ((448 + 128 + 8) * bs).div_ceil(576) * 576,
        _ => d_qk * dtype_size(format_dtype(fmt)) * bs,
    }
}

// ---------------------------------------------------------------- handles

fn engine_options() -> mlart_engine_options {
    let mut o = mlart_engine_options {
        struct_size: 0,
        backend: 0,
        device_index: 0,
        num_threads: 0,
        thread_affinity: 0,
    };
    mlart_engine_options_init(&mut o);
    o.backend = MLART_BACKEND_CPU;
    o
}

/// An engine owned by a test.
struct Engine(*mut mlart_engine);

impl Engine {
    fn new() -> Self {
        let mut e = ptr::null_mut();
        ok(mlart_engine_create(&engine_options(), &mut e));
        assert!(!e.is_null());
        Engine(e)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        mlart_engine_free(self.0);
    }
}

/// Pool geometry.
#[derive(Clone, Copy, Debug)]
struct Geo {
    fmt: mlart_kv_format,
    d_qk: usize,
    layers: usize,
    bs: usize,
    nb: usize,
}

impl Geo {
    fn options(&self) -> mlart_kv_pool_options {
        let mut o = mlart_kv_pool_options {
            struct_size: 0,
            kv_format: 0,
            d_qk: 0,
            num_layers: 0,
            block_size: 0,
            num_blocks: 0,
            index_head_dim: 0,
        };
        mlart_kv_pool_options_init(&mut o);
        o.kv_format = self.fmt;
        o.d_qk = self.d_qk as i32;
        o.num_layers = self.layers as i32;
        o.block_size = self.bs as i32;
        o.num_blocks = self.nb as i32;
        o
    }

    /// The value the pool stores for one row (already rounded to the
    /// dtype it was appended in).
    fn stored_row(&self, row: &[f32]) -> Vec<f32> {
        if is_fp8(self.fmt) {
            fp8_stored_row(self.fmt, row)
        } else {
            let pd = format_dtype(self.fmt);
            row.iter().map(|&v| round_to(pd, v)).collect()
        }
    }

    fn block_bytes(&self) -> usize {
        block_bytes(self.fmt, self.d_qk, self.bs)
    }
}

/// A pool owned by a test. Its engine is released right after the pool is
/// created: the pool must keep it alive by itself.
struct Pool {
    ptr: *mut mlart_kv_pool,
}

impl Pool {
    fn new(geo: Geo) -> Self {
        let engine = Engine::new();
        let mut p = ptr::null_mut();
        ok(mlart_kv_pool_create(engine.0, &geo.options(), &mut p));
        assert!(!p.is_null());
        drop(engine);
        let pool = Pool { ptr: p };
        let s = pool.stats();
        let block = geo.block_bytes();
        assert_eq!(s.blocks_total, geo.nb as i64);
        assert_eq!(s.blocks_used, 0);
        assert_eq!(s.blocks_free, geo.nb as i64);
        assert_eq!(s.sequences, 0);
        assert_eq!(s.bytes_per_block, (block * geo.layers) as i64);
        assert_eq!(s.bytes_total, (block * geo.layers * geo.nb) as i64);
        pool
    }

    fn stats(&self) -> Stats {
        stats(self.ptr)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        mlart_kv_pool_free(self.ptr);
    }
}

/// `mlart_kv_pool_stats` without `struct_size`, comparable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stats {
    blocks_total: i64,
    blocks_used: i64,
    blocks_free: i64,
    sequences: i64,
    bytes_per_block: i64,
    bytes_total: i64,
}

fn empty_stats() -> mlart_kv_pool_stats {
    let mut s = mlart_kv_pool_stats {
        struct_size: 0,
        blocks_total: -1,
        blocks_used: -1,
        blocks_free: -1,
        sequences: -1,
        bytes_per_block: -1,
        bytes_total: -1,
    };
    mlart_kv_pool_stats_init(&mut s);
    s
}

#[track_caller]
fn stats(pool: *const mlart_kv_pool) -> Stats {
    let mut s = empty_stats();
    ok(mlart_kv_pool_stats_get(pool, &mut s));
    assert_eq!(s.blocks_used + s.blocks_free, s.blocks_total);
    Stats {
        blocks_total: s.blocks_total,
        blocks_used: s.blocks_used,
        blocks_free: s.blocks_free,
        sequences: s.sequences,
        bytes_per_block: s.bytes_per_block,
        bytes_total: s.bytes_total,
    }
}

#[track_caller]
fn seq_len(pool: *const mlart_kv_pool, id: u64, layer: usize) -> i64 {
    let mut n = -7;
    ok(mlart_kv_seq_length(pool, id, layer as i32, &mut n));
    n
}

fn decode_args() -> mlart_kv_pool_decode_args {
    let mut a = mlart_kv_pool_decode_args {
        struct_size: 0,
        layer: -1,
        batch: -1,
        seq_ids: ptr::null(),
        s_q: -1,
        h_q: -1,
        d_v: -1,
        softmax_scale: -1.0,
        causal: true,
        memory: 9,
        q_dtype: 9,
        q: ptr::null(),
        indices: ptr::null(),
        topk: -1,
        topk_length: ptr::null(),
        attn_sink: ptr::null(),
        out_dtype: 9,
        out: ptr::null_mut(),
        lse: ptr::null_mut(),
        stream: ptr::null_mut(),
    };
    mlart_kv_pool_decode_args_init(&mut a);
    a
}

// ---------------------------------------------------------------- reference

/// One decode call.
#[derive(Clone, Debug)]
struct Spec {
    layer: usize,
    ids: Vec<u64>,
    s_q: usize,
    h_q: usize,
    d_v: usize,
    scale: f32,
    causal: bool,
    q_dtype: mlart_dtype,
    out_dtype: mlart_dtype,
    with_lse: bool,
    /// Sparse decode: logical positions `[batch, s_q, topk]` (-1 = none).
    indices: Option<Vec<i32>>,
    topk: usize,
    /// Optional `[batch]` prefix lengths of each index list.
    topk_length: Option<Vec<i32>>,
    /// Optional per-head attention sink `[h_q]`.
    sink: Option<Vec<f32>>,
}

impl Spec {
    fn new(layer: usize, ids: &[u64], d_v: usize) -> Self {
        Spec {
            layer,
            ids: ids.to_vec(),
            s_q: 1,
            h_q: 2,
            d_v,
            scale: 0.0,
            causal: false,
            q_dtype: MLART_DTYPE_F32,
            out_dtype: MLART_DTYPE_F32,
            with_lse: true,
            indices: None,
            topk: 0,
            topk_length: None,
            sink: None,
        }
    }

    /// The entries of `indices` query `i` of sequence `b` uses (within its
    /// `topk_length`), -1 included.
    fn list(&self, b: usize, i: usize) -> &[i32] {
        let ind = self.indices.as_ref().expect("sparse spec");
        let n = self
            .topk_length
            .as_ref()
            .map_or(self.topk, |l| l[b] as usize);
        &ind[(b * self.s_q + i) * self.topk..][..n]
    }
}

/// What a decode wrote, bit for bit.
#[derive(Clone, Debug, PartialEq)]
struct Raw {
    out: Vec<u8>,
    lse_bits: Vec<u32>,
}

/// Calls `mlart_kv_pool_decode` with fresh (poisoned) out/lse buffers.
fn run_decode(
    pool: *mut mlart_kv_pool,
    spec: &Spec,
    d_qk: usize,
    q: &[u8],
) -> Result<Raw, (mlart_status, String)> {
    let batch = spec.ids.len();
    assert_eq!(
        q.len(),
        batch * spec.s_q * spec.h_q * d_qk * dtype_size(spec.q_dtype)
    );
    let mut out = vec![0xA5u8; batch * spec.s_q * spec.h_q * spec.d_v * dtype_size(spec.out_dtype)];
    let mut lse = vec![-12345.0f32; batch * spec.h_q * spec.s_q];
    let mut a = decode_args();
    a.layer = spec.layer as i32;
    a.batch = batch as i32;
    a.seq_ids = spec.ids.as_ptr();
    a.s_q = spec.s_q as i32;
    a.h_q = spec.h_q as i32;
    a.d_v = spec.d_v as i32;
    a.softmax_scale = spec.scale;
    a.causal = spec.causal;
    a.q_dtype = spec.q_dtype;
    a.q = q.as_ptr().cast();
    a.out_dtype = spec.out_dtype;
    a.out = out.as_mut_ptr().cast();
    a.lse = if spec.with_lse {
        lse.as_mut_ptr()
    } else {
        ptr::null_mut()
    };
    if let Some(ind) = &spec.indices {
        assert_eq!(ind.len(), batch * spec.s_q * spec.topk);
        a.indices = ind.as_ptr();
        a.topk = spec.topk as i32;
    }
    if let Some(l) = &spec.topk_length {
        assert_eq!(l.len(), batch);
        a.topk_length = l.as_ptr();
    }
    if let Some(sink) = &spec.sink {
        assert_eq!(sink.len(), spec.h_q);
        a.attn_sink = sink.as_ptr();
    }
    match take_err(mlart_kv_pool_decode(pool, &a)) {
        Some(e) => Err(e),
        None => Ok(Raw {
            out,
            lse_bits: lse.iter().map(|v| v.to_bits()).collect(),
        }),
    }
}

/// f64 attention: returns (out [batch, s_q, h_q, d_v], lse [batch, h_q, s_q]).
/// `keys[b]` are the rows of sequence b by logical position. Dense specs
/// attend to all of them (or the causal prefix), sparse ones to the listed
/// positions (-1 skipped, duplicates counted twice); a sink then scales each
/// head's output by 1 / (1 + exp(sink[h] - lse)).
fn reference(keys: &[&[Vec<f32>]], q: &[f32], spec: &Spec, d_qk: usize) -> (Vec<f64>, Vec<f64>) {
    let (s_q, h_q, d_v) = (spec.s_q, spec.h_q, spec.d_v);
    let scale = if spec.scale == 0.0 {
        1.0 / (d_qk as f64).sqrt()
    } else {
        spec.scale as f64
    };
    let batch = keys.len();
    let mut out = vec![0.0f64; batch * s_q * h_q * d_v];
    let mut lse = vec![f64::INFINITY; batch * h_q * s_q];
    for (b, rows) in keys.iter().enumerate() {
        let len = rows.len();
        for i in 0..s_q {
            let seen: Vec<&[f32]> = if spec.indices.is_some() {
                assert!(!spec.causal);
                spec.list(b, i)
                    .iter()
                    .filter(|&&p| p != -1)
                    .map(|&p| rows[usize::try_from(p).expect("valid index")].as_slice())
                    .collect()
            } else {
                let visible = if spec.causal {
                    len.saturating_sub(s_q - 1 - i)
                } else {
                    len
                };
                rows[..visible].iter().map(|r| r.as_slice()).collect()
            };
            for h in 0..h_q {
                if seen.is_empty() {
                    continue;
                }
                let qv = &q[((b * s_q + i) * h_q + h) * d_qk..][..d_qk];
                let scores: Vec<f64> = seen
                    .iter()
                    .map(|k| {
                        let dot: f64 = qv.iter().zip(*k).map(|(&a, &b)| a as f64 * b as f64).sum();
                        scale * dot
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                let l = m + sum.ln();
                lse[(b * h_q + h) * s_q + i] = l;
                // +inf sink: factor 0; -inf: factor 1.
                let factor = spec
                    .sink
                    .as_ref()
                    .map_or(1.0, |sk| 1.0 / (1.0 + (sk[h] as f64 - l).exp()));
                let o = &mut out[((b * s_q + i) * h_q + h) * d_v..][..d_v];
                for (s, k) in scores.iter().zip(&seen) {
                    let p = (s - m).exp() / sum * factor;
                    for (oc, &kc) in o.iter_mut().zip(&k[..d_v]) {
                        *oc += p * kc as f64;
                    }
                }
            }
        }
    }
    (out, lse)
}

/// Compares a decode's result with the reference; `tol` is the bound on the
/// relative L2 error of `out` (and, scaled, of each lse).
#[track_caller]
fn assert_matches(raw: &Raw, spec: &Spec, want: &(Vec<f64>, Vec<f64>), tol: f64, ctx: &str) {
    let got = decode_bytes(spec.out_dtype, &raw.out);
    let (want_out, want_lse) = want;
    assert_eq!(got.len(), want_out.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want_out) {
        assert!(g.is_finite(), "{ctx}: non-finite output {g}");
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        assert_eq!(num, 0.0, "{ctx}: output should be all zeros");
    } else {
        let rel = (num / den).sqrt();
        assert!(rel <= tol, "{ctx}: rel-L2 error {rel:e} > {tol:e}");
    }
    // Queries that see no key: exactly 0 and +inf.
    let (s_q, h_q, d_v) = (spec.s_q, spec.h_q, spec.d_v);
    for b in 0..spec.ids.len() {
        for i in 0..s_q {
            for h in 0..h_q {
                let li = (b * h_q + h) * s_q + i;
                let o = &got[((b * s_q + i) * h_q + h) * d_v..][..d_v];
                if want_lse[li].is_infinite() {
                    assert!(
                        o.iter().all(|&v| v == 0.0),
                        "{ctx}: b={b} i={i} h={h} sees no key but out != 0"
                    );
                }
                if spec.sink.as_ref().is_some_and(|s| s[h] == f32::INFINITY) {
                    assert!(
                        o.iter().all(|&v| v == 0.0),
                        "{ctx}: b={b} i={i} h={h} has a +inf sink but out != 0"
                    );
                }
                if !spec.with_lse {
                    continue;
                }
                let g = f32::from_bits(raw.lse_bits[li]) as f64;
                let w = want_lse[li];
                if w.is_infinite() {
                    assert_eq!(g, f64::INFINITY, "{ctx}: lse b={b} i={i} h={h}");
                } else {
                    let err = (g - w).abs() / w.abs().max(1.0);
                    assert!(
                        err <= 2.0 * tol,
                        "{ctx}: lse b={b} i={i} h={h}: got {g}, want {w}"
                    );
                }
            }
        }
    }
    if !spec.with_lse {
        assert!(raw.lse_bits.iter().all(|&b| b == (-12345.0f32).to_bits()));
    }
}

/// Rows of each layer of a sequence.
type Layers = Vec<Vec<Vec<f32>>>;

/// What the pool should hold: per sequence, per layer, the stored rows
/// (`seqs`, exactly) and the rows the caller appended (`orig`, before the
/// pool's rounding or quantization).
#[derive(Clone)]
struct Model {
    geo: Geo,
    seqs: BTreeMap<u64, Layers>,
    orig: BTreeMap<u64, Layers>,
}

/// Bound on the rel-L2 error of an FP8 pool's decode against the rows as
/// appended (the exact check is the one against the stored rows). e4m3
/// keeps 3 mantissa bits: rounding a value spread evenly over a binade
/// [2^e, 2^(e+1)) to steps of 2^(e-3) leaves a relative RMS error of
/// 2^-3 / sqrt(12) / sqrt(7/3) = 2.36%, and the softmax-weighted average of
/// zero-mean rows shrinks the error and the output alike, so the decode's
/// relative error stays near 2.4% (up to 3.1% seen here). 2e-2 would sit
/// below that; 4e-2 still catches a wrong scale, tile or saturation.
const FP8_TOL: f64 = 4e-2;

impl Model {
    fn new(geo: Geo) -> Self {
        Model {
            geo,
            seqs: BTreeMap::new(),
            orig: BTreeMap::new(),
        }
    }

    #[track_caller]
    fn create(&mut self, pool: *mut mlart_kv_pool, id: u64) {
        ok(mlart_kv_seq_create(pool, id));
        let empty = vec![Vec::new(); self.geo.layers];
        assert!(self.seqs.insert(id, empty.clone()).is_none());
        assert!(self.orig.insert(id, empty).is_none());
    }

    /// Appends rows given as f32 values (first rounded to `dtype`, the
    /// element type passed to the pool).
    #[track_caller]
    fn append_vals(
        &mut self,
        pool: *mut mlart_kv_pool,
        id: u64,
        layer: usize,
        dtype: mlart_dtype,
        vals: &[f32],
    ) {
        let d = self.geo.d_qk;
        assert_eq!(vals.len() % d, 0);
        let n = vals.len() / d;
        let bytes = encode(dtype, vals);
        ok(mlart_kv_append(
            pool,
            id,
            layer as i32,
            n as i32,
            dtype,
            bytes.as_ptr().cast(),
        ));
        for r in vals.chunks_exact(d) {
            let given: Vec<f32> = r.iter().map(|&v| round_to(dtype, v)).collect();
            let stored = self.geo.stored_row(&given);
            self.seqs.get_mut(&id).expect("model seq")[layer].push(stored);
            self.orig.get_mut(&id).expect("model seq")[layer].push(given);
        }
    }

    #[track_caller]
    fn append(
        &mut self,
        pool: *mut mlart_kv_pool,
        rng: &mut SmallRng,
        id: u64,
        layer: usize,
        n: usize,
        dtype: mlart_dtype,
    ) {
        let vals = random_vals(rng, n * self.geo.d_qk, 1.0);
        self.append_vals(pool, id, layer, dtype, &vals);
    }

    #[track_caller]
    fn fork(&mut self, pool: *mut mlart_kv_pool, src: u64, dst: u64) {
        ok(mlart_kv_seq_fork(pool, src, dst));
        let s = self.seqs[&src].clone();
        assert!(self.seqs.insert(dst, s).is_none());
        let s = self.orig[&src].clone();
        assert!(self.orig.insert(dst, s).is_none());
    }

    #[track_caller]
    fn truncate(&mut self, pool: *mut mlart_kv_pool, id: u64, len: usize) {
        ok(mlart_kv_seq_truncate(pool, id, len as i64));
        for rows in self.seqs.get_mut(&id).expect("model seq") {
            rows.truncate(len);
        }
        for rows in self.orig.get_mut(&id).expect("model seq") {
            rows.truncate(len);
        }
    }

    #[track_caller]
    fn free(&mut self, pool: *mut mlart_kv_pool, id: u64) {
        ok(mlart_kv_seq_free(pool, id));
        assert!(self.seqs.remove(&id).is_some());
        assert!(self.orig.remove(&id).is_some());
    }

    fn len(&self, id: u64, layer: usize) -> usize {
        self.seqs[&id][layer].len()
    }

    #[track_caller]
    fn check_lengths(&self, pool: *const mlart_kv_pool) {
        for (&id, layers) in &self.seqs {
            for (l, rows) in layers.iter().enumerate() {
                assert_eq!(
                    seq_len(pool, id, l),
                    rows.len() as i64,
                    "length of seq {id} layer {l}"
                );
            }
        }
    }

    /// Random queries for `spec`, already rounded to `spec.q_dtype`.
    fn queries(&self, rng: &mut SmallRng, spec: &Spec) -> Vec<f32> {
        let n = spec.ids.len() * spec.s_q * spec.h_q * self.geo.d_qk;
        random_vals(rng, n, 1.5)
            .into_iter()
            .map(|v| round_to(spec.q_dtype, v))
            .collect()
    }

    /// Tolerance against the stored rows: FP8 rows dequantize exactly to
    /// f32, so an FP8 pool is held to the F32 pool's bound.
    fn tolerance(&self, spec: &Spec) -> f64 {
        let strict = (self.geo.fmt == MLART_KV_FORMAT_F32 || is_fp8(self.geo.fmt))
            && spec.q_dtype == MLART_DTYPE_F32
            && spec.out_dtype == MLART_DTYPE_F32;
        if strict {
            1e-5
        } else {
            1e-2
        }
    }

    /// Decodes `spec` with random queries and checks it against the
    /// reference on the stored rows (FP8 pools: also against the rows as
    /// appended, within `FP8_TOL`); returns the raw result and the queries.
    #[track_caller]
    fn check_decode(
        &self,
        pool: *mut mlart_kv_pool,
        rng: &mut SmallRng,
        spec: &Spec,
        ctx: &str,
    ) -> (Raw, Vec<u8>) {
        let qv = self.queries(rng, spec);
        let q = encode(spec.q_dtype, &qv);
        let raw = run_decode(pool, spec, self.geo.d_qk, &q)
            .unwrap_or_else(|(c, m)| panic!("{ctx}: decode failed (status {c}): {m}"));
        self.check_raw(&raw, &qv, spec, ctx);
        (raw, q)
    }

    /// Checks a decode of `spec` with queries `qv` against the model.
    #[track_caller]
    fn check_raw(&self, raw: &Raw, qv: &[f32], spec: &Spec, ctx: &str) {
        let ctx = format!("{ctx} [{:?} geo {:?}]", spec, self.geo);
        for (rows, tol, what) in [
            (&self.seqs, self.tolerance(spec), "stored rows"),
            (&self.orig, FP8_TOL, "rows as appended"),
        ] {
            let keys: Vec<&[Vec<f32>]> = spec
                .ids
                .iter()
                .map(|id| rows[id][spec.layer].as_slice())
                .collect();
            let want = reference(&keys, qv, spec, self.geo.d_qk);
            assert_matches(raw, spec, &want, tol, &format!("{ctx} vs {what}"));
            if !is_fp8(self.geo.fmt) {
                break;
            }
        }
    }

    /// A sparse decode of `ids` in `layer` over random logical positions of
    /// each sequence. With `lengths`, per-sequence `topk_length`s (the first
    /// 0, the last `topk`, others random), entries past them hold garbage.
    #[allow(clippy::too_many_arguments)]
    fn sparse_spec(
        &self,
        rng: &mut SmallRng,
        layer: usize,
        ids: &[u64],
        s_q: usize,
        h_q: usize,
        topk: usize,
        lengths: bool,
        sink: bool,
    ) -> Spec {
        let lens: Vec<usize> = ids.iter().map(|&id| self.len(id, layer)).collect();
        let mut indices = random_indices(rng, &lens, s_q, topk);
        let topk_length = lengths.then(|| {
            let n = ids.len();
            let l: Vec<i32> = (0..n)
                .map(|b| match b {
                    0 => 0,
                    _ if b == n - 1 => topk as i32,
                    _ => rng.random_range(0..=topk) as i32,
                })
                .collect();
            for (b, &len) in l.iter().enumerate() {
                for i in 0..s_q {
                    for (k, e) in indices[(b * s_q + i) * topk..][..topk]
                        .iter_mut()
                        .enumerate()
                        .skip(len as usize)
                    {
                        *e = [i32::MAX, -7, 1 << 20, i32::MIN][k % 4];
                    }
                }
            }
            l
        });
        Spec {
            s_q,
            h_q,
            indices: Some(indices),
            topk,
            topk_length,
            sink: sink.then(|| sinks(h_q)),
            ..Spec::new(layer, ids, d_v_for(self.geo.d_qk))
        }
    }

    /// Checks every layer of every sequence (plain f32 decode, one batch).
    #[track_caller]
    fn check_all(&self, pool: *mut mlart_kv_pool, rng: &mut SmallRng, ctx: &str) {
        self.check_lengths(pool);
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        for layer in 0..self.geo.layers {
            let mut spec = Spec::new(layer, &ids, self.geo.d_qk.min(64));
            spec.s_q = 2;
            spec.causal = true;
            self.check_decode(pool, rng, &spec, &format!("{ctx}: layer {layer}"));
        }
    }
}

fn random_vals(rng: &mut SmallRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

/// Blocks a sequence of these per-layer lengths holds on its own.
fn blocks_for(lens: &[usize], bs: usize) -> usize {
    lens.iter().copied().max().unwrap_or(0).div_ceil(bs)
}

/// Per sequence: (id, layer-0 length, layer-1 length).
type Plan = [(u64, usize, usize)];

/// A two-layer pool holding `plan` (plus `spare` free blocks) and its model,
/// filled by chunks of 1..=`chunk` rows interleaved across sequences and
/// layers so that block tables are not contiguous; `rows` makes a chunk's
/// f32 values. Returns the blocks in use.
fn filled_pool(
    geo: Geo,
    plan: &Plan,
    spare: usize,
    rng: &mut SmallRng,
    chunk: usize,
    in_dtype: mlart_dtype,
    rows: impl Fn(&mut SmallRng, &Geo, usize) -> Vec<f32>,
) -> (Pool, Model, usize) {
    let nb: usize = plan.iter().map(|p| blocks_for(&[p.1, p.2], geo.bs)).sum();
    let geo = Geo {
        nb: nb + spare,
        ..geo
    };
    let pool = Pool::new(geo);
    let p = pool.ptr;
    let mut m = Model::new(geo);
    for &(id, _, _) in plan {
        m.create(p, id);
    }
    let mut remaining: Vec<[usize; 2]> = plan.iter().map(|p| [p.1, p.2]).collect();
    while remaining.iter().any(|r| r[0] + r[1] > 0) {
        for (&(id, _, _), rem) in plan.iter().zip(remaining.iter_mut()) {
            for (layer, left) in rem.iter_mut().enumerate() {
                if *left == 0 {
                    continue;
                }
                let n = rng.random_range(1..=chunk).min(*left);
                let vals = rows(rng, &geo, n);
                m.append_vals(p, id, layer, in_dtype, &vals);
                *left -= n;
            }
        }
    }
    m.check_lengths(p);
    (pool, m, nb)
}

/// `n` rows for `geo`. FP8 rows get a different amplitude per quantization
/// tile (zero, subnormal-sized, at the scale floor, small, unit), so tile
/// scales vary within a row; other formats get unit-amplitude rows. (Larger
/// keys would add score errors on top of the e4m3 rounding of V: `FP8_TOL`
/// assumes |k| <= 1.)
fn varied_rows(rng: &mut SmallRng, geo: &Geo, n: usize) -> Vec<f32> {
    if !is_fp8(geo.fmt) {
        return random_vals(rng, n * geo.d_qk, 1.0);
    }
    const AMPS: [f32; 7] = [0.0, 1e-5, 0.02, 0.1, 0.25, 1.0, 1.0];
    let (nope, tile) = fp8_tiles(geo.fmt);
    let mut v = Vec::with_capacity(n * geo.d_qk);
    for _ in 0..n {
        for _ in 0..nope / tile {
            let amp = AMPS[rng.random_range(0..AMPS.len())];
            v.extend((0..tile).map(|_| amp * rng.random_range(-1.0f32..1.0)));
        }
        v.extend(random_vals(rng, geo.d_qk - nope, 1.0));
    }
    v
}

/// Random logical positions `[lens.len(), s_q, topk]` for sequences of
/// `lens` tokens: about one entry in six is -1 and one in six repeats an
/// earlier entry of its list (a sequence with no token gets only -1).
fn random_indices(rng: &mut SmallRng, lens: &[usize], s_q: usize, topk: usize) -> Vec<i32> {
    let mut v = Vec::with_capacity(lens.len() * s_q * topk);
    for &len in lens {
        for _ in 0..s_q {
            let start = v.len();
            for k in 0..topk {
                let p = match rng.random_range(0..6) {
                    _ if len == 0 => -1,
                    0 => -1,
                    1 if k > 0 => v[start + rng.random_range(0..k)],
                    _ => rng.random_range(0..len) as i32,
                };
                v.push(p);
            }
        }
    }
    v
}

/// Per-head sinks cycling through finite, +inf and -inf values.
fn sinks(h_q: usize) -> Vec<f32> {
    const S: [f32; 5] = [0.3, f32::INFINITY, -1.5, f32::NEG_INFINITY, 2.0];
    (0..h_q).map(|h| S[h % S.len()]).collect()
}

// ---------------------------------------------------------------- tests

/// Appends in every input dtype into every pool format and block size, over
/// sequences of assorted lengths (0, partial blocks, exact blocks) in two
/// layers with independent contents, then decodes each layer against the
/// reference with several shapes and dtypes.
#[test]
fn append_then_decode_matches_reference() {
    let d_qk = 72;
    for (fi, &fmt) in FORMATS.iter().enumerate() {
        for (di, &in_dtype) in DTYPES.iter().enumerate() {
            for &bs in &[1usize, 16, 64] {
                let mut rng = SmallRng::seed_from_u64((fi * 100 + di * 10 + bs) as u64);
                // Per sequence: (id, layer-0 length, layer-1 length).
                let plan: Vec<(u64, usize, usize)> = vec![
                    (7, 0, 3),
                    (u64::MAX, 1, 0),
                    (3, bs.saturating_sub(1).max(2), 50),
                    (1 << 40, bs, 1),
                    (42, bs + 1, 2 * bs),
                    (5, 37, 17),
                    (0, 100, 0),
                ];
                let geo = Geo {
                    fmt,
                    d_qk,
                    layers: 2,
                    bs,
                    nb: 0,
                };
                let random =
                    |rng: &mut SmallRng, g: &Geo, n: usize| random_vals(rng, n * g.d_qk, 1.0);
                let (pool, mut m, nb) = filled_pool(geo, &plan, 3, &mut rng, 13, in_dtype, random);
                let p = pool.ptr;
                let s = pool.stats();
                assert_eq!(s.blocks_used as usize, nb, "blocks used");
                assert_eq!(s.sequences, plan.len() as i64);
                // A zero-token append of valid rows changes nothing.
                let row = encode(in_dtype, &vec![0.5; d_qk]);
                ok(mlart_kv_append(p, 5, 1, 0, in_dtype, row.as_ptr().cast()));
                m.check_lengths(p);
                assert_eq!(pool.stats(), s);

                let all: Vec<u64> = plan.iter().map(|p| p.0).collect();
                for layer in 0..2 {
                    let ctx = format!("fmt {fmt} in {in_dtype} bs {bs} layer {layer}");
                    // Plain f32 decode of everything, default scale.
                    let spec = Spec {
                        h_q: 3,
                        ..Spec::new(layer, &all, 64)
                    };
                    m.check_decode(p, &mut rng, &spec, &ctx);
                    // MTP with a causal mask, bf16 in and out, explicit scale,
                    // repeated ids, full d_v.
                    let spec = Spec {
                        ids: vec![42, 5, 42, 7, 0],
                        s_q: 3,
                        h_q: 2,
                        d_v: d_qk,
                        scale: 0.25,
                        causal: true,
                        q_dtype: MLART_DTYPE_BF16,
                        out_dtype: MLART_DTYPE_BF16,
                        ..Spec::new(layer, &[], 0)
                    };
                    m.check_decode(p, &mut rng, &spec, &ctx);
                    // f16 in and out, no lse, mixed q/out dtypes.
                    let spec = Spec {
                        ids: vec![3, u64::MAX, 1 << 40],
                        s_q: 2,
                        h_q: 5,
                        d_v: 8,
                        causal: true,
                        q_dtype: MLART_DTYPE_F16,
                        out_dtype: MLART_DTYPE_F32,
                        with_lse: false,
                        ..Spec::new(layer, &[], 0)
                    };
                    m.check_decode(p, &mut rng, &spec, &ctx);
                    let spec = Spec {
                        q_dtype: MLART_DTYPE_F32,
                        out_dtype: MLART_DTYPE_F16,
                        h_q: 1,
                        d_v: 1,
                        ..Spec::new(layer, &all, 1)
                    };
                    m.check_decode(p, &mut rng, &spec, &ctx);
                    // A batch of only empty sequences: zeros and +inf.
                    let empty = if layer == 0 { 7 } else { u64::MAX };
                    let spec = Spec {
                        s_q: 2,
                        ..Spec::new(layer, &[empty, empty], 64)
                    };
                    m.check_decode(p, &mut rng, &spec, &ctx);
                }
                // Free everything: every block comes back.
                for &(id, _, _) in &plan {
                    m.free(p, id);
                }
                let s = pool.stats();
                assert_eq!((s.blocks_used, s.sequences), (0, 0));
            }
        }
    }
}

/// DeepSeek-V3 geometry (576/512), many heads, BF16 pool.
#[test]
fn deepseek_geometry_matches_reference() {
    let geo = Geo {
        fmt: MLART_KV_FORMAT_BF16,
        d_qk: 576,
        layers: 3,
        bs: 64,
        nb: 24,
    };
    let pool = Pool::new(geo);
    let p = pool.ptr;
    let mut rng = SmallRng::seed_from_u64(576);
    let mut m = Model::new(geo);
    let lens = [0usize, 1, 63, 64, 65, 200];
    for (k, &n) in lens.iter().enumerate() {
        let id = 100 + k as u64;
        m.create(p, id);
        for layer in 0..geo.layers {
            let n = (n + layer * 7) % 211;
            if n > 0 {
                m.append(p, &mut rng, id, layer, n, DTYPES[(k + layer) % 3]);
            }
        }
    }
    m.check_lengths(p);
    let ids: Vec<u64> = m.seqs.keys().copied().collect();
    for layer in 0..geo.layers {
        for (q_dtype, out_dtype) in [
            (MLART_DTYPE_BF16, MLART_DTYPE_BF16),
            (MLART_DTYPE_F32, MLART_DTYPE_F32),
        ] {
            let spec = Spec {
                s_q: 2,
                h_q: 16,
                d_v: 512,
                causal: true,
                q_dtype,
                out_dtype,
                ..Spec::new(layer, &ids, 512)
            };
            m.check_decode(p, &mut rng, &spec, "deepseek geometry");
        }
    }
}

/// An F32 pool fed F32 rows and decoded to F32 is held to 1e-5.
#[test]
fn f32_pool_is_accurate() {
    let geo = Geo {
        fmt: MLART_KV_FORMAT_F32,
        d_qk: 130,
        layers: 1,
        bs: 16,
        nb: 40,
    };
    let pool = Pool::new(geo);
    let p = pool.ptr;
    let mut rng = SmallRng::seed_from_u64(32);
    let mut m = Model::new(geo);
    for (id, n) in [(1u64, 1usize), (2, 15), (3, 16), (4, 17), (5, 300)] {
        m.create(p, id);
        m.append(p, &mut rng, id, 0, n, MLART_DTYPE_F32);
    }
    // Peaky softmax: large scale.
    for scale in [0.0f32, 0.5, 2.0] {
        for causal in [false, true] {
            let spec = Spec {
                s_q: 4,
                h_q: 7,
                d_v: 128,
                scale,
                causal,
                ..Spec::new(0, &[1, 2, 3, 4, 5], 128)
            };
            m.check_decode(p, &mut rng, &spec, "f32 pool");
        }
    }
}

/// Fork shares blocks, copies a shared block on the first write into it, and
/// keeps parent and child isolated; also at a block boundary, fork of fork,
/// and freeing the parent. Every format, FP8 included: a copied MODEL1 block
/// must carry its per-block scale area along.
#[test]
fn fork_is_copy_on_write_and_isolated() {
    for &fmt in &ALL_FORMATS {
        let bs = 16;
        let geo = Geo {
            fmt,
            d_qk: d_qk_for(fmt, 40),
            layers: 2,
            bs,
            nb: 32,
        };
        let pool = Pool::new(geo);
        let p = pool.ptr;
        let mut rng = SmallRng::seed_from_u64(fmt as u64 + 7);
        let mut m = Model::new(geo);

        // Parent 1: 40 tokens in layer 0 (last block partial), 21 in layer 1.
        m.create(p, 1);
        m.append(p, &mut rng, 1, 0, 40, MLART_DTYPE_F32);
        m.append(p, &mut rng, 1, 1, 21, MLART_DTYPE_BF16);
        assert_eq!(pool.stats().blocks_used, 3);

        m.fork(p, 1, 2);
        let s = pool.stats();
        assert_eq!((s.blocks_used, s.sequences), (3, 2), "fork shares blocks");
        m.check_all(p, &mut rng, "after fork");

        // Parent appends into the shared partial block 2: one COW copy.
        m.append(p, &mut rng, 1, 0, 5, MLART_DTYPE_F16);
        assert_eq!(pool.stats().blocks_used, 4);
        // Child appends into its block 2, no longer shared: in place.
        m.append(p, &mut rng, 2, 0, 3, MLART_DTYPE_F32);
        assert_eq!(pool.stats().blocks_used, 4);
        // Child appends into layer 1 (block 1, still shared): one more copy,
        // which must carry layer 0's rows of that block along.
        m.append(p, &mut rng, 2, 1, 4, MLART_DTYPE_BF16);
        assert_eq!(pool.stats().blocks_used, 5);
        m.check_all(p, &mut rng, "after diverging appends");

        // Fork of fork; grandchild and child diverge.
        m.fork(p, 2, 3);
        assert_eq!(pool.stats().blocks_used, 5);
        m.append(p, &mut rng, 3, 0, 30, MLART_DTYPE_F32); // COW block 2 + 2 fresh
        assert_eq!(pool.stats().blocks_used, 8);
        m.append(p, &mut rng, 2, 1, 2, MLART_DTYPE_F32); // block 1 shared with 3: COW
        assert_eq!(pool.stats().blocks_used, 9);
        m.check_all(p, &mut rng, "fork of fork");

        // Freeing the parent releases what it alone held: its original block
        // 1 (2 copied it before 3 forked) and its copy of block 2. Block 0 is
        // still shared by 2 and 3.
        m.free(p, 1);
        let s = pool.stats();
        assert_eq!((s.blocks_used, s.sequences), (7, 2));
        m.check_all(p, &mut rng, "after freeing the parent");

        // Fork at an exact block boundary: no copy on append, only fresh blocks.
        m.create(p, 10);
        m.append(p, &mut rng, 10, 0, 32, MLART_DTYPE_F32);
        m.append(p, &mut rng, 10, 1, 32, MLART_DTYPE_F16);
        let before = pool.stats().blocks_used;
        m.fork(p, 10, 11);
        assert_eq!(pool.stats().blocks_used, before);
        m.append(p, &mut rng, 11, 0, 3, MLART_DTYPE_F32);
        assert_eq!(pool.stats().blocks_used, before + 1);
        m.append(p, &mut rng, 10, 0, 3, MLART_DTYPE_BF16);
        assert_eq!(pool.stats().blocks_used, before + 2);
        // Layer 1 of both goes on into the block each already owns alone.
        m.append(p, &mut rng, 11, 1, 5, MLART_DTYPE_F32);
        m.append(p, &mut rng, 10, 1, 6, MLART_DTYPE_F32);
        assert_eq!(pool.stats().blocks_used, before + 2);
        m.check_all(p, &mut rng, "fork at a block boundary");

        // Fork of an empty sequence.
        m.create(p, 20);
        m.fork(p, 20, 21);
        m.append(p, &mut rng, 21, 1, 1, MLART_DTYPE_F32);
        m.check_all(p, &mut rng, "fork of empty");

        for id in m.seqs.keys().copied().collect::<Vec<_>>() {
            m.free(p, id);
        }
        let s = pool.stats();
        assert_eq!((s.blocks_used, s.sequences), (0, 0), "all blocks returned");
    }
}

/// Multi-layer pools: a layer's length and contents do not depend on the
/// others.
#[test]
fn layers_are_independent() {
    let bs = 8;
    let geo = Geo {
        fmt: MLART_KV_FORMAT_F32,
        d_qk: 24,
        layers: 4,
        bs,
        nb: 16,
    };
    let pool = Pool::new(geo);
    let p = pool.ptr;
    let mut rng = SmallRng::seed_from_u64(4);
    let mut m = Model::new(geo);
    m.create(p, 9);
    m.append(p, &mut rng, 9, 2, 19, MLART_DTYPE_F32);
    assert_eq!(pool.stats().blocks_used, 3);
    for l in 0..4 {
        assert_eq!(seq_len(p, 9, l), if l == 2 { 19 } else { 0 });
    }
    // Layer 0 grows into blocks allocated for layer 2: no new block.
    m.append(p, &mut rng, 9, 0, 20, MLART_DTYPE_F32);
    assert_eq!(pool.stats().blocks_used, 3);
    m.append(p, &mut rng, 9, 3, 25, MLART_DTYPE_BF16);
    assert_eq!(pool.stats().blocks_used, 4);
    m.check_all(p, &mut rng, "multi-layer");
    // Same ids, same queries, different layers: different outputs.
    let spec0 = Spec::new(0, &[9], 24);
    let spec2 = Spec::new(2, &[9], 24);
    let q = encode(MLART_DTYPE_F32, &random_vals(&mut rng, 2 * 24, 1.0));
    let r0 = run_decode(p, &spec0, 24, &q).unwrap();
    let r2 = run_decode(p, &spec2, 24, &q).unwrap();
    assert_ne!(r0, r2);
    // Truncate cuts every layer to at most the length.
    m.truncate(p, 9, 19);
    assert_eq!(pool.stats().blocks_used, 3);
    assert_eq!(
        (0..4).map(|l| seq_len(p, 9, l)).collect::<Vec<_>>(),
        vec![19, 0, 19, 19]
    );
    m.check_all(p, &mut rng, "multi-layer after truncate");
}

/// Truncate (mid-block, at a boundary, to 0, beyond the end), appends after
/// truncate, and truncating one of two forked siblings; every format (FP8:
/// re-appended rows get their own scales).
#[test]
fn truncate_releases_blocks_and_keeps_prefix() {
    for &fmt in &ALL_FORMATS {
        let bs = 16;
        let geo = Geo {
            fmt,
            d_qk: d_qk_for(fmt, 33),
            layers: 2,
            bs,
            nb: 24,
        };
        let pool = Pool::new(geo);
        let p = pool.ptr;
        let mut rng = SmallRng::seed_from_u64(fmt as u64 + 100);
        let mut m = Model::new(geo);

        m.create(p, 1);
        m.append(p, &mut rng, 1, 0, 50, MLART_DTYPE_F32);
        m.append(p, &mut rng, 1, 1, 30, MLART_DTYPE_BF16);
        assert_eq!(pool.stats().blocks_used, 4);

        // Past the end: nothing changes.
        m.truncate(p, 1, 1000);
        assert_eq!(pool.stats().blocks_used, 4);
        m.check_all(p, &mut rng, "truncate beyond end");

        // Mid-block.
        m.truncate(p, 1, 37);
        assert_eq!(pool.stats().blocks_used, 3);
        assert_eq!((m.len(1, 0), m.len(1, 1)), (37, 30));
        m.check_all(p, &mut rng, "truncate mid-block");

        // At a block boundary.
        m.truncate(p, 1, 32);
        assert_eq!(pool.stats().blocks_used, 2);
        m.check_all(p, &mut rng, "truncate at boundary");

        // Rows appended after a truncate replace the cut ones; poison rows
        // (NaN) written and then cut away must never be read.
        let nan = vec![f32::NAN; 5 * geo.d_qk];
        m.append_vals(p, 1, 0, MLART_DTYPE_F32, &nan);
        m.append_vals(p, 1, 1, MLART_DTYPE_F32, &nan);
        m.truncate(p, 1, 30);
        m.append(p, &mut rng, 1, 0, 7, MLART_DTYPE_F16);
        m.append(p, &mut rng, 1, 1, 1, MLART_DTYPE_F32);
        assert_eq!((m.len(1, 0), m.len(1, 1)), (37, 31));
        assert_eq!(pool.stats().blocks_used, 3);
        m.check_all(p, &mut rng, "append after truncate");

        // Siblings: truncating one leaves the other alone.
        m.fork(p, 1, 2);
        assert_eq!(pool.stats().blocks_used, 3);
        m.truncate(p, 2, 20);
        // Block 2 is still held by 1: nothing is freed.
        assert_eq!(pool.stats().blocks_used, 3);
        m.check_all(p, &mut rng, "truncated sibling");
        // The child writes into the shared block 1: a copy.
        m.append(p, &mut rng, 2, 0, 4, MLART_DTYPE_F32);
        assert_eq!(pool.stats().blocks_used, 4);
        m.check_all(p, &mut rng, "append to truncated sibling");
        // Truncating the parent to 10 frees its blocks 1 and 2 (the child has
        // its own copy of block 1 and never held block 2 after truncating).
        m.truncate(p, 1, 10);
        assert_eq!(pool.stats().blocks_used, 2);
        m.check_all(p, &mut rng, "truncate parent");
        // Parent appends into block 0, shared with the child: a copy.
        m.append(p, &mut rng, 1, 1, 2, MLART_DTYPE_BF16);
        assert_eq!(pool.stats().blocks_used, 3);
        m.check_all(p, &mut rng, "append to truncated parent");

        // To zero: all the sequence's blocks go, the sequence stays.
        m.truncate(p, 2, 0);
        m.truncate(p, 1, 0);
        let s = pool.stats();
        assert_eq!((s.blocks_used, s.sequences), (0, 2));
        m.check_all(p, &mut rng, "truncate to zero");
        m.append(p, &mut rng, 2, 0, 17, MLART_DTYPE_F32);
        m.check_all(p, &mut rng, "append after truncate to zero");
    }
}

/// A full pool rejects the append that does not fit (including a partial
/// fit and a copy-on-write copy) with POOL_EXHAUSTED, changing nothing.
#[test]
fn exhaustion_fails_cleanly() {
    let bs = 8;
    let geo = Geo {
        fmt: MLART_KV_FORMAT_BF16,
        d_qk: 32,
        layers: 2,
        bs,
        nb: 4,
    };
    let pool = Pool::new(geo);
    let p = pool.ptr;
    let mut rng = SmallRng::seed_from_u64(44);
    let mut m = Model::new(geo);

    m.create(p, 1);
    m.append(p, &mut rng, 1, 0, 20, MLART_DTYPE_F32);
    m.create(p, 2);
    m.append(p, &mut rng, 2, 1, 8, MLART_DTYPE_F32);
    assert_eq!(pool.stats().blocks_free, 0);

    // A fixed decode to compare bit for bit before and after failures.
    let spec = Spec {
        s_q: 2,
        causal: true,
        ..Spec::new(0, &[1, 2], 32)
    };
    let spec1 = Spec::new(1, &[2, 1], 32);
    let (raw0, q0) = m.check_decode(p, &mut rng, &spec, "before");
    let (raw1, q1) = m.check_decode(p, &mut rng, &spec1, "before");
    let snapshot = |m: &Model| {
        m.check_lengths(p);
        let s = stats(p);
        assert_eq!(run_decode(p, &spec, 32, &q0).unwrap(), raw0);
        assert_eq!(run_decode(p, &spec1, 32, &q1).unwrap(), raw1);
        s
    };
    let s0 = snapshot(&m);

    let rows = |n: usize| encode(MLART_DTYPE_F32, &vec![0.25; n * 32]);
    // 5 rows where only 4 slots are left (partial fit): nothing written.
    let r = rows(5);
    expect_err(
        mlart_kv_append(p, 1, 0, 5, MLART_DTYPE_F32, r.as_ptr().cast()),
        MLART_STATUS_POOL_EXHAUSTED,
        "free blocks",
    );
    assert_eq!(snapshot(&m), s0);
    // Layer 1 of seq 2 is at a block boundary: any row needs a new block.
    let r = rows(1);
    expect_err(
        mlart_kv_append(p, 2, 1, 1, MLART_DTYPE_F32, r.as_ptr().cast()),
        MLART_STATUS_POOL_EXHAUSTED,
        "seq_id 2",
    );
    assert_eq!(snapshot(&m), s0);
    // A new sequence cannot get its first block.
    m.create(p, 3);
    expect_err(
        mlart_kv_append(p, 3, 0, 1, MLART_DTYPE_F32, r.as_ptr().cast()),
        MLART_STATUS_POOL_EXHAUSTED,
        "0 are left",
    );
    m.check_lengths(p);

    // Exactly the 4 remaining slots fit.
    m.append(p, &mut rng, 1, 0, 4, MLART_DTYPE_F32);
    assert_eq!(pool.stats().blocks_free, 0);
    m.check_all(p, &mut rng, "filled to the brim");
    m.free(p, 3);

    // Copy-on-write that does not fit: seq 4 forks seq 1 (3 full blocks),
    // seq 1 is truncated into a shared partial block.
    m.fork(p, 1, 4);
    m.truncate(p, 1, 12);
    // 1 holds blocks 0,1 (shared with 4); 4 holds 0,1,2; 2 holds 1 block.
    assert_eq!(pool.stats().blocks_free, 0);
    let (raw_a, q_a) = m.check_decode(p, &mut rng, &Spec::new(0, &[1, 4, 2], 32), "cow");
    let s1 = pool.stats();
    let r = rows(1);
    expect_err(
        mlart_kv_append(p, 1, 0, 1, MLART_DTYPE_F32, r.as_ptr().cast()),
        MLART_STATUS_POOL_EXHAUSTED,
        "needs 1 free blocks but 0 are left",
    );
    assert_eq!(pool.stats(), s1);
    m.check_lengths(p);
    assert_eq!(
        run_decode(p, &Spec::new(0, &[1, 4, 2], 32), 32, &q_a).unwrap(),
        raw_a
    );

    // Free seq 2: one block free. A COW plus a fresh block (2 needed) still
    // fails; the COW alone fits.
    m.free(p, 2);
    assert_eq!(pool.stats().blocks_free, 1);
    let s2 = pool.stats();
    let r = rows(8);
    expect_err(
        mlart_kv_append(p, 1, 0, 8, MLART_DTYPE_F32, r.as_ptr().cast()),
        MLART_STATUS_POOL_EXHAUSTED,
        "needs 2 free blocks but 1 are left",
    );
    assert_eq!(pool.stats(), s2);
    m.check_lengths(p);
    assert_eq!(
        run_decode(p, &Spec::new(0, &[1, 4], 32), 32, &q_a[..2 * 2 * 32 * 4]).unwrap(),
        Raw {
            out: raw_a.out[..2 * 2 * 32 * 4].to_vec(),
            lse_bits: raw_a.lse_bits[..4].to_vec()
        }
    );
    m.append(p, &mut rng, 1, 0, 4, MLART_DTYPE_F32);
    assert_eq!(pool.stats().blocks_free, 0);
    m.check_all(p, &mut rng, "after COW into the last block");
}

/// Freed blocks are reused, and what they held before never shows through
/// (every format).
#[test]
fn reuse_after_free_does_not_leak_stale_rows() {
    for &fmt in &ALL_FORMATS {
        let bs = 16;
        let geo = Geo {
            fmt,
            d_qk: d_qk_for(fmt, 48),
            layers: 2,
            bs,
            nb: 6,
        };
        let pool = Pool::new(geo);
        let p = pool.ptr;
        let mut rng = SmallRng::seed_from_u64(fmt as u64 + 1000);
        let mut m = Model::new(geo);
        // Poison every block: NaN rows and huge values fill the pool.
        m.create(p, 1);
        let nan = vec![f32::NAN; 3 * bs * geo.d_qk];
        m.append_vals(p, 1, 0, MLART_DTYPE_F32, &nan);
        m.append_vals(p, 1, 1, MLART_DTYPE_F32, &nan);
        m.create(p, 2);
        let big = vec![60000.0f32; 3 * bs * geo.d_qk];
        m.append_vals(p, 2, 0, MLART_DTYPE_F32, &big);
        m.append_vals(p, 2, 1, MLART_DTYPE_F32, &big);
        assert_eq!(pool.stats().blocks_free, 0);
        m.free(p, 1);
        m.free(p, 2);
        let s = pool.stats();
        assert_eq!((s.blocks_free, s.sequences), (6, 0));

        // New sequences with partial blocks reuse the poisoned blocks.
        for (id, n0, n1) in [(1u64, 5usize, 0usize), (3, 17, 33), (4, 1, 17)] {
            m.create(p, id);
            if n0 > 0 {
                m.append(p, &mut rng, id, 0, n0, MLART_DTYPE_BF16);
            }
            if n1 > 0 {
                m.append(p, &mut rng, id, 1, n1, MLART_DTYPE_F32);
            }
        }
        assert_eq!(pool.stats().blocks_free, 0);
        m.check_all(p, &mut rng, "reused blocks");
        for layer in 0..2 {
            let spec = Spec {
                s_q: 4,
                causal: true,
                h_q: 3,
                ..Spec::new(layer, &[1, 3, 4], d_v_for(geo.d_qk))
            };
            m.check_decode(p, &mut rng, &spec, "reused blocks, causal");
        }
    }
}

/// A raw pool pointer shared by scoped threads.
#[derive(Clone, Copy)]
struct SharedPool(*mut mlart_kv_pool);

// SAFETY: mlart_kv_pool documents that every function taking a pool may be
// called concurrently from any threads (mutations are serialized inside);
// the pool is freed only after all threads using this pointer are joined.
unsafe impl Send for SharedPool {}
// SAFETY: as above; the pointer itself is never written through here.
unsafe impl Sync for SharedPool {}

impl SharedPool {
    fn get(self) -> *mut mlart_kv_pool {
        self.0
    }
}

/// Four threads on one pool, each with its own sequences: three append and
/// decode, one also forks, truncates, frees and recreates. Every decode
/// must match its thread's reference.
#[test]
fn concurrent_sequences_on_one_pool() {
    let geo = Geo {
        fmt: MLART_KV_FORMAT_BF16,
        d_qk: 64,
        layers: 2,
        bs: 16,
        nb: 240,
    };
    let pool = Pool::new(geo);
    let shared = SharedPool(pool.ptr);
    let iterations = 150;
    let start = std::sync::Barrier::new(4);
    let start = &start;
    let models: Vec<Model> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                scope.spawn(move || {
                    let p = shared.get();
                    start.wait();
                    let mut rng = SmallRng::seed_from_u64(9000 + t);
                    let mut m = Model::new(geo);
                    let base = (t + 1) << 32;
                    let mut next = base;
                    let mut fresh = || {
                        next += 1;
                        next
                    };
                    for _ in 0..2 {
                        let id = fresh();
                        m.create(p, id);
                    }
                    for it in 0..iterations {
                        let ids: Vec<u64> = m.seqs.keys().copied().collect();
                        let id = ids[rng.random_range(0..ids.len())];
                        let layer = rng.random_range(0..2);
                        if t == 3 {
                            match rng.random_range(0..5) {
                                0 if ids.len() < 4 => {
                                    let dst = fresh();
                                    m.fork(p, id, dst);
                                }
                                1 => {
                                    let len = m.len(id, 0).max(m.len(id, 1));
                                    let to = rng.random_range(0..=len);
                                    m.truncate(p, id, to);
                                }
                                2 if ids.len() > 1 => m.free(p, id),
                                3 if ids.len() < 4 => {
                                    let id = fresh();
                                    m.create(p, id);
                                }
                                _ => {}
                            }
                        }
                        if let Some(&id) = m.seqs.keys().nth(it % m.seqs.len()) {
                            if m.len(id, layer) < 200 {
                                let n = rng.random_range(1..=9);
                                let dtype = DTYPES[rng.random_range(0..3)];
                                m.append(p, &mut rng, id, layer, n, dtype);
                            }
                        }
                        let mut ids: Vec<u64> = m.seqs.keys().copied().collect();
                        ids.push(ids[0]);
                        let spec = Spec {
                            s_q: 1 + it % 3,
                            h_q: 4,
                            causal: it % 2 == 0,
                            q_dtype: DTYPES[it % 3],
                            out_dtype: DTYPES[(it / 3) % 3],
                            ..Spec::new(layer, &ids, 64)
                        };
                        m.check_decode(p, &mut rng, &spec, &format!("thread {t} iteration {it}"));
                        m.check_lengths(p);
                    }
                    m
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    });
    let live: usize = models.iter().map(|m| m.seqs.len()).sum();
    assert_eq!(pool.stats().sequences, live as i64);
    // Single-threaded recheck of the final state, then no leaked blocks.
    let mut rng = SmallRng::seed_from_u64(1);
    for mut m in models {
        m.check_all(pool.ptr, &mut rng, "after the threads");
        for id in m.seqs.keys().copied().collect::<Vec<_>>() {
            m.free(pool.ptr, id);
        }
    }
    let s = pool.stats();
    assert_eq!((s.blocks_used, s.sequences), (0, 0));
}

/// Every rejected call names the problem with the right status and leaves
/// the pool and the out-parameters untouched.
#[test]
fn error_paths_change_nothing() {
    let geo = Geo {
        fmt: MLART_KV_FORMAT_BF16,
        d_qk: 72,
        layers: 2,
        bs: 16,
        nb: 8,
    };
    let engine = Engine::new();
    let mut p: *mut mlart_kv_pool = ptr::null_mut();
    ok(mlart_kv_pool_create(engine.0, &geo.options(), &mut p));
    let pool = Pool { ptr: p };
    let mut rng = SmallRng::seed_from_u64(5);
    let mut m = Model::new(geo);
    m.create(p, 1);
    m.append(p, &mut rng, 1, 0, 20, MLART_DTYPE_F32);
    m.append(p, &mut rng, 1, 1, 5, MLART_DTYPE_F32);
    m.create(p, 2);
    let s0 = pool.stats();
    let unchanged = |what: &str| {
        assert_eq!(stats(p), s0, "stats changed by {what}");
        m.check_lengths(p);
        for missing in [99u64, 100] {
            let mut n = -3;
            expect_err(
                mlart_kv_seq_length(p, missing, 0, &mut n),
                MLART_STATUS_NOT_FOUND,
                "is not a sequence",
            );
            assert_eq!(n, -3);
        }
    };
    let row = encode(MLART_DTYPE_F32, &vec![0.5; 72]);
    let rowp: *const c_void = row.as_ptr().cast();

    // Unknown sequence ids.
    expect_err(
        mlart_kv_append(p, 99, 0, 1, MLART_DTYPE_F32, rowp),
        MLART_STATUS_NOT_FOUND,
        "seq_id = 99",
    );
    expect_err(
        mlart_kv_append(p, 99, 0, 0, MLART_DTYPE_F32, rowp),
        MLART_STATUS_NOT_FOUND,
        "seq_id = 99",
    );
    unchanged("append to unknown seq");
    let mut n = -3i64;
    expect_err(
        mlart_kv_seq_length(p, 99, 0, &mut n),
        MLART_STATUS_NOT_FOUND,
        "seq_id = 99",
    );
    assert_eq!(n, -3);
    expect_err(
        mlart_kv_seq_free(p, 99),
        MLART_STATUS_NOT_FOUND,
        "seq_id = 99",
    );
    expect_err(
        mlart_kv_seq_fork(p, 99, 100),
        MLART_STATUS_NOT_FOUND,
        "seq_id = 99",
    );
    expect_err(
        mlart_kv_seq_truncate(p, 99, 0),
        MLART_STATUS_NOT_FOUND,
        "seq_id = 99",
    );
    unchanged("unknown seq ops");

    // Duplicates.
    expect_err(
        mlart_kv_seq_create(p, 1),
        MLART_STATUS_INVALID_ARGUMENT,
        "seq_id = 1 already exists",
    );
    expect_err(
        mlart_kv_seq_fork(p, 2, 1),
        MLART_STATUS_INVALID_ARGUMENT,
        "seq_id = 1 already exists",
    );
    expect_err(
        mlart_kv_seq_fork(p, 1, 1),
        MLART_STATUS_INVALID_ARGUMENT,
        "already exists",
    );
    expect_err(
        mlart_kv_seq_fork(p, 99, 2),
        MLART_STATUS_INVALID_ARGUMENT,
        "already exists",
    );
    unchanged("duplicates");

    // Layers out of range.
    expect_err(
        mlart_kv_append(p, 1, 5, 1, MLART_DTYPE_F32, rowp),
        MLART_STATUS_INVALID_ARGUMENT,
        "layer = 5 is outside [0, 2)",
    );
    expect_err(
        mlart_kv_append(p, 1, -1, 1, MLART_DTYPE_F32, rowp),
        MLART_STATUS_INVALID_ARGUMENT,
        "layer = -1 is outside [0, 2)",
    );
    expect_err(
        mlart_kv_seq_length(p, 1, 2, &mut n),
        MLART_STATUS_INVALID_ARGUMENT,
        "layer = 2 is outside [0, 2)",
    );
    assert_eq!(n, -3);
    unchanged("bad layer");

    // Bad append arguments.
    expect_err(
        mlart_kv_append(p, 1, 0, -1, MLART_DTYPE_F32, rowp),
        MLART_STATUS_INVALID_ARGUMENT,
        "n_tokens = -1",
    );
    expect_err(
        mlart_kv_append(p, 1, 0, 1, MLART_DTYPE_F32, ptr::null()),
        MLART_STATUS_NULL_POINTER,
        "rows",
    );
    expect_err(
        mlart_kv_append(p, 1, 0, 1, 7, rowp),
        MLART_STATUS_INVALID_ARGUMENT,
        "dtype = 7",
    );
    expect_err(
        mlart_kv_append(p, 1, 0, 1, MLART_DTYPE_FP8_E4M3, rowp),
        MLART_STATUS_UNSUPPORTED,
        "dtype",
    );
    expect_err(
        mlart_kv_seq_truncate(p, 1, -1),
        MLART_STATUS_INVALID_ARGUMENT,
        "-1",
    );
    unchanged("bad append/truncate");

    // NULL pool everywhere.
    let null = ptr::null_mut::<mlart_kv_pool>();
    let mut st = empty_stats();
    expect_err(
        mlart_kv_pool_stats_get(null, &mut st),
        MLART_STATUS_NULL_POINTER,
        "pool",
    );
    assert_eq!(st.blocks_total, 0);
    expect_err(
        mlart_kv_seq_create(null, 1),
        MLART_STATUS_NULL_POINTER,
        "pool",
    );
    expect_err(
        mlart_kv_seq_free(null, 1),
        MLART_STATUS_NULL_POINTER,
        "pool",
    );
    expect_err(
        mlart_kv_seq_fork(null, 1, 3),
        MLART_STATUS_NULL_POINTER,
        "pool",
    );
    expect_err(
        mlart_kv_seq_truncate(null, 1, 0),
        MLART_STATUS_NULL_POINTER,
        "pool",
    );
    expect_err(
        mlart_kv_seq_length(null, 1, 0, &mut n),
        MLART_STATUS_NULL_POINTER,
        "pool",
    );
    assert_eq!(n, -3);
    expect_err(
        mlart_kv_append(null, 1, 0, 1, MLART_DTYPE_F32, rowp),
        MLART_STATUS_NULL_POINTER,
        "pool",
    );
    let ids = [1u64, 2];
    let q = encode(MLART_DTYPE_F32, &vec![0.1; 2 * 2 * 72]);
    let mut out = vec![0x5Au8; 2 * 2 * 64 * 4];
    let mut lse = vec![7.0f32; 2 * 2];
    let mut args = decode_args();
    args.batch = 2;
    args.seq_ids = ids.as_ptr();
    args.h_q = 2;
    args.d_v = 64;
    args.q_dtype = MLART_DTYPE_F32;
    args.out_dtype = MLART_DTYPE_F32;
    args.q = q.as_ptr().cast();
    args.out = out.as_mut_ptr().cast();
    args.lse = lse.as_mut_ptr();
    expect_err(
        mlart_kv_pool_decode(null, &args),
        MLART_STATUS_NULL_POINTER,
        "pool",
    );
    mlart_kv_pool_free(null);
    mlart_error_free(ptr::null_mut());
    assert_eq!(mlart_error_code(ptr::null()), MLART_STATUS_OK);
    unchanged("NULL pool");
    // The stats out-param and length out-param must be non-NULL and sized.
    expect_err(
        mlart_kv_pool_stats_get(p, ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        "out",
    );
    let mut st = empty_stats();
    st.struct_size += 8;
    expect_err(
        mlart_kv_pool_stats_get(p, &mut st),
        MLART_STATUS_INVALID_ARGUMENT,
        "struct_size",
    );
    assert_eq!(st.blocks_total, 0);
    expect_err(
        mlart_kv_seq_length(p, 1, 0, ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        "out_length",
    );
    unchanged("bad out-params");

    // Decode errors: nothing is written to out or lse.
    let out0 = out.clone();
    let lse0: Vec<u32> = lse.iter().map(|v| v.to_bits()).collect();
    let ids_bad = [1u64, 99];
    // Sparse arguments for batch 2 (seq 1: 20 tokens in layer 0, 5 in layer
    // 1; seq 2: empty), s_q 1, topk 2.
    let good = [19i32, -1, -1, -1];
    let layer1_bad = [4i32, 5, -1, -1];
    let lengths = [1i32, 0];
    let nan_sink = [0.0f32, f32::NAN];
    type Edit = Box<dyn Fn(&mut mlart_kv_pool_decode_args)>;
    let sparse = |ind: [i32; 4], len: Option<[i32; 2]>| -> Edit {
        Box::new(move |a| {
            a.indices = ind.as_ptr();
            a.topk = 2;
            if let Some(l) = &len {
                a.topk_length = l.as_ptr();
            }
        })
    };
    let cases: Vec<(&str, Edit, mlart_status, &str)> = vec![
        (
            "unknown id",
            Box::new(move |a| a.seq_ids = ids_bad.as_ptr()),
            MLART_STATUS_NOT_FOUND,
            "seq_ids[1] = 99",
        ),
        (
            "layer",
            Box::new(|a| a.layer = 5),
            MLART_STATUS_INVALID_ARGUMENT,
            "layer = 5 is outside [0, 2)",
        ),
        (
            "d_v > d_qk",
            Box::new(|a| a.d_v = 80),
            MLART_STATUS_INVALID_ARGUMENT,
            "d_v = 80 exceeds d_qk = 72",
        ),
        (
            "NULL seq_ids",
            Box::new(|a| a.seq_ids = ptr::null()),
            MLART_STATUS_NULL_POINTER,
            "seq_ids",
        ),
        (
            "topk 0",
            Box::new(move |a| {
                a.indices = good.as_ptr();
                a.topk = 0;
            }),
            MLART_STATUS_INVALID_ARGUMENT,
            "topk = 0 must be >= 1",
        ),
        (
            "topk < 0",
            Box::new(move |a| {
                a.indices = good.as_ptr();
                a.topk = -3;
            }),
            MLART_STATUS_INVALID_ARGUMENT,
            "topk = -3 must be >= 1",
        ),
        (
            "index = length",
            sparse([20, -1, -1, -1], None),
            MLART_STATUS_INVALID_ARGUMENT,
            "indices[0][0][0] = 20 is outside [-1, 20) (seq_ids[0] = 1 holds 20 tokens in layer 0)",
        ),
        (
            "index into an empty sequence",
            sparse([0, 19, 0, -1], None),
            MLART_STATUS_INVALID_ARGUMENT,
            "indices[1][0][0] = 0 is outside [-1, 0) (seq_ids[1] = 2 holds 0 tokens in layer 0)",
        ),
        (
            "index past the layer's length",
            Box::new(move |a| {
                a.layer = 1;
                a.indices = layer1_bad.as_ptr();
                a.topk = 2;
            }),
            MLART_STATUS_INVALID_ARGUMENT,
            "indices[0][0][1] = 5 is outside [-1, 5) (seq_ids[0] = 1 holds 5 tokens in layer 1)",
        ),
        (
            "index -2",
            sparse([3, -2, -1, -1], None),
            MLART_STATUS_INVALID_ARGUMENT,
            "indices[0][0][1] = -2 is outside [-1, 20)",
        ),
        (
            "index i32::MIN",
            sparse([-1, -1, -1, i32::MIN], None),
            MLART_STATUS_INVALID_ARGUMENT,
            "indices[1][0][1] = -2147483648 is outside [-1, 0)",
        ),
        (
            "bad index within topk_length",
            sparse([19, 999, -1, 0], Some([1, 2])),
            MLART_STATUS_INVALID_ARGUMENT,
            "indices[1][0][1] = 0 is outside [-1, 0)",
        ),
        (
            "topk_length > topk",
            sparse(good, Some([3, 0])),
            MLART_STATUS_INVALID_ARGUMENT,
            "topk_length[0] = 3 is outside [0, 2]",
        ),
        (
            "topk_length < 0",
            sparse(good, Some([0, -1])),
            MLART_STATUS_INVALID_ARGUMENT,
            "topk_length[1] = -1 is outside [0, 2]",
        ),
        (
            "causal with indices",
            Box::new(move |a| {
                a.indices = good.as_ptr();
                a.topk = 2;
                a.causal = true;
            }),
            MLART_STATUS_INVALID_ARGUMENT,
            "causal = true with indices",
        ),
        (
            "topk_length without indices",
            Box::new(move |a| a.topk_length = lengths.as_ptr()),
            MLART_STATUS_INVALID_ARGUMENT,
            "topk_length is set but indices is NULL",
        ),
        (
            "NaN attn_sink",
            Box::new(move |a| a.attn_sink = nan_sink.as_ptr()),
            MLART_STATUS_INVALID_ARGUMENT,
            "attn_sink[1] = NaN",
        ),
        (
            "NaN attn_sink, sparse",
            Box::new(move |a| {
                a.indices = good.as_ptr();
                a.topk = 2;
                a.attn_sink = nan_sink.as_ptr();
            }),
            MLART_STATUS_INVALID_ARGUMENT,
            "attn_sink[1] = NaN",
        ),
        (
            "NULL seq_ids, sparse",
            Box::new(move |a| {
                a.indices = good.as_ptr();
                a.topk = 2;
                a.seq_ids = ptr::null();
            }),
            MLART_STATUS_NULL_POINTER,
            "seq_ids",
        ),
        (
            "device memory",
            Box::new(|a| a.memory = MLART_MEMORY_DEVICE),
            MLART_STATUS_UNSUPPORTED,
            "memory",
        ),
        (
            "bad memory",
            Box::new(|a| a.memory = 7),
            MLART_STATUS_INVALID_ARGUMENT,
            "memory = 7",
        ),
        (
            "struct_size",
            Box::new(|a| a.struct_size -= 8),
            MLART_STATUS_INVALID_ARGUMENT,
            "args->struct_size",
        ),
        (
            "batch 0",
            Box::new(|a| a.batch = 0),
            MLART_STATUS_INVALID_ARGUMENT,
            "batch = 0",
        ),
        (
            "h_q 0",
            Box::new(|a| a.h_q = 0),
            MLART_STATUS_INVALID_ARGUMENT,
            "h_q = 0",
        ),
        (
            "s_q 0",
            Box::new(|a| a.s_q = 0),
            MLART_STATUS_INVALID_ARGUMENT,
            "s_q = 0",
        ),
        (
            "d_v 0",
            Box::new(|a| a.d_v = 0),
            MLART_STATUS_INVALID_ARGUMENT,
            "d_v = 0",
        ),
        (
            "q_dtype",
            Box::new(|a| a.q_dtype = 9),
            MLART_STATUS_INVALID_ARGUMENT,
            "q_dtype = 9",
        ),
        (
            "out_dtype fp8",
            Box::new(|a| a.out_dtype = MLART_DTYPE_FP8_E4M3),
            MLART_STATUS_UNSUPPORTED,
            "out_dtype",
        ),
        (
            "NaN scale",
            Box::new(|a| a.softmax_scale = f32::NAN),
            MLART_STATUS_INVALID_ARGUMENT,
            "softmax_scale",
        ),
        (
            "NULL q",
            Box::new(|a| a.q = ptr::null()),
            MLART_STATUS_NULL_POINTER,
            "q is NULL",
        ),
        (
            "NULL out",
            Box::new(|a| a.out = ptr::null_mut()),
            MLART_STATUS_NULL_POINTER,
            "out is NULL",
        ),
        (
            "lse aliases out",
            Box::new(|a| a.lse = a.out.cast()),
            MLART_STATUS_INVALID_ARGUMENT,
            "overlaps",
        ),
    ];
    for (what, edit, status, needle) in cases {
        let mut a = args;
        edit(&mut a);
        expect_err(mlart_kv_pool_decode(p, &a), status, needle);
        assert_eq!(out, out0, "{what}: out was written");
        assert_eq!(
            lse.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            lse0,
            "{what}: lse was written"
        );
        unchanged(what);
    }
    expect_err(
        mlart_kv_pool_decode(p, ptr::null()),
        MLART_STATUS_NULL_POINTER,
        "args",
    );
    assert_eq!(out, out0);
    // lse may not alias an input of the sparse path either.
    let mut shared = vec![0.0f32; 8];
    for (what, edit) in [("attn_sink", 0), ("indices", 1), ("topk_length", 2)] {
        let mut a = args;
        a.lse = shared.as_mut_ptr();
        a.indices = good.as_ptr();
        a.topk = 2;
        match edit {
            0 => a.attn_sink = shared.as_ptr(),
            1 => a.indices = shared.as_ptr().cast(),
            _ => a.topk_length = shared.as_ptr().cast(),
        }
        expect_err(
            mlart_kv_pool_decode(p, &a),
            MLART_STATUS_INVALID_ARGUMENT,
            &format!("lse overlaps {what}"),
        );
        assert!(shared.iter().all(|&v| v == 0.0), "{what}: lse written");
        assert_eq!(out, out0, "{what}: out was written");
        unchanged(what);
    }

    // The unmodified arguments do work (so each case above failed on its
    // own defect), and so do their sparse forms; entries past topk_length
    // are not read, so they may hold anything.
    ok(mlart_kv_pool_decode(p, &args));
    assert_ne!(out, out0);
    for layer in 0..2 {
        for (indices, topk_length) in [
            (vec![4, -1, -1, -1], None),
            (vec![0, 4, -1, -1], None),
            (vec![4, 4, -1, -1], Some(vec![2, 0])),
            (vec![3, 999, i32::MIN, 7], Some(vec![1, 0])),
        ] {
            let spec = Spec {
                indices: Some(indices),
                topk: 2,
                topk_length,
                sink: Some(vec![0.5, f32::NEG_INFINITY]),
                ..Spec::new(layer, &[1, 2], 64)
            };
            m.check_decode(p, &mut rng, &spec, "sparse after errors");
        }
    }
    unchanged("good sparse decodes");

    // Pool creation options.
    let sentinel = std::ptr::NonNull::<mlart_kv_pool>::dangling().as_ptr();
    type OptEdit = fn(&mut mlart_kv_pool_options);
    let opt_cases: Vec<(OptEdit, mlart_status, &str)> = vec![
        (
            |o| o.num_blocks = 0,
            MLART_STATUS_INVALID_ARGUMENT,
            "options->num_blocks = 0 must be >= 1",
        ),
        (
            |o| o.block_size = 0,
            MLART_STATUS_INVALID_ARGUMENT,
            "options->block_size = 0 must be >= 1",
        ),
        (
            |o| o.d_qk = 0,
            MLART_STATUS_INVALID_ARGUMENT,
            "options->d_qk = 0 must be >= 1",
        ),
        (
            |o| o.d_qk = 2000,
            MLART_STATUS_INVALID_ARGUMENT,
            "d_qk = 2000",
        ),
        (
            |o| o.num_layers = 0,
            MLART_STATUS_INVALID_ARGUMENT,
            "options->num_layers = 0",
        ),
        (
            |o| o.num_layers = -4,
            MLART_STATUS_INVALID_ARGUMENT,
            "num_layers = -4",
        ),
        (
            |o| o.kv_format = 9,
            MLART_STATUS_INVALID_ARGUMENT,
            "options->kv_format = 9",
        ),
        (
            |o| o.kv_format = MLART_KV_FORMAT_FP8_V32,
            MLART_STATUS_INVALID_ARGUMENT,
            "kv_format = fp8_v32 stores rows of d_qk = 576, but d_qk = 72",
        ),
        (
            |o| o.kv_format = MLART_KV_FORMAT_FP8_MODEL1,
            MLART_STATUS_INVALID_ARGUMENT,
            "kv_format = fp8_model1 stores rows of d_qk = 512, but d_qk = 72",
        ),
        (
            |o| {
                o.kv_format = MLART_KV_FORMAT_FP8_V32;
                o.d_qk = 512;
            },
            MLART_STATUS_INVALID_ARGUMENT,
            "d_qk = 576, but d_qk = 512",
        ),
        (
            |o| {
                o.kv_format = MLART_KV_FORMAT_FP8_MODEL1;
                o.d_qk = 576;
            },
            MLART_STATUS_INVALID_ARGUMENT,
            "d_qk = 512, but d_qk = 576",
        ),
        (
            |o| o.kv_format = 5,
            MLART_STATUS_INVALID_ARGUMENT,
            "options->kv_format = 5",
        ),
        (
            |o| o.struct_size = 4,
            MLART_STATUS_INVALID_ARGUMENT,
            "options->struct_size = 4",
        ),
        (
            |o| o.struct_size += 4,
            MLART_STATUS_INVALID_ARGUMENT,
            "struct_size",
        ),
    ];
    for (edit, status, needle) in opt_cases {
        let mut o = geo.options();
        edit(&mut o);
        let mut out = sentinel;
        expect_err(mlart_kv_pool_create(engine.0, &o, &mut out), status, needle);
        assert_eq!(out, sentinel, "out written on error {needle}");
    }
    let mut out = sentinel;
    expect_err(
        mlart_kv_pool_create(engine.0, ptr::null(), &mut out),
        MLART_STATUS_NULL_POINTER,
        "options",
    );
    expect_err(
        mlart_kv_pool_create(ptr::null_mut(), &geo.options(), &mut out),
        MLART_STATUS_NULL_POINTER,
        "engine",
    );
    assert_eq!(out, sentinel);
    expect_err(
        mlart_kv_pool_create(engine.0, &geo.options(), ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        "out",
    );
    // Default options need num_blocks.
    let mut o = geo.options();
    mlart_kv_pool_options_init(&mut o);
    expect_err(
        mlart_kv_pool_create(engine.0, &o, &mut out),
        MLART_STATUS_INVALID_ARGUMENT,
        "num_blocks",
    );
    assert_eq!(out, sentinel);
    unchanged("pool creation errors");
    m.check_all(p, &mut rng, "after all errors");
}

/// FP8 pools (both layouts, block sizes 1, 16, 64) fed F32 and BF16 rows:
/// every decode matches the reference on this file's own quantization of
/// the rows exactly (f32 in and out: 1e-5), and the rows as appended within
/// `FP8_TOL`; the pool reports FlashMLA's block sizes.
#[test]
fn fp8_append_then_decode_matches_reference() {
    for (fi, &fmt) in FP8_FORMATS.iter().enumerate() {
        for (di, &in_dtype) in [MLART_DTYPE_F32, MLART_DTYPE_BF16].iter().enumerate() {
            for &bs in &[1usize, 16, 64] {
                let mut rng = SmallRng::seed_from_u64((7000 + fi * 100 + di * 10 + bs) as u64);
                let d_qk = d_qk_for(fmt, 0);
                // (id, layer-0 length, layer-1 length).
                let plan: Vec<(u64, usize, usize)> = vec![
                    (7, 0, 3),
                    (1, 1, 0),
                    (3, bs.saturating_sub(1).max(2), 21),
                    (4, bs, 1),
                    (5, bs + 1, 2 * bs),
                    (6, 45, 9),
                ];
                let geo = Geo {
                    fmt,
                    d_qk,
                    layers: 2,
                    bs,
                    nb: 0,
                };
                // Pool::new checks the stats' block bytes against FlashMLA's.
                let (pool, mut m, nb) =
                    filled_pool(geo, &plan, 2, &mut rng, 11, in_dtype, varied_rows);
                let p = pool.ptr;
                assert_eq!(pool.stats().blocks_used as usize, nb);

                let all: Vec<u64> = plan.iter().map(|p| p.0).collect();
                for layer in 0..2 {
                    let ctx = format!("fmt {fmt} in {in_dtype} bs {bs} layer {layer}");
                    let spec = Spec {
                        h_q: 3,
                        ..Spec::new(layer, &all, d_v_for(d_qk))
                    };
                    m.check_decode(p, &mut rng, &spec, &ctx);
                    // MTP, causal, bf16, V = the whole row (rope included).
                    let spec = Spec {
                        ids: vec![5, 6, 5, 7],
                        s_q: 3,
                        h_q: 2,
                        d_v: d_qk,
                        scale: 0.03,
                        causal: true,
                        q_dtype: MLART_DTYPE_BF16,
                        out_dtype: MLART_DTYPE_BF16,
                        ..Spec::new(layer, &[], 0)
                    };
                    m.check_decode(p, &mut rng, &spec, &ctx);
                    // f32 queries, f16 output, attention sink, no lse.
                    let spec = Spec {
                        ids: vec![3, 1, 4],
                        h_q: 5,
                        d_v: 64,
                        out_dtype: MLART_DTYPE_F16,
                        with_lse: false,
                        sink: Some(sinks(5)),
                        ..Spec::new(layer, &[], 0)
                    };
                    m.check_decode(p, &mut rng, &spec, &ctx);
                }
                for &(id, _, _) in &plan {
                    m.free(p, id);
                }
                assert_eq!(pool.stats().blocks_used, 0);
            }
        }
    }
}

/// One appended row of an FP8 pool holds exactly what `mlart_kv_dequantize`
/// makes of `mlart_kv_quantize`'s block for that row, and what this file's
/// quantizer computes: the three agree, so the tight checks above compare
/// against the library's own format.
#[test]
fn fp8_quantizer_agrees_with_the_library() {
    use mlart::ffi::format::{mlart_kv_block_bytes, mlart_kv_dequantize, mlart_kv_quantize};
    for &fmt in &FP8_FORMATS {
        let geo = Geo {
            fmt,
            d_qk: d_qk_for(fmt, 0),
            layers: 1,
            bs: 1,
            nb: 1,
        };
        let d = geo.d_qk;
        let mut rng = SmallRng::seed_from_u64(fmt as u64);
        let mut bytes = 0usize;
        ok(mlart_kv_block_bytes(fmt, d as i32, 1, &mut bytes));
        assert_eq!(bytes, geo.block_bytes());
        for n in 0..40 {
            let mut row = varied_rows(&mut rng, &geo, 1);
            if n == 0 {
                // Saturation and exact ties.
                row[0] = 1e6;
                row[1] = -1e6;
            }
            let mut block = vec![0u8; bytes];
            ok(mlart_kv_quantize(
                fmt,
                d as i32,
                1,
                1,
                MLART_DTYPE_F32,
                row.as_ptr().cast(),
                block.as_mut_ptr().cast(),
            ));
            let mut back = vec![0f32; d];
            ok(mlart_kv_dequantize(
                fmt,
                d as i32,
                1,
                1,
                block.as_ptr().cast(),
                MLART_DTYPE_F32,
                back.as_mut_ptr().cast(),
            ));
            let mine = fp8_stored_row(fmt, &row);
            for (i, (a, b)) in mine.iter().zip(&back).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "fmt {fmt} row {n} [{i}]: {a} vs {b}"
                );
            }
        }
    }
}

/// Fork of FP8 sequences: diverging appends into a shared partial block copy
/// it (for MODEL1 with its per-block scale area), each side decodes to its
/// own rows, and the other side's decode stays bit for bit the same.
#[test]
fn fp8_fork_copy_on_write_keeps_both_sides() {
    for &fmt in &FP8_FORMATS {
        for &bs in &[16usize, 5] {
            let geo = Geo {
                fmt,
                d_qk: d_qk_for(fmt, 0),
                layers: 2,
                bs,
                nb: 24,
            };
            let pool = Pool::new(geo);
            let p = pool.ptr;
            let mut rng = SmallRng::seed_from_u64(fmt as u64 * 31 + bs as u64);
            let mut m = Model::new(geo);
            let add = |m: &mut Model, rng: &mut SmallRng, id: u64, layer: usize, n: usize| {
                let vals = varied_rows(rng, &geo, n);
                m.append_vals(p, id, layer, MLART_DTYPE_F32, &vals);
            };
            // 37 tokens in layer 0 (tail block ceil(37 / bs) - 1, partial) and
            // bs + 2 in layer 1 (tail block 1, partial).
            let used = || pool.stats().blocks_used as usize;
            m.create(p, 1);
            add(&mut m, &mut rng, 1, 0, 37);
            add(&mut m, &mut rng, 1, 1, bs + 2);
            let held = 37usize.div_ceil(bs);
            assert_eq!(used(), held);
            m.fork(p, 1, 2);
            assert_eq!(used(), held);

            let spec = |layer: usize, id: u64| Spec {
                s_q: 2,
                h_q: 3,
                ..Spec::new(layer, &[id], d_v_for(geo.d_qk))
            };
            let snapshot = |m: &Model, rng: &mut SmallRng, id: u64, ctx: &str| {
                [0, 1].map(|layer| m.check_decode(p, rng, &spec(layer, id), ctx))
            };
            let same = |before: &[(Raw, Vec<u8>); 2], id: u64, ctx: &str| {
                for (layer, (raw, q)) in before.iter().enumerate() {
                    let now = run_decode(p, &spec(layer, id), geo.d_qk, q).unwrap();
                    assert!(now == *raw, "{ctx}: seq {id} layer {layer} changed");
                }
            };

            // The child writes into the shared partial tail block of layer
            // 0: one copy, plus fresh blocks past it.
            let parent = snapshot(&m, &mut rng, 1, "parent before");
            add(&mut m, &mut rng, 2, 0, 6);
            assert_eq!(used(), 43usize.div_ceil(bs) + 1, "copy of the tail block");
            same(&parent, 1, "after the child's append");
            let child = snapshot(&m, &mut rng, 2, "child after its append");
            // The parent goes on in its tail block, its own again: in place.
            add(&mut m, &mut rng, 1, 0, 3);
            assert_eq!(used(), 43usize.div_ceil(bs) + 1, "no copy");
            same(&child, 2, "after the parent's append");
            // The parent writes into layer 1's tail, block 1, still shared: a
            // copy that must carry layer 0's full block 1 (rows and scales).
            add(&mut m, &mut rng, 1, 1, 1);
            assert_eq!(used(), 43usize.div_ceil(bs) + 2, "copy of block 1");
            same(&child, 2, "after the parent's layer-1 append");
            m.check_all(p, &mut rng, "both sides");

            // Truncate the child back into block 1 (its own now) and
            // re-append: new rows with new scales, the parent untouched.
            let parent = snapshot(&m, &mut rng, 1, "parent before truncate");
            m.truncate(p, 2, bs + 1);
            add(&mut m, &mut rng, 2, 0, bs + 4);
            add(&mut m, &mut rng, 2, 1, 2);
            // Parent: ceil(40 / bs) blocks; child: block 0 shared, 2 of its own.
            assert_eq!(used(), 40usize.div_ceil(bs) + 2);
            same(&parent, 1, "after the child's truncate + append");
            m.check_all(p, &mut rng, "after truncate + re-append");

            for id in [1, 2] {
                m.free(p, id);
            }
            assert_eq!(pool.stats().blocks_used, 0);
        }
    }
}

/// Sparse pool decode on every format: per query, random logical positions
/// (-1 entries, duplicates), with and without `topk_length` (0 and `topk`
/// included; entries past it hold garbage that must not be read), finite,
/// +inf and -inf sinks, repeated ids, every dtype; then after a fork, whose
/// child's positions land in blocks shared with the parent and in its own
/// copies.
#[test]
fn sparse_pool_decode_matches_reference() {
    for (fi, &fmt) in ALL_FORMATS.iter().enumerate() {
        let d_qk = d_qk_for(fmt, 80);
        let bs = [16usize, 1, 64, 16, 5][fi];
        let mut rng = SmallRng::seed_from_u64(500 + fi as u64);
        // (id, layer-0 length, layer-1 length).
        let plan: [(u64, usize, usize); 5] =
            [(1, 0, 3), (2, 1, 0), (3, 17, 40), (4, 70, 9), (5, 33, 33)];
        let nb: usize = plan.iter().map(|p| blocks_for(&[p.1, p.2], bs)).sum();
        let geo = Geo {
            fmt,
            d_qk,
            layers: 2,
            bs,
            nb: nb + 90 / bs + 2,
        };
        let pool = Pool::new(geo);
        let p = pool.ptr;
        let mut m = Model::new(geo);
        for (k, &(id, l0, l1)) in plan.iter().enumerate() {
            m.create(p, id);
            for (layer, n) in [(0, l0), (1, l1)] {
                let mut left = n;
                while left > 0 {
                    let c = rng.random_range(1..=29usize).min(left);
                    let vals = varied_rows(&mut rng, &geo, c);
                    m.append_vals(p, id, layer, DTYPES[(k + layer + left) % 3], &vals);
                    left -= c;
                }
            }
        }
        let all: Vec<u64> = plan.iter().map(|p| p.0).collect();
        let check = |m: &Model, rng: &mut SmallRng, ids: &[u64], ctx: &str| {
            for layer in 0..2 {
                let ctx = format!("fmt {fmt} bs {bs} layer {layer}: {ctx}");
                let spec = m.sparse_spec(rng, layer, ids, 2, 3, 24, false, false);
                m.check_decode(p, rng, &spec, &ctx);
                let spec = Spec {
                    q_dtype: MLART_DTYPE_BF16,
                    out_dtype: MLART_DTYPE_BF16,
                    ..m.sparse_spec(rng, layer, ids, 1, 5, 7, true, true)
                };
                m.check_decode(p, rng, &spec, &ctx);
                let mut rep = ids.to_vec();
                rep.extend(ids.iter().rev());
                let spec = Spec {
                    q_dtype: MLART_DTYPE_F16,
                    out_dtype: MLART_DTYPE_F32,
                    with_lse: false,
                    scale: 0.1,
                    ..m.sparse_spec(rng, layer, &rep, 3, 4, 64, true, true)
                };
                m.check_decode(p, rng, &spec, &ctx);
            }
        };
        check(&m, &mut rng, &all, "all sequences");

        // Fork seq 4; child and parent diverge in the tail block they shared
        // (a copy, unless 70 is a multiple of bs) and grow past it.
        m.fork(p, 4, 40);
        let add = |m: &mut Model, rng: &mut SmallRng, id: u64, layer: usize, n: usize| {
            let vals = varied_rows(rng, &geo, n);
            m.append_vals(p, id, layer, MLART_DTYPE_F32, &vals);
        };
        add(&mut m, &mut rng, 40, 0, 9);
        add(&mut m, &mut rng, 40, 1, 4);
        add(&mut m, &mut rng, 4, 0, 2);
        check(&m, &mut rng, &[4, 40, 3], "after fork");
        // Sparse over the child only, every position once plus the shared
        // first and the copied last ones twice.
        for layer in 0..2 {
            let len = m.len(40, layer) as i32;
            let mut indices: Vec<i32> = (0..len).collect();
            indices.extend([0, len - 1, -1]);
            let spec = Spec {
                topk: indices.len(),
                indices: Some(indices),
                sink: Some(sinks(3)),
                h_q: 3,
                ..Spec::new(layer, &[40], d_v_for(d_qk))
            };
            m.check_decode(p, &mut rng, &spec, "child, every position");
        }
    }
}

/// Sparse decode over positions 0..len-1 of each sequence (-1 padded, or cut
/// by topk_length with garbage after it) gives what dense decode gives, with
/// and without a sink, on every format.
#[test]
fn sparse_over_every_position_equals_dense() {
    for (fi, &fmt) in ALL_FORMATS.iter().enumerate() {
        let d_qk = d_qk_for(fmt, 64);
        let bs = 16;
        let lens = [1usize, 20, 77, 0, 130];
        let geo = Geo {
            fmt,
            d_qk,
            layers: 1,
            bs,
            nb: lens.iter().map(|l| l.div_ceil(bs)).sum(),
        };
        let pool = Pool::new(geo);
        let p = pool.ptr;
        let mut rng = SmallRng::seed_from_u64(900 + fi as u64);
        let mut m = Model::new(geo);
        let ids: Vec<u64> = (10..10 + lens.len() as u64).collect();
        for (&id, &n) in ids.iter().zip(&lens) {
            m.create(p, id);
            if n > 0 {
                let vals = varied_rows(&mut rng, &geo, n);
                m.append_vals(p, id, 0, MLART_DTYPE_F32, &vals);
            }
        }
        let (s_q, topk) = (2, 130);
        for sink in [None, Some(sinks(4))] {
            let dense = Spec {
                s_q,
                h_q: 4,
                sink: sink.clone(),
                ..Spec::new(0, &ids, d_v_for(d_qk))
            };
            let qv = m.queries(&mut rng, &dense);
            let q = encode(MLART_DTYPE_F32, &qv);
            let want = run_decode(p, &dense, d_qk, &q).unwrap();
            m.check_raw(&want, &qv, &dense, "dense");
            let got_out = decode_bytes(MLART_DTYPE_F32, &want.out);
            for cut in [false, true] {
                let mut indices = Vec::new();
                for &len in &lens {
                    for _ in 0..s_q {
                        indices.extend((0..topk as i32).map(|t| match t {
                            _ if (t as usize) < len => t,
                            _ if cut => 1 << 30,
                            _ => -1,
                        }));
                    }
                }
                let sparse = Spec {
                    indices: Some(indices),
                    topk,
                    topk_length: cut.then(|| lens.iter().map(|&l| l as i32).collect()),
                    ..dense.clone()
                };
                let raw = run_decode(p, &sparse, d_qk, &q).unwrap();
                let ctx = format!("fmt {fmt} sink {} cut {cut}", sink.is_some());
                m.check_raw(&raw, &qv, &sparse, &ctx);
                let out = decode_bytes(MLART_DTYPE_F32, &raw.out);
                let (mut num, mut den) = (0.0f64, 0.0f64);
                for (a, b) in out.iter().zip(&got_out) {
                    num += (a - b) * (a - b);
                    den += b * b;
                }
                assert!(
                    num.sqrt() <= 1e-6 * den.sqrt(),
                    "{ctx}: sparse and dense outputs differ (rel-L2 {:e})",
                    (num / den).sqrt()
                );
                for (i, (&a, &b)) in raw.lse_bits.iter().zip(&want.lse_bits).enumerate() {
                    let (a, b) = (f32::from_bits(a), f32::from_bits(b));
                    assert!(
                        a == b || (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{ctx}: lse[{i}] sparse {a} dense {b}"
                    );
                }
            }
        }
    }
}
