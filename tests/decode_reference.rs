//! `mlart_decode_paged` against an independent float64 reference.
//!
//! Everything goes through the C ABI exactly as a host would call it. The
//! reference below is written from the documented semantics (FlashMLA's
//! `flash_mla_with_kvcache`) and shares no code with the library: it reads
//! the logical (unpaged) keys, in f64, after rounding every input to the
//! dtype the kernel reads, so the only difference left is the kernel's own
//! arithmetic and the rounding of the output.
//!
//! Inputs are fresh random values per case, from a fixed base seed mixed
//! with a per-case counter; every failure message prints the seed.
//! Caches are paged through shuffled, interleaved block tables; slots past a
//! sequence's end and blocks nobody references hold NaN, block-table padding
//! holds out-of-range ids, and the outputs are NaN-poisoned before each call.

mod common;

use common::{rel_l2, sample, take_error, Dt, Engine, DTS, ENV_LOCK};
use mlart::ffi::decode::*;
use mlart::ffi::engine::*;
use mlart::ffi::types::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::time::Instant;

// ---------------------------------------------------------------------------
// Engines: `common::Engine` (whose creation holds the read side of
// `common::ENV_LOCK`), plus creation with a chosen backend for the test that
// sets MLART_CPU_ISA under the write side.
// ---------------------------------------------------------------------------

impl Engine {
    fn create_unlocked(backend: mlart_backend, threads: i32) -> Engine {
        let mut opts = MaybeUninit::<mlart_engine_options>::uninit();
        mlart_engine_options_init(opts.as_mut_ptr());
        // SAFETY: initialized by mlart_engine_options_init.
        let mut opts = unsafe { opts.assume_init() };
        opts.backend = backend;
        opts.num_threads = threads;
        let mut ptr = std::ptr::null_mut();
        if let Some((code, msg)) = take_error(mlart_engine_create(&opts, &mut ptr)) {
            panic!("mlart_engine_create(threads = {threads}) failed: {code}: {msg}");
        }
        assert!(!ptr.is_null());
        Engine { ptr, threads }
    }

    fn props(&self) -> mlart_engine_props {
        let mut p = MaybeUninit::<mlart_engine_props>::uninit();
        mlart_engine_props_init(p.as_mut_ptr());
        // SAFETY: initialized by mlart_engine_props_init.
        let mut p = unsafe { p.assume_init() };
        if let Some((code, msg)) = take_error(mlart_engine_info(self.ptr, &mut p)) {
            panic!("mlart_engine_info failed: {code}: {msg}");
        }
        p
    }
}

// ---------------------------------------------------------------------------
// Element types: `common::Dt`, written out independently of the library.
// ---------------------------------------------------------------------------

/// NaN-filled buffer of `n` elements of `dt`.
fn nan_buffer(dt: Dt, n: usize) -> Vec<u8> {
    dt.nan().repeat(n)
}

// ---------------------------------------------------------------------------
// Random inputs.
// ---------------------------------------------------------------------------

const BASE_SEED: u64 = 0x6d6c_6172_745f_7265;

/// Fixed base seed mixed with the group salt and the case counter.
fn case_seed(salt: u64, counter: u64) -> u64 {
    let mut z = BASE_SEED ^ salt.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ counter;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Debug)]
struct Case {
    group: &'static str,
    batch: usize,
    s_q: usize,
    h_q: usize,
    d_qk: usize,
    d_v: usize,
    causal: bool,
    block_size: usize,
    kv: Dt,
    q: Dt,
    out: Dt,
    seqlens: Vec<usize>,
    /// 0 = the default 1/sqrt(d_qk).
    scale: f32,
    with_lse: bool,
}

impl Case {
    fn strict(&self) -> bool {
        self.kv == Dt::F32 && self.q == Dt::F32 && self.out == Dt::F32
    }

    /// Keys visible to query `i` of a sequence of `len` tokens.
    fn visible(&self, len: usize, i: usize) -> usize {
        if self.causal {
            (len + i + 1).saturating_sub(self.s_q)
        } else {
            len
        }
    }

    /// Multiply-adds of one decode (for budgeting).
    fn cost(&self) -> usize {
        self.seqlens.iter().sum::<usize>() * self.s_q * self.h_q * (self.d_qk + self.d_v)
    }
}

/// The logical problem: rounded queries and keys.
struct Problem {
    case: Case,
    seed: u64,
    /// `[batch, s_q, h_q, d_qk]`, the exact values in `q_bytes`.
    q: Vec<f64>,
    q_bytes: Vec<u8>,
    /// Per sequence `[len, d_qk]`, the exact values stored in the cache.
    k: Vec<Vec<f64>>,
    /// The same rows, encoded in the cache format.
    k_bytes: Vec<Vec<u8>>,
}

impl Problem {
    fn new(case: Case, seed: u64) -> Problem {
        assert_eq!(case.seqlens.len(), case.batch);
        let mut rng = SmallRng::seed_from_u64(seed);
        let nq = case.batch * case.s_q * case.h_q * case.d_qk;
        let mut q_bytes = Vec::with_capacity(nq * case.q.size());
        let q = (0..nq)
            .map(|_| case.q.push(sample(&mut rng), &mut q_bytes))
            .collect();
        let mut k = Vec::new();
        let mut k_bytes = Vec::new();
        for &len in &case.seqlens {
            let mut bytes = Vec::with_capacity(len * case.d_qk * case.kv.size());
            let vals = (0..len * case.d_qk)
                .map(|_| case.kv.push(sample(&mut rng), &mut bytes))
                .collect();
            k.push(vals);
            k_bytes.push(bytes);
        }
        Problem {
            case,
            seed,
            q,
            q_bytes,
            k,
            k_bytes,
        }
    }

    fn ctx(&self) -> String {
        format!(
            "group {}, seed = {:#018x}, case = {:?}",
            self.case.group, self.seed, self.case
        )
    }
}

/// A paged cache holding a problem's keys.
struct Paged {
    kv: Vec<u8>,
    num_blocks: usize,
    block_table: Vec<i32>,
    stride: usize,
}

/// Out-of-range ids written into unused block-table entries.
const PADDING: [i32; 5] = [2147480000, -1, i32::MIN, i32::MAX, -7];

/// Lays the keys out in shuffled blocks: the blocks of different sequences
/// are interleaved, some whole blocks are unreferenced, and every slot
/// nobody reads is NaN.
fn page(p: &Problem, layout_seed: u64) -> Paged {
    let c = &p.case;
    let mut rng = SmallRng::seed_from_u64(layout_seed);
    let bs = c.block_size;
    let used: Vec<usize> = c.seqlens.iter().map(|l| l.div_ceil(bs)).collect();
    let total: usize = used.iter().sum();
    let num_blocks = total + rng.random_range(1..=3);
    let stride = (used.iter().copied().max().unwrap_or(0) + rng.random_range(0..=2)).max(1);
    let mut ids: Vec<usize> = (0..num_blocks).collect();
    ids.shuffle(&mut rng);
    let mut slots: Vec<(usize, usize)> = used
        .iter()
        .enumerate()
        .flat_map(|(b, &n)| (0..n).map(move |j| (b, j)))
        .collect();
    slots.shuffle(&mut rng);
    let mut block_table: Vec<i32> = (0..c.batch * stride)
        .map(|_| PADDING[rng.random_range(0..PADDING.len())])
        .collect();
    for (&(b, j), &id) in slots.iter().zip(&ids) {
        block_table[b * stride + j] = id as i32;
    }
    let row = c.d_qk * c.kv.size();
    let mut kv = nan_buffer(c.kv, num_blocks * bs * c.d_qk);
    for (b, &len) in c.seqlens.iter().enumerate() {
        for t in 0..len {
            let block = block_table[b * stride + t / bs] as usize;
            let dst = (block * bs + t % bs) * row;
            kv[dst..dst + row].copy_from_slice(&p.k_bytes[b][t * row..(t + 1) * row]);
        }
    }
    Paged {
        kv,
        num_blocks,
        block_table,
        stride,
    }
}

// ---------------------------------------------------------------------------
// The reference.
// ---------------------------------------------------------------------------

struct Reference {
    /// `[batch, s_q, h_q, d_v]`.
    out: Vec<f64>,
    /// `[batch, h_q, s_q]`, +inf where no key is visible.
    lse: Vec<f64>,
}

fn reference(p: &Problem) -> Reference {
    let c = &p.case;
    let (d_qk, d_v) = (c.d_qk, c.d_v);
    let scale = if c.scale == 0.0 {
        1.0 / (d_qk as f64).sqrt()
    } else {
        c.scale as f64
    };
    let mut out = vec![0.0; c.batch * c.s_q * c.h_q * d_v];
    let mut lse = vec![f64::INFINITY; c.batch * c.h_q * c.s_q];
    let mut scores = Vec::new();
    for b in 0..c.batch {
        let keys = &p.k[b];
        for i in 0..c.s_q {
            let n = c.visible(c.seqlens[b], i);
            for h in 0..c.h_q {
                let row = (b * c.s_q + i) * c.h_q + h;
                if n == 0 {
                    continue; // out stays 0, lse +inf
                }
                let q = &p.q[row * d_qk..(row + 1) * d_qk];
                scores.clear();
                for t in 0..n {
                    let k = &keys[t * d_qk..(t + 1) * d_qk];
                    let dot: f64 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                    scores.push(scale * dot);
                }
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let o = &mut out[row * d_v..(row + 1) * d_v];
                let mut sum = 0.0;
                for (t, &s) in scores.iter().enumerate() {
                    let w = (s - m).exp();
                    sum += w;
                    for (x, v) in o.iter_mut().zip(&keys[t * d_qk..t * d_qk + d_v]) {
                        *x += w * v;
                    }
                }
                o.iter_mut().for_each(|x| *x /= sum);
                lse[(b * c.h_q + h) * c.s_q + i] = m + sum.ln();
            }
        }
    }
    Reference { out, lse }
}

// ---------------------------------------------------------------------------
// Running and checking.
// ---------------------------------------------------------------------------

struct Got {
    /// The raw output bytes (for bitwise comparisons).
    raw: Vec<u8>,
    out: Vec<f64>,
    lse: Option<Vec<f32>>,
}

fn decode(engine: &Engine, p: &Problem, pg: &Paged) -> Got {
    let c = &p.case;
    let n_out = c.batch * c.s_q * c.h_q * c.d_v;
    let mut out = nan_buffer(c.out, n_out);
    let mut lse = vec![f32::NAN; c.batch * c.h_q * c.s_q];
    let seqlens: Vec<i32> = c.seqlens.iter().map(|&l| l as i32).collect();
    let mut a = MaybeUninit::<mlart_decode_args>::uninit();
    mlart_decode_args_init(a.as_mut_ptr());
    // SAFETY: initialized by mlart_decode_args_init.
    let mut a = unsafe { a.assume_init() };
    a.batch = c.batch as i32;
    a.s_q = c.s_q as i32;
    a.h_q = c.h_q as i32;
    a.d_qk = c.d_qk as i32;
    a.d_v = c.d_v as i32;
    a.softmax_scale = c.scale;
    a.causal = c.causal;
    a.q_dtype = c.q.dtype();
    a.q = p.q_bytes.as_ptr().cast();
    a.kv_format = c.kv.kv_format();
    a.kv = pg.kv.as_ptr().cast();
    a.num_blocks = pg.num_blocks as i32;
    a.block_size = c.block_size as i32;
    a.block_table = pg.block_table.as_ptr();
    a.block_table_stride = pg.stride as i32;
    a.seqlens = seqlens.as_ptr();
    a.out_dtype = c.out.dtype();
    a.out = out.as_mut_ptr().cast();
    a.lse = if c.with_lse {
        lse.as_mut_ptr()
    } else {
        std::ptr::null_mut()
    };
    if let Some((code, msg)) = take_error(mlart_decode_paged(engine.ptr, &a)) {
        panic!(
            "mlart_decode_paged failed ({} threads): {code}: {msg}\n{}",
            engine.threads,
            p.ctx()
        );
    }
    let vals = (0..n_out).map(|i| c.out.read(&out, i)).collect();
    Got {
        raw: out,
        out: vals,
        lse: c.with_lse.then_some(lse),
    }
}

/// Worst errors seen in a group of cases.
#[derive(Default)]
struct Stats {
    cases: usize,
    calls: usize,
    /// Decodes with f32 cache, queries and outputs (the tight tolerance).
    strict_calls: usize,
    /// Multiply-adds of the decodes checked (for the time budget).
    madds: usize,
    strict_l2: f64,
    low_l2: f64,
    strict_lse: f64,
    low_lse: f64,
}

impl Stats {
    fn print(&self, group: &str, t: Instant) {
        println!(
            "{group}: {} cases, {} decodes ({} all-f32, {:.2} G multiply-adds), max rel L2 {:.2e} (f32) / {:.2e} (bf16/f16), \
             max |lse err| {:.2e} (f32) / {:.2e} (bf16/f16), {:.2} s",
            self.cases,
            self.calls,
            self.strict_calls,
            self.madds as f64 * 1e-9,
            self.strict_l2,
            self.low_l2,
            self.strict_lse,
            self.low_lse,
            t.elapsed().as_secs_f64()
        );
    }
}

/// Checks a result against the reference and records its errors in `stats`.
fn check(p: &Problem, r: &Reference, got: &Got, what: &str, stats: &mut Stats) {
    let c = &p.case;
    let ctx = || format!("{what}: {}", p.ctx());
    // Rounding the output to bf16 (and P to bf16 with it, as FlashMLA
    // does) costs about 2e-3 at most; f16 outputs and bf16/f16 inputs
    // held exactly cost less.
    let (tol, lse_tol) = if c.strict() {
        (1e-5, 1e-4)
    } else {
        (4e-3, 1e-3)
    };
    // Every element written, nothing NaN.
    if let Some(i) = got.out.iter().position(|x| !x.is_finite()) {
        panic!("out[{i}] = {} is not finite; {}", got.out[i], ctx());
    }
    let d_v = c.d_v;
    let rows_per_seq = c.s_q * c.h_q;
    // Queries that see no key: exactly zero.
    for b in 0..c.batch {
        for i in 0..c.s_q {
            if c.visible(c.seqlens[b], i) == 0 {
                for h in 0..c.h_q {
                    let row = (b * c.s_q + i) * c.h_q + h;
                    let o = &got.out[row * d_v..(row + 1) * d_v];
                    assert!(
                        o.iter().all(|&x| x == 0.0),
                        "out[{b}][{i}][{h}] sees no key but is not 0; {}",
                        ctx()
                    );
                }
            }
        }
    }
    let l2 = rel_l2(&got.out, &r.out);
    assert!(
        l2 <= tol,
        "relative L2 error {l2:.3e} > {tol:.0e}; {}",
        ctx()
    );
    // Per sequence as well, so that one wrong sequence cannot hide in a batch.
    for b in 0..c.batch {
        let s = b * rows_per_seq * d_v..(b + 1) * rows_per_seq * d_v;
        let e = rel_l2(&got.out[s.clone()], &r.out[s]);
        assert!(
            e <= tol,
            "sequence {b} (seqlen {}): relative L2 error {e:.3e} > {tol:.0e}; {}",
            c.seqlens[b],
            ctx()
        );
    }
    let mut lse_err = 0.0f64;
    if let Some(lse) = &got.lse {
        for (j, (&g, &w)) in lse.iter().zip(&r.lse).enumerate() {
            let (b, h, i) = (j / (c.h_q * c.s_q), j / c.s_q % c.h_q, j % c.s_q);
            if w == f64::INFINITY {
                assert!(
                    g == f32::INFINITY,
                    "lse[{b}][{h}][{i}] = {g}, want +inf (no visible key); {}",
                    ctx()
                );
            } else {
                assert!(
                    g.is_finite(),
                    "lse[{b}][{h}][{i}] = {g}, want {w}; {}",
                    ctx()
                );
                let e = (g as f64 - w).abs();
                assert!(
                    e <= lse_tol,
                    "lse[{b}][{h}][{i}] = {g}, want {w} (error {e:.3e} > {lse_tol:.0e}); {}",
                    ctx()
                );
                lse_err = lse_err.max(e);
            }
        }
    }
    stats.calls += 1;
    stats.madds += c.cost();
    if c.strict() {
        stats.strict_calls += 1;
        stats.strict_l2 = stats.strict_l2.max(l2);
        stats.strict_lse = stats.strict_lse.max(lse_err);
    } else {
        stats.low_l2 = stats.low_l2.max(l2);
        stats.low_lse = stats.low_lse.max(lse_err);
    }
}

/// Generates, pages, runs on `engine` and checks one case.
fn run_case(engine: &Engine, case: Case, salt: u64, counter: u64, stats: &mut Stats) {
    let seed = case_seed(salt, counter);
    let p = Problem::new(case, seed);
    let pg = page(&p, seed ^ 0x5eed);
    let r = reference(&p);
    let got = decode(engine, &p, &pg);
    check(&p, &r, &got, &format!("{} threads", engine.threads), stats);
    stats.cases += 1;
}

/// Random lengths in `[0, max]` for `batch` sequences. Some are pinned to
/// the edge cases 0, 1 and non-multiples of the block size; at least one
/// sequence has a real length.
fn lengths(rng: &mut SmallRng, batch: usize, max: usize, bs: usize) -> Vec<usize> {
    let special = [0, 1, bs + 1, (2 * bs).saturating_sub(1), max];
    let mut v: Vec<usize> = (0..batch)
        .map(|j| {
            if j < special.len() && rng.random_bool(0.5) {
                special[j].min(max)
            } else {
                rng.random_range(0..=max)
            }
        })
        .collect();
    if v.iter().all(|&l| l < 2) {
        let j = rng.random_range(0..batch);
        v[j] = rng.random_range(max.div_ceil(2)..=max);
    }
    v.shuffle(rng);
    v
}

/// Formats for case `idx`: all-f32 every fourth case, else rotating.
fn rotate_dtypes(idx: usize) -> (Dt, Dt, Dt) {
    if idx.is_multiple_of(4) {
        (Dt::F32, Dt::F32, Dt::F32)
    } else {
        (
            DTS[idx % 3],
            DTS[(idx / 3 + idx) % 3],
            DTS[(idx / 9 + 2 * idx) % 3],
        )
    }
}

const DIMS: [(usize, usize); 3] = [(576, 512), (512, 512), (64, 64)];
const BLOCK_SIZES: [usize; 4] = [1, 16, 64, 100];
/// Softmax scales; 0 is the default 1/sqrt(d_qk). Large ones make the
/// softmax peaky (scores of tens), a negative one flips it.
const SCALES: [f32; 6] = [0.0, 0.0, 0.5, 3.0, 20.0, -0.7];

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// Every (kv format, q dtype, out dtype) combination.
#[test]
fn dtype_matrix() {
    let t = Instant::now();
    let engines = [Engine::new(1), Engine::new(2), Engine::new(3)];
    let mut stats = Stats::default();
    let mut n = 0u64;
    for rep in 0..2usize {
        for (ki, &kv) in DTS.iter().enumerate() {
            for (qi, &q) in DTS.iter().enumerate() {
                for (oi, &out) in DTS.iter().enumerate() {
                    let seed = case_seed(1, 1000 + n);
                    let mut rng = SmallRng::seed_from_u64(seed);
                    let (d_qk, d_v) = DIMS[(ki + qi + oi + rep) % 3];
                    let bs = BLOCK_SIZES[(n as usize + rep) % 4];
                    let batch = 1 + (n as usize * 3 + rep) % 8;
                    let h_q = [1, 16][(ki + oi + rep) % 2];
                    let max = if d_qk == 64 { 600 } else { 250 };
                    let case = Case {
                        group: "dtype_matrix",
                        batch,
                        s_q: [1, 2, 4][(qi + 2 * oi + rep) % 3],
                        h_q,
                        d_qk,
                        d_v,
                        causal: (n as usize + rep) % 2 == 1,
                        block_size: bs,
                        kv,
                        q,
                        out,
                        seqlens: lengths(&mut rng, batch, max, bs),
                        scale: SCALES[(n as usize) % SCALES.len()],
                        with_lse: n % 5 != 4,
                    };
                    run_case(&engines[n as usize % 3], case, 1, n, &mut stats);
                    n += 1;
                }
            }
        }
    }
    stats.print("dtype_matrix", t);
}

/// Head dims x heads x query tokens x causal, with formats rotating.
#[test]
fn shape_matrix() {
    let t = Instant::now();
    let engines = [Engine::new(2), Engine::new(1), Engine::new(3)];
    let mut stats = Stats::default();
    let mut n = 0u64;
    for (di, &(d_qk, d_v)) in DIMS.iter().enumerate() {
        for (hi, &h_q) in [1usize, 16, 128].iter().enumerate() {
            for (si, &s_q) in [1usize, 2, 4].iter().enumerate() {
                for causal in [false, true] {
                    let seed = case_seed(2, 2000 + n);
                    let mut rng = SmallRng::seed_from_u64(seed);
                    let bs = BLOCK_SIZES[(di + hi + si + causal as usize) % 4];
                    let batch = 1 + (n as usize * 5 + 3) % 8;
                    // Keep each case to a few tens of millions of multiply-adds.
                    let budget = 60_000_000 / (s_q * h_q * (d_qk + d_v));
                    let max = (budget / batch).clamp(6, 800);
                    let idx = n as usize;
                    let (kv, q, out) = rotate_dtypes(idx);
                    let case = Case {
                        group: "shape_matrix",
                        batch,
                        s_q,
                        h_q,
                        d_qk,
                        d_v,
                        causal,
                        block_size: bs,
                        kv,
                        q,
                        out,
                        seqlens: lengths(&mut rng, batch, max, bs),
                        scale: SCALES[(idx / 2) % SCALES.len()],
                        with_lse: true,
                    };
                    run_case(&engines[idx % 3], case, 2, n, &mut stats);
                    n += 1;
                }
            }
        }
    }
    stats.print("shape_matrix", t);
}

/// Variable lengths around every block size: 0, 1, bs - 1, bs, bs + 1, ...
#[test]
fn varlen_block_sizes() {
    let t = Instant::now();
    let engines = [Engine::new(3), Engine::new(2), Engine::new(1)];
    let mut stats = Stats::default();
    let mut n = 0u64;
    for &bs in &BLOCK_SIZES {
        for v in 0..3usize {
            let seed = case_seed(3, 3000 + n);
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut seqlens = vec![
                0,
                1,
                bs.saturating_sub(1),
                bs,
                bs + 1,
                2 * bs + 3,
                rng.random_range(0..=3 * bs + 7),
                rng.random_range(0..=200),
            ];
            seqlens.shuffle(&mut rng);
            let idx = n as usize;
            let (d_qk, d_v) = DIMS[(idx + 2) % 3];
            let (kv, q, out) = rotate_dtypes(idx + 1);
            let case = Case {
                group: "varlen",
                batch: seqlens.len(),
                s_q: [1, 2, 4][v],
                h_q: [16, 1, 16][v],
                d_qk,
                d_v,
                causal: v != 0,
                block_size: bs,
                kv,
                q,
                out,
                seqlens,
                scale: SCALES[idx % SCALES.len()],
                with_lse: true,
            };
            run_case(&engines[idx % 3], case, 3, n, &mut stats);
            n += 1;
        }
    }
    // Batches of every size 1..=8, and a batch where nobody has a token.
    for batch in 1..=8usize {
        let seed = case_seed(3, 3100 + batch as u64);
        let mut rng = SmallRng::seed_from_u64(seed);
        let bs = BLOCK_SIZES[batch % 4];
        let case = Case {
            group: "varlen",
            batch,
            s_q: 1 + batch % 2,
            h_q: 16,
            d_qk: 64,
            d_v: 64,
            causal: batch % 3 == 0,
            block_size: bs,
            kv: rotate_dtypes(batch).0,
            q: rotate_dtypes(batch).1,
            out: rotate_dtypes(batch).2,
            seqlens: lengths(&mut rng, batch, 150, bs),
            scale: 0.0,
            with_lse: true,
        };
        run_case(&engines[batch % 3], case, 3, 100 + batch as u64, &mut stats);
    }
    for (j, causal) in [false, true].into_iter().enumerate() {
        let case = Case {
            group: "varlen",
            batch: 3,
            s_q: 2,
            h_q: 16,
            d_qk: 576,
            d_v: 512,
            causal,
            block_size: 64,
            kv: Dt::Bf16,
            q: Dt::Bf16,
            out: DTS[j],
            seqlens: vec![0, 0, 0],
            scale: 0.0,
            with_lse: true,
        };
        run_case(&engines[j], case, 3, 200 + j as u64, &mut stats);
    }
    stats.print("varlen_block_sizes", t);
}

/// Long sequences (split across workers) on engines with 1, 2 and 3
/// threads: each matches the reference, and the engines agree.
#[test]
fn long_sequences_split_kv_threads() {
    let t = Instant::now();
    let engines = [Engine::new(1), Engine::new(2), Engine::new(3)];
    let mut stats = Stats::default();
    // (seqlens, s_q, h_q, causal, kv = q format, out, block size, scale)
    type Config = (Vec<usize>, usize, usize, bool, Dt, Dt, usize, f32);
    let configs: [Config; 6] = [
        (vec![3001], 1, 16, false, Dt::F32, Dt::F32, 64, 0.0),
        (vec![2999], 2, 16, true, Dt::F32, Dt::F32, 100, 1.0),
        (
            vec![2950, 0, 1, 1500],
            1,
            16,
            true,
            Dt::Bf16,
            Dt::Bf16,
            16,
            0.0,
        ),
        (vec![17, 3003], 4, 16, true, Dt::F16, Dt::F32, 64, 20.0),
        (vec![3000], 1, 128, false, Dt::Bf16, Dt::Bf16, 64, 0.0),
        (vec![2500, 2600], 2, 1, true, Dt::F32, Dt::F32, 1, 50.0),
    ];
    for (n, (seqlens, s_q, h_q, causal, kv, out, bs, scale)) in configs.into_iter().enumerate() {
        let case = deepseek_case("long", seqlens, s_q, h_q, causal, kv, out, bs, scale);
        let seed = case_seed(4, n as u64);
        let p = Problem::new(case, seed);
        let pg = page(&p, seed ^ 0x5eed);
        let r = reference(&p);
        let results: Vec<Got> = engines.iter().map(|e| decode(e, &p, &pg)).collect();
        for (e, got) in engines.iter().zip(&results) {
            check(&p, &r, got, &format!("{} threads", e.threads), &mut stats);
        }
        // The thread counts agree with each other to the same tolerance.
        let tol = if p.case.strict() { 1e-5 } else { 1e-2 };
        for (e, got) in engines.iter().zip(&results).skip(1) {
            let d = rel_l2(&got.out, &results[0].out);
            assert!(
                d <= tol,
                "{} threads vs 1 thread: relative L2 {d:.3e} > {tol:.0e}; {}",
                e.threads,
                p.ctx()
            );
        }
        stats.cases += 1;
    }
    stats.print("long_sequences_split_kv_threads", t);
}

/// The AMX kernel (on the CPU's tiles, or on the library's software model
/// of them where it has none) against the reference: the shapes its tiles
/// cut at (rows not a multiple of 16, keys not a multiple of 16, 32 or a
/// 128-key tile, blocks of 1 to 100 tokens so A tiles are read in place or
/// gathered), causal MTP, NaN-poisoned free slots, each head dim, bf16
/// queries and outputs (both GEMMs on tiles) and f32 outputs (its fallback).
#[test]
fn amx_kernel() {
    let t = Instant::now();
    let Some((engine, emulated)) = Engine::amx(2) else {
        return;
    };
    let mut stats = Stats::default();
    let mut n = 0u64;
    for (di, &(d_qk, d_v)) in DIMS.iter().enumerate() {
        for (hi, &h_q) in [1usize, 7, 16, 128].iter().enumerate() {
            for &bs in &BLOCK_SIZES {
                let seed = case_seed(9, 9000 + n);
                let mut rng = SmallRng::seed_from_u64(seed);
                let idx = n as usize;
                let s_q = [1, 2, 4][(di + hi + idx) % 3];
                let batch = 1 + idx % 4;
                // Software tiles run about 1000x slower than AMX.
                let budget = if emulated { 8_000_000 } else { 60_000_000 };
                let max = (budget / (s_q * h_q * (d_qk + d_v)) / batch).clamp(150, 700);
                let case = Case {
                    group: "amx_kernel",
                    batch,
                    s_q,
                    h_q,
                    d_qk,
                    d_v,
                    causal: idx % 2 == 1,
                    block_size: bs,
                    kv: Dt::Bf16,
                    q: Dt::Bf16,
                    out: if idx % 5 == 4 { Dt::F32 } else { Dt::Bf16 },
                    seqlens: lengths(&mut rng, batch, max, bs),
                    scale: SCALES[idx % SCALES.len()],
                    with_lse: true,
                };
                run_case(&engine, case, 9, n, &mut stats);
                n += 1;
            }
        }
    }
    let what = if emulated {
        "amx_kernel (emulated tiles)"
    } else {
        "amx_kernel"
    };
    stats.print(what, t);
}

/// A case with DeepSeek's head dims, queries in the cache's dtype and the lse.
#[allow(clippy::too_many_arguments)]
fn deepseek_case(
    group: &'static str,
    seqlens: Vec<usize>,
    s_q: usize,
    h_q: usize,
    causal: bool,
    kv: Dt,
    out: Dt,
    block_size: usize,
    scale: f32,
) -> Case {
    Case {
        group,
        batch: seqlens.len(),
        s_q,
        h_q,
        d_qk: 576,
        d_v: 512,
        causal,
        block_size,
        kv,
        q: kv,
        out,
        seqlens,
        scale,
        with_lse: true,
    }
}

/// Prefill-shaped calls: many query tokens per sequence, so the CPU driver
/// attends them in runs of a few tokens (and, when causal, each run sees
/// only its visible keys) instead of splitting keys. Lengths shorter than,
/// equal to and longer than s_q; heads that do and do not divide the run.
#[test]
fn many_query_tokens_in_runs() {
    let t = Instant::now();
    let engines = [Engine::new(1), Engine::new(2), Engine::new(3)];
    let mut stats = Stats::default();
    // (seqlens, s_q, h_q, causal, kv, out, block size)
    type Config = (Vec<usize>, usize, usize, bool, Dt, Dt, usize);
    let configs: [Config; 6] = [
        (vec![40], 40, 16, true, Dt::F32, Dt::F32, 64),
        (vec![150, 7, 0, 33], 33, 16, true, Dt::Bf16, Dt::Bf16, 16),
        (vec![90, 12], 12, 128, true, Dt::Bf16, Dt::F32, 64),
        (vec![61, 300], 37, 7, true, Dt::F16, Dt::F32, 100),
        (vec![45, 5], 20, 16, false, Dt::F32, Dt::F32, 1),
        (vec![200], 300, 1, true, Dt::F32, Dt::Bf16, 64),
    ];
    for (n, (seqlens, s_q, h_q, causal, kv, out, bs)) in configs.into_iter().enumerate() {
        let scale = SCALES[n % SCALES.len()];
        let case = deepseek_case(
            "many_query_tokens",
            seqlens,
            s_q,
            h_q,
            causal,
            kv,
            out,
            bs,
            scale,
        );
        let seed = case_seed(7, n as u64);
        let p = Problem::new(case, seed);
        let pg = page(&p, seed ^ 0x5eed);
        let r = reference(&p);
        for e in &engines {
            let got = decode(e, &p, &pg);
            check(&p, &r, &got, &format!("{} threads", e.threads), &mut stats);
        }
        stats.cases += 1;
    }
    stats.print("many_query_tokens_in_runs", t);
}

/// The physical placement of blocks does not change the result: the same
/// logical cache under different shuffled block tables gives bit-identical
/// outputs on one engine.
#[test]
fn block_table_permutation_invariance() {
    let t = Instant::now();
    let engines = [Engine::new(1), Engine::new(2), Engine::new(3)];
    let mut stats = Stats::default();
    for n in 0..6u64 {
        let seed = case_seed(5, n);
        let mut rng = SmallRng::seed_from_u64(seed);
        let idx = n as usize;
        let bs = BLOCK_SIZES[idx % 4];
        let batch = [5, 8, 2, 1, 7, 3][idx];
        let max = if idx == 3 { 1200 } else { 250 };
        let (d_qk, d_v) = DIMS[idx % 3];
        let case = Case {
            group: "permutation",
            batch,
            s_q: [1, 2, 4][idx % 3],
            h_q: 16,
            d_qk,
            d_v,
            causal: idx.is_multiple_of(2),
            block_size: bs,
            kv: rotate_dtypes(idx).0,
            q: rotate_dtypes(idx).1,
            out: rotate_dtypes(idx).2,
            seqlens: lengths(&mut rng, batch, max, bs),
            scale: SCALES[idx % SCALES.len()],
            with_lse: true,
        };
        let p = Problem::new(case, seed);
        let r = reference(&p);
        let layouts: Vec<Paged> = (0..3).map(|k| page(&p, seed ^ (0x1000 + k))).collect();
        assert_ne!(
            layouts[0].block_table,
            layouts[1].block_table,
            "layouts should differ; {}",
            p.ctx()
        );
        for e in &engines {
            let first = decode(e, &p, &layouts[0]);
            check(&p, &r, &first, "layout 0", &mut stats);
            for (k, pg) in layouts.iter().enumerate().skip(1) {
                let got = decode(e, &p, pg);
                assert!(
                    got.raw == first.raw,
                    "{} threads: output differs between block layouts 0 and {k}; {}",
                    e.threads,
                    p.ctx()
                );
                let (a, b) = (got.lse.as_ref().unwrap(), first.lse.as_ref().unwrap());
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{} threads: lse differs between block layouts 0 and {k}; {}",
                    e.threads,
                    p.ctx()
                );
                stats.calls += 1;
            }
        }
        stats.cases += 1;
    }
    stats.print("block_table_permutation_invariance", t);
}

/// Head dims off the SIMD width (the kernel's remainder loops), the
/// largest supported head dim, and head counts that are not powers of two.
#[test]
fn odd_shapes() {
    let t = Instant::now();
    let engines = [Engine::new(2), Engine::new(3), Engine::new(1)];
    let mut stats = Stats::default();
    let shapes: [(usize, usize, usize); 7] = [
        (1, 1, 1),
        (13, 7, 3),
        (100, 3, 5),
        (9, 9, 2),
        (1024, 1024, 2),
        (1024, 512, 1),
        (576, 1, 7),
    ];
    for (n, &(d_qk, d_v, h_q)) in shapes.iter().enumerate() {
        let seed = case_seed(8, n as u64);
        let mut rng = SmallRng::seed_from_u64(seed);
        let (kv, q, out) = rotate_dtypes(n);
        let bs = BLOCK_SIZES[n % 4];
        let batch = 1 + n % 4;
        let case = Case {
            group: "odd_shapes",
            batch,
            s_q: [1, 2, 4][n % 3],
            h_q,
            d_qk,
            d_v,
            causal: n % 2 == 1,
            block_size: bs,
            kv,
            q,
            out,
            seqlens: lengths(&mut rng, batch, 400, bs),
            scale: SCALES[n % SCALES.len()],
            with_lse: true,
        };
        run_case(&engines[n % 3], case, 8, n as u64, &mut stats);
    }
    stats.print("odd_shapes", t);
}

/// Several host threads decoding on one engine at once (documented as
/// allowed) each get their own correct result.
#[test]
fn concurrent_decodes_share_an_engine() {
    let t = Instant::now();
    let engine = Engine::new(2);
    let problems: Vec<(Problem, Paged, Reference)> = (0..4u64)
        .map(|n| {
            let seed = case_seed(7, n);
            let mut rng = SmallRng::seed_from_u64(seed);
            let idx = n as usize;
            let (kv, q, out) = rotate_dtypes(idx);
            let case = Case {
                group: "concurrent",
                batch: 1 + idx * 2,
                s_q: 1 + idx % 2,
                h_q: 16,
                d_qk: 576,
                d_v: 512,
                causal: idx % 2 == 1,
                block_size: BLOCK_SIZES[idx],
                kv,
                q,
                out,
                seqlens: lengths(&mut rng, 1 + idx * 2, [1500, 300, 200, 100][idx], 64),
                scale: 0.0,
                with_lse: true,
            };
            let p = Problem::new(case, seed);
            let pg = page(&p, seed ^ 0x5eed);
            let r = reference(&p);
            (p, pg, r)
        })
        .collect();
    let stats = std::sync::Mutex::new(Stats::default());
    std::thread::scope(|s| {
        for (p, pg, r) in &problems {
            let (engine, stats) = (&engine, &stats);
            s.spawn(move || {
                for _ in 0..3 {
                    let got = decode(engine, p, pg);
                    let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
                    check(p, r, &got, "concurrent", &mut st);
                }
            });
        }
    });
    let mut stats = stats.into_inner().unwrap();
    stats.cases = problems.len();
    stats.print("concurrent_decodes_share_an_engine", t);
}

/// `MLART_CPU_ISA=scalar` forces the portable kernel, which is also correct.
#[test]
fn forced_scalar_isa() {
    let t = Instant::now();
    let (auto, cpu) = {
        let _env = ENV_LOCK.write().unwrap_or_else(|e| e.into_inner());
        let saved = std::env::var_os("MLART_CPU_ISA");
        std::env::set_var("MLART_CPU_ISA", "scalar");
        let auto = Engine::create_unlocked(MLART_BACKEND_AUTO, 2);
        let cpu = Engine::create_unlocked(MLART_BACKEND_CPU, 0);
        match saved {
            Some(v) => std::env::set_var("MLART_CPU_ISA", v),
            None => std::env::remove_var("MLART_CPU_ISA"),
        }
        (auto, cpu)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    for (e, want_threads) in [(&auto, 2), (&cpu, cores)] {
        let p = e.props();
        assert_eq!(p.cpu_isa, MLART_CPU_ISA_SCALAR);
        assert_eq!(p.backend, MLART_BACKEND_CPU);
        assert_eq!(p.num_threads, want_threads);
        // SAFETY: the library NUL-terminates the string.
        let reason = unsafe { CStr::from_ptr(p.reason.as_ptr()) }.to_string_lossy();
        assert!(
            reason.contains("MLART_CPU_ISA=scalar"),
            "reason = {reason:?}"
        );
    }
    let mut stats = Stats::default();
    for (n, e) in [&auto, &cpu].into_iter().enumerate() {
        let seed = case_seed(6, n as u64);
        let mut rng = SmallRng::seed_from_u64(seed);
        let case = Case {
            group: "scalar",
            batch: 4,
            s_q: 2,
            h_q: 16,
            d_qk: 576,
            d_v: 512,
            causal: n == 1,
            block_size: 64,
            kv: DTS[n],
            q: DTS[n],
            out: DTS[n],
            seqlens: lengths(&mut rng, 4, 700, 64),
            scale: 0.0,
            with_lse: true,
        };
        run_case(e, case, 6, n as u64, &mut stats);
    }
    stats.print("forced_scalar_isa", t);
}
