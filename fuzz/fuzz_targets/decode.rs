//! `mlart_decode_paged` through the C ABI with fuzzer-chosen shapes, block
//! tables, sequence lengths, index lists, sinks and dtypes over a cache
//! whose unused slots are NaN. Buffers are sized as the arguments say (the
//! caller's side of the contract); their contents are free.
//!
//! Checked: no panic anywhere; a SIMD kernel variant and the scalar
//! reference kernel agree on success or on the error status, and on the
//! output where both succeed.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mlart::ffi::decode::{mlart_decode_args, mlart_decode_args_init, mlart_decode_paged};
use mlart::ffi::engine::{
    mlart_engine, mlart_engine_create, mlart_engine_options, mlart_engine_options_init,
};
use mlart::ffi::error::{mlart_error_code, mlart_error_free, mlart_error_message};
use mlart::format::{KvFormat, KvLayout};
use std::ffi::CStr;
use std::sync::OnceLock;

mod common;
use common::Rng;

#[derive(Arbitrary, Debug)]
struct Sparse {
    topk: u8,
    indices: Vec<i32>,
    lengths: Option<Vec<i32>>,
    extra: Option<(u8, u8, u8, Vec<i32>)>, // blocks, block size, topk, indices
}

#[derive(Arbitrary, Debug)]
struct Input {
    variant: u8,
    batch: u8,
    s_q: u8,
    h_q: u8,
    format: u8,
    dims: u8,
    block_size: u8,
    num_blocks: u8,
    stride: u8,
    causal: bool,
    q_dtype: u8,
    out_dtype: u8,
    want_lse: bool,
    scale: u8,
    block_table: Vec<i32>,
    seqlens: Vec<i32>,
    sparse: Option<Sparse>,
    sink: Option<Vec<f32>>,
    seed: u64,
}

/// The variants to compare with the scalar kernel (those this CPU runs).
const VARIANTS: [&str; 4] = ["avx2", "avx512", "avx512bf16", "amx"];

struct Engines {
    scalar: Engine,
    simd: Vec<(&'static str, Engine)>,
}

struct Engine(*mut mlart_engine);
// SAFETY: engines are thread-safe handles (mlart.h); libFuzzer runs the
// target on one thread anyway.
unsafe impl Send for Engine {}
unsafe impl Sync for Engine {}

fn create(isa: &str, threads: i32) -> Option<Engine> {
    std::env::set_var("MLART_CPU_ISA", isa);
    std::env::set_var("MLART_AMX_EMULATE", "1");
    let mut o = std::mem::MaybeUninit::<mlart_engine_options>::uninit();
    mlart_engine_options_init(o.as_mut_ptr());
    // SAFETY: initialised by mlart_engine_options_init.
    let mut o = unsafe { o.assume_init() };
    o.backend = 1; // CPU
    o.num_threads = threads;
    let mut e = std::ptr::null_mut();
    let err = mlart_engine_create(&o, &mut e);
    std::env::remove_var("MLART_CPU_ISA");
    std::env::remove_var("MLART_AMX_EMULATE");
    if err.is_null() {
        Some(Engine(e))
    } else {
        mlart_error_free(err);
        None
    }
}

fn engines() -> &'static Engines {
    static E: OnceLock<Engines> = OnceLock::new();
    E.get_or_init(|| Engines {
        scalar: create("scalar", 1).expect("the scalar kernel runs everywhere"),
        simd: VARIANTS
            .iter()
            .filter_map(|&v| create(v, 2).map(|e| (v, e)))
            .collect(),
    })
}

fn fit(v: &[i32], n: usize, fill: i32) -> Vec<i32> {
    (0..n)
        .map(|i| if v.is_empty() { fill } else { v[i % v.len()] })
        .collect()
}

/// A cache of `blocks` blocks: 0xff bytes (NaN in every format) except the
/// rows at `used` positions, which hold random finite values.
fn cache(layout: &KvLayout, blocks: usize, used: &[i64], rng: &mut Rng) -> Vec<u8> {
    let mut c = vec![0xffu8; layout.cache_bytes(blocks).expect("a small cache")];
    let positions = (blocks * layout.block_size) as i64;
    let mut row = vec![0f32; layout.d_qk];
    for &p in used {
        if (0..positions).contains(&p) {
            row.iter_mut().for_each(|x| *x = rng.next());
            let p = p as usize;
            layout.store_row(&mut c, p / layout.block_size, p % layout.block_size, &row);
        }
    }
    c
}

fn dtype_size(d: u32) -> usize {
    if d == 0 {
        4
    } else {
        2
    }
}

fn fill_activations(dtype: u32, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut v = Vec::with_capacity(n * dtype_size(dtype));
    for _ in 0..n {
        let x = rng.next();
        match dtype {
            0 => v.extend_from_slice(&x.to_le_bytes()),
            1 => v.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
            _ => v.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
        }
    }
    v
}

fn to_f32(dtype: u32, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        0 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        1 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Runs one decode; `Ok((out, lse))` or the error's status and message.
fn run(
    e: &Engine,
    args: &mlart_decode_args,
    out_bytes: usize,
    lse_n: usize,
) -> Result<(Vec<u8>, Vec<f32>), (u32, String)> {
    // Poisoned outputs: every element must be written.
    let mut out = vec![0x7fu8; out_bytes];
    let mut lse = vec![f32::NAN; lse_n];
    let mut a = *args;
    a.out = out.as_mut_ptr().cast();
    a.lse = if lse_n > 0 {
        lse.as_mut_ptr()
    } else {
        std::ptr::null_mut()
    };
    let err = mlart_decode_paged(e.0, &a);
    if err.is_null() {
        return Ok((out, lse));
    }
    let code = mlart_error_code(err);
    // SAFETY: a live error's message is a NUL-terminated string.
    let msg = unsafe { CStr::from_ptr(mlart_error_message(err)) }
        .to_string_lossy()
        .into_owned();
    mlart_error_free(err);
    Err((code, msg))
}

fuzz_target!(|inp: Input| {
    let es = engines();
    if es.simd.is_empty() {
        return;
    }
    let (name, simd) = &es.simd[inp.variant as usize % es.simd.len()];
    let format = KvFormat::from_raw("fmt", (inp.format % 5) as u32).unwrap();
    let (d_qk, d_v) = match format {
        KvFormat::Fp8V32 => (576, 512),
        KvFormat::Fp8Model1 => (512, 448),
        _ => {
            let d_qk = [8usize, 16, 36, 64, 72, 576][inp.dims as usize % 6];
            let d_v = [d_qk, d_qk / 2, 8, (d_qk - 4).max(1)][(inp.dims / 6) as usize % 4];
            (d_qk, d_v)
        }
    };
    // Small sizes; zero and negative values come from the arguments below.
    let batch = 1 + inp.batch as usize % 4;
    let s_q = 1 + inp.s_q as usize % 3;
    let h_q = 1 + inp.h_q as usize % 20;
    let bs = 1 + inp.block_size as usize % 8;
    let blocks = 1 + inp.num_blocks as usize % 8;
    let stride = 1 + inp.stride as usize % 6;
    let Ok(layout) = KvLayout::new(format, d_qk, bs, "fuzz") else {
        return;
    };
    let q_dtype = (inp.q_dtype % 3) as u32;
    let out_dtype = (inp.out_dtype % 3) as u32;
    let scale = [0.0f32, 0.05, 0.2, -0.1][inp.scale as usize % 4];
    let mut rng = Rng(inp.seed);

    let block_table = fit(&inp.block_table, batch * stride, 0);
    let seqlens = fit(&inp.seqlens, batch, 1);
    let q = fill_activations(q_dtype, batch * s_q * h_q * d_qk, &mut rng);
    let sink = inp.sink.as_ref().map(|s| {
        fit(
            &s.iter().map(|x| x.to_bits() as i32).collect::<Vec<_>>(),
            h_q,
            0,
        )
        .into_iter()
        .map(|b| f32::from_bits(b as u32))
        .collect::<Vec<f32>>()
    });

    let mut args = std::mem::MaybeUninit::<mlart_decode_args>::uninit();
    mlart_decode_args_init(args.as_mut_ptr());
    // SAFETY: initialised by mlart_decode_args_init.
    let mut args = unsafe { args.assume_init() };
    args.batch = batch as i32;
    args.s_q = s_q as i32;
    args.h_q = h_q as i32;
    args.d_qk = d_qk as i32;
    args.d_v = d_v as i32;
    args.softmax_scale = scale;
    args.causal = inp.causal;
    args.q_dtype = q_dtype;
    args.q = q.as_ptr().cast();
    args.kv_format = format.raw();
    args.num_blocks = blocks as i32;
    args.block_size = bs as i32;
    args.out_dtype = out_dtype;
    if let Some(s) = &sink {
        args.attn_sink = s.as_ptr();
    }

    // Keep the buffers alive until the calls return.
    let kv;
    let (indices, lengths, extra_kv, extra_indices);
    match &inp.sparse {
        None => {
            let mut used = Vec::new();
            for b in 0..batch {
                let len = seqlens[b].clamp(0, (stride * bs) as i32) as usize;
                for t in 0..len {
                    let id = block_table[b * stride + t / bs] as i64;
                    used.push(id * bs as i64 + (t % bs) as i64);
                }
            }
            kv = cache(&layout, blocks, &used, &mut rng);
            args.kv = kv.as_ptr().cast();
            args.block_table = block_table.as_ptr();
            args.block_table_stride = stride as i32;
            args.seqlens = seqlens.as_ptr();
        }
        Some(sp) => {
            let topk = 1 + sp.topk as usize % 40;
            indices = fit(&sp.indices, batch * s_q * topk, -1);
            let used: Vec<i64> = indices.iter().map(|&p| p as i64).collect();
            kv = cache(&layout, blocks, &used, &mut rng);
            args.kv = kv.as_ptr().cast();
            args.indices = indices.as_ptr();
            args.topk = topk as i32;
            lengths = sp.lengths.as_ref().map(|l| fit(l, batch, topk as i32));
            if let Some(l) = &lengths {
                args.topk_length = l.as_ptr();
            }
            if let Some((xb, xbs, xk, xi)) = &sp.extra {
                let (xb, xbs, xk) = (
                    1 + *xb as usize % 4,
                    1 + *xbs as usize % 8,
                    1 + *xk as usize % 20,
                );
                let Ok(xl) = KvLayout::new(format, d_qk, xbs, "fuzz") else {
                    return;
                };
                extra_indices = fit(xi, batch * s_q * xk, -1);
                let used: Vec<i64> = extra_indices.iter().map(|&p| p as i64).collect();
                extra_kv = cache(&xl, xb, &used, &mut rng);
                args.extra_kv = extra_kv.as_ptr().cast();
                args.extra_num_blocks = xb as i32;
                args.extra_block_size = xbs as i32;
                args.extra_indices = extra_indices.as_ptr();
                args.extra_topk = xk as i32;
            }
        }
    }

    let out_n = batch * s_q * h_q * d_v;
    let lse_n = if inp.want_lse { batch * s_q * h_q } else { 0 };
    let out_bytes = out_n * dtype_size(out_dtype);
    let want = run(&es.scalar, &args, out_bytes, lse_n);
    let got = run(simd, &args, out_bytes, lse_n);
    match (&want, &got) {
        (Err((a, _)), Err((b, _))) => assert_eq!(a, b, "{name}: {got:?} vs scalar {want:?}"),
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
            panic!("{name} and scalar disagree on success: {e:?}")
        }
        (Ok((wo, wl)), Ok((go, gl))) => {
            let (wo, go) = (to_f32(out_dtype, wo), to_f32(out_dtype, go));
            for r in 0..batch * s_q * h_q {
                let (w, g) = (&wo[r * d_v..][..d_v], &go[r * d_v..][..d_v]);
                let norm = w.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let diff = w
                    .iter()
                    .zip(g)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                assert!(
                    w.iter().chain(g).all(|x| x.is_finite()),
                    "{name}: non-finite output in row {r}"
                );
                assert!(
                    diff <= 2e-2 * norm.max(1e-3),
                    "{name}: row {r} differs from scalar: |d| {diff} vs |out| {norm}"
                );
            }
            for (i, (a, b)) in wl.iter().zip(gl).enumerate() {
                let ok = if a.is_finite() {
                    (a - b).abs() <= 1e-2 * (1.0 + a.abs())
                } else {
                    a == b
                };
                assert!(ok, "{name}: lse[{i}] {b} vs scalar {a}");
            }
        }
    }
});
