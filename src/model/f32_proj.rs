//! Prefill projections in f32, `Y [T, out] = X [T, inp] · Wᵀ`, for the
//! levels without the bf16 GEMM (avx512, avx2, portable) and for f32/f16
//! weights.
//!
//! The layout of [`super::gemm`] in f32, so that no weight is transposed:
//! - X is packed once per call as blocks of `tok` tokens, `[k][tok]`, so
//!   one or two vector loads give column k for the whole block;
//! - a task converts a group of weight rows to f32 one `KB`-column chunk
//!   at a time, as stored (row-major);
//! - a tile of `R` rows × `tok` tokens broadcasts each row's value at k
//!   against the X vectors (AVX-512: 12 rows × 32 tokens, AVX2: 6 × 16);
//! - the tiles of a group share each X run while it is in cache, and sums
//!   over the chunks accumulate in the task's rows of the output.
//!
//! The first version converted whole rows and transposed each chunk for
//! the `[k][n]` kernel of [`super::f32_gemm`]: the transposition took a
//! third as long as the products.

use super::columns::OutputColumns;
use super::level::Level;
use super::scratch::Scratch;
use rayon::prelude::*;

/// Weight columns per converted chunk.
const KB: usize = 256;
/// Weight rows per task: a multiple of every tile's row count.
const GROUP: usize = 48;

/// Tokens per block at `lvl`; fewer tokens are padded to a whole block.
pub fn block_tokens(lvl: Level) -> usize {
    shape(lvl).0
}

/// Tokens per block and weight rows per tile at `lvl`.
fn shape(lvl: Level) -> (usize, usize) {
    if lvl >= Level::Avx512 {
        (32, 12)
    } else {
        (16, 6)
    }
}

/// `y [tokens, out] = x [tokens, inp] · Wᵀ`, where `row(o, c0, dst)` writes
/// columns `c0 .. c0 + dst.len()` of weight row `o` as f32 (`c0` is a
/// multiple of 256). Runs on the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    lvl: Level,
    x: &[f32],
    tokens: usize,
    inp: usize,
    out: usize,
    row: impl Fn(usize, usize, &mut [f32]) + Sync,
    y: &mut [f32],
    scratch: &Scratch,
) {
    assert!(x.len() >= tokens * inp && y.len() >= tokens * out);
    if tokens == 0 || out == 0 {
        return;
    }
    let (tok, r_tile) = shape(lvl);
    let t_blocks = tokens.div_ceil(tok);
    let t_pad = t_blocks * tok;
    // X as [block][inp][tok], zero past the last token.
    let mut px = scratch.overwritten::<f32>(t_blocks * inp * tok);
    px.par_chunks_mut(inp * tok)
        .enumerate()
        .for_each(|(b, run)| {
            for (k, col) in run.chunks_exact_mut(tok).enumerate() {
                for (l, v) in col.iter_mut().enumerate() {
                    let t = b * tok + l;
                    *v = if t < tokens { x[t * inp + k] } else { 0.0 };
                }
            }
        });
    let y = OutputColumns::new(y, out, tokens);
    (0..out.div_ceil(GROUP)).into_par_iter().for_each(|g| {
        let (o0, rows) = (g * GROUP, GROUP.min(out - g * GROUP));
        // This group's outputs for every token, [GROUP rows][t_pad],
        // accumulated over the chunks.
        let mut acc = scratch.zeroed::<f32>(GROUP * t_pad);
        // Rows past `rows` stay zero, so whole tiles can run.
        let mut w = vec![0f32; GROUP * KB];
        for k0 in (0..inp).step_by(KB) {
            let kb = KB.min(inp - k0);
            for r in 0..rows {
                row(o0 + r, k0, &mut w[r * KB..r * KB + kb]);
            }
            for b in 0..t_blocks {
                let xr = &px[(b * inp + k0) * tok..][..kb * tok];
                for r0 in (0..rows).step_by(r_tile) {
                    tile(
                        lvl,
                        xr,
                        &w[r0 * KB..],
                        kb,
                        &mut acc[r0 * t_pad..],
                        t_pad,
                        b * tok,
                    );
                }
            }
        }
        // SAFETY: group g alone has outputs o0..o0 + rows.
        unsafe { y.put(o0, rows, &acc, t_pad) };
    });
}

/// `acc[r][t0 + l] += Σ_k w[r][k] · x[k][l]` for the tile's rows `r` (row
/// stride `KB` in w, `t_pad` in acc) and its `tok` tokens `l`.
fn tile(lvl: Level, x: &[f32], w: &[f32], kb: usize, acc: &mut [f32], t_pad: usize, t0: usize) {
    let (tok, r_tile) = shape(lvl);
    assert!(x.len() >= kb * tok && w.len() >= (r_tile - 1) * KB + kb && kb <= KB);
    assert!(t0 + tok <= t_pad && acc.len() >= (r_tile - 1) * t_pad + t0 + tok);
    #[cfg(target_arch = "x86_64")]
    {
        if lvl >= Level::Avx512 {
            // SAFETY: the level is capped by the CPU (AVX-512F); sizes
            // asserted above.
            unsafe { avx512::tile(x, w, kb, acc, t_pad, t0) };
            return;
        }
        if lvl == Level::Avx2 {
            // SAFETY: the level is capped by the CPU (AVX2 and FMA); sizes
            // asserted above.
            unsafe { avx2::tile(x, w, kb, acc, t_pad, t0) };
            return;
        }
    }
    for r in 0..r_tile {
        for l in 0..tok {
            let s: f32 = (0..kb).map(|k| w[r * KB + k] * x[k * tok + l]).sum();
            acc[r * t_pad + t0 + l] += s;
        }
    }
}

/// One register tile, `ROWS` weight rows × two vectors of tokens, over a
/// module's intrinsics: `$zero`, `$load`, `$store`, `$splat`, `$fma`, `$add`.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_kernel {
    ($feat:literal, $rows:literal, $lanes:literal,
     $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident, $add:ident) => {
        /// `ROWS` rows × `2 * LANES` tokens (two vectors).
        ///
        /// # Safety
        /// The target features enabled; sizes as [`super::tile`] asserts for
        /// `(2 * LANES, ROWS)`.
        #[target_feature(enable = $feat)]
        pub unsafe fn tile(
            x: &[f32],
            w: &[f32],
            kb: usize,
            acc: &mut [f32],
            t_pad: usize,
            t0: usize,
        ) {
            const TOK: usize = 2 * $lanes;
            let mut s = [[$zero(); 2]; $rows];
            for k in 0..kb {
                // SAFETY (caller): x holds kb columns of TOK, w ROWS rows of KB.
                unsafe {
                    let x0 = $load(x.as_ptr().add(k * TOK));
                    let x1 = $load(x.as_ptr().add(k * TOK + $lanes));
                    for (r, sr) in s.iter_mut().enumerate() {
                        let b = $splat(*w.get_unchecked(r * KB + k));
                        sr[0] = $fma(b, x0, sr[0]);
                        sr[1] = $fma(b, x1, sr[1]);
                    }
                }
            }
            for (r, sr) in s.iter().enumerate() {
                // SAFETY (caller): row r of acc has t0 + TOK <= t_pad values.
                unsafe {
                    let p = acc.as_mut_ptr().add(r * t_pad + t0);
                    $store(p, $add($load(p), sr[0]));
                    $store(p.add($lanes), $add($load(p.add($lanes)), sr[1]));
                }
            }
        }
    };
}

/// 12 rows × 32 tokens: 24 accumulators.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::KB;
    use std::arch::x86_64::*;

    tile_kernel!(
        "avx512f",
        12,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps
    );
}

/// 6 rows × 16 tokens: 12 of the 16 registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::KB;
    use std::arch::x86_64::*;

    tile_kernel!(
        "avx2,fma",
        6,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gen::uniform;

    /// Every level this CPU runs, against f64: token counts around the
    /// blocks (1, 16, 33, 70), row counts around the tiles and the groups
    /// of 48, column counts around the chunks of 256.
    #[test]
    fn matches_f64_at_every_level() {
        for (tokens, inp, out) in [
            (1usize, 5usize, 3usize),
            (16, 256, 48),
            (33, 300, 61),
            (70, 600, 100),
        ] {
            let x = uniform(tokens * inp, 1);
            let w = uniform(out * inp, 2);
            let row = |o: usize, c0: usize, dst: &mut [f32]| {
                let n = dst.len();
                dst.copy_from_slice(&w[o * inp + c0..][..n]);
            };
            for lvl in Level::available() {
                let mut y = vec![f32::NAN; tokens * out];
                matmul(lvl, &x, tokens, inp, out, row, &mut y, &Scratch::default());
                for t in 0..tokens {
                    for o in 0..out {
                        let want: f64 = (0..inp)
                            .map(|k| x[t * inp + k] as f64 * w[o * inp + k] as f64)
                            .sum();
                        let got = y[t * out + o] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{lvl:?} {tokens}x{inp}x{out}: y[{t}][{o}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}
