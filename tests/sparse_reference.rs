//! Sparse decode (`indices`, `topk_length`, the extra cache, the attention
//! sink) and FP8 caches in `mlart_decode_paged`, against an independent
//! float64 reference, through the C ABI.
//!
//! The reference works on explicit key lists: for each query token, the
//! cache positions it attends to (dense decode: the causal prefix of its
//! sequence, paged through the block table; sparse: the valid used entries
//! of its index lists, duplicates included). It is computed twice for FP8
//! caches: on the values the cache stores (decoded from the bytes by the
//! test's own decoder; tight tolerance) and on the original unquantized
//! values (the FP8 error budget). Cache slots nobody attends to hold NaN
//! (bytes 0xFF for FP8: NaN codes, NaN scales, NaN rope), including slots
//! named by the unused tail of an index list beyond `topk_length`; MODEL1
//! pad bytes and block padding are 0xFF too; outputs are NaN-poisoned.
//! Every failure message prints the case and its seed.

mod common;

use common::*;
use mlart::ffi::decode::*;
use mlart::ffi::format::*;
use mlart::ffi::types::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::mem::MaybeUninit;
use std::time::Instant;

// ---------------------------------------------------------------------------
// Cache formats (element types: `common::Dt`).
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fmt {
    F32,
    Bf16,
    F16,
    V32,
    Model1,
}

const FMTS: [Fmt; 5] = [Fmt::F32, Fmt::Bf16, Fmt::F16, Fmt::V32, Fmt::Model1];

impl Fmt {
    fn raw(self) -> mlart_kv_format {
        match self {
            Fmt::F32 => MLART_KV_FORMAT_F32,
            Fmt::Bf16 => MLART_KV_FORMAT_BF16,
            Fmt::F16 => MLART_KV_FORMAT_F16,
            Fmt::V32 => MLART_KV_FORMAT_FP8_V32,
            Fmt::Model1 => MLART_KV_FORMAT_FP8_MODEL1,
        }
    }

    fn fp8(self) -> Option<Fp8> {
        match self {
            Fmt::V32 => Some(Fp8::V32),
            Fmt::Model1 => Some(Fp8::Model1),
            _ => None,
        }
    }

    fn plain(self) -> Option<Dt> {
        match self {
            Fmt::F32 => Some(Dt::F32),
            Fmt::Bf16 => Some(Dt::Bf16),
            Fmt::F16 => Some(Dt::F16),
            _ => None,
        }
    }

    /// (d_qk, d_v): fixed for FP8, else one of a few by `alt`.
    fn dims(self, alt: usize) -> (usize, usize) {
        match self {
            Fmt::V32 => (576, 512),
            Fmt::Model1 => (512, 512),
            _ => [(576, 512), (512, 512), (64, 64), (100, 36)][alt % 4],
        }
    }
}

// ---------------------------------------------------------------------------
// Caches.
// ---------------------------------------------------------------------------

/// A paged cache `[num_blocks, block_size]` in one format, with the values
/// of its live slots (the others are NaN).
struct Cache {
    fmt: Fmt,
    d_qk: usize,
    bs: usize,
    num_blocks: usize,
    bytes: Vec<u8>,
    /// `[positions, d_qk]`: the values handed to the cache (NaN if dead).
    orig: Vec<f64>,
    /// `[positions, d_qk]`: the values the cache holds, decoded by the test.
    stored: Vec<f64>,
}

impl Cache {
    fn positions(&self) -> usize {
        self.num_blocks * self.bs
    }

    /// Fills the `live` slots with fresh N(0, 0.1) values; poisons the rest.
    fn build(
        fmt: Fmt,
        d_qk: usize,
        bs: usize,
        num_blocks: usize,
        live: &[bool],
        rng: &mut SmallRng,
    ) -> Cache {
        let n = num_blocks * bs;
        assert_eq!(live.len(), n);
        let mut orig = vec![f64::NAN; n * d_qk];
        let mut src = vec![0f32; n * d_qk];
        for p in (0..n).filter(|&p| live[p]) {
            for j in 0..d_qk {
                let x = sample(rng);
                src[p * d_qk + j] = x;
                orig[p * d_qk + j] = x as f64;
            }
        }
        let mut block_bytes = 0usize;
        expect_ok(
            "mlart_kv_block_bytes",
            mlart_kv_block_bytes(fmt.raw(), d_qk as i32, bs as i32, &mut block_bytes),
        );
        let mut stored = vec![f64::NAN; n * d_qk];
        let bytes = match (fmt.plain(), fmt.fp8()) {
            (Some(dt), _) => {
                assert_eq!(block_bytes, bs * d_qk * dt.size());
                let mut bytes = Vec::with_capacity(n * d_qk * dt.size());
                for p in 0..n {
                    for j in 0..d_qk {
                        if live[p] {
                            stored[p * d_qk + j] = dt.push(src[p * d_qk + j], &mut bytes);
                        } else {
                            bytes.extend_from_slice(dt.nan());
                        }
                    }
                }
                bytes
            }
            (None, Some(fp8)) => {
                assert_eq!(block_bytes, fp8.block_bytes(bs));
                let mut bytes = vec![0xFFu8; num_blocks * block_bytes];
                let src_bytes: Vec<u8> = src.iter().flat_map(|x| x.to_le_bytes()).collect();
                expect_ok(
                    "mlart_kv_quantize",
                    mlart_kv_quantize(
                        fmt.raw(),
                        d_qk as i32,
                        bs as i32,
                        n as i32,
                        MLART_DTYPE_F32,
                        src_bytes.as_ptr().cast(),
                        bytes.as_mut_ptr().cast(),
                    ),
                );
                for b in 0..num_blocks {
                    let block = &mut bytes[b * block_bytes..(b + 1) * block_bytes];
                    // Bytes no token owns (MODEL1 block padding, pad bytes).
                    if fp8 == Fp8::Model1 {
                        block[bs * 584..].fill(0xFF);
                    }
                    for slot in 0..bs {
                        let p = b * bs + slot;
                        if live[p] {
                            if fp8 == Fp8::Model1 {
                                block[fp8.scales_at(bs, slot) + 7] = 0xFF;
                            }
                            let v = fp8.decode_token(bs, block, slot);
                            stored[p * d_qk..(p + 1) * d_qk].copy_from_slice(&v);
                        } else {
                            for r in fp8.token_ranges(bs, slot) {
                                block[r].fill(0xFF);
                            }
                        }
                    }
                }
                bytes
            }
            _ => unreachable!(),
        };
        assert_eq!(bytes.len(), num_blocks * block_bytes);
        Cache {
            fmt,
            d_qk,
            bs,
            num_blocks,
            bytes,
            orig,
            stored,
        }
    }
}

// ---------------------------------------------------------------------------
// Problems, the reference and the call.
// ---------------------------------------------------------------------------

/// A key: a position in the main (`false`) or extra (`true`) cache.
type Key = (bool, usize);

/// How the keys are given to the library.
enum Mode {
    Dense {
        block_table: Vec<i32>,
        stride: usize,
        seqlens: Vec<i32>,
        causal: bool,
    },
    Sparse {
        indices: Vec<i32>,
        topk: usize,
        topk_length: Option<Vec<i32>>,
        /// extra_indices, extra_topk, extra_topk_length.
        extra: Option<(Vec<i32>, usize, Option<Vec<i32>>)>,
    },
}

struct Problem {
    desc: String,
    seed: u64,
    batch: usize,
    s_q: usize,
    h_q: usize,
    d_qk: usize,
    d_v: usize,
    /// As passed (0 = default).
    scale: f32,
    q_dt: Dt,
    out_dt: Dt,
    q_bytes: Vec<u8>,
    q: Vec<f64>,
    main: Cache,
    extra: Option<Cache>,
    mode: Mode,
    /// Per query token `b * s_q + i`: the keys it attends to.
    keys: Vec<Vec<Key>>,
    sink: Option<Vec<f32>>,
    with_lse: bool,
}

impl Problem {
    fn ctx(&self) -> String {
        format!("{} (seed {:#018x})", self.desc, self.seed)
    }

    fn strict(&self) -> bool {
        self.q_dt == Dt::F32 && self.out_dt == Dt::F32
    }

    /// Multiply-adds of one decode.
    fn cost(&self) -> usize {
        self.keys.iter().map(Vec::len).sum::<usize>() * self.h_q * (self.d_qk + self.d_v)
    }
}

fn random_q(
    batch: usize,
    s_q: usize,
    h_q: usize,
    d_qk: usize,
    dt: Dt,
    rng: &mut SmallRng,
) -> (Vec<u8>, Vec<f64>) {
    let n = batch * s_q * h_q * d_qk;
    let mut bytes = Vec::with_capacity(n * dt.size());
    let q = (0..n).map(|_| dt.push(sample(rng), &mut bytes)).collect();
    (bytes, q)
}

/// Per-head sinks: finite values near `center`, +inf, -inf.
fn random_sink(h_q: usize, center: f64, rng: &mut SmallRng) -> Vec<f32> {
    (0..h_q)
        .map(|h| match (h + rng.random_range(0..2)) % 5 {
            1 => f32::INFINITY,
            3 => f32::NEG_INFINITY,
            _ => (center + 2.0 * normal(rng)) as f32,
        })
        .collect()
}

struct Ref {
    /// `[batch, s_q, h_q, d_v]`.
    out: Vec<f64>,
    /// `[batch, h_q, s_q]`, +inf where no key.
    lse: Vec<f64>,
}

/// The float64 reference on the stored values (`orig = false`) or the
/// original ones.
fn reference(p: &Problem, orig: bool) -> Ref {
    let (d_qk, d_v, h_q, s_q) = (p.d_qk, p.d_v, p.h_q, p.s_q);
    let scale = if p.scale == 0.0 {
        1.0 / (d_qk as f64).sqrt()
    } else {
        p.scale as f64
    };
    fn vals(c: &Cache, orig: bool) -> &[f64] {
        if orig {
            &c.orig
        } else {
            &c.stored
        }
    }
    let main = vals(&p.main, orig);
    let extra = p.extra.as_ref().map(|x| vals(x, orig));
    let mut out = vec![0.0; p.batch * s_q * h_q * d_v];
    let mut lse = vec![f64::INFINITY; p.batch * h_q * s_q];
    let mut scores = Vec::new();
    for (g, keys) in p.keys.iter().enumerate() {
        let (b, i) = (g / s_q, g % s_q);
        if keys.is_empty() {
            continue;
        }
        let rows: Vec<&[f64]> = keys
            .iter()
            .map(|&(x, pos)| {
                let v = if x { extra.unwrap() } else { main };
                &v[pos * d_qk..(pos + 1) * d_qk]
            })
            .collect();
        for h in 0..h_q {
            let row = g * h_q + h;
            let q = &p.q[row * d_qk..(row + 1) * d_qk];
            scores.clear();
            scores.extend(
                rows.iter()
                    .map(|k| scale * q.iter().zip(*k).map(|(a, b)| a * b).sum::<f64>()),
            );
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let o = &mut out[row * d_v..(row + 1) * d_v];
            let mut sum = 0.0;
            for (k, &s) in rows.iter().zip(&scores) {
                let w = (s - m).exp();
                sum += w;
                for (x, v) in o.iter_mut().zip(&k[..d_v]) {
                    *x += w * v;
                }
            }
            let l = m + sum.ln();
            let mut f = 1.0 / sum;
            if let Some(sink) = &p.sink {
                f /= 1.0 + (sink[h] as f64 - l).exp();
            }
            o.iter_mut().for_each(|x| *x *= f);
            lse[(b * h_q + h) * s_q + i] = l;
        }
    }
    Ref { out, lse }
}

struct Got {
    out: Vec<f64>,
    lse: Option<Vec<f32>>,
}

fn decode_args() -> mlart_decode_args {
    let mut a = MaybeUninit::uninit();
    mlart_decode_args_init(a.as_mut_ptr());
    // SAFETY: initialized above.
    unsafe { a.assume_init() }
}

fn decode(engine: &Engine, p: &Problem) -> Got {
    let n_out = p.batch * p.s_q * p.h_q * p.d_v;
    let mut out = p.out_dt.nan().repeat(n_out);
    let mut lse = vec![f32::NAN; p.batch * p.h_q * p.s_q];
    let mut a = decode_args();
    a.batch = p.batch as i32;
    a.s_q = p.s_q as i32;
    a.h_q = p.h_q as i32;
    a.d_qk = p.d_qk as i32;
    a.d_v = p.d_v as i32;
    a.softmax_scale = p.scale;
    a.q_dtype = p.q_dt.dtype();
    a.q = p.q_bytes.as_ptr().cast();
    a.kv_format = p.main.fmt.raw();
    a.kv = p.main.bytes.as_ptr().cast();
    a.num_blocks = p.main.num_blocks as i32;
    a.block_size = p.main.bs as i32;
    match &p.mode {
        Mode::Dense {
            block_table,
            stride,
            seqlens,
            causal,
        } => {
            a.block_table = block_table.as_ptr();
            a.block_table_stride = *stride as i32;
            a.seqlens = seqlens.as_ptr();
            a.causal = *causal;
        }
        Mode::Sparse {
            indices,
            topk,
            topk_length,
            extra,
        } => {
            // block_table and seqlens stay NULL: not read in sparse mode.
            a.indices = indices.as_ptr();
            a.topk = *topk as i32;
            a.topk_length = topk_length
                .as_ref()
                .map_or(std::ptr::null(), |l| l.as_ptr());
            if let Some((xi, xtopk, xlen)) = extra {
                let x = p.extra.as_ref().unwrap();
                a.extra_kv = x.bytes.as_ptr().cast();
                a.extra_num_blocks = x.num_blocks as i32;
                a.extra_block_size = x.bs as i32;
                a.extra_indices = xi.as_ptr();
                a.extra_topk = *xtopk as i32;
                a.extra_topk_length = xlen.as_ref().map_or(std::ptr::null(), |l| l.as_ptr());
            }
        }
    }
    a.attn_sink = p.sink.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    a.out_dtype = p.out_dt.dtype();
    a.out = out.as_mut_ptr().cast();
    a.lse = if p.with_lse {
        lse.as_mut_ptr()
    } else {
        std::ptr::null_mut()
    };
    if let Some((code, msg)) = take_error(mlart_decode_paged(engine.ptr, &a)) {
        panic!(
            "mlart_decode_paged failed ({} threads): {} ({code}): {msg}\n{}",
            engine.threads,
            status_name(code),
            p.ctx()
        );
    }
    Got {
        out: (0..n_out).map(|i| p.out_dt.read(&out, i)).collect(),
        lse: p.with_lse.then_some(lse),
    }
}

/// Worst errors over a group of cases.
#[derive(Default)]
struct Stats {
    cases: usize,
    madds: usize,
    strict_l2: f64,
    loose_l2: f64,
    lse_err: f64,
    /// FP8 against the original (unquantized) values.
    fp8_orig_l2: f64,
}

impl Stats {
    fn print(&self, group: &str, t: Instant) {
        println!(
            "{group}: {} cases ({:.2} G multiply-adds), max rel L2 {:.2e} (f32 q/out) / {:.2e} (bf16/f16), \
             max |lse err| {:.2e}, FP8 vs unquantized values max rel L2 {:.2e}, {:.2} s",
            self.cases,
            self.madds as f64 * 1e-9,
            self.strict_l2,
            self.loose_l2,
            self.lse_err,
            self.fp8_orig_l2,
            t.elapsed().as_secs_f64()
        );
    }
}

/// Relative L2 bound of an FP8 cache's output against the reference on
/// the original values. E4M3 keeps 4 significant bits: rounding a N(0, s)
/// tile to its power-of-two scale has an RMS relative error of about 2.6%
/// (measured for 64- and 128-wide tiles), and the output (a weighted mean
/// of V rows) inherits it. Plus the score error through the softmax.
const FP8_ORIG_TOL: f64 = 4e-2;

/// Checks a result against the references, recording the errors.
fn check(p: &Problem, got: &Got, r: &Ref, r_orig: Option<&Ref>, what: &str, st: &mut Stats) {
    let ctx = || format!("{what}: {}", p.ctx());
    // Rounding the output to bf16 (and P with it) costs about 2e-3 at most.
    let (tol, lse_tol) = if p.strict() {
        (1e-5, 1e-4)
    } else {
        (4e-3, 1e-3)
    };
    if let Some(i) = got.out.iter().position(|x| !x.is_finite()) {
        panic!("out[{i}] = {} is not finite; {}", got.out[i], ctx());
    }
    let (h_q, d_v, s_q) = (p.h_q, p.d_v, p.s_q);
    for (g, keys) in p.keys.iter().enumerate() {
        let (b, i) = (g / s_q, g % s_q);
        for h in 0..h_q {
            let row = g * h_q + h;
            let o = &got.out[row * d_v..(row + 1) * d_v];
            let zero = keys.is_empty() || p.sink.as_ref().is_some_and(|s| s[h] == f32::INFINITY);
            if zero {
                assert!(
                    o.iter().all(|&x| x == 0.0),
                    "out[{b}][{i}][{h}] must be 0 ({} keys, sink {:?}); {}",
                    keys.len(),
                    p.sink.as_ref().map(|s| s[h]),
                    ctx()
                );
            }
            if let Some(lse) = &got.lse {
                let (gl, wl) = (lse[(b * h_q + h) * s_q + i], r.lse[(b * h_q + h) * s_q + i]);
                if keys.is_empty() {
                    assert!(
                        gl == f32::INFINITY,
                        "lse[{b}][{h}][{i}] = {gl}, want +inf (no key); {}",
                        ctx()
                    );
                } else {
                    let e = (gl as f64 - wl).abs();
                    assert!(
                        e <= lse_tol,
                        "lse[{b}][{h}][{i}] = {gl}, want {wl} (error {e:.3e} > {lse_tol:.0e}); {}",
                        ctx()
                    );
                    st.lse_err = st.lse_err.max(e);
                }
            }
        }
        // Each query token on its own, so one bad list cannot hide.
        let rg = g * h_q * d_v..(g + 1) * h_q * d_v;
        let e = rel_l2(&got.out[rg.clone()], &r.out[rg]);
        assert!(
            e <= tol,
            "query [{b}][{i}] ({} keys): relative L2 error {e:.3e} > {tol:.0e}; {}",
            keys.len(),
            ctx()
        );
    }
    let l2 = rel_l2(&got.out, &r.out);
    assert!(
        l2 <= tol,
        "relative L2 error {l2:.3e} > {tol:.0e}; {}",
        ctx()
    );
    if p.strict() {
        st.strict_l2 = st.strict_l2.max(l2);
    } else {
        st.loose_l2 = st.loose_l2.max(l2);
    }
    if let Some(ro) = r_orig {
        let e = rel_l2(&got.out, &ro.out);
        assert!(
            e <= FP8_ORIG_TOL,
            "FP8 vs the unquantized values: relative L2 error {e:.3e} > {FP8_ORIG_TOL:.0e}; {}",
            ctx()
        );
        st.fp8_orig_l2 = st.fp8_orig_l2.max(e);
    }
    st.madds += p.cost();
}

/// Runs and checks a problem (both references for FP8 at the default scale
/// and d_v >= 128, where the FP8 error budget above applies).
fn run(engine: &Engine, p: &Problem, st: &mut Stats) -> Got {
    let got = decode(engine, p);
    let r = reference(p, false);
    // The FP8 budget is statistical (an RMS over many elements): checked
    // where each output row has at least 128 of them.
    let r_orig =
        (p.main.fmt.fp8().is_some() && p.scale == 0.0 && p.d_v >= 128).then(|| reference(p, true));
    check(
        p,
        &got,
        &r,
        r_orig.as_ref(),
        &format!("{} threads", engine.threads),
        st,
    );
    st.cases += 1;
    got
}

// ---------------------------------------------------------------------------
// Sparse problems.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SparseSpec {
    fmt: Fmt,
    dims: (usize, usize),
    batch: usize,
    s_q: usize,
    h_q: usize,
    q_dt: Dt,
    out_dt: Dt,
    bs: usize,
    topk: usize,
    topk_length: bool,
    /// (block size, topk, with extra_topk_length).
    extra: Option<(usize, usize, bool)>,
    sink: bool,
    scale: f32,
    with_lse: bool,
}

/// Index lists for one cache: `[batch, s_q, topk]` with -1s, duplicates,
/// optional per-sequence lengths whose unused tails hold garbage (out of
/// range, or in-range dead slots), and the slots that end up live.
struct Lists {
    indices: Vec<i32>,
    lengths: Option<Vec<i32>>,
    live: Vec<bool>,
    num_blocks: usize,
}

fn gen_lists(
    batch: usize,
    s_q: usize,
    topk: usize,
    bs: usize,
    with_len: bool,
    rng: &mut SmallRng,
) -> Lists {
    // Room for the lists and for dead slots: some whole blocks are never
    // drawn from, and 30% of the other slots.
    let target = (2 * topk).max(48);
    let num_blocks = target.div_ceil(bs) + 2;
    let n = num_blocks * bs;
    let dead_blocks = [num_blocks - 1, rng.random_range(0..num_blocks)];
    let allowed: Vec<usize> = (0..n)
        .filter(|&p| !dead_blocks.contains(&(p / bs)) && !rng.random_bool(0.3))
        .collect();
    assert!(!allowed.is_empty());
    let lengths: Option<Vec<i32>> = with_len.then(|| {
        (0..batch)
            .map(|b| match (b + rng.random_range(0..4)) % 4 {
                // A lone sequence uses most of its list.
                _ if batch == 1 => rng.random_range(topk / 2..=topk) as i32,
                0 => 0,
                1 => topk as i32,
                2 => 1.min(topk) as i32,
                _ => rng.random_range(0..=topk) as i32,
            })
            .collect()
    });
    let mut indices = vec![0i32; batch * s_q * topk];
    let mut live = vec![false; n];
    for b in 0..batch {
        let used = lengths.as_ref().map_or(topk, |l| l[b] as usize);
        for i in 0..s_q {
            let list = &mut indices[(b * s_q + i) * topk..][..topk];
            let all_invalid = rng.random_bool(0.08);
            for k in 0..used {
                let r: f64 = rng.random();
                list[k] = if all_invalid || r < 0.12 {
                    -1
                } else if r < 0.22 && k > 0 {
                    list[rng.random_range(0..k)]
                } else {
                    allowed[rng.random_range(0..allowed.len())] as i32
                };
                if list[k] >= 0 {
                    live[list[k] as usize] = true;
                }
            }
        }
    }
    // Tails past topk_length: garbage, including dead in-range slots.
    let dead: Vec<usize> = (0..n).filter(|&p| !live[p]).collect();
    assert!(!dead.is_empty());
    if let Some(l) = &lengths {
        for b in 0..batch {
            for i in 0..s_q {
                let list = &mut indices[(b * s_q + i) * topk..][..topk];
                for x in &mut list[l[b] as usize..] {
                    *x = match rng.random_range(0..6) {
                        0 => i32::MAX,
                        1 => i32::MIN,
                        2 => -2,
                        3 => n as i32,
                        _ => dead[rng.random_range(0..dead.len())] as i32,
                    };
                }
            }
        }
    }
    Lists {
        indices,
        lengths,
        live,
        num_blocks,
    }
}

/// The used, valid entries of list `(b, i)`.
fn used_keys(l: &Lists, s_q: usize, topk: usize, b: usize, i: usize, extra: bool) -> Vec<Key> {
    let used = l.lengths.as_ref().map_or(topk, |len| len[b] as usize);
    l.indices[(b * s_q + i) * topk..][..used]
        .iter()
        .filter(|&&p| p >= 0)
        .map(|&p| (extra, p as usize))
        .collect()
}

fn sparse_problem(spec: &SparseSpec, seed: u64) -> Problem {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (d_qk, d_v) = spec.dims;
    let (batch, s_q) = (spec.batch, spec.s_q);
    let main_l = gen_lists(batch, s_q, spec.topk, spec.bs, spec.topk_length, &mut rng);
    let extra_l = spec.extra.map(|(xbs, xtopk, xlen)| {
        (
            gen_lists(batch, s_q, xtopk, xbs, xlen, &mut rng),
            xbs,
            xtopk,
        )
    });
    let main = Cache::build(
        spec.fmt,
        d_qk,
        spec.bs,
        main_l.num_blocks,
        &main_l.live,
        &mut rng,
    );
    let extra = extra_l
        .as_ref()
        .map(|(l, xbs, _)| Cache::build(spec.fmt, d_qk, *xbs, l.num_blocks, &l.live, &mut rng));
    let mut keys = Vec::new();
    for b in 0..batch {
        for i in 0..s_q {
            let mut k = used_keys(&main_l, s_q, spec.topk, b, i, false);
            if let Some((l, _, xtopk)) = &extra_l {
                k.extend(used_keys(l, s_q, *xtopk, b, i, true));
            }
            keys.push(k);
        }
    }
    let (q_bytes, q) = random_q(batch, s_q, spec.h_q, d_qk, spec.q_dt, &mut rng);
    let n_keys = keys.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let sink = spec
        .sink
        .then(|| random_sink(spec.h_q, (n_keys as f64).ln(), &mut rng));
    Problem {
        desc: format!("{spec:?}"),
        seed,
        batch,
        s_q,
        h_q: spec.h_q,
        d_qk,
        d_v,
        scale: spec.scale,
        q_dt: spec.q_dt,
        out_dt: spec.out_dt,
        q_bytes,
        q,
        main,
        extra,
        mode: Mode::Sparse {
            indices: main_l.indices,
            topk: spec.topk,
            topk_length: main_l.lengths,
            extra: extra_l.map(|(l, _, xtopk)| (l.indices, xtopk, l.lengths)),
        },
        keys,
        sink,
        with_lse: spec.with_lse,
    }
}

// ---------------------------------------------------------------------------
// Dense problems over the same caches.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct DenseSpec {
    fmt: Fmt,
    dims: (usize, usize),
    seqlens: Vec<usize>,
    s_q: usize,
    h_q: usize,
    causal: bool,
    q_dt: Dt,
    out_dt: Dt,
    bs: usize,
    sink: bool,
    scale: f32,
}

/// Out-of-range ids in unused block-table entries.
const PADDING: [i32; 4] = [2147480000, -1, i32::MIN, i32::MAX];

fn dense_problem(spec: &DenseSpec, seed: u64) -> Problem {
    let mut rng = SmallRng::seed_from_u64(seed);
    let (d_qk, d_v) = spec.dims;
    let (batch, s_q, bs) = (spec.seqlens.len(), spec.s_q, spec.bs);
    let used: Vec<usize> = spec.seqlens.iter().map(|l| l.div_ceil(bs)).collect();
    let num_blocks = used.iter().sum::<usize>() + rng.random_range(1..=3);
    let stride = (used.iter().copied().max().unwrap_or(0) + rng.random_range(0..=2)).max(1);
    let mut ids: Vec<usize> = (0..num_blocks).collect();
    ids.shuffle(&mut rng);
    let mut slots: Vec<(usize, usize)> = used
        .iter()
        .enumerate()
        .flat_map(|(b, &n)| (0..n).map(move |j| (b, j)))
        .collect();
    slots.shuffle(&mut rng);
    let mut block_table: Vec<i32> = (0..batch * stride)
        .map(|_| PADDING[rng.random_range(0..PADDING.len())])
        .collect();
    for (&(b, j), &id) in slots.iter().zip(&ids) {
        block_table[b * stride + j] = id as i32;
    }
    let pos = |b: usize, t: usize| block_table[b * stride + t / bs] as usize * bs + t % bs;
    let mut live = vec![false; num_blocks * bs];
    for (b, &len) in spec.seqlens.iter().enumerate() {
        for t in 0..len {
            live[pos(b, t)] = true;
        }
    }
    let main = Cache::build(spec.fmt, d_qk, bs, num_blocks, &live, &mut rng);
    let mut keys = Vec::new();
    for (b, &len) in spec.seqlens.iter().enumerate() {
        for i in 0..s_q {
            let visible = if spec.causal {
                (len + i + 1).saturating_sub(s_q)
            } else {
                len
            };
            keys.push((0..visible).map(|t| (false, pos(b, t))).collect());
        }
    }
    let (q_bytes, q) = random_q(batch, s_q, spec.h_q, d_qk, spec.q_dt, &mut rng);
    let longest = spec.seqlens.iter().copied().max().unwrap_or(1).max(1);
    let sink = spec
        .sink
        .then(|| random_sink(spec.h_q, (longest as f64).ln(), &mut rng));
    Problem {
        desc: format!("{spec:?}"),
        seed,
        batch,
        s_q,
        h_q: spec.h_q,
        d_qk,
        d_v,
        scale: spec.scale,
        q_dt: spec.q_dt,
        out_dt: spec.out_dt,
        q_bytes,
        q,
        main,
        extra: None,
        mode: Mode::Dense {
            block_table,
            stride,
            seqlens: spec.seqlens.iter().map(|&l| l as i32).collect(),
            causal: spec.causal,
        },
        keys,
        sink,
        with_lse: true,
    }
}

/// The same problem with its keys given as sparse index lists (each query
/// token's visible positions in order, padded with -1).
fn as_sparse(p: &Problem) -> Problem {
    let topk = p.keys.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut indices = vec![-1i32; p.keys.len() * topk];
    for (g, k) in p.keys.iter().enumerate() {
        for (j, &(_, pos)) in k.iter().enumerate() {
            indices[g * topk + j] = pos as i32;
        }
    }
    Problem {
        desc: format!("{} as sparse", p.desc),
        q_bytes: p.q_bytes.clone(),
        q: p.q.clone(),
        main: Cache {
            bytes: p.main.bytes.clone(),
            orig: p.main.orig.clone(),
            stored: p.main.stored.clone(),
            ..p.main
        },
        extra: None,
        mode: Mode::Sparse {
            indices,
            topk,
            topk_length: None,
            extra: None,
        },
        keys: p.keys.clone(),
        sink: p.sink.clone(),
        ..*p
    }
}

/// Replaces an FP8 problem's cache by its dequantization to `dt` (through
/// `mlart_kv_dequantize`), as a plain cache with the same paging.
fn dequantized(p: &Problem, dt: Dt) -> Problem {
    let c = &p.main;
    let n = c.positions();
    let mut bytes = vec![0u8; n * c.d_qk * dt.size()];
    expect_ok(
        "mlart_kv_dequantize",
        mlart_kv_dequantize(
            c.fmt.raw(),
            c.d_qk as i32,
            c.bs as i32,
            n as i32,
            c.bytes.as_ptr().cast(),
            dt.dtype(),
            bytes.as_mut_ptr().cast(),
        ),
    );
    let fmt = match dt {
        Dt::F32 => Fmt::F32,
        Dt::Bf16 => Fmt::Bf16,
        Dt::F16 => Fmt::F16,
    };
    Problem {
        desc: format!("{} dequantized to {dt:?}", p.desc),
        q_bytes: p.q_bytes.clone(),
        q: p.q.clone(),
        main: Cache {
            fmt,
            bytes,
            orig: c.orig.clone(),
            stored: c.stored.clone(),
            ..*c
        },
        extra: None,
        mode: match &p.mode {
            Mode::Dense {
                block_table,
                stride,
                seqlens,
                causal,
            } => Mode::Dense {
                block_table: block_table.clone(),
                stride: *stride,
                seqlens: seqlens.clone(),
                causal: *causal,
            },
            Mode::Sparse { .. } => unreachable!("dense problems only"),
        },
        keys: p.keys.clone(),
        sink: p.sink.clone(),
        ..*p
    }
}

/// Compares two results of the same problem (different key encodings).
fn assert_close(a: &Got, b: &Got, tol: f64, what: &str, ctx: &str) -> f64 {
    let e = rel_l2(&a.out, &b.out);
    assert!(
        e <= tol,
        "{what}: relative L2 difference {e:.3e} > {tol:.0e}; {ctx}"
    );
    if let (Some(x), Some(y)) = (&a.lse, &b.lse) {
        for (j, (&u, &v)) in x.iter().zip(y).enumerate() {
            let ok = (u == f32::INFINITY && v == f32::INFINITY) || (u - v).abs() <= 1e-5;
            assert!(ok, "{what}: lse[{j}] {u} vs {v}; {ctx}");
        }
    }
    e
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// Every format x h_q in {1, 16, 64, 128} x s_q in {1, 2}, with the sparse
/// features rotating: topk 1 / 64 / 2048, topk_length, an extra cache with
/// its own block size and topk, sinks, dtypes, scales, thread counts.
#[test]
fn sparse_matrix() {
    let t = Instant::now();
    let engines = [Engine::new(2), Engine::new(1), Engine::new(3)];
    let mut st = Stats::default();
    let mut n = 0usize;
    let mut topks = std::collections::BTreeMap::new();
    let (mut zero_len, mut full_len, mut extras, mut sinks, mut empty_queries) = (0, 0, 0, 0, 0);
    // Two rounds: the rotations below give each round other combinations.
    for (round, fmt) in (0..2).flat_map(|r| FMTS.map(|f| (r, f))) {
        for h_q in [1usize, 16, 64, 128] {
            for s_q in [1usize, 2] {
                let dims = fmt.dims(n / 5);
                let mut topk = [1usize, 64, 2048][(n + round + h_q / 16) % 3];
                let per_seq = |topk: usize| s_q * topk * h_q * (dims.0 + dims.1);
                // topk 2048 with 64+ heads is left to the dedicated test.
                if per_seq(topk) > 100_000_000 {
                    topk = 512;
                }
                let batch = (30_000_000 / per_seq(topk)).clamp(1, 4);
                let (q_dt, out_dt) = if n.is_multiple_of(3) {
                    (Dt::F32, Dt::F32)
                } else {
                    (DTS[n % 3], DTS[(n / 3) % 3])
                };
                let bs = [1, 16, 64, 100][n % 4];
                let spec = SparseSpec {
                    fmt,
                    dims,
                    batch,
                    s_q,
                    h_q,
                    q_dt,
                    out_dt,
                    bs,
                    topk,
                    topk_length: n % 2 == 1,
                    extra: (n % 3 != 2).then(|| {
                        (
                            [7, 64, 3, 33][n % 4],
                            [1, 7, 64, 200][(n / 2) % 4],
                            n % 4 < 2,
                        )
                    }),
                    sink: n % 4 != 1,
                    scale: [0.0, 0.0, 0.5, -0.7, 3.0][n % 5],
                    with_lse: n % 7 != 6,
                };
                let p = sparse_problem(&spec, case_seed(10, n as u64));
                run(&engines[n % 3], &p, &mut st);
                // Coverage of the features across the rotations.
                *topks.entry(topk).or_insert(0) += 1;
                if let Mode::Sparse {
                    topk_length: Some(l),
                    ..
                } = &p.mode
                {
                    zero_len += l.contains(&0) as usize;
                    full_len += l.contains(&(topk as i32)) as usize;
                }
                extras += spec.extra.is_some() as usize;
                sinks += spec.sink as usize;
                empty_queries += p.keys.iter().filter(|k| k.is_empty()).count();
                n += 1;
            }
        }
    }
    st.print("sparse_matrix", t);
    println!(
        "sparse_matrix coverage: topk {topks:?}, cases with a topk_length of 0: {zero_len}, \
         of topk: {full_len}; with an extra cache: {extras}; with sinks: {sinks}; \
         query tokens without any key: {empty_queries}"
    );
    assert!(topks.len() == 4 && zero_len > 0 && full_len > 0 && empty_queries > 0);
}

/// The largest configuration: topk 2048, 128 heads, with and without an
/// extra cache and a sink.
#[test]
fn sparse_topk_2048_h128() {
    let t = Instant::now();
    let engine = Engine::new(2);
    let mut st = Stats::default();
    let cases = [
        (Fmt::V32, Dt::F32, true, None, false),
        (Fmt::Model1, Dt::Bf16, false, Some((64, 128, true)), true),
        (Fmt::Bf16, Dt::F32, true, Some((1, 64, false)), true),
    ];
    for (n, (fmt, dt, len, extra, sink)) in cases.into_iter().enumerate() {
        let spec = SparseSpec {
            fmt,
            dims: fmt.dims(0),
            batch: 1,
            s_q: 1,
            h_q: 128,
            q_dt: dt,
            out_dt: dt,
            bs: 64,
            topk: 2048,
            topk_length: len,
            extra,
            sink,
            scale: 0.0,
            with_lse: true,
        };
        let p = sparse_problem(&spec, case_seed(11, n as u64));
        run(&engine, &p, &mut st);
    }
    st.print("sparse_topk_2048_h128", t);
}

/// Hand-made lists: all invalid, only the extra cache, one key repeated,
/// the first and last positions, duplicates.
#[test]
fn sparse_edge_cases() {
    let t = Instant::now();
    let engine = Engine::new(2);
    let mut st = Stats::default();
    for (fi, fmt) in FMTS.into_iter().enumerate() {
        let spec = SparseSpec {
            fmt,
            dims: fmt.dims(fi),
            batch: 2,
            s_q: 2,
            h_q: 5,
            q_dt: Dt::F32,
            out_dt: Dt::F32,
            bs: 16,
            topk: 8,
            topk_length: true,
            extra: Some((5, 4, false)),
            sink: true,
            scale: 0.0,
            with_lse: true,
        };
        let base = sparse_problem(&spec, case_seed(12, fi as u64));
        let main_pos: Vec<usize> = (0..base.main.positions())
            .filter(|&p| base.main.orig[p * base.d_qk].is_finite())
            .collect();
        let extra_pos: Vec<usize> = {
            let x = base.extra.as_ref().unwrap();
            (0..x.positions())
                .filter(|&p| x.orig[p * base.d_qk].is_finite())
                .collect()
        };
        let (first, last) = (main_pos[0] as i32, *main_pos.last().unwrap() as i32);
        let a = main_pos[main_pos.len() / 2] as i32;
        // (main lists, lengths, extra lists) for the 4 query tokens.
        type Lists4 = ([[i32; 8]; 4], [i32; 2], [[i32; 4]; 4]);
        let x0 = extra_pos[0] as i32;
        let cases: [(&str, Lists4); 5] = [
            ("nothing valid", ([[-1; 8]; 4], [8, 0], [[-1; 4]; 4])),
            (
                "extra cache only",
                (
                    [[-1; 8], [-1; 8], [i32::MAX; 8], [i32::MIN; 8]],
                    [8, 0],
                    [[x0, -1, x0, -1]; 4],
                ),
            ),
            ("one key repeated", ([[a; 8]; 4], [8, 3], [[-1; 4]; 4])),
            (
                "first, last, duplicates",
                (
                    [[first, last, first, -1, last, last, a, -1]; 4],
                    [8, 7],
                    [[x0, x0, -1, -1]; 4],
                ),
            ),
            (
                "single key, garbage tail",
                (
                    [[last, 7777777, -5, i32::MAX, i32::MIN, -2, 0x7fff_ffff, -1]; 4],
                    [1, 1],
                    [[-1; 4]; 4],
                ),
            ),
        ];
        for (ci, (name, (lists, lens, xlists))) in cases.into_iter().enumerate() {
            let mut p = Problem {
                desc: format!("{name}: {}", base.desc),
                q_bytes: base.q_bytes.clone(),
                q: base.q.clone(),
                main: Cache {
                    bytes: base.main.bytes.clone(),
                    orig: base.main.orig.clone(),
                    stored: base.main.stored.clone(),
                    ..base.main
                },
                extra: base.extra.as_ref().map(|x| Cache {
                    bytes: x.bytes.clone(),
                    orig: x.orig.clone(),
                    stored: x.stored.clone(),
                    ..*x
                }),
                mode: Mode::Sparse {
                    indices: lists.concat(),
                    topk: 8,
                    topk_length: Some(lens.to_vec()),
                    extra: Some((xlists.concat(), 4, None)),
                },
                keys: Vec::new(),
                sink: base.sink.clone(),
                ..base
            };
            for g in 0..4 {
                let b = g / 2;
                let mut k: Vec<Key> = lists[g][..lens[b] as usize]
                    .iter()
                    .filter(|&&x| x >= 0)
                    .map(|&x| (false, x as usize))
                    .collect();
                k.extend(
                    xlists[g]
                        .iter()
                        .filter(|&&x| x >= 0)
                        .map(|&x| (true, x as usize)),
                );
                p.keys.push(k);
            }
            // With the random per-head sinks, and without any sink.
            for sink in [p.sink.clone(), None] {
                p.sink = sink;
                let got = run(&engine, &p, &mut st);
                if ci == 2 {
                    // Identical keys: softmax weights are equal, out = V.
                    let v = &p.main.stored[a as usize * p.d_qk..][..p.d_v];
                    for h in 0..p.h_q {
                        if p.sink.is_some() {
                            continue;
                        }
                        let o = &got.out[h * p.d_v..(h + 1) * p.d_v];
                        let e = rel_l2(o, v);
                        assert!(
                            e <= 1e-6,
                            "{name}: head {h} out != V ({e:.2e}); {}",
                            p.ctx()
                        );
                    }
                }
            }
        }
    }
    st.print("sparse_edge_cases", t);
}

/// Sparse lists that name a whole sequence in order give the dense result,
/// for every format; a causal dense decode equals sparse lists of each
/// query token's causal prefix. Sinks included.
#[test]
fn sparse_equals_dense() {
    let t = Instant::now();
    let engines = [Engine::new(1), Engine::new(3)];
    let mut st = Stats::default();
    let mut worst = 0.0f64;
    for (fi, fmt) in FMTS.into_iter().enumerate() {
        for causal in [false, true] {
            let n = fi * 2 + causal as usize;
            let bs = [1, 64, 100, 16][n % 4];
            let spec = DenseSpec {
                fmt,
                dims: fmt.dims(fi),
                seqlens: vec![0, bs + 1, 150 + n, 1],
                s_q: 2,
                h_q: 16,
                causal,
                q_dt: Dt::F32,
                out_dt: Dt::F32,
                bs,
                sink: !n.is_multiple_of(3),
                scale: 0.0,
            };
            let p = dense_problem(&spec, case_seed(13, n as u64));
            let sp = as_sparse(&p);
            let e = &engines[n % 2];
            let dense = run(e, &p, &mut st);
            let sparse = run(e, &sp, &mut st);
            worst = worst.max(assert_close(
                &dense,
                &sparse,
                1e-5,
                "sparse vs dense",
                &p.ctx(),
            ));
        }
    }
    st.print("sparse_equals_dense", t);
    println!("sparse_equals_dense: max rel L2 between the two {worst:.2e}");
}

/// Dense decode over an FP8 cache equals dense decode over that cache
/// dequantized (by `mlart_kv_dequantize`) to F32 and to BF16 (both exact).
#[test]
fn dense_fp8_equals_dequantized_cache() {
    let t = Instant::now();
    let engine = Engine::new(2);
    let mut st = Stats::default();
    let mut worst = 0.0f64;
    let mut n = 0u64;
    for fmt in [Fmt::V32, Fmt::Model1] {
        for bs in [1usize, 64, 100] {
            for (s_q, causal) in [(1, false), (2, true)] {
                let spec = DenseSpec {
                    fmt,
                    dims: fmt.dims(0),
                    seqlens: vec![bs + 1, 0, 200, bs.saturating_sub(1).max(1), 1],
                    s_q,
                    h_q: 16,
                    causal,
                    q_dt: Dt::F32,
                    out_dt: Dt::F32,
                    bs,
                    sink: n % 2 == 1,
                    scale: [0.0, 0.3][n as usize % 2],
                };
                let p = dense_problem(&spec, case_seed(14, n));
                let got = run(&engine, &p, &mut st);
                for dt in [Dt::F32, Dt::Bf16] {
                    let dq = dequantized(&p, dt);
                    let other = run(&engine, &dq, &mut st);
                    worst = worst.max(assert_close(
                        &got,
                        &other,
                        1e-5,
                        &format!("FP8 vs dequantized {dt:?}"),
                        &p.ctx(),
                    ));
                }
                n += 1;
            }
        }
    }
    st.print("dense_fp8_equals_dequantized_cache", t);
    println!("dense_fp8_equals_dequantized_cache: max rel L2 between the two {worst:.2e}");
}

/// Dense decode over FP8_V32 / FP8_MODEL1 caches against the reference:
/// block sizes 1, 64, 100, varlen (0, 1, bs - 1, bs, bs + 1, long), causal
/// MTP, several head counts and dtypes.
#[test]
fn dense_fp8_reference() {
    let t = Instant::now();
    let engines = [Engine::new(1), Engine::new(2), Engine::new(3)];
    let mut st = Stats::default();
    let mut n = 0usize;
    for fmt in [Fmt::V32, Fmt::Model1] {
        for bs in [1usize, 64, 100] {
            for (s_q, causal) in [(1, false), (2, true), (2, false)] {
                let mut rng = SmallRng::seed_from_u64(case_seed(15, n as u64));
                let mut seqlens = vec![
                    0,
                    1,
                    bs.saturating_sub(1),
                    bs,
                    bs + 1,
                    rng.random_range(200..=400),
                ];
                seqlens.shuffle(&mut rng);
                let h_q = [16, 1, 64][n % 3];
                let (q_dt, out_dt) = if n.is_multiple_of(2) {
                    (Dt::F32, Dt::F32)
                } else {
                    (DTS[1 + n % 2], DTS[1 + (n / 2) % 2])
                };
                let spec = DenseSpec {
                    fmt,
                    dims: fmt.dims(0),
                    seqlens,
                    s_q,
                    h_q,
                    causal,
                    q_dt,
                    out_dt,
                    bs,
                    sink: false,
                    scale: [0.0, 0.0, 2.0][n % 3],
                };
                let p = dense_problem(&spec, case_seed(15, 100 + n as u64));
                run(&engines[n % 3], &p, &mut st);
                n += 1;
            }
        }
    }
    st.print("dense_fp8_reference", t);
}

/// The attention sink in dense decode: finite, +inf and -inf per head,
/// sequences of length 0 and causal queries that see nothing, every format.
#[test]
fn dense_attn_sink() {
    let t = Instant::now();
    let engine = Engine::new(2);
    let mut st = Stats::default();
    for (n, fmt) in FMTS.into_iter().enumerate() {
        for h_q in [1usize, 16] {
            let spec = DenseSpec {
                fmt,
                dims: fmt.dims(n + 2),
                seqlens: vec![1, 0, 77, 130],
                s_q: 2,
                h_q,
                causal: n % 2 == 0,
                q_dt: [Dt::F32, Dt::Bf16][h_q / 16],
                out_dt: [Dt::F32, Dt::F16][h_q / 16],
                bs: [16, 64, 1, 100, 7][n],
                sink: true,
                scale: 0.0,
            };
            let mut p = dense_problem(&spec, case_seed(16, (2 * n + h_q / 16) as u64));
            run(&engine, &p, &mut st);
            // Sinks at the extremes of the finite range behave like +-inf.
            p.sink = Some(
                (0..h_q)
                    .map(|h| if h % 2 == 0 { 1e30 } else { -1e30 })
                    .collect(),
            );
            run(&engine, &p, &mut st);
            // The same decode without a sink: with a sink of -inf on every
            // head it is bit-for-bit unchanged.
            p.sink = None;
            let plain = decode(&engine, &p);
            p.sink = Some(vec![f32::NEG_INFINITY; h_q]);
            let neg = decode(&engine, &p);
            assert!(
                plain
                    .out
                    .iter()
                    .zip(&neg.out)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "sink -inf changed the output; {}",
                p.ctx()
            );
            assert_eq!(plain.lse, neg.lse, "{}", p.ctx());
        }
    }
    st.print("dense_attn_sink", t);
}

/// Every kernel variant this build and CPU have (forced with
/// `MLART_CPU_ISA`): sparse decode over every format with extra caches and
/// sinks, and dense FP8 decode with causal MTP, against the reference.
#[test]
fn every_kernel_variant() {
    let t = Instant::now();
    let mut ran = Vec::new();
    for (vi, isa) in ["scalar", "avx2", "avx512", "avx512bf16", "amx"]
        .into_iter()
        .enumerate()
    {
        // AMX runs on software tiles where the CPU has none.
        let engine = match isa {
            "amx" => Engine::amx(2).map(|(e, _)| e),
            _ => Engine::with_isa(isa, 2),
        };
        let Some(engine) = engine else {
            println!("SKIPPED {isa}: not available on this CPU");
            continue;
        };
        ran.push(isa);
        let mut st = Stats::default();
        let mut n = 0usize;
        for fmt in FMTS {
            for (h_q, topk) in [(1usize, 300usize), (16, 64), (128, 200)] {
                let spec = SparseSpec {
                    fmt,
                    dims: fmt.dims(n),
                    batch: 2,
                    s_q: 1 + n % 2,
                    h_q,
                    q_dt: [Dt::F32, Dt::Bf16][n % 2],
                    out_dt: [Dt::F32, Dt::Bf16][n % 2],
                    bs: [64, 1, 100][n % 3],
                    topk,
                    topk_length: n.is_multiple_of(2),
                    extra: Some(([3, 64, 16][n % 3], [5, 64, 1][n % 3], n.is_multiple_of(3))),
                    sink: n % 3 != 1,
                    scale: 0.0,
                    with_lse: true,
                };
                let p = sparse_problem(&spec, case_seed(17, (vi * 100 + n) as u64));
                run(&engine, &p, &mut st);
                n += 1;
            }
        }
        for fmt in [Fmt::V32, Fmt::Model1] {
            for (bs, causal) in [(1usize, true), (100, true), (64, false)] {
                let spec = DenseSpec {
                    fmt,
                    dims: fmt.dims(0),
                    seqlens: vec![0, 1, 65, 333],
                    s_q: 2,
                    h_q: 16,
                    causal,
                    // bf16 in and out: FP8 caches on both AMX GEMMs.
                    q_dt: [Dt::F32, Dt::Bf16][bs % 2],
                    out_dt: [Dt::F32, Dt::Bf16][bs % 2],
                    bs,
                    sink: bs == 100,
                    scale: 0.0,
                };
                let p = dense_problem(&spec, case_seed(17, (vi * 100 + n) as u64));
                run(&engine, &p, &mut st);
                n += 1;
            }
        }
        // V of any width, FP8 included: d_v ending inside a tile, or
        // reaching into the bf16 rope part.
        for (fmt, d_v) in [
            (Fmt::V32, 1usize),
            (Fmt::V32, 130),
            (Fmt::V32, 513),
            (Fmt::V32, 576),
            (Fmt::Model1, 64),
            (Fmt::Model1, 449),
            (Fmt::Model1, 511),
        ] {
            let spec = SparseSpec {
                fmt,
                dims: (fmt.dims(0).0, d_v),
                batch: 2,
                s_q: 2,
                h_q: 16,
                q_dt: Dt::F32,
                out_dt: Dt::F32,
                bs: 64,
                topk: 100,
                topk_length: true,
                extra: Some((5, 9, false)),
                sink: true,
                scale: 0.0,
                with_lse: true,
            };
            let p = sparse_problem(&spec, case_seed(17, (vi * 100 + n) as u64));
            run(&engine, &p, &mut st);
            let spec = DenseSpec {
                fmt,
                dims: (fmt.dims(0).0, d_v),
                seqlens: vec![3, 150],
                s_q: 2,
                h_q: 16,
                causal: true,
                q_dt: Dt::F32,
                out_dt: Dt::F32,
                bs: 16,
                sink: false,
                scale: 0.0,
            };
            let p = dense_problem(&spec, case_seed(17, (vi * 100 + n + 50) as u64));
            run(&engine, &p, &mut st);
            n += 1;
        }
        st.print(&format!("every_kernel_variant ({isa})"), t);
    }
    assert!(ran.contains(&"scalar"), "the scalar kernel is always built");
    println!("every_kernel_variant: ran {ran:?}");
}

fn clone_cache(c: &Cache) -> Cache {
    Cache {
        bytes: c.bytes.clone(),
        orig: c.orig.clone(),
        stored: c.stored.clone(),
        ..*c
    }
}

/// Copies token `from` of a cache onto the slot of token `to` (bytes and
/// values), so that two positions hold the same key.
fn copy_token(c: &mut Cache, from: usize, to: usize) {
    let d = c.d_qk;
    match (c.fmt.plain(), c.fmt.fp8()) {
        (Some(dt), _) => {
            let row = d * dt.size();
            c.bytes.copy_within(from * row..(from + 1) * row, to * row);
        }
        (None, Some(fp8)) => {
            let bb = fp8.block_bytes(c.bs);
            let (b1, s1, b2, s2) = (from / c.bs, from % c.bs, to / c.bs, to % c.bs);
            for (r1, r2) in fp8
                .token_ranges(c.bs, s1)
                .into_iter()
                .zip(fp8.token_ranges(c.bs, s2))
            {
                c.bytes
                    .copy_within(b1 * bb + r1.start..b1 * bb + r1.end, b2 * bb + r2.start);
            }
        }
        _ => unreachable!(),
    }
    c.orig.copy_within(from * d..(from + 1) * d, to * d);
    c.stored.copy_within(from * d..(from + 1) * d, to * d);
}

/// Writes key `from` of `src` (its original values) into slot `to` of
/// `c`, through `mlart_kv_quantize` into a scratch block; both caches have
/// the same format, so the stored values are the same too.
fn put_key(c: &mut Cache, to: usize, src: &Cache, from: usize) {
    let d = c.d_qk;
    let (block, slot) = (to / c.bs, to % c.bs);
    let bb = c.bytes.len() / c.num_blocks;
    let rows: Vec<f32> = (0..c.bs * d)
        .map(|i| {
            if i / d == slot {
                src.orig[from * d + i % d] as f32
            } else {
                0.0
            }
        })
        .collect();
    let mut tmp = vec![0u8; bb];
    expect_ok(
        "mlart_kv_quantize",
        mlart_kv_quantize(
            c.fmt.raw(),
            d as i32,
            c.bs as i32,
            c.bs as i32,
            MLART_DTYPE_F32,
            rows.as_ptr().cast(),
            tmp.as_mut_ptr().cast(),
        ),
    );
    let ranges = match c.fmt.fp8() {
        Some(fp8) => fp8.token_ranges(c.bs, slot),
        None => {
            let row = bb / c.bs;
            std::iter::once(slot * row..(slot + 1) * row).collect()
        }
    };
    for r in ranges {
        c.bytes[block * bb + r.start..block * bb + r.end].copy_from_slice(&tmp[r]);
    }
    c.orig[to * d..(to + 1) * d].copy_from_slice(&src.orig[from * d..(from + 1) * d]);
    c.stored[to * d..(to + 1) * d].copy_from_slice(&src.stored[from * d..(from + 1) * d]);
    if let Some(fp8) = c.fmt.fp8() {
        let got = fp8.decode_token(c.bs, &c.bytes[block * bb..(block + 1) * bb], slot);
        assert_eq!(got, c.stored[to * d..(to + 1) * d]);
    }
}

/// A duplicated index counts twice: `[a, a, b]` gives exactly what
/// `[a, a', b]` gives when position a' holds a copy of key a, and differs
/// from `[a, b]`. Likewise across the main and extra caches.
#[test]
fn duplicates_count_twice() {
    let t = Instant::now();
    let engine = Engine::new(2);
    let mut st = Stats::default();
    for (fi, fmt) in FMTS.into_iter().enumerate() {
        let spec = SparseSpec {
            fmt,
            dims: fmt.dims(fi),
            batch: 1,
            s_q: 1,
            h_q: 16,
            q_dt: Dt::F32,
            out_dt: Dt::F32,
            bs: 4,
            topk: 16,
            topk_length: false,
            extra: Some((3, 2, false)),
            sink: false,
            scale: 2.0,
            with_lse: true,
        };
        let base = sparse_problem(&spec, case_seed(18, fi as u64));
        let d = base.d_qk;
        let n = base.main.positions();
        let live: Vec<usize> = (0..n)
            .filter(|&p| base.main.orig[p * d].is_finite())
            .collect();
        let dead: Vec<usize> = (0..n)
            .filter(|&p| !base.main.orig[p * d].is_finite())
            .collect();
        let (a, b, a2) = (live[0], live[1], dead[0]);
        let mut main = clone_cache(&base.main);
        copy_token(&mut main, a, a2);
        // The extra cache (its own block size) gets a copy of key a in a
        // dead slot.
        let x = base.extra.as_ref().unwrap();
        let mut extra = clone_cache(x);
        let xdead = (0..x.positions())
            .find(|&p| !x.orig[p * d].is_finite())
            .unwrap();
        put_key(&mut extra, xdead, &main, a);
        let make = |name: &str, list: &[i32], xlist: &[i32]| {
            let mut indices = vec![-1i32; 16];
            indices[..list.len()].copy_from_slice(list);
            let mut xind = vec![-1i32; 2];
            xind[..xlist.len()].copy_from_slice(xlist);
            let mut keys: Vec<Key> = list.iter().map(|&p| (false, p as usize)).collect();
            keys.extend(xlist.iter().map(|&p| (true, p as usize)));
            Problem {
                desc: format!("{name}: {}", base.desc),
                q_bytes: base.q_bytes.clone(),
                q: base.q.clone(),
                main: clone_cache(&main),
                extra: Some(clone_cache(&extra)),
                mode: Mode::Sparse {
                    indices,
                    topk: 16,
                    topk_length: None,
                    extra: Some((xind, 2, None)),
                },
                keys: vec![keys],
                sink: None,
                ..base
            }
        };
        let (a, b, a2, xa) = (a as i32, b as i32, a2 as i32, xdead as i32);
        let dup = run(&engine, &make("[a, a, b]", &[a, a, b], &[]), &mut st);
        let copy = run(&engine, &make("[a, a', b]", &[a, a2, b], &[]), &mut st);
        let extra_copy = run(
            &engine,
            &make("[a, b] + extra [a']", &[a, b], &[xa]),
            &mut st,
        );
        let once = run(&engine, &make("[a, b]", &[a, b], &[]), &mut st);
        let ctx = format!("{fmt:?}");
        for (what, other) in [("a' in main", &copy), ("a' in extra", &extra_copy)] {
            let e = rel_l2(&dup.out, &other.out);
            assert!(e <= 1e-6, "{ctx}: [a, a, b] vs {what}: {e:.2e}");
            let (l1, l2) = (dup.lse.as_ref().unwrap(), other.lse.as_ref().unwrap());
            for (u, v) in l1.iter().zip(l2) {
                assert!((u - v).abs() <= 1e-6, "{ctx}: lse {u} vs {v} ({what})");
            }
        }
        let e = rel_l2(&dup.out, &once.out);
        assert!(
            e > 1e-3,
            "{ctx}: the duplicate made no difference ({e:.2e})"
        );
    }
    st.print("duplicates_count_twice", t);
}
