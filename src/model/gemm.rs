//! Prefill projections on `vdpbf16ps`: `Y [T, out] = X [T, in] · Wᵀ` for
//! many tokens, with bf16 or FP8 weights kept in their stored precision.
//!
//! The f32 path converts each weight row once and dots it with every
//! token's `x`, which re-reads all of `X` (7 MB for 256 tokens of V3's
//! hidden size) from L3 per weight row. This one is a register-tiled GEMM:
//! - `X` is split once per call into bf16 `hi` and `lo = x − hi` (about 16
//!   bits of each activation are kept), stored as column pairs × tokens,
//!   so one load gives one pair for 16 tokens;
//! - a tile is 12 weight rows × 16 tokens: per column pair, each row's
//!   bf16 pair is broadcast and multiplied into 16 tokens' `hi` and `lo`;
//! - weights are converted 12 rows × 128 columns at a time (one FP8 scale
//!   block: `vpermi2b` lookups, exact), and that block serves every token;
//! - each 128-column block's sums are scaled per row (the FP8 block scale,
//!   1 for bf16) into an f32 accumulator.
//!
//! FP8 codes convert in an interleaved column order; `X` is packed in the
//! same order, which a dot product does not mind.

use super::fp8_bf16::{self, source_of, CHUNK};
use super::linear::FP8_BLOCK;
use rayon::prelude::*;

/// Weight rows per tile.
const ROWS: usize = 12;
/// Tokens per tile (one vector of f32 lanes).
const TOKENS: usize = 16;
/// Columns per block: one FP8 scale block.
const COLS: usize = FP8_BLOCK;
const PAIRS: usize = COLS / 2;

/// Whether this CPU runs the GEMM (AVX512-BF16 and VBMI, as the FP8 dot).
pub fn available() -> bool {
    fp8_bf16::available()
}

/// The weight operand: bf16 rows, or E4M3 codes with `[ceil(out/128),
/// ceil(in/128)]` scales.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    Bf16(&'a [u8]),
    Fp8 { codes: &'a [u8], scales: &'a [f32] },
}

impl Weights<'_> {
    /// Column pair `q` of a 64-column chunk: the two columns it holds.
    fn pair_columns(&self, q: usize) -> (usize, usize) {
        match self {
            Weights::Bf16(_) => (2 * q, 2 * q + 1),
            Weights::Fp8 { .. } => (source_of(2 * q), source_of(2 * q + 1)),
        }
    }

    /// Rows `o0..o0 + ROWS` (zero past `out`), columns of block `cb`, as
    /// bf16 pairs `[ROWS][PAIRS]`; and each row's scale for the block.
    fn block(&self, o0: usize, out: usize, inp: usize, cb: usize, w: &mut [u32], s: &mut [f32]) {
        let c0 = cb * COLS;
        let cols = COLS.min(inp - c0);
        for r in 0..ROWS {
            let dst = &mut w[r * PAIRS..][..PAIRS];
            let o = o0 + r;
            if o >= out {
                dst.fill(0);
                s[r] = 0.0;
                continue;
            }
            match *self {
                Weights::Bf16(b) => {
                    let row = &b[(o * inp + c0) * 2..][..cols * 2];
                    for (q, d) in dst.iter_mut().enumerate() {
                        let at = |c: usize| {
                            if c < cols {
                                u16::from_le_bytes([row[2 * c], row[2 * c + 1]]) as u32
                            } else {
                                0
                            }
                        };
                        *d = at(2 * q) | at(2 * q + 1) << 16;
                    }
                    s[r] = 1.0;
                }
                Weights::Fp8 { codes, scales } => {
                    let row = &codes[o * inp + c0..][..cols];
                    for (h, pairs) in dst.chunks_exact_mut(CHUNK / 2).enumerate() {
                        // Zero codes past the row's end (a partial last block).
                        let mut chunk = [0u8; CHUNK];
                        let part = row.get(h * CHUNK..).unwrap_or(&[]);
                        let n = part.len().min(CHUNK);
                        chunk[..n].copy_from_slice(&part[..n]);
                        let pairs: &mut [u32; CHUNK / 2] =
                            pairs.try_into().expect("PAIRS is a multiple of CHUNK / 2");
                        fp8_bf16::codes_to_bf16_pairs(&chunk, pairs);
                    }
                    s[r] = scales[(o / FP8_BLOCK) * inp.div_ceil(FP8_BLOCK) + cb];
                }
            }
        }
    }
}

/// `X` split into bf16 `hi` and `lo` in the weights' column order, zero
/// past `in` and past `T`: per (column block, 16-token block), `PAIRS`
/// entries of 16 `hi` pairs then 16 `lo` pairs, so a tile reads one
/// contiguous 8 KiB run.
struct PackedX {
    data: Vec<u32>,
    token_blocks: usize,
}

/// u32s per (column block, token block) of [`PackedX`].
const XBLOCK: usize = PAIRS * 2 * TOKENS;

impl PackedX {
    fn new(w: &Weights, x: &[f32], tokens: usize, inp: usize) -> Self {
        let token_blocks = tokens.div_ceil(TOKENS);
        let blocks = inp.div_ceil(COLS);
        let mut data = vec![0u32; blocks * token_blocks * XBLOCK];
        data.par_chunks_mut(XBLOCK).enumerate().for_each(|(i, xb)| {
            let (cb, tb) = (i / token_blocks, i % token_blocks);
            for (p, e) in xb.chunks_exact_mut(2 * TOKENS).enumerate() {
                let (chunk, q) = (cb * COLS / CHUNK + p / (CHUNK / 2), p % (CHUNK / 2));
                let (a, b) = w.pair_columns(q);
                let cols = [chunk * CHUNK + a, chunk * CHUNK + b];
                for l in 0..TOKENS.min(tokens - tb * TOKENS) {
                    let t = tb * TOKENS + l;
                    for (k, &c) in cols.iter().enumerate() {
                        if c < inp {
                            let v = x[t * inp + c];
                            let vh = half::bf16::from_f32(v);
                            let vl = half::bf16::from_f32(v - vh.to_f32());
                            e[l] |= (vh.to_bits() as u32) << (16 * k);
                            e[TOKENS + l] |= (vl.to_bits() as u32) << (16 * k);
                        }
                    }
                }
            }
        });
        PackedX { data, token_blocks }
    }

    /// The run of column block `cb`, token block `tb`.
    fn block(&self, cb: usize, tb: usize) -> &[u32] {
        &self.data[(cb * self.token_blocks + tb) * XBLOCK..][..XBLOCK]
    }
}

/// Row tiles per task: the tiles share each `X` run while it is in L1.
const TILES: usize = 4;

/// `y [T, out] = x [T, inp] · Wᵀ`. Requires [`available`]; `w` holds `out`
/// rows of `inp`.
pub fn matmul(w: Weights, out: usize, inp: usize, x: &[f32], tokens: usize, y: &mut [f32]) {
    let px = PackedX::new(&w, x, tokens, inp);
    let blocks = inp.div_ceil(COLS);
    let t_pad = px.token_blocks * TOKENS;
    // Each task: TILES × ROWS output rows for every token, as [rows][t_pad].
    let task_rows = TILES * ROWS;
    let mut yt = vec![0f32; out.div_ceil(task_rows) * task_rows * t_pad];
    yt.par_chunks_mut(task_rows * t_pad)
        .enumerate()
        .for_each(|(g, acc)| {
            let mut wb = [0u32; TILES * ROWS * PAIRS];
            let mut s = [0f32; TILES * ROWS];
            for cb in 0..blocks {
                for (k, (wk, sk)) in wb
                    .chunks_exact_mut(ROWS * PAIRS)
                    .zip(s.chunks_exact_mut(ROWS))
                    .enumerate()
                {
                    w.block(g * task_rows + k * ROWS, out, inp, cb, wk, sk);
                }
                for tb in 0..px.token_blocks {
                    let xb = px.block(cb, tb);
                    for k in 0..TILES {
                        if g * task_rows + k * ROWS < out {
                            tile(
                                &wb[k * ROWS * PAIRS..][..ROWS * PAIRS],
                                &s[k * ROWS..][..ROWS],
                                xb,
                                &mut acc[k * ROWS * t_pad..][..ROWS * t_pad],
                                t_pad,
                                tb * TOKENS,
                            );
                        }
                    }
                }
            }
        });
    // yt [out][t_pad] → y [T][out], 16 tokens at a time: each cache line of
    // yt is read once, and the 16 output rows are written in runs.
    y[..tokens * out]
        .par_chunks_mut(TOKENS * out)
        .enumerate()
        .for_each(|(tb, ys)| {
            let n = ys.len() / out;
            for (o, col) in yt.chunks_exact(t_pad).take(out).enumerate() {
                for (t, &v) in col[tb * TOKENS..][..n].iter().enumerate() {
                    ys[t * out + o] = v;
                }
            }
        });
}

/// One 12-row × 16-token tile over one column block (`x`: one [`PackedX`]
/// run), added (scaled per row) into `acc [ROWS][t_pad]` at token `tb`.
fn tile(w: &[u32], s: &[f32], x: &[u32], acc: &mut [f32], t_pad: usize, tb: usize) {
    assert!(w.len() >= ROWS * PAIRS && s.len() >= ROWS && x.len() >= XBLOCK);
    assert!(acc.len() >= (ROWS - 1) * t_pad + tb + TOKENS);
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: features detected at run time; sizes checked above.
        unsafe { avx512::tile(w, s, x, acc, t_pad, tb) };
        return;
    }
    tile_portable(w, s, x, acc, t_pad, tb)
}

/// [`tile`] without SIMD: the fallback, and the vector tile's test oracle.
fn tile_portable(w: &[u32], s: &[f32], x: &[u32], acc: &mut [f32], t_pad: usize, tb: usize) {
    let bf = |v: u32| half::bf16::from_bits(v as u16).to_f32();
    for r in 0..ROWS {
        for t in 0..TOKENS {
            let mut sum = 0f32;
            for q in 0..PAIRS {
                let wv = w[r * PAIRS + q];
                let (h, l) = (x[q * 2 * TOKENS + t], x[q * 2 * TOKENS + TOKENS + t]);
                for k in [0, 16] {
                    sum += bf(wv >> k) * (bf(h >> k) + bf(l >> k));
                }
            }
            acc[r * t_pad + tb + t] += s[r] * sum;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PAIRS, ROWS, TOKENS};
    use std::arch::x86_64::*;

    /// # Safety
    /// `w` has `ROWS · PAIRS` pairs, `s` `ROWS` scales, `x` one
    /// `XBLOCK` run, `acc` rows of `t_pad` with `tb + 16 <= t_pad`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile(w: &[u32], s: &[f32], x: &[u32], acc: &mut [f32], t_pad: usize, tb: usize) {
        let mut sum = [_mm512_setzero_ps(); ROWS];
        for q in 0..PAIRS {
            // SAFETY (caller): entry q of the run is in x.
            let (xh, xl) = unsafe {
                let p = x.as_ptr().add(q * 2 * TOKENS);
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        p.add(TOKENS) as *const _
                    )),
                )
            };
            for (r, sr) in sum.iter_mut().enumerate() {
                // SAFETY: any bits are a valid bf16 pair vector.
                let wv = unsafe {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        w[r * PAIRS + q] as i32,
                    ))
                };
                *sr = _mm512_dpbf16_ps(*sr, wv, xh);
                *sr = _mm512_dpbf16_ps(*sr, wv, xl);
            }
        }
        for (r, v) in sum.iter().enumerate() {
            // SAFETY (caller): row r of acc has t_pad >= tb + TOKENS values.
            unsafe {
                let p = acc.as_mut_ptr().add(r * t_pad + tb);
                _mm512_storeu_ps(
                    p,
                    _mm512_fmadd_ps(*v, _mm512_set1_ps(s[r]), _mm512_loadu_ps(p)),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linear::testing::values;

    /// The vector tile equals the portable one (both sum the same bf16
    /// products in f32; the order differs, so up to rounding).
    #[test]
    fn vector_tile_matches_portable() {
        if !available() {
            eprintln!("SKIPPED gemm vector tile: CPU lacks avx512bf16/avx512vbmi");
            return;
        }
        let t_pad = 48;
        let bits = |v: &[f32]| -> Vec<u32> {
            v.chunks(2)
                .map(|p| {
                    half::bf16::from_f32(p[0]).to_bits() as u32
                        | (half::bf16::from_f32(p[1]).to_bits() as u32) << 16
                })
                .collect()
        };
        let w = bits(&values(ROWS * PAIRS * 2, 1));
        let x = bits(&values(XBLOCK * 2, 2));
        let s: Vec<f32> = (0..ROWS).map(|r| 0.5 + r as f32).collect();
        let init = values(ROWS * t_pad, 4);
        for tb in [0, 16, 32] {
            let (mut a, mut b) = (init.clone(), init.clone());
            tile(&w, &s, &x, &mut a, t_pad, tb);
            tile_portable(&w, &s, &x, &mut b, t_pad, tb);
            for (k, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                    "tb {tb} [{k}]: {p} vs {q}"
                );
            }
            // Only this token block changed.
            for (k, (p, q)) in a.iter().zip(&init).enumerate() {
                if !(tb..tb + TOKENS).contains(&(k % t_pad)) {
                    assert_eq!(p, q);
                }
            }
        }
    }
}
