//! Every CPU kernel variant, forced with `MLART_CPU_ISA`, against an
//! independent float64 reference on fresh random inputs: dense (varlen,
//! causal MTP, NaN-poisoned unused slots) and sparse (invalid indices, extra
//! cache, sink), every cache format, odd head counts and dims that are not
//! multiples of the vector width. A variant this CPU lacks must be refused
//! with UNSUPPORTED rather than silently replaced.

use mlart::ffi::decode::*;
use mlart::ffi::engine::*;
use mlart::ffi::error::*;
use mlart::ffi::format::*;
use mlart::ffi::types::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::ffi::CStr;
use std::ptr;

fn err_text(e: *mut mlart_error) -> String {
    // SAFETY: e is a live error from the library.
    let m = unsafe { CStr::from_ptr(mlart_error_message(e)) }
        .to_string_lossy()
        .into_owned();
    let code = mlart_error_code(e);
    mlart_error_free(e);
    format!("status {code}: {m}")
}

fn check(e: *mut mlart_error, what: &str) {
    assert!(e.is_null(), "{what}: {}", err_text(e));
}

struct Engine(*mut mlart_engine);
impl Drop for Engine {
    fn drop(&mut self) {
        mlart_engine_free(self.0);
    }
}

/// Creates a 2-thread engine with `MLART_CPU_ISA=isa`. AMX runs on the
/// library's software tile model (`MLART_AMX_EMULATE=1`) where the CPU
/// has no AMX; the name then says so.
fn engine_for(isa: &str) -> Result<(Engine, String), (u32, String)> {
    let hw = engine_with(isa, false);
    match hw {
        Err((MLART_STATUS_UNSUPPORTED, _)) if isa == "amx" => {
            engine_with(isa, true).map(|e| (e, "amx (emulated tiles)".to_string()))
        }
        _ => hw.map(|e| (e, isa.to_string())),
    }
}

fn engine_with(isa: &str, emulate_amx: bool) -> Result<Engine, (u32, String)> {
    // Tests run on parallel threads: one engine creation at a time.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("MLART_CPU_ISA", isa);
    if emulate_amx {
        std::env::set_var("MLART_AMX_EMULATE", "1");
    }
    let mut opts = unsafe { std::mem::zeroed::<mlart_engine_options>() };
    mlart_engine_options_init(&mut opts);
    opts.num_threads = 2;
    let mut e = ptr::null_mut();
    let r = mlart_engine_create(&opts, &mut e);
    std::env::remove_var("MLART_CPU_ISA");
    std::env::remove_var("MLART_AMX_EMULATE");
    if r.is_null() {
        Ok(Engine(e))
    } else {
        let code = mlart_error_code(r);
        Err((code, err_text(r)))
    }
}

fn normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// One random problem: logical keys per sequence, a paged cache built with
/// mlart_kv_quantize (any format), and the exact dequantized key values.
struct Case {
    batch: usize,
    s_q: usize,
    h_q: usize,
    d_qk: usize,
    d_v: usize,
    format: u32,
    block_size: usize,
    causal: bool,
    sparse: bool,
    q: Vec<f32>,
    /// `q` holds bf16-exact values and is passed as BF16 (exercises the
    /// bf16 dot-product path of the avx512bf16 variant).
    q_bf16: bool,
    /// The output is bf16 (with bf16 queries: P·V on bf16 too, and both
    /// AMX GEMMs on tiles).
    out_bf16: bool,
    lens: Vec<usize>,
    /// Per sequence, per token: the values the kernel reads (dequantized).
    keys: Vec<Vec<Vec<f64>>>,
    kv: Vec<u8>,
    num_blocks: usize,
    table: Vec<i32>,
    stride: usize,
    /// Sparse: logical (seq, token) per index, -1 = none; also as cache positions.
    logical: Vec<i64>,
    indices: Vec<i32>,
    topk: usize,
    sink: Option<Vec<f32>>,
}

/// Fixed geometry for a case; `None` fields are drawn at random.
#[derive(Default, Clone)]
struct Spec {
    lens: Option<Vec<usize>>,
    block_size: Option<usize>,
    h_q: Option<usize>,
    s_q: Option<usize>,
    causal: Option<bool>,
    /// Keys drift along the sequence: the queries are made positive and key
    /// t gets a drift in every value that raises its scaled scores by about
    /// `trend * t`, so a kernel's running max keeps jumping (rescaling O).
    trend: Option<f64>,
}

fn make_case(rng: &mut SmallRng, format: u32, sparse: bool) -> Case {
    make_case_with(rng, format, sparse, &Spec::default())
}

fn make_case_with(rng: &mut SmallRng, format: u32, sparse: bool, spec: &Spec) -> Case {
    let (d_qk, d_v) = match format {
        MLART_KV_FORMAT_FP8_V32 => (576, 512),
        MLART_KV_FORMAT_FP8_MODEL1 => (512, 512),
        _ => *[(576, 512), (64, 40), (40, 3), (512, 512), (33, 17)]
            .get(rng.random_range(0..5))
            .unwrap(),
    };
    let batch = spec
        .lens
        .as_ref()
        .map_or_else(|| rng.random_range(1..4), |l| l.len());
    let s_q = spec.s_q.unwrap_or_else(|| rng.random_range(1..4));
    let h_q = spec
        .h_q
        .unwrap_or_else(|| *[1usize, 7, 16, 128].get(rng.random_range(0..4)).unwrap());
    let block_size = spec
        .block_size
        .unwrap_or_else(|| *[1usize, 16, 64, 100].get(rng.random_range(0..4)).unwrap());
    let causal = spec
        .causal
        .unwrap_or_else(|| !sparse && rng.random_bool(0.5));
    let lens: Vec<usize> = spec.lens.clone().unwrap_or_else(|| {
        (0..batch)
            .map(|_| match rng.random_range(0..4) {
                0 => 0,
                1 => rng.random_range(1..5),
                _ => rng.random_range(1..300),
            })
            .collect()
    });
    let stride = lens
        .iter()
        .map(|l| l.div_ceil(block_size))
        .max()
        .unwrap_or(0)
        .max(1)
        + 1;
    let used: usize = lens.iter().map(|l| l.div_ceil(block_size)).sum();
    let num_blocks = used + 2; // two blocks nobody references
    let mut perm: Vec<usize> = (0..num_blocks).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.random_range(0..=i));
    }
    // Original rows, quantized into their blocks; unused slots stay NaN rows.
    let mut rows = vec![f32::NAN; num_blocks * block_size * d_qk];
    let mut table = vec![i32::MAX; batch * stride];
    let mut next = 0;
    for (b, &len) in lens.iter().enumerate() {
        for j in 0..len.div_ceil(block_size) {
            table[b * stride + j] = perm[next] as i32;
            next += 1;
        }
        for t in 0..len {
            let slot = table[b * stride + t / block_size] as usize * block_size + t % block_size;
            // |N(0, 1/100)| has mean 0.08: a drift c adds about c * 0.08 * d
            // to a dot product, c * 0.08 * sqrt(d) to a scaled score.
            let drift = spec
                .trend
                .map_or(0.0, |r| r / (0.08 * (d_qk as f64).sqrt()) * t as f64);
            for x in &mut rows[slot * d_qk..(slot + 1) * d_qk] {
                *x = ((normal(rng) / 10.0).clamp(-1.0, 1.0) + drift) as f32;
            }
        }
    }
    let mut block_bytes = 0usize;
    check(
        mlart_kv_block_bytes(format, d_qk as i32, block_size as i32, &mut block_bytes),
        "block bytes",
    );
    let mut kv = vec![0u8; num_blocks * block_bytes];
    let n_tok = (num_blocks * block_size) as i32;
    check(
        mlart_kv_quantize(
            format,
            d_qk as i32,
            block_size as i32,
            n_tok,
            MLART_DTYPE_F32,
            rows.as_ptr().cast(),
            kv.as_mut_ptr().cast(),
        ),
        "quantize",
    );
    let mut deq = vec![0f32; rows.len()];
    check(
        mlart_kv_dequantize(
            format,
            d_qk as i32,
            block_size as i32,
            n_tok,
            kv.as_ptr().cast(),
            MLART_DTYPE_F32,
            deq.as_mut_ptr().cast(),
        ),
        "dequantize",
    );
    let keys = lens
        .iter()
        .enumerate()
        .map(|(b, &len)| {
            (0..len)
                .map(|t| {
                    let slot =
                        table[b * stride + t / block_size] as usize * block_size + t % block_size;
                    deq[slot * d_qk..(slot + 1) * d_qk]
                        .iter()
                        .map(|&x| x as f64)
                        .collect()
                })
                .collect()
        })
        .collect();
    let q: Vec<f32> = (0..batch * s_q * h_q * d_qk)
        .map(|_| (normal(rng) / 10.0).clamp(-1.0, 1.0))
        .map(|x| if spec.trend.is_some() { x.abs() } else { x } as f32)
        .collect();
    let q_bf16 = matches!(
        format,
        MLART_KV_FORMAT_BF16 | MLART_KV_FORMAT_FP8_V32 | MLART_KV_FORMAT_FP8_MODEL1
    ) && rng.random_bool(0.7);
    let q: Vec<f32> = if q_bf16 {
        q.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    } else {
        q
    };
    let out_bf16 = q_bf16 && rng.random_bool(0.5);
    let (mut logical, mut indices, mut topk) = (Vec::new(), Vec::new(), 0);
    if sparse {
        topk = *[1usize, 5, 64, 130].get(rng.random_range(0..4)).unwrap();
        for b in 0..batch {
            for _ in 0..s_q * topk {
                if lens[b] == 0 || rng.random_bool(0.2) {
                    logical.push(-1);
                    indices.push(-1);
                } else {
                    let t = rng.random_range(0..lens[b]);
                    logical.push(t as i64);
                    indices.push(
                        table[b * stride + t / block_size] * block_size as i32
                            + (t % block_size) as i32,
                    );
                }
            }
        }
    }
    let sink = (sparse && rng.random_bool(0.5)).then(|| {
        (0..h_q)
            .map(|h| match h % 3 {
                0 => f32::NEG_INFINITY,
                1 => normal(rng) as f32,
                _ => f32::INFINITY,
            })
            .collect()
    });
    Case {
        batch,
        s_q,
        h_q,
        d_qk,
        d_v,
        format,
        block_size,
        causal,
        sparse,
        q,
        q_bf16,
        out_bf16,
        lens,
        keys,
        kv,
        num_blocks,
        table,
        stride,
        logical,
        indices,
        topk,
        sink,
    }
}

/// float64 attention: returns out [b, s_q, h_q, d_v] and lse [b, h_q, s_q].
fn reference(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (c.d_qk as f64).sqrt();
    let mut out = vec![0.0; c.batch * c.s_q * c.h_q * c.d_v];
    let mut lse = vec![0.0; c.batch * c.h_q * c.s_q];
    for b in 0..c.batch {
        for i in 0..c.s_q {
            let seen: Vec<&Vec<f64>> = if c.sparse {
                c.logical[(b * c.s_q + i) * c.topk..][..c.topk]
                    .iter()
                    .filter(|&&t| t >= 0)
                    .map(|&t| &c.keys[b][t as usize])
                    .collect()
            } else {
                let vis = if c.causal {
                    (c.lens[b] + i + 1).saturating_sub(c.s_q)
                } else {
                    c.lens[b]
                };
                c.keys[b][..vis].iter().collect()
            };
            for h in 0..c.h_q {
                let qo = ((b * c.s_q + i) * c.h_q + h) * c.d_qk;
                let q = &c.q[qo..qo + c.d_qk];
                let s: Vec<f64> = seen
                    .iter()
                    .map(|k| scale * k.iter().zip(q).map(|(a, &b)| a * b as f64).sum::<f64>())
                    .collect();
                let oo = ((b * c.s_q + i) * c.h_q + h) * c.d_v;
                let lo = (b * c.h_q + h) * c.s_q + i;
                if s.is_empty() {
                    lse[lo] = f64::INFINITY;
                    continue;
                }
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[lo] = m + z.ln();
                let mut w = 1.0 / z;
                if let Some(sink) = &c.sink {
                    w /= 1.0 + (sink[h] as f64 - lse[lo]).exp();
                }
                for (k, sv) in seen.iter().zip(&s) {
                    let p = (sv - m).exp() * w;
                    for x in 0..c.d_v {
                        out[oo + x] += p * k[x];
                    }
                }
            }
        }
    }
    (out, lse)
}

fn run(engine: &Engine, c: &Case) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![f32::NAN; c.batch * c.s_q * c.h_q * c.d_v];
    let mut lse = vec![f32::NAN; c.batch * c.h_q * c.s_q];
    let mut a = unsafe { std::mem::zeroed::<mlart_decode_args>() };
    mlart_decode_args_init(&mut a);
    a.batch = c.batch as i32;
    a.s_q = c.s_q as i32;
    a.h_q = c.h_q as i32;
    a.d_qk = c.d_qk as i32;
    a.d_v = c.d_v as i32;
    a.causal = c.causal;
    let q_bytes: Vec<u8> =
        c.q.iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
    if c.q_bf16 {
        a.q_dtype = MLART_DTYPE_BF16;
        a.q = q_bytes.as_ptr().cast();
    } else {
        a.q_dtype = MLART_DTYPE_F32;
        a.q = c.q.as_ptr().cast();
    }
    a.kv_format = c.format;
    a.kv = c.kv.as_ptr().cast();
    a.num_blocks = c.num_blocks as i32;
    a.block_size = c.block_size as i32;
    let lens: Vec<i32> = c.lens.iter().map(|&l| l as i32).collect();
    if c.sparse {
        a.indices = c.indices.as_ptr();
        a.topk = c.topk as i32;
    } else {
        a.block_table = c.table.as_ptr();
        a.block_table_stride = c.stride as i32;
        a.seqlens = lens.as_ptr();
    }
    if let Some(s) = &c.sink {
        a.attn_sink = s.as_ptr();
    }
    // A bf16 output starts as NaN bits too (0x7fc0).
    let mut out16 = vec![0x7fc0u16; out.len()];
    if c.out_bf16 {
        a.out_dtype = MLART_DTYPE_BF16;
        a.out = out16.as_mut_ptr().cast();
    } else {
        a.out_dtype = MLART_DTYPE_F32;
        a.out = out.as_mut_ptr().cast();
    }
    a.lse = lse.as_mut_ptr();
    check(mlart_decode_paged(engine.0, &a), "decode");
    if c.out_bf16 {
        out = out16
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
    }
    (out, lse)
}

/// rel-L2 bound: f32 arithmetic on exact inputs, or a bf16 output (whose
/// rounding, with P rounded to bf16, costs about 2e-3 at most).
fn tolerance(c: &Case) -> f64 {
    if c.out_bf16 {
        4e-3
    } else {
        1e-5
    }
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn every_cpu_variant_matches_the_f64_reference() {
    let formats = [
        MLART_KV_FORMAT_F32,
        MLART_KV_FORMAT_BF16,
        MLART_KV_FORMAT_F16,
        MLART_KV_FORMAT_FP8_V32,
        MLART_KV_FORMAT_FP8_MODEL1,
    ];
    let mut tested = Vec::new();
    for isa in ["scalar", "avx2", "avx512", "avx512bf16", "amx"] {
        let (engine, name) = match engine_for(isa) {
            Ok(e) => e,
            Err((code, msg)) => {
                // Refused, never silently replaced: the CPU or build lacks it.
                assert_eq!(code, MLART_STATUS_UNSUPPORTED, "{isa}: {msg}");
                assert!(msg.contains(isa), "{isa}: {msg}");
                println!("SKIPPED {isa}: not available here ({msg})");
                continue;
            }
        };
        let mut props = unsafe { std::mem::zeroed::<mlart_engine_props>() };
        mlart_engine_props_init(&mut props);
        check(mlart_engine_info(engine.0, &mut props), "info");
        let want_isa = match isa {
            "scalar" => MLART_CPU_ISA_SCALAR,
            "avx2" => MLART_CPU_ISA_AVX2,
            "avx512" => MLART_CPU_ISA_AVX512,
            "avx512bf16" => MLART_CPU_ISA_AVX512_BF16,
            _ => MLART_CPU_ISA_AMX,
        };
        assert_eq!(props.cpu_isa, want_isa, "{isa}");
        let seed = 0x15A0_0000 + tested.len() as u64;
        let mut rng = SmallRng::seed_from_u64(seed);
        // Worst rel-L2 with f32 outputs, and with bf16 ones.
        let mut worst = [0f64; 2];
        for case_no in 0..30 {
            let format = formats[case_no % formats.len()];
            let sparse = case_no % 3 == 2;
            let c = make_case(&mut rng, format, sparse);
            let (out, lse) = run(&engine, &c);
            let (rout, rlse) = reference(&c);
            let what = format!(
                "{name} seed {seed:#x} case {case_no}: format {} sparse {} b {} s_q {} h_q {} d {}/{} bs {} causal {} lens {:?} topk {} q/out bf16 {}/{}",
                c.format, c.sparse, c.batch, c.s_q, c.h_q, c.d_qk, c.d_v, c.block_size, c.causal, c.lens, c.topk, c.q_bf16, c.out_bf16
            );
            assert!(
                out.iter().all(|x| x.is_finite()),
                "{what}: non-finite output"
            );
            let err = rel_l2(&out, &rout);
            // f32 arithmetic on the exact (dequantized) key values.
            if rout.iter().any(|&x| x != 0.0) {
                assert!(err <= tolerance(&c), "{what}: rel-L2 {err:e}");
                worst[c.out_bf16 as usize] = worst[c.out_bf16 as usize].max(err);
            } else {
                assert!(
                    out.iter().all(|&x| x == 0.0),
                    "{what}: expected all-zero output"
                );
            }
            for (k, (&g, &w)) in lse.iter().zip(&rlse).enumerate() {
                if w.is_infinite() {
                    assert_eq!(g, f32::INFINITY, "{what}: lse[{k}]");
                } else {
                    assert!((g as f64 - w).abs() <= 1e-4, "{what}: lse[{k}] {g} vs {w}");
                }
            }
        }
        println!(
            "{name}: 30 cases, worst rel-L2 {:.2e} (f32 out) / {:.2e} (bf16 out)",
            worst[0], worst[1]
        );
        tested.push(isa);
    }
    assert!(
        tested.contains(&"scalar"),
        "the scalar reference kernel must always be available"
    );
}

/// Split-KV edges on every variant: with 2 workers a single 65-token
/// sequence is split into 64 + 1 tokens (a one-token split), and with block
/// size 100 the 64-token split boundaries cut blocks; causal MTP makes the
/// last split partly masked.
#[test]
fn split_edges_match_the_reference_on_every_variant() {
    let long_h128 = Spec {
        lens: Some(vec![1100]),
        block_size: Some(64),
        h_q: Some(128),
        s_q: Some(1),
        causal: Some(false),
        ..Spec::default()
    };
    let long_h16 = Spec {
        lens: Some(vec![1300]),
        block_size: Some(100),
        h_q: Some(16),
        s_q: Some(1),
        causal: Some(true),
        ..Spec::default()
    };
    let specs = [
        Spec {
            lens: Some(vec![65]),
            block_size: Some(16),
            h_q: Some(16),
            s_q: Some(1),
            causal: Some(false),
            ..Spec::default()
        },
        Spec {
            lens: Some(vec![65]),
            block_size: Some(100),
            h_q: Some(7),
            s_q: Some(2),
            causal: Some(true),
            ..Spec::default()
        },
        Spec {
            lens: Some(vec![150]),
            block_size: Some(100),
            h_q: Some(128),
            s_q: Some(1),
            causal: Some(false),
            ..Spec::default()
        },
        Spec {
            lens: Some(vec![129]),
            block_size: Some(1),
            h_q: Some(3),
            s_q: Some(4),
            causal: Some(true),
            ..Spec::default()
        },
        // Splits longer than the AMX kernel's 256-key tiles: the online
        // softmax carries across tiles (many rows, and 16 rows with V read
        // from the keys).
        long_h128.clone(),
        long_h16.clone(),
        // Scores rising along the keys: the running max jumps from tile to
        // tile (by more than the AMX kernel's lazy-rescale slack, checked
        // below) and O is rescaled after the first tile.
        Spec {
            trend: Some(0.0625),
            ..long_h128
        },
        Spec {
            trend: Some(0.0625),
            s_q: Some(2),
            ..long_h16
        },
    ];
    let mut ran = 0;
    for isa in ["scalar", "avx2", "avx512", "avx512bf16", "amx"] {
        let Ok((engine, name)) = engine_for(isa) else {
            println!("SKIPPED {isa}: not available on this CPU");
            continue;
        };
        let mut rng = SmallRng::seed_from_u64(0x5_1117);
        for (k, spec) in specs.iter().enumerate() {
            for format in [
                MLART_KV_FORMAT_F32,
                MLART_KV_FORMAT_FP8_V32,
                MLART_KV_FORMAT_BF16,
            ] {
                let c = make_case_with(&mut rng, format, false, spec);
                if spec.trend.is_some() {
                    // Row 0's scaled scores: each 256 keys' max tops the
                    // last 256's by more than 8.
                    let scale = 1.0 / (c.d_qk as f64).sqrt();
                    let q = &c.q[..c.d_qk];
                    let tile_max = |t: usize| {
                        c.keys[0][256 * t..256 * (t + 1)]
                            .iter()
                            .map(|k| {
                                scale * k.iter().zip(q).map(|(a, &b)| a * b as f64).sum::<f64>()
                            })
                            .fold(f64::NEG_INFINITY, f64::max)
                    };
                    for t in 1..4 {
                        let jump = tile_max(t) - tile_max(t - 1);
                        assert!(
                            jump > 8.0,
                            "spec {k}: the max rose by only {jump} at tile {t}"
                        );
                    }
                }
                let (out, lse) = run(&engine, &c);
                let (rout, rlse) = reference(&c);
                let err = rel_l2(&out, &rout);
                assert!(
                    err <= tolerance(&c),
                    "{name} spec {k} format {format}: rel-L2 {err:e}"
                );
                for (g, w) in lse.iter().zip(&rlse) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 || (w.is_infinite() && *g == f32::INFINITY)
                    );
                }
                ran += 1;
            }
        }
    }
    assert!(ran >= specs.len() * 2, "the scalar kernel always runs");
}
