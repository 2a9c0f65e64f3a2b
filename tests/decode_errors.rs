//! Error paths of `mlart_decode_paged` (dense and sparse: indices,
//! topk_length, the extra cache, the attention sink; FP8 formats),
//! `mlart_engine_create` and `mlart_engine_info`, called through the C ABI.
//!
//! Each bad argument must give the documented `mlart_status` and a message
//! naming the argument and its value, and must leave every output untouched:
//! the decode's `out`/`lse` (pre-filled with a sentinel) and the inputs stay
//! bit-identical, and out-parameters keep their sentinel value. Every error
//! returned is freed with `mlart_error_free`; NULL means success.

mod common;

use common::{expect_error, status_name, take_error, with_env, ENV_LOCK};
use mlart::ffi::decode::*;
use mlart::ffi::engine::*;
use mlart::ffi::error::*;
use mlart::ffi::format::*;
use mlart::ffi::types::*;
use std::ffi::{c_void, CStr};
use std::mem::{size_of, MaybeUninit};

// `MLART_CPU_ISA` / `MLART_BACKEND` are read when an engine is created:
// engine creation holds the read side of `common::ENV_LOCK`, tests that set
// them (`common::with_env`) the write side.

fn env_read() -> std::sync::RwLockReadGuard<'static, ()> {
    ENV_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

fn options() -> mlart_engine_options {
    let mut o = MaybeUninit::uninit();
    mlart_engine_options_init(o.as_mut_ptr());
    // SAFETY: initialized above.
    unsafe { o.assume_init() }
}

fn decode_args() -> mlart_decode_args {
    let mut a = MaybeUninit::uninit();
    mlart_decode_args_init(a.as_mut_ptr());
    // SAFETY: initialized above.
    unsafe { a.assume_init() }
}

fn props() -> mlart_engine_props {
    let mut p = MaybeUninit::uninit();
    mlart_engine_props_init(p.as_mut_ptr());
    // SAFETY: initialized above.
    unsafe { p.assume_init() }
}

struct Engine(*mut mlart_engine);

impl Engine {
    fn new() -> Engine {
        let _env = env_read();
        let mut o = options();
        o.backend = MLART_BACKEND_CPU;
        o.num_threads = 1;
        let mut e = std::ptr::null_mut();
        assert!(take_error(mlart_engine_create(&o, &mut e)).is_none());
        Engine(e)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        mlart_engine_free(self.0);
    }
}

// ---------------------------------------------------------------------------
// A small valid decode: batch 2, s_q 1, h_q 2, d_qk 8, d_v 4, f32 everywhere,
// 8 blocks of 4 tokens, block_table [2, 3], seqlens [5, 9].
// ---------------------------------------------------------------------------

const BATCH: usize = 2;
const H_Q: usize = 2;
const D_QK: usize = 8;
const D_V: usize = 4;
const NUM_BLOCKS: usize = 8;
const BS: usize = 4;
const STRIDE: usize = 3;
const OUT_SENTINEL: u32 = 0xdead_beef;
const LSE_SENTINEL: u32 = 0x7fa5_a5a5;

// Sparse decode over the same cache (32 positions): topk 4, and an extra
// cache of 3 blocks x 5 tokens (15 positions) with extra_topk 3.
const TOPK: usize = 4;
const EXTRA_BLOCKS: usize = 3;
const EXTRA_BS: usize = 5;
const EXTRA_TOPK: usize = 3;

/// Buffers of the base decode. One allocation per tensor; `spare` gives
/// room for misaligned pointers and for overlap tests.
#[derive(Clone, PartialEq)]
struct Fixture {
    /// `q` then room: `[BATCH * H_Q * D_QK + 64]`.
    q: Vec<f32>,
    kv: Vec<f32>,
    /// `[BATCH, STRIDE]` then one spare entry.
    table: Vec<i32>,
    /// `[BATCH]` then one spare entry.
    seqlens: Vec<i32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    /// `[BATCH, s_q <= 2, TOPK]` then spare entries.
    indices: Vec<i32>,
    /// `[BATCH]` then spare entries.
    topk_length: Vec<i32>,
    extra_kv: Vec<f32>,
    /// `[BATCH, s_q <= 2, EXTRA_TOPK]` then spare entries.
    extra_indices: Vec<i32>,
    /// `[BATCH]` then spare entries.
    extra_topk_length: Vec<i32>,
    /// `[h_q <= 4]` then spare entries (16 in all: room for `out`).
    sink: Vec<f32>,
}

impl Fixture {
    fn new() -> Fixture {
        let q = (0..BATCH * H_Q * D_QK + 64)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 16.0)
            .collect();
        let kv = (0..NUM_BLOCKS * BS * D_QK)
            .map(|i| ((i * 53 % 29) as f32 - 14.0) / 28.0)
            .collect();
        Fixture {
            q,
            kv,
            // Sequence 0 uses 2 blocks (its third entry is padding),
            // sequence 1 uses 3.
            table: vec![6, 1, 2147480000, 3, 0, 5, 0],
            seqlens: vec![5, 9, 0],
            out: vec![f32::from_bits(OUT_SENTINEL); BATCH * H_Q * D_V],
            lse: vec![f32::from_bits(LSE_SENTINEL); BATCH * H_Q],
            // Valid positions, -1s and a duplicate; the last 8 are spare.
            indices: vec![
                0, 31, -1, 5, 12, 12, 7, -1, //
                3, -1, 30, 2, 9, 9, 9, 1, //
                0, 0, 0, 0, 0, 0, 0, 0,
            ],
            topk_length: vec![4, 2, 0, 0],
            extra_kv: (0..EXTRA_BLOCKS * EXTRA_BS * D_QK)
                .map(|i| ((i * 31 % 23) as f32 - 11.0) / 22.0)
                .collect(),
            extra_indices: vec![
                14, -1, 0, 3, 3, -1, //
                7, 8, -1, -1, -1, -1, //
                0, 0, 0, 0, 0, 0,
            ],
            extra_topk_length: vec![3, 1, 0, 0],
            sink: [0.5, f32::INFINITY, f32::NEG_INFINITY, -2.0]
                .into_iter()
                .chain([0.0; 12])
                .collect(),
        }
    }

    /// Sparse decode: the base arguments with `indices`/`topk` set and the
    /// block table and lengths NULL (not read).
    fn sparse(&mut self, c: &mut Call) {
        c.args.indices = self.indices.as_ptr();
        c.args.topk = TOPK as i32;
        c.args.block_table = std::ptr::null();
        c.args.block_table_stride = 0;
        c.args.seqlens = std::ptr::null();
    }

    /// Sparse decode with the extra cache, both topk lengths and a sink.
    fn sparse_full(&mut self, c: &mut Call) {
        self.sparse(c);
        c.args.topk_length = self.topk_length.as_ptr();
        c.args.extra_kv = self.extra_kv.as_ptr().cast();
        c.args.extra_num_blocks = EXTRA_BLOCKS as i32;
        c.args.extra_block_size = EXTRA_BS as i32;
        c.args.extra_indices = self.extra_indices.as_ptr();
        c.args.extra_topk = EXTRA_TOPK as i32;
        c.args.extra_topk_length = self.extra_topk_length.as_ptr();
        c.args.attn_sink = self.sink.as_ptr();
    }

    /// Sets `s_q` and `h_q`, with room in q and sentinel-filled out/lse
    /// buffers for them.
    fn resize(&mut self, c: &mut Call, s_q: usize, h_q: usize) {
        let nq = BATCH * s_q * h_q * D_QK + 64;
        if self.q.len() < nq {
            self.q
                .extend((self.q.len()..nq).map(|i| (i % 5) as f32 / 8.0));
            c.args.q = self.q.as_ptr().cast();
        }
        self.out = vec![f32::from_bits(OUT_SENTINEL); BATCH * s_q * h_q * D_V];
        self.lse = vec![f32::from_bits(LSE_SENTINEL); BATCH * h_q * s_q];
        c.args.s_q = s_q as i32;
        c.args.h_q = h_q as i32;
        c.args.out = self.out.as_mut_ptr().cast();
        c.args.lse = self.lse.as_mut_ptr();
    }

    fn args(&mut self) -> mlart_decode_args {
        let mut a = decode_args();
        a.batch = BATCH as i32;
        a.s_q = 1;
        a.h_q = H_Q as i32;
        a.d_qk = D_QK as i32;
        a.d_v = D_V as i32;
        a.q_dtype = MLART_DTYPE_F32;
        a.q = self.q.as_ptr().cast();
        a.kv_format = MLART_KV_FORMAT_F32;
        a.kv = self.kv.as_ptr().cast();
        a.num_blocks = NUM_BLOCKS as i32;
        a.block_size = BS as i32;
        a.block_table = self.table.as_ptr();
        a.block_table_stride = STRIDE as i32;
        a.seqlens = self.seqlens.as_ptr();
        a.out_dtype = MLART_DTYPE_F32;
        a.out = self.out.as_mut_ptr().cast();
        a.lse = self.lse.as_mut_ptr();
        a
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
}

/// One decode call: engine, args, and whether to pass `args` as NULL.
struct Call {
    engine: *mut mlart_engine,
    args: mlart_decode_args,
    null_args: bool,
}

/// Runs the base decode edited by `edit` and expects `status` with every
/// needle in the message, and no byte of any buffer changed; returns the
/// message.
fn decode_error(
    engine: &Engine,
    what: &str,
    status: mlart_status,
    needles: &[&str],
    edit: impl FnOnce(&mut Fixture, &mut Call),
) -> String {
    let mut fx = Fixture::new();
    let mut call = Call {
        engine: engine.0,
        args: fx.args(),
        null_args: false,
    };
    edit(&mut fx, &mut call);
    let before_q = Fixture::bits(&fx.q);
    let before_kv = Fixture::bits(&fx.kv);
    let before_extra_kv = Fixture::bits(&fx.extra_kv);
    let before_sink = Fixture::bits(&fx.sink);
    let before = fx.clone();
    let args: *const mlart_decode_args = if call.null_args {
        std::ptr::null()
    } else {
        &call.args
    };
    let e = mlart_decode_paged(call.engine, args);
    let msg = expect_error(&format!("decode with {what}"), e, status, needles);
    assert!(
        Fixture::bits(&fx.out).iter().all(|&b| b == OUT_SENTINEL),
        "decode with {what}: out was written on error"
    );
    assert!(
        Fixture::bits(&fx.lse).iter().all(|&b| b == LSE_SENTINEL),
        "decode with {what}: lse was written on error"
    );
    assert_eq!(Fixture::bits(&fx.q), before_q, "{what}: q changed");
    assert_eq!(Fixture::bits(&fx.kv), before_kv, "{what}: kv changed");
    assert_eq!(fx.table, before.table, "{what}: block_table changed");
    assert_eq!(fx.seqlens, before.seqlens, "{what}: seqlens changed");
    assert_eq!(fx.indices, before.indices, "{what}: indices changed");
    assert_eq!(
        fx.topk_length, before.topk_length,
        "{what}: topk_length changed"
    );
    assert_eq!(
        fx.extra_indices, before.extra_indices,
        "{what}: extra_indices changed"
    );
    assert_eq!(
        fx.extra_topk_length, before.extra_topk_length,
        "{what}: extra_topk_length changed"
    );
    assert_eq!(
        Fixture::bits(&fx.extra_kv),
        before_extra_kv,
        "{what}: extra_kv changed"
    );
    assert_eq!(
        Fixture::bits(&fx.sink),
        before_sink,
        "{what}: attn_sink changed"
    );
    msg
}

/// Runs the base decode edited by `edit` and expects success.
fn decode_ok(engine: &Engine, what: &str, edit: impl FnOnce(&mut Fixture, &mut Call)) -> Fixture {
    let mut fx = Fixture::new();
    let mut call = Call {
        engine: engine.0,
        args: fx.args(),
        null_args: false,
    };
    edit(&mut fx, &mut call);
    if let Some((code, msg)) = take_error(mlart_decode_paged(call.engine, &call.args)) {
        panic!("decode with {what}: failed with {code}: {msg}");
    }
    assert!(
        fx.out.iter().all(|x| x.is_finite()),
        "decode with {what}: out not fully written: {:?}",
        fx.out
    );
    fx
}

#[test]
fn base_decode_succeeds() {
    let engine = Engine::new();
    let fx = decode_ok(&engine, "the base arguments", |_, _| {});
    assert!(fx.lse.iter().all(|x| x.is_finite()), "lse {:?}", fx.lse);
    // lse is optional.
    let fx = decode_ok(&engine, "lse = NULL", |_, c| {
        c.args.lse = std::ptr::null_mut()
    });
    assert!(Fixture::bits(&fx.lse).iter().all(|&b| b == LSE_SENTINEL));
    // Entries past a sequence's blocks are never read, whatever they hold.
    decode_ok(&engine, "garbage padding", |fx, _| {
        fx.table[2] = -1;
        fx.seqlens[0] = 4; // one block: entries 1 and 2 are padding
        fx.table[1] = i32::MIN;
    });
    decode_ok(&engine, "an empty sequence with a garbage row", |fx, _| {
        fx.seqlens[0] = 0;
        fx.table[..STRIDE].copy_from_slice(&[-1, 2147480000, 99]);
    });
    // The largest allowed length.
    decode_ok(&engine, "seqlens at capacity", |fx, _| {
        fx.seqlens[1] = (STRIDE * BS) as i32
    });
    decode_ok(&engine, "d_qk = 1024 and d_v = d_qk", |fx, c| {
        fx.kv = vec![0.25; NUM_BLOCKS * BS * 1024];
        fx.q = vec![0.5; BATCH * H_Q * 1024];
        fx.out = vec![f32::NAN; BATCH * H_Q * 1024];
        c.args = fx.args();
        c.args.d_qk = 1024;
        c.args.d_v = 1024;
    });
}

#[test]
fn decode_null_pointers() {
    let engine = Engine::new();
    let null = MLART_STATUS_NULL_POINTER;
    decode_error(&engine, "engine NULL", null, &["engine is NULL"], |_, c| {
        c.engine = std::ptr::null_mut()
    });
    decode_error(&engine, "args NULL", null, &["args is NULL"], |_, c| {
        c.null_args = true
    });
    decode_error(&engine, "q NULL", null, &["q is NULL"], |_, c| {
        c.args.q = std::ptr::null()
    });
    decode_error(&engine, "kv NULL", null, &["kv is NULL"], |_, c| {
        c.args.kv = std::ptr::null()
    });
    decode_error(
        &engine,
        "block_table NULL",
        null,
        &["block_table is NULL"],
        |_, c| c.args.block_table = std::ptr::null(),
    );
    decode_error(
        &engine,
        "seqlens NULL",
        null,
        &["seqlens is NULL"],
        |_, c| c.args.seqlens = std::ptr::null(),
    );
    decode_error(&engine, "out NULL", null, &["out is NULL"], |_, c| {
        c.args.out = std::ptr::null_mut()
    });
}

#[test]
fn decode_struct_size() {
    let engine = Engine::new();
    let want = size_of::<mlart_decode_args>();
    for bad in [0, 4, want - 8, want + 8, u32::MAX as usize] {
        let bad = bad as u32;
        decode_error(
            &engine,
            &format!("struct_size = {bad}"),
            MLART_STATUS_INVALID_ARGUMENT,
            &[
                &format!("args->struct_size = {bad}"),
                &format!("expects {want}"),
                "mlart_decode_args_init",
            ],
            |_, c| c.args.struct_size = bad,
        );
    }
}

#[test]
fn decode_bad_sizes() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    type Setter = fn(&mut mlart_decode_args, i32);
    let fields: [(&str, Setter); 8] = [
        ("batch", |a, v| a.batch = v),
        ("s_q", |a, v| a.s_q = v),
        ("h_q", |a, v| a.h_q = v),
        ("d_qk", |a, v| a.d_qk = v),
        ("d_v", |a, v| a.d_v = v),
        ("num_blocks", |a, v| a.num_blocks = v),
        ("block_size", |a, v| a.block_size = v),
        ("block_table_stride", |a, v| a.block_table_stride = v),
    ];
    for (name, set) in fields {
        for v in [0, -1, i32::MIN] {
            decode_error(
                &engine,
                &format!("{name} = {v}"),
                inv,
                &[&format!("{name} = {v} must be >= 1")],
                |_, c| set(&mut c.args, v),
            );
        }
    }
    decode_error(
        &engine,
        "d_v > d_qk",
        inv,
        &["d_v = 9 exceeds d_qk = 8"],
        |_, c| c.args.d_v = 9,
    );
    for d in [1025, 4096, i32::MAX] {
        decode_error(
            &engine,
            &format!("d_qk = {d}"),
            inv,
            &[&format!("d_qk = {d} exceeds"), "1024"],
            |_, c| c.args.d_qk = d,
        );
    }
    decode_error(
        &engine,
        "d_v > d_qk = 1024",
        inv,
        &["d_v = 1025 exceeds d_qk = 1024"],
        |_, c| {
            c.args.d_qk = 1024;
            c.args.d_v = 1025;
        },
    );
    decode_error(
        &engine,
        "q size overflow",
        inv,
        &["q", "overflows"],
        |_, c| {
            c.args.batch = i32::MAX;
            c.args.s_q = i32::MAX;
            c.args.h_q = i32::MAX;
        },
    );
    decode_error(
        &engine,
        "kv size overflow",
        inv,
        &["kv", "overflows"],
        |_, c| {
            c.args.num_blocks = i32::MAX;
            c.args.block_size = i32::MAX;
            c.args.d_qk = 1024;
            c.args.d_v = 4;
        },
    );
}

#[test]
fn decode_bad_scale() {
    let engine = Engine::new();
    for (v, text) in [
        (f32::NAN, "softmax_scale = NaN"),
        (f32::INFINITY, "softmax_scale = inf"),
        (f32::NEG_INFINITY, "softmax_scale = -inf"),
    ] {
        decode_error(
            &engine,
            text,
            MLART_STATUS_INVALID_ARGUMENT,
            &[text, "not finite"],
            |_, c| c.args.softmax_scale = v,
        );
    }
}

#[test]
fn decode_bad_enums() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    let uns = MLART_STATUS_UNSUPPORTED;
    decode_error(&engine, "q_dtype = 7", inv, &["q_dtype = 7"], |_, c| {
        c.args.q_dtype = 7
    });
    decode_error(&engine, "out_dtype = 7", inv, &["out_dtype = 7"], |_, c| {
        c.args.out_dtype = 7
    });
    decode_error(
        &engine,
        "q_dtype FP8",
        uns,
        &["q_dtype = FP8_E4M3"],
        |_, c| c.args.q_dtype = MLART_DTYPE_FP8_E4M3,
    );
    decode_error(
        &engine,
        "out_dtype FP8",
        uns,
        &["out_dtype = FP8_E4M3"],
        |_, c| c.args.out_dtype = MLART_DTYPE_FP8_E4M3,
    );
    decode_error(&engine, "kv_format = 9", inv, &["kv_format = 9"], |_, c| {
        c.args.kv_format = 9
    });
    // FP8 formats have a fixed row size: d_qk must match it.
    for (format, name, d_qk, d_v, want) in [
        (MLART_KV_FORMAT_FP8_V32, "fp8_v32", 8, 4, 576),
        (MLART_KV_FORMAT_FP8_V32, "fp8_v32", 512, 512, 576),
        (MLART_KV_FORMAT_FP8_V32, "fp8_v32", 577, 512, 576),
        (MLART_KV_FORMAT_FP8_MODEL1, "fp8_model1", 576, 512, 512),
        (MLART_KV_FORMAT_FP8_MODEL1, "fp8_model1", 8, 4, 512),
    ] {
        for sparse in [false, true] {
            decode_error(
                &engine,
                &format!("kv_format {name} with d_qk {d_qk} (sparse: {sparse})"),
                inv,
                &[
                    &format!("kv_format = {name}"),
                    &format!("d_qk = {want}"),
                    &format!("d_qk = {d_qk}"),
                ],
                |fx, c| {
                    if sparse {
                        fx.sparse_full(c);
                    }
                    c.args.kv_format = format;
                    c.args.d_qk = d_qk;
                    c.args.d_v = d_v;
                },
            );
        }
    }
    decode_error(
        &engine,
        "memory DEVICE",
        uns,
        &["memory = MLART_MEMORY_DEVICE"],
        |_, c| c.args.memory = MLART_MEMORY_DEVICE,
    );
    decode_error(&engine, "memory = 2", inv, &["memory = 2"], |_, c| {
        c.args.memory = 2
    });
}

/// Sparse decode and FP8 caches are accepted; the entries past a topk
/// length, block-table and sink entries past h_q are never read.
#[test]
fn sparse_and_fp8_decode_succeed() {
    let engine = Engine::new();
    let fx = decode_ok(&engine, "indices only", |fx, c| fx.sparse(c));
    assert!(fx.lse.iter().all(|x| x.is_finite()), "lse {:?}", fx.lse);
    decode_ok(&engine, "every sparse field", |fx, c| fx.sparse_full(c));
    decode_ok(&engine, "topk without indices (dense)", |_, c| {
        c.args.topk = 4
    });
    decode_ok(&engine, "dense with attn_sink", |fx, c| {
        c.args.attn_sink = fx.sink.as_ptr();
        // Only the first h_q entries are read.
        fx.sink[H_Q] = f32::NAN;
    });
    decode_ok(&engine, "s_q 2, h_q 4", |fx, c| {
        fx.sparse_full(c);
        fx.resize(c, 2, 4);
    });
    decode_ok(&engine, "garbage past topk_length", |fx, c| {
        fx.sparse_full(c);
        fx.topk_length[..BATCH].copy_from_slice(&[1, 0]);
        fx.indices[1..TOPK].copy_from_slice(&[i32::MAX, -2, i32::MIN]);
        fx.indices[TOPK..2 * TOPK].fill(0x7fff_ffff);
        fx.extra_topk_length[..BATCH].copy_from_slice(&[0, 2]);
        fx.extra_indices[..EXTRA_TOPK].fill(-99);
        fx.extra_indices[EXTRA_TOPK + 2] = 15;
    });
    let fx = decode_ok(&engine, "no valid index", |fx, c| {
        fx.sparse(c);
        fx.indices[..BATCH * TOPK].fill(-1);
    });
    assert!(fx.out.iter().all(|&x| x == 0.0), "out {:?}", fx.out);
    assert!(
        fx.lse.iter().all(|&x| x == f32::INFINITY),
        "lse {:?}",
        fx.lse
    );
    // FP8 caches, dense and sparse (the cache made by mlart_kv_quantize).
    for (format, d_qk, d_v) in [
        (MLART_KV_FORMAT_FP8_V32, 576usize, 512usize),
        (MLART_KV_FORMAT_FP8_MODEL1, 512, 512),
    ] {
        for sparse in [false, true] {
            decode_ok(
                &engine,
                &format!("kv_format {format} (sparse: {sparse})"),
                |fx, c| {
                    let mut block = 0usize;
                    assert!(take_error(mlart_kv_block_bytes(
                        format,
                        d_qk as i32,
                        BS as i32,
                        &mut block
                    ))
                    .is_none());
                    let rows: Vec<f32> = (0..NUM_BLOCKS * BS * d_qk)
                        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
                        .collect();
                    fx.kv = vec![0.0; NUM_BLOCKS * block / 4];
                    assert!(take_error(mlart_kv_quantize(
                        format,
                        d_qk as i32,
                        BS as i32,
                        (NUM_BLOCKS * BS) as i32,
                        MLART_DTYPE_F32,
                        rows.as_ptr().cast(),
                        fx.kv.as_mut_ptr().cast(),
                    ))
                    .is_none());
                    fx.q = vec![0.25; BATCH * H_Q * d_qk];
                    fx.out = vec![f32::NAN; BATCH * H_Q * d_v];
                    c.args = fx.args();
                    c.args.kv_format = format;
                    c.args.d_qk = d_qk as i32;
                    c.args.d_v = d_v as i32;
                    if sparse {
                        fx.sparse(c);
                    }
                },
            );
        }
    }
}

#[test]
fn decode_sparse_bad_sizes() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    type Setter = fn(&mut mlart_decode_args, i32);
    let fields: [(&str, Setter); 4] = [
        ("topk", |a, v| a.topk = v),
        ("extra_num_blocks", |a, v| a.extra_num_blocks = v),
        ("extra_block_size", |a, v| a.extra_block_size = v),
        ("extra_topk", |a, v| a.extra_topk = v),
    ];
    for (name, set) in fields {
        for v in [0, -1, i32::MIN] {
            decode_error(
                &engine,
                &format!("{name} = {v}"),
                inv,
                &[&format!("{name} = {v} must be >= 1")],
                |fx, c| {
                    fx.sparse_full(c);
                    set(&mut c.args, v);
                },
            );
        }
    }
}

#[test]
fn decode_sparse_bad_indices() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    // (what, entry to set, value, needle); lists are [BATCH, 1, TOPK].
    for (at, v) in [
        (TOPK + 2, 32),
        (0, i32::MAX),
        (1, -2),
        (TOPK + 3, i32::MIN),
        (3, 1_000_000),
    ] {
        let (b, k) = (at / TOPK, at % TOPK);
        let want = format!("indices[{b}][0][{k}] = {v} is outside [-1, 32)");
        let msg = decode_error(&engine, &want, inv, &[&want], |fx, c| {
            fx.sparse(c);
            fx.indices[at] = v;
        });
        assert!(msg.starts_with(&want), "{msg}");
    }
    // With s_q = 2 the query token index is named.
    decode_error(
        &engine,
        "indices[1][1][3] out of range",
        inv,
        &["indices[1][1][3] = 40 is outside [-1, 32)"],
        |fx, c| {
            fx.sparse(c);
            fx.resize(c, 2, H_Q);
            fx.indices[3 * TOPK + 3] = 40;
        },
    );
    // Fewer blocks: position 31 no longer exists.
    decode_error(
        &engine,
        "num_blocks 7",
        inv,
        &["indices[0][0][1] = 31 is outside [-1, 28)"],
        |fx, c| {
            fx.sparse(c);
            c.args.num_blocks = 7;
        },
    );
    // An entry past topk_length is not checked until it becomes used.
    decode_ok(&engine, "bad entry past topk_length", |fx, c| {
        fx.sparse_full(c);
        fx.indices[TOPK + 3] = 99;
        fx.topk_length[1] = 3;
    });
    decode_error(
        &engine,
        "bad entry inside topk_length",
        inv,
        &["indices[1][0][3] = 99 is outside [-1, 32)"],
        |fx, c| {
            fx.sparse_full(c);
            fx.indices[TOPK + 3] = 99;
            fx.topk_length[1] = 4;
        },
    );
    // The extra cache: 15 positions.
    for (at, v, num_blocks, limit) in [
        (1, 15, 3, 15),
        (2, -2, 3, 15),
        (EXTRA_TOPK + 1, i32::MAX, 3, 15),
        (0, 14, 2, 10),
    ] {
        let (b, k) = (at / EXTRA_TOPK, at % EXTRA_TOPK);
        let want = format!("extra_indices[{b}][0][{k}] = {v} is outside [-1, {limit})");
        let msg = decode_error(&engine, &want, inv, &[&want], |fx, c| {
            fx.sparse_full(c);
            fx.extra_topk_length[1] = 2;
            fx.extra_indices[at] = v;
            c.args.extra_num_blocks = num_blocks;
        });
        assert!(msg.starts_with("extra_indices["), "{msg}");
    }
}

#[test]
fn decode_sparse_bad_topk_lengths() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    for (b, v) in [(0, -1), (1, 5), (1, i32::MIN), (0, i32::MAX)] {
        let want = format!("topk_length[{b}] = {v} is outside [0, 4]");
        decode_error(&engine, &want, inv, &[&want], |fx, c| {
            fx.sparse_full(c);
            fx.topk_length[b] = v;
        });
        let want = format!("extra_topk_length[{b}] = {v} is outside [0, 3]");
        let msg = decode_error(&engine, &want, inv, &[&want], |fx, c| {
            fx.sparse_full(c);
            fx.extra_topk_length[b] = v;
        });
        assert!(msg.starts_with("extra_topk_length["), "{msg}");
    }
    decode_error(
        &engine,
        "extra_topk_length 4",
        inv,
        &["extra_topk_length[1] = 4 is outside [0, 3]"],
        |fx, c| {
            fx.sparse_full(c);
            fx.extra_topk_length[1] = 4;
        },
    );
}

#[test]
fn decode_sparse_bad_combinations() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    let null = MLART_STATUS_NULL_POINTER;
    decode_error(
        &engine,
        "causal with indices",
        inv,
        &["causal = true with indices"],
        |fx, c| {
            fx.sparse(c);
            c.args.causal = true;
        },
    );
    // Sparse-only fields without indices.
    type Setter = fn(&mut Fixture, &mut Call);
    let fields: [(&str, Setter); 4] = [
        ("topk_length", |fx, c| {
            c.args.topk_length = fx.topk_length.as_ptr()
        }),
        ("extra_kv", |fx, c| {
            c.args.extra_kv = fx.extra_kv.as_ptr().cast::<c_void>()
        }),
        ("extra_indices", |fx, c| {
            c.args.extra_indices = fx.extra_indices.as_ptr()
        }),
        ("extra_topk_length", |fx, c| {
            c.args.extra_topk_length = fx.extra_topk_length.as_ptr()
        }),
    ];
    for (name, set) in fields {
        decode_error(
            &engine,
            &format!("{name} without indices"),
            inv,
            &[&format!("{name} is set but indices is NULL")],
            |fx, c| {
                fx.sparse_full(c);
                c.args.indices = std::ptr::null();
                c.args.topk_length = std::ptr::null();
                c.args.extra_kv = std::ptr::null();
                c.args.extra_indices = std::ptr::null();
                c.args.extra_topk_length = std::ptr::null();
                // The dense fields are valid: only the stray field is wrong.
                c.args.block_table = fx.table.as_ptr();
                c.args.block_table_stride = STRIDE as i32;
                c.args.seqlens = fx.seqlens.as_ptr();
                set(fx, c);
            },
        );
    }
    decode_error(
        &engine,
        "extra_kv without extra_indices",
        null,
        &["extra_indices is NULL"],
        |fx, c| {
            fx.sparse_full(c);
            c.args.extra_indices = std::ptr::null();
        },
    );
    for (what, keep_len) in [("extra_indices", false), ("extra_topk_length", true)] {
        decode_error(
            &engine,
            &format!("{what} without extra_kv"),
            inv,
            &["is set but extra_kv is NULL"],
            |fx, c| {
                fx.sparse_full(c);
                c.args.extra_kv = std::ptr::null();
                if keep_len {
                    c.args.extra_indices = std::ptr::null();
                } else {
                    c.args.extra_topk_length = std::ptr::null();
                }
            },
        );
    }
    // Required pointers stay required in sparse decode.
    decode_error(&engine, "sparse, q NULL", null, &["q is NULL"], |fx, c| {
        fx.sparse(c);
        c.args.q = std::ptr::null();
    });
    decode_error(
        &engine,
        "sparse, kv NULL",
        null,
        &["kv is NULL"],
        |fx, c| {
            fx.sparse(c);
            c.args.kv = std::ptr::null();
        },
    );
    decode_error(
        &engine,
        "sparse, out NULL",
        null,
        &["out is NULL"],
        |fx, c| {
            fx.sparse(c);
            c.args.out = std::ptr::null_mut();
        },
    );
}

#[test]
fn decode_attn_sink_nan() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    for sparse in [false, true] {
        for nan in [f32::NAN, -f32::NAN, f32::from_bits(0x7f80_0001)] {
            decode_error(
                &engine,
                &format!("attn_sink[3] = {nan:?} (sparse: {sparse})"),
                inv,
                &["attn_sink[3] = NaN"],
                |fx, c| {
                    if sparse {
                        fx.sparse_full(c);
                    }
                    fx.resize(c, 1, 4);
                    c.args.attn_sink = fx.sink.as_ptr();
                    fx.sink[3] = nan;
                },
            );
        }
        decode_error(
            &engine,
            &format!("attn_sink[0] = NaN (sparse: {sparse})"),
            inv,
            &["attn_sink[0] = NaN"],
            |fx, c| {
                if sparse {
                    fx.sparse(c);
                }
                c.args.attn_sink = fx.sink.as_ptr();
                fx.sink[0] = f32::NAN;
            },
        );
    }
}

#[test]
fn decode_sparse_overlaps_and_alignment() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    type Edit = fn(&mut Fixture, &mut Call);
    let overlaps: [(&str, Edit); 8] = [
        ("out overlaps indices", |fx, c| {
            c.args.out = fx.indices.as_mut_ptr().cast()
        }),
        ("out overlaps attn_sink", |fx, c| {
            c.args.out = fx.sink.as_mut_ptr().cast()
        }),
        ("out overlaps extra_kv", |fx, c| {
            c.args.out = fx.extra_kv[5..].as_mut_ptr().cast()
        }),
        ("out overlaps extra_indices", |fx, c| {
            c.args.out = fx.extra_indices.as_mut_ptr().cast()
        }),
        ("out overlaps topk_length", |fx, c| {
            // topk_length at the end of a buffer whose start holds out, so
            // that out overlaps topk_length and nothing else.
            let n = BATCH * H_Q * D_V;
            fx.topk_length = vec![0; n + BATCH];
            fx.topk_length[n..].copy_from_slice(&[4, 2]);
            c.args.topk_length = fx.topk_length[n..].as_ptr();
            c.args.out = fx.topk_length[BATCH..].as_mut_ptr().cast();
        }),
        ("lse overlaps topk_length", |fx, c| {
            c.args.lse = fx.topk_length.as_mut_ptr().cast()
        }),
        ("lse overlaps extra_topk_length", |fx, c| {
            c.args.lse = fx.extra_topk_length.as_mut_ptr().cast()
        }),
        ("lse overlaps indices", |fx, c| {
            c.args.lse = fx.indices[2 * TOPK - 1..].as_mut_ptr().cast()
        }),
    ];
    for (want, edit) in overlaps {
        decode_error(&engine, want, inv, &[want], |fx, c| {
            fx.sparse_full(c);
            edit(fx, c);
        });
    }
    type Mis = fn(&mut Fixture, &mut Call);
    let misaligned: [(&str, Mis); 5] = [
        ("indices", |fx, c| {
            c.args.indices = fx.indices.as_ptr().cast::<u8>().wrapping_add(1).cast()
        }),
        ("topk_length", |fx, c| {
            c.args.topk_length = fx.topk_length.as_ptr().cast::<u8>().wrapping_add(2).cast()
        }),
        ("extra_indices", |fx, c| {
            c.args.extra_indices = fx
                .extra_indices
                .as_ptr()
                .cast::<u8>()
                .wrapping_add(3)
                .cast()
        }),
        ("extra_topk_length", |fx, c| {
            c.args.extra_topk_length = fx
                .extra_topk_length
                .as_ptr()
                .cast::<u8>()
                .wrapping_add(1)
                .cast()
        }),
        ("attn_sink", |fx, c| {
            c.args.attn_sink = fx.sink.as_ptr().cast::<u8>().wrapping_add(2).cast()
        }),
    ];
    for (name, edit) in misaligned {
        decode_error(
            &engine,
            &format!("misaligned {name}"),
            inv,
            &[&format!("{name} = "), "not aligned to 4 bytes"],
            |fx, c| {
                fx.sparse_full(c);
                edit(fx, c);
            },
        );
    }
}

#[test]
fn decode_bad_lengths_and_block_ids() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    decode_error(
        &engine,
        "seqlens[0] = -1",
        inv,
        &["seqlens[0] = -1"],
        |fx, _| fx.seqlens[0] = -1,
    );
    decode_error(
        &engine,
        "seqlens[1] past capacity",
        inv,
        &["seqlens[1] = 13 is outside [0, 12]"],
        |fx, _| fx.seqlens[1] = 13,
    );
    decode_error(
        &engine,
        "seqlens[1] = i32::MIN",
        inv,
        &[&format!("seqlens[1] = {}", i32::MIN)],
        |fx, _| fx.seqlens[1] = i32::MIN,
    );
    decode_error(
        &engine,
        "a huge used block id",
        inv,
        &["block_table[1][2] = 2147480000 is outside [0, 8)"],
        |fx, _| fx.table[STRIDE + 2] = 2147480000,
    );
    decode_error(
        &engine,
        "a negative used block id",
        inv,
        &["block_table[0][1] = -1 is outside [0, 8)"],
        |fx, _| fx.table[1] = -1,
    );
    decode_error(
        &engine,
        "block id = num_blocks",
        inv,
        &["block_table[0][0] = 8 is outside [0, 8)"],
        |fx, _| fx.table[0] = NUM_BLOCKS as i32,
    );
    // A length that reaches into the padding entry makes it used.
    decode_error(
        &engine,
        "padding entry that becomes used",
        inv,
        &["block_table[0][2] = 2147480000 is outside [0, 8)"],
        |fx, _| fx.seqlens[0] = 9,
    );
    decode_error(
        &engine,
        "fewer blocks than used ids",
        inv,
        &["block_table[0][0] = 6 is outside [0, 4)"],
        |_, c| c.args.num_blocks = 4,
    );
}

#[test]
fn decode_overlaps_and_alignment() {
    let engine = Engine::new();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    decode_error(&engine, "out = q", inv, &["out overlaps q"], |fx, c| {
        c.args.out = fx.q.as_mut_ptr().cast()
    });
    // The last element of q is the first of out (q has spare room after it).
    decode_error(
        &engine,
        "out partly over q",
        inv,
        &["out overlaps q"],
        |fx, c| c.args.out = fx.q[BATCH * H_Q * D_QK - 1..].as_mut_ptr().cast(),
    );
    decode_error(
        &engine,
        "out inside kv",
        inv,
        &["out overlaps kv"],
        |fx, c| c.args.out = fx.kv[100..].as_mut_ptr().cast(),
    );
    decode_error(&engine, "lse = out", inv, &["lse overlaps out"], |fx, c| {
        c.args.lse = fx.out.as_mut_ptr()
    });
    decode_error(&engine, "lse = q", inv, &["lse overlaps q"], |fx, c| {
        c.args.lse = fx.q.as_mut_ptr()
    });
    decode_error(
        &engine,
        "lse inside kv",
        inv,
        &["lse overlaps kv"],
        |fx, c| c.args.lse = fx.kv[7..].as_mut_ptr(),
    );
    decode_error(
        &engine,
        "seqlens inside out",
        inv,
        &["out overlaps seqlens"],
        |fx, c| c.args.seqlens = fx.out[3..].as_ptr().cast(),
    );
    decode_error(
        &engine,
        "misaligned block_table",
        inv,
        &["block_table = ", "not aligned to 4 bytes"],
        |fx, c| {
            c.args.block_table = fx.table.as_ptr().cast::<u8>().wrapping_add(1).cast();
        },
    );
    decode_error(
        &engine,
        "misaligned seqlens",
        inv,
        &["seqlens = ", "not aligned to 4 bytes"],
        |fx, c| {
            c.args.seqlens = fx.seqlens.as_ptr().cast::<u8>().wrapping_add(2).cast();
        },
    );
    decode_error(
        &engine,
        "misaligned lse",
        inv,
        &["lse = ", "not aligned to 4 bytes"],
        |fx, c| {
            c.args.lse = fx.q.as_mut_ptr().cast::<u8>().wrapping_add(3).cast();
        },
    );
}

// ---------------------------------------------------------------------------
// mlart_engine_create / mlart_engine_info.
// ---------------------------------------------------------------------------

/// A value no engine pointer has; must survive a failed create.
/// CUDA devices the driver reports (0 without a driver).
fn cuda_devices() -> i32 {
    let mut n = -1;
    assert!(take_error(mlart::ffi::device::mlart_device_count(&mut n)).is_none());
    assert!(n >= 0);
    n
}

fn sentinel_engine() -> *mut mlart_engine {
    std::ptr::dangling_mut::<mlart_engine>().wrapping_byte_add(0x5a50)
}

fn create_error(
    what: &str,
    opts: Option<&mlart_engine_options>,
    status: mlart_status,
    needles: &[&str],
) {
    let mut e = sentinel_engine();
    let p = opts.map_or(std::ptr::null(), |o| o as *const _);
    let r = mlart_engine_create(p, &mut e);
    if r.is_null() {
        mlart_engine_free(e);
    }
    expect_error(&format!("engine_create with {what}"), r, status, needles);
    assert_eq!(e, sentinel_engine(), "{what}: *out written on error");
}

#[test]
fn engine_create_errors() {
    let _env = env_read();
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    // NULL out.
    let o = options();
    expect_error(
        "engine_create(out = NULL)",
        mlart_engine_create(&o, std::ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        &["out is NULL"],
    );
    expect_error(
        "engine_create(NULL, NULL)",
        mlart_engine_create(std::ptr::null(), std::ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        &["out is NULL"],
    );
    let want = size_of::<mlart_engine_options>() as u32;
    // 16 is the layout before `thread_affinity` (accepted; see
    // `engine_thread_affinity`), so sizes around it and the current one.
    for bad in [0, 4, 12, 15, 17, want - 1, want + 4, u32::MAX] {
        let mut o = options();
        o.struct_size = bad;
        create_error(
            &format!("struct_size = {bad}"),
            Some(&o),
            inv,
            &[
                &format!("options->struct_size = {bad}"),
                "mlart_engine_options_init",
            ],
        );
    }
    if cuda_devices() == 0 {
        let mut o = options();
        o.backend = MLART_BACKEND_CUDA;
        create_error(
            "backend CUDA",
            Some(&o),
            MLART_STATUS_UNSUPPORTED,
            &["backend = CUDA", "driver"],
        );
    }
    for b in [3, 9, u32::MAX] {
        let mut o = options();
        o.backend = b;
        create_error(
            &format!("backend {b}"),
            Some(&o),
            inv,
            &[&format!("options->backend = {b}")],
        );
    }
    for n in [-1, i32::MIN] {
        let mut o = options();
        o.num_threads = n;
        create_error(
            &format!("num_threads {n}"),
            Some(&o),
            inv,
            &[&format!("options->num_threads = {n}")],
        );
    }
    for a in [3, 7, u32::MAX] {
        let mut o = options();
        o.thread_affinity = a;
        create_error(
            &format!("thread_affinity {a}"),
            Some(&o),
            inv,
            &[&format!("options->thread_affinity = {a}"), "AUTO=0"],
        );
    }
    for d in [-1, i32::MIN] {
        let mut o = options();
        o.device_index = d;
        create_error(
            &format!("device_index {d}"),
            Some(&o),
            inv,
            &[&format!("options->device_index = {d}")],
        );
    }
    for backend in [MLART_BACKEND_AUTO, MLART_BACKEND_CPU] {
        let mut o = options();
        o.backend = backend;
        o.device_index = 1;
        create_error(
            &format!("device_index 1, backend {backend}"),
            Some(&o),
            inv,
            &["device_index = 1", "CPU"],
        );
    }
    // Options NULL means the defaults, and succeeds.
    let mut e = sentinel_engine();
    assert!(take_error(mlart_engine_create(std::ptr::null(), &mut e)).is_none());
    assert_ne!(e, sentinel_engine());
    assert!(!e.is_null());
    mlart_engine_free(e);
}

#[test]
fn engine_create_environment_errors() {
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    with_env(&[("MLART_CPU_ISA", "sse9")], || {
        create_error(
            "MLART_CPU_ISA=sse9",
            None,
            inv,
            &["MLART_CPU_ISA = \"sse9\""],
        );
        let mut o = options();
        o.backend = MLART_BACKEND_CPU;
        create_error(
            "MLART_CPU_ISA=sse9, backend CPU",
            Some(&o),
            inv,
            &["MLART_CPU_ISA = \"sse9\""],
        );
    });
    with_env(&[("MLART_CPU_AFFINITY", "everywhere")], || {
        create_error(
            "MLART_CPU_AFFINITY=everywhere",
            None,
            inv,
            &["MLART_CPU_AFFINITY = \"everywhere\"", "auto, none, pin"],
        );
    });
    with_env(&[("MLART_BACKEND", "tpu")], || {
        create_error("MLART_BACKEND=tpu", None, inv, &["MLART_BACKEND = \"tpu\""]);
        // An explicit backend is not overridden by the environment.
        let mut o = options();
        o.backend = MLART_BACKEND_CPU;
        let mut e = sentinel_engine();
        assert!(take_error(mlart_engine_create(&o, &mut e)).is_none());
        mlart_engine_free(e);
    });
    if cuda_devices() == 0 {
        with_env(&[("MLART_BACKEND", "cuda")], || {
            create_error(
                "MLART_BACKEND=cuda",
                None,
                MLART_STATUS_UNSUPPORTED,
                &["CUDA"],
            );
        });
    }
    // Forcing a kernel this build or CPU lacks is UNSUPPORTED and names it
    // (or works, where both have it).
    for isa in ["avx2", "avx512", "amx"] {
        with_env(&[("MLART_CPU_ISA", isa)], || {
            let mut e = sentinel_engine();
            let r = mlart_engine_create(std::ptr::null(), &mut e);
            if r.is_null() {
                let mut p = props();
                assert!(take_error(mlart_engine_info(e, &mut p)).is_none());
                mlart_engine_free(e);
            } else {
                expect_error(
                    &format!("MLART_CPU_ISA={isa}"),
                    r,
                    MLART_STATUS_UNSUPPORTED,
                    &[&format!("MLART_CPU_ISA = {isa}")],
                );
                assert_eq!(e, sentinel_engine());
            }
        });
    }
}

#[test]
fn engine_info_errors() {
    let engine = Engine::new();
    let mut p = props();
    expect_error(
        "engine_info(engine = NULL)",
        mlart_engine_info(std::ptr::null(), &mut p),
        MLART_STATUS_NULL_POINTER,
        &["engine is NULL"],
    );
    expect_error(
        "engine_info(out = NULL)",
        mlart_engine_info(engine.0, std::ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        &["out is NULL"],
    );
    let want = size_of::<mlart_engine_props>() as u32;
    for bad in [0, 4, want - 8, want + 8] {
        let mut p = MaybeUninit::<mlart_engine_props>::uninit();
        // SAFETY: every byte pattern is a valid mlart_engine_props.
        let mut p = unsafe {
            p.as_mut_ptr().write_bytes(0xab, 1);
            p.assume_init()
        };
        p.struct_size = bad;
        // SAFETY: plain old data viewed as bytes.
        let bytes = |p: &mlart_engine_props| unsafe {
            std::slice::from_raw_parts(
                (p as *const mlart_engine_props).cast::<u8>(),
                size_of::<mlart_engine_props>(),
            )
            .to_vec()
        };
        let before = bytes(&p);
        expect_error(
            &format!("engine_info(struct_size = {bad})"),
            mlart_engine_info(engine.0, &mut p),
            MLART_STATUS_INVALID_ARGUMENT,
            &[
                &format!("out->struct_size = {bad}"),
                "mlart_engine_props_init",
            ],
        );
        assert_eq!(bytes(&p), before, "props written on error");
    }
    // And the valid call fills it.
    let mut p = props();
    assert!(take_error(mlart_engine_info(engine.0, &mut p)).is_none());
    assert_eq!(p.backend, MLART_BACKEND_CPU);
    assert_eq!(p.num_threads, 1);
}

#[test]
fn error_object_conventions() {
    assert_eq!(mlart_error_code(std::ptr::null()), MLART_STATUS_OK);
    // SAFETY: static string.
    let ok = unsafe { CStr::from_ptr(mlart_error_message(std::ptr::null())) };
    assert_eq!(ok.to_str().unwrap(), "ok");
    mlart_error_free(std::ptr::null_mut());
    mlart_engine_free(std::ptr::null_mut());
    mlart_decode_args_init(std::ptr::null_mut());
    mlart_engine_options_init(std::ptr::null_mut());
    mlart_engine_props_init(std::ptr::null_mut());
    for (s, name) in [
        (MLART_STATUS_OK, "ok"),
        (MLART_STATUS_INVALID_ARGUMENT, "invalid argument"),
        (MLART_STATUS_NULL_POINTER, "null pointer"),
        (MLART_STATUS_UNSUPPORTED, "unsupported"),
        (MLART_STATUS_INTERNAL, "internal error"),
        (9999, "unknown status"),
    ] {
        assert_eq!(status_name(s), name);
    }
    // Defaults documented in mlart.h.
    let a = decode_args();
    assert_eq!(a.struct_size as usize, size_of::<mlart_decode_args>());
    assert_eq!(
        (a.s_q, a.softmax_scale, a.causal, a.memory),
        (1, 0.0, false, MLART_MEMORY_HOST)
    );
    assert_eq!(
        (a.q_dtype, a.kv_format, a.out_dtype),
        (MLART_DTYPE_BF16, MLART_KV_FORMAT_BF16, MLART_DTYPE_BF16)
    );
    assert!(a.indices.is_null() && a.lse.is_null() && a.attn_sink.is_null());
    let o = options();
    assert_eq!(o.struct_size as usize, size_of::<mlart_engine_options>());
    assert_eq!(
        (o.backend, o.device_index, o.num_threads, o.thread_affinity),
        (MLART_BACKEND_AUTO, 0, 0, MLART_AFFINITY_AUTO)
    );
}

/// The engine's placement of its CPU threads for each `thread_affinity`,
/// as `mlart_engine_info` reports it; and callers built against the 0.2
/// header (16-byte options, 532-byte props) still work.
#[test]
fn engine_thread_affinity() {
    let _env = env_read();
    let placement = |o: Option<&mlart_engine_options>, props_size: Option<u32>| {
        let mut e = sentinel_engine();
        let p = o.map_or(std::ptr::null(), |o| o as *const _);
        assert!(take_error(mlart_engine_create(p, &mut e)).is_none());
        let mut p = MaybeUninit::<mlart_engine_props>::uninit();
        // SAFETY: every byte pattern is a valid mlart_engine_props.
        let mut p = unsafe {
            p.as_mut_ptr().write_bytes(0xab, 1);
            p.assume_init()
        };
        p.struct_size = props_size.unwrap_or(size_of::<mlart_engine_props>() as u32);
        let r = take_error(mlart_engine_info(e, &mut p));
        mlart_engine_free(e);
        assert!(r.is_none(), "{r:?}");
        p
    };
    let text = |p: &mlart_engine_props| {
        // SAFETY: NUL-terminated by mlart_engine_info.
        unsafe { CStr::from_ptr(p.thread_placement.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    // Miri cannot ask the OS: mlart then reports no CPU affinity.
    let linux = cfg!(all(target_os = "linux", not(miri)));
    for (a, threads, want) in [
        (MLART_AFFINITY_NONE, 2, "not pinned (affinity NONE)"),
        (MLART_AFFINITY_PIN, 1, "pinned to CPUs "),
        (MLART_AFFINITY_PIN, 3, "pinned to CPUs "),
        (MLART_AFFINITY_AUTO, 0, "(auto: "),
    ] {
        let mut o = options();
        o.backend = MLART_BACKEND_CPU;
        o.num_threads = threads;
        o.thread_affinity = a;
        let t = text(&placement(Some(&o), None));
        if linux || a == MLART_AFFINITY_NONE {
            assert!(t.contains(want), "affinity {a}, {threads} threads: {t}");
        } else {
            assert!(t.contains("no CPU affinity"), "{t}");
        }
        if linux && a == MLART_AFFINITY_PIN {
            let cpus = t.split(' ').nth(3).unwrap_or_default();
            assert_eq!(cpus.split(',').count(), threads as usize, "{t}");
        }
    }
    // The 0.2 options layout ends before thread_affinity: AUTO is used and
    // the bytes after it are never read (the caller's struct has none; a
    // poisoned value there would be an invalid affinity).
    #[repr(C)]
    struct OldOptions {
        o: [u32; 4],
        poison: u32,
    }
    let old = OldOptions {
        o: [16, MLART_BACKEND_CPU, 0, 0],
        poison: 0xdead,
    };
    let mut e = sentinel_engine();
    let r = take_error(mlart_engine_create(
        &old as *const OldOptions as *const mlart_engine_options,
        &mut e,
    ));
    assert!(r.is_none(), "{r:?}");
    mlart_engine_free(e);
    // The 0.2 props layout: only its 532 bytes are written.
    let p = placement(None, Some(532));
    assert_eq!(p.struct_size, 532);
    assert!(
        p.thread_placement.iter().all(|&c| c as u8 == 0xab),
        "written past 532 bytes"
    );
    assert!(p.reason[0] != 0xabu8 as std::ffi::c_char);
    let p = placement(None, None);
    assert!(!text(&p).is_empty());
}

/// `mlart_device_count/info` and the engine memory helpers on a CPU engine.
#[test]
fn device_and_memory_function_errors() {
    use mlart::ffi::device::*;
    let inv = MLART_STATUS_INVALID_ARGUMENT;
    expect_error(
        "device_count(NULL)",
        mlart_device_count(std::ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        &["out"],
    );
    let mut dp = MaybeUninit::<mlart_device_props>::uninit();
    mlart_device_props_init(dp.as_mut_ptr());
    // SAFETY: initialized above.
    let mut dp = unsafe { dp.assume_init() };
    expect_error(
        "device_info(NULL)",
        mlart_device_info(0, std::ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        &["out"],
    );
    let mut bad = dp;
    bad.struct_size = 3;
    expect_error(
        "device_info struct_size",
        mlart_device_info(0, &mut bad),
        inv,
        &["struct_size = 3", "mlart_device_props_init"],
    );
    expect_error(
        "device_info(-1)",
        mlart_device_info(-1, &mut dp),
        inv,
        &["device_index = -1"],
    );
    let n = cuda_devices();
    let e = take_error(mlart_device_info(n, &mut dp)).expect("one past the last device");
    if n == 0 {
        assert_eq!(e.0, MLART_STATUS_UNSUPPORTED, "{}", e.1);
        assert!(e.1.contains("driver"), "{}", e.1);
    } else {
        assert_eq!(e.0, MLART_STATUS_NOT_FOUND, "{}", e.1);
        assert!(e.1.contains(&format!("device_index = {n}")), "{}", e.1);
    }

    let engine = Engine::new();
    let mut p: *mut c_void = std::ptr::null_mut();
    expect_error(
        "mem_alloc(NULL engine)",
        mlart_engine_mem_alloc(std::ptr::null_mut(), 8, &mut p),
        MLART_STATUS_NULL_POINTER,
        &["engine"],
    );
    expect_error(
        "mem_alloc(0)",
        mlart_engine_mem_alloc(engine.0, 0, &mut p),
        inv,
        &["bytes = 0"],
    );
    expect_error(
        "mem_alloc(out NULL)",
        mlart_engine_mem_alloc(engine.0, 8, std::ptr::null_mut()),
        MLART_STATUS_NULL_POINTER,
        &["out"],
    );
    assert!(p.is_null(), "a failed alloc wrote *out");
    // A CPU engine's memory is host memory: usable directly, copied by mem_copy.
    assert!(take_error(mlart_engine_mem_alloc(engine.0, 1000, &mut p)).is_none());
    assert!(!p.is_null() && (p as usize).is_multiple_of(256));
    let src: Vec<u8> = (0..1000).map(|i| (i * 7) as u8).collect();
    assert!(take_error(mlart_engine_mem_copy(
        engine.0,
        p,
        MLART_MEMORY_HOST,
        src.as_ptr() as *const c_void,
        MLART_MEMORY_HOST,
        1000
    ))
    .is_none());
    // SAFETY: p holds 1000 bytes just written.
    assert_eq!(
        unsafe { std::slice::from_raw_parts(p as *const u8, 1000) },
        &src[..]
    );
    expect_error(
        "mem_copy device on CPU",
        mlart_engine_mem_copy(
            engine.0,
            p,
            MLART_MEMORY_DEVICE,
            src.as_ptr() as *const c_void,
            MLART_MEMORY_HOST,
            10,
        ),
        MLART_STATUS_UNSUPPORTED,
        &["dst_memory = 1", "CPU"],
    );
    expect_error(
        "mem_copy bad memory",
        mlart_engine_mem_copy(engine.0, p, 7, src.as_ptr() as *const c_void, 0, 10),
        inv,
        &["dst_memory = 7"],
    );
    expect_error(
        "mem_copy overlap",
        mlart_engine_mem_copy(
            engine.0,
            p,
            MLART_MEMORY_HOST,
            (p as usize + 10) as *const c_void,
            MLART_MEMORY_HOST,
            100,
        ),
        inv,
        &["overlap"],
    );
    expect_error(
        "mem_copy NULL src",
        mlart_engine_mem_copy(engine.0, p, 0, std::ptr::null(), 0, 10),
        MLART_STATUS_NULL_POINTER,
        &["src"],
    );
    assert!(take_error(mlart_engine_mem_free(engine.0, p)).is_none());
    assert!(take_error(mlart_engine_mem_free(engine.0, std::ptr::null_mut())).is_none());
}

/// AUTO says in `mlart_engine_info` why it chose the CPU: without a GPU it
/// names the missing driver or device; with one, that the CUDA kernels are
/// not yet enabled for AUTO.
#[test]
fn auto_explains_its_backend_choice() {
    let _env = ENV_LOCK.write().unwrap_or_else(|e| e.into_inner());
    let saved = std::env::var_os("MLART_BACKEND");
    std::env::remove_var("MLART_BACKEND");
    let mut e = sentinel_engine();
    let r = take_error(mlart_engine_create(std::ptr::null(), &mut e));
    if let Some(v) = saved {
        std::env::set_var("MLART_BACKEND", v);
    }
    assert!(r.is_none(), "{r:?}");
    let mut p = props();
    assert!(take_error(mlart_engine_info(e, &mut p)).is_none());
    mlart_engine_free(e);
    // SAFETY: NUL-terminated by mlart_engine_info.
    let reason = unsafe { CStr::from_ptr(p.reason.as_ptr()) }.to_string_lossy();
    assert!(reason.starts_with("auto: "), "{reason}");
    if cuda_devices() == 0 {
        assert_eq!(p.backend, MLART_BACKEND_CPU, "{reason}");
        assert!(reason.contains("no usable CUDA device"), "{reason}");
    } else if !mlart::engine::AUTO_USES_CUDA {
        assert_eq!(p.backend, MLART_BACKEND_CPU, "{reason}");
        assert!(reason.contains("not yet verified"), "{reason}");
    }
}
