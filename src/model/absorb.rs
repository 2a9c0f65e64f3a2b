//! The absorbed up-projections. `kv_b_proj [H·(nope + v), kv_lora]` read
//! per head is `W_UK [H, nope, kv_lora]` (its first `nope` rows) and
//! `W_UV [H, v, kv_lora]` (the next `v`), so both stay inside `kv_b_proj`
//! in its stored precision: for DeepSeek-V3 that is 17 MB of FP8 per layer
//! instead of 67 MB of f32, and a batch-1 decode step streams it like the
//! other projections.
//!
//! Few tokens (decode) convert the rows in registers for each token. More
//! tokens (a batched decode step, prefill):
//! - W_UV runs on the `vdpbf16ps` GEMM in its stored precision where the
//!   CPU has it (`o = lat · W_UVᵀ` is the GEMM's `X · Wᵀ`);
//! - otherwise, and always for W_UK (`lat = q_nope · W_UK`, a product the
//!   GEMM does not take), heads are converted to f32 once per call and each
//!   runs as a register-blocked GEMM over the tokens ([`matmul_rows`]), so
//!   each row of W serves 8 tokens: per head in its task's L2 for one block
//!   of tokens, in groups of heads for more.

use super::f32_gemm::matmul_rows;
use super::gemm;
use super::linear::Linear;
use super::scratch::{Buf, Scratch};
use rayon::prelude::*;

/// Tokens above which rows are converted once per call rather than per token.
const FEW_TOKENS: usize = 4;
/// Heads converted to f32 at a time for many tokens (4 MB for V3's W_UK).
const HEAD_GROUP: usize = 16;
/// Tokens per parallel task for many tokens: each head's f32 rows (256 KB
/// for V3) stay in L2 while they serve the task's tokens. Up to this many
/// tokens the tasks are heads instead; fewer than threads × this are split
/// evenly (in multiples of 4), so every thread has work.
const TOKEN_BLOCK: usize = 64;

/// Runs `head_out(head, y)` for every head in parallel, each writing its
/// `y [tokens, n]`, then puts the results into the first `n` values of
/// each row of `out [tokens, h, out_stride]`.
fn per_head(
    (h, tokens, n): (usize, usize, usize),
    out: &mut [f32],
    out_stride: usize,
    sc: &Scratch,
    head_out: impl Fn(usize, &mut [f32]) + Sync,
) {
    let mut by_head = sc.overwritten::<f32>(h * tokens * n);
    by_head
        .par_chunks_mut(tokens * n)
        .enumerate()
        .for_each(|(head, y)| head_out(head, y));
    out[..tokens * h * out_stride]
        .par_chunks_mut(h * out_stride)
        .enumerate()
        .for_each(|(t, ot)| {
            for (head, dst) in ot.chunks_exact_mut(out_stride).enumerate() {
                dst[..n].copy_from_slice(&by_head[(head * tokens + t) * n..][..n]);
            }
        });
}

pub struct Absorbed {
    kv_b: Linear,
    heads: usize,
    nope: usize,
    v: usize,
}

impl Absorbed {
    /// `kv_b` is `kv_b_proj` as loaded: `[heads·(nope + v), kv_lora]`.
    pub fn new(kv_b: Linear, heads: usize, nope: usize, v: usize) -> Self {
        debug_assert_eq!(kv_b.out, heads * (nope + v));
        Absorbed {
            kv_b,
            heads,
            nope,
            v,
        }
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> usize {
        self.kv_b.bytes()
    }

    /// `kv_b_proj` as loaded.
    pub fn kv_b(&self) -> &Linear {
        &self.kv_b
    }

    fn lora(&self) -> usize {
        self.kv_b.inp
    }

    /// kv_b row of `W_UK[head, d]`.
    fn uk_row(&self, head: usize, d: usize) -> usize {
        head * (self.nope + self.v) + d
    }

    /// kv_b row of `W_UV[head, d]`.
    fn uv_row(&self, head: usize, d: usize) -> usize {
        head * (self.nope + self.v) + self.nope + d
    }

    /// Rows `part` (`(offset, count)` within each head's `nope + v` rows:
    /// W_UK is `(0, nope)`, W_UV `(nope, v)`) of heads `first..first +
    /// count` as f32: `[heads, part rows, lora]`, or with `transposed`
    /// `[heads, lora, part rows]`.
    fn heads_f32<'s>(
        &self,
        first: usize,
        count: usize,
        part: (usize, usize),
        transposed: bool,
        sc: &'s Scratch,
    ) -> Buf<'s, f32> {
        // Every element is written below.
        let mut w = sc.overwritten::<f32>(count * part.1 * self.lora());
        w.par_chunks_mut(part.1 * self.lora())
            .enumerate()
            .for_each(|(i, dst)| self.head_f32(first + i, part, transposed, dst));
        w
    }

    /// One head's rows `part` as f32 into `dst`: `[part rows, lora]`, or
    /// with `transposed` `[lora, part rows]`.
    fn head_f32(&self, head: usize, part: (usize, usize), transposed: bool, dst: &mut [f32]) {
        let ((offset, rows), lora) = (part, self.lora());
        let row_of = |d: usize| head * (self.nope + self.v) + offset + d;
        if !transposed {
            for (d, r) in dst.chunks_exact_mut(lora).enumerate() {
                self.kv_b.row(row_of(d), r);
            }
            return;
        }
        let mut r = vec![0f32; lora];
        for d in 0..rows {
            self.kv_b.row(row_of(d), &mut r);
            for (c, &v) in r.iter().enumerate() {
                dst[c * rows + d] = v;
            }
        }
    }

    /// Many tokens: `out[t, h][..n] = x[t, h][..k] · W[h]` for every token
    /// and head, W[h] being head h's rows `part` as f32 `[k][n]`
    /// (`transposed`: the rows are W's columns, as for W_UV). `x` is
    /// `[tokens, H, x_stride]`, `out` `[tokens, H, out_stride]`.
    #[allow(clippy::too_many_arguments)]
    fn heads_matmul(
        &self,
        part: (usize, usize),
        transposed: bool,
        (k, n): (usize, usize),
        x: &[f32],
        x_stride: usize,
        out: &mut [f32],
        out_stride: usize,
        tokens: usize,
        sc: &Scratch,
    ) {
        let h = self.heads;
        if tokens <= TOKEN_BLOCK {
            // One block of tokens (a batched decode step): each task
            // converts one head's rows, which stay in its L2, and runs
            // every token through them; the outputs go into place after.
            return per_head((h, tokens, n), out, out_stride, sc, |head, y| {
                let mut w = sc.overwritten::<f32>(k * n);
                self.head_f32(head, part, transposed, &mut w);
                let xh = &x[head * x_stride..];
                matmul_rows(self.kv_b.level(), xh, h * x_stride, &w, k, n, y, n, tokens);
            });
        }
        let block = TOKEN_BLOCK.min(
            tokens
                .div_ceil(rayon::current_num_threads())
                .next_multiple_of(4),
        );
        for first in (0..h).step_by(HEAD_GROUP) {
            let count = HEAD_GROUP.min(h - first);
            let w = self.heads_f32(first, count, part, transposed, sc);
            out[..tokens * h * out_stride]
                .par_chunks_mut(block * h * out_stride)
                .enumerate()
                .for_each(|(b, chunk)| {
                    let (t0, rows) = (b * block, chunk.len() / (h * out_stride));
                    for head in first..first + count {
                        matmul_rows(
                            self.kv_b.level(),
                            &x[(t0 * h + head) * x_stride..],
                            h * x_stride,
                            &w[(head - first) * k * n..][..k * n],
                            k,
                            n,
                            &mut chunk[head * out_stride..],
                            h * out_stride,
                            rows,
                        );
                    }
                });
        }
    }

    /// [`Self::values`] for many tokens on the `vdpbf16ps` GEMM, each head's
    /// W_UV rows read in their stored precision (`o[t, h] = lat[t, h] ·
    /// W_UV[h]ᵀ` is the GEMM's `X · Wᵀ`). The f32 path instead converts and
    /// transposes all of W_UV on every call, which costs as much as a
    /// batched decode step's products. False (nothing written) where the
    /// GEMM does not run these rows.
    fn values_gemm(&self, lat: &[f32], tokens: usize, o: &mut [f32], sc: &Scratch) -> bool {
        let (h, v, lora) = (self.heads, self.v, self.lora());
        let rows: Option<Vec<_>> = (0..h)
            .map(|head| self.kv_b.gemm_rows(self.uv_row(head, 0), v))
            .collect();
        let Some(rows) = rows else {
            return false;
        };
        let a = self.kv_b.activations();
        per_head((h, tokens, v), o, v, sc, |head, y| {
            let mut x = sc.overwritten::<f32>(tokens * lora);
            for (t, xt) in x.chunks_exact_mut(lora).enumerate() {
                xt.copy_from_slice(&lat[(t * h + head) * lora..][..lora]);
            }
            gemm::matmul(rows[head], v, lora, &x, tokens, y, a, sc);
        });
        true
    }

    /// `lat[t, h] = q_nope[t, h] · W_UK[h]`: `q` is `[tokens, H, q_stride]`
    /// with `q_nope` first in each head's row; writes the first `kv_lora`
    /// values of each `out_stride` row of `out [tokens, H, out_stride]`.
    /// Many tokens take their temporaries from `sc`.
    pub fn latent_queries(
        &self,
        q: &[f32],
        q_stride: usize,
        tokens: usize,
        out: &mut [f32],
        out_stride: usize,
        sc: &Scratch,
    ) {
        let (h, nope, lora) = (self.heads, self.nope, self.lora());
        if tokens > FEW_TOKENS {
            let shape = (nope, lora);
            return self.heads_matmul(
                (0, nope),
                false,
                shape,
                q,
                q_stride,
                out,
                out_stride,
                tokens,
                sc,
            );
        }
        out[..tokens * h * out_stride]
            .par_chunks_mut(out_stride)
            .enumerate()
            .for_each(|(th, dst)| {
                let (t, head) = (th / h, th % h);
                let qn = &q[(t * h + head) * q_stride..][..nope];
                let lat = &mut dst[..lora];
                lat.fill(0.0);
                for d in (0..nope).step_by(4) {
                    let rows = [0, 1, 2, 3].map(|k| self.uk_row(head, (d + k).min(nope - 1)));
                    let a = [0, 1, 2, 3].map(|k| if d + k < nope { qn[d + k] } else { 0.0 });
                    self.kv_b.axpy4(rows, a, lat);
                }
            });
    }

    /// `o[t, h] = W_UV[h] · lat[t, h]`: `lat` is `[tokens, H, kv_lora]`,
    /// `o` is `[tokens, H, v]`. Many tokens take their temporaries from `sc`.
    pub fn values(&self, lat: &[f32], tokens: usize, o: &mut [f32], sc: &Scratch) {
        let (h, v, lora) = (self.heads, self.v, self.lora());
        if tokens > FEW_TOKENS && self.values_gemm(lat, tokens, o, sc) {
            return;
        }
        if tokens > FEW_TOKENS {
            let shape = (lora, v);
            return self.heads_matmul((self.nope, v), true, shape, lat, lora, o, v, tokens, sc);
        }
        o[..tokens * h * v]
            .par_chunks_mut(v)
            .enumerate()
            .for_each(|(th, dst)| {
                let (t, head) = (th / h, th % h);
                let x = &lat[(t * h + head) * lora..][..lora];
                let split = self.kv_b.prepare(x);
                for d in (0..v).step_by(4) {
                    let rows = [0, 1, 2, 3].map(|k| self.uv_row(head, (d + k).min(v - 1)));
                    let r = self.kv_b.dot4(rows, x, split.as_ref());
                    for (k, &val) in r.iter().enumerate().take(v - d) {
                        dst[d + k] = val;
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::level::Level;
    use crate::model::linear::testing::{every_dtype, values};

    /// Both directions, for few tokens (stored rows) and many (heads
    /// converted in groups, here 20 heads: a full group and a partial one;
    /// tokens in tasks of 64: a full task and a partial one),
    /// with head dims that are not multiples of four, against f64 sums over
    /// `kv_b.row()`.
    #[test]
    fn latent_queries_and_values_match_f64() {
        // DeepSeek's head dims (128) put every head's W_UV rows on an FP8
        // scale block, so FP8 too takes the GEMM for many tokens.
        let shapes = [(20usize, 6usize, 5usize, 130usize), (3, 128, 128, 256)];
        for ((heads, nope, v, lora), kv_b) in shapes.into_iter().flat_map(|(h, n, v, l)| {
            let weights = every_dtype(h * (n + v), l, 3);
            Level::available()
                .into_iter()
                .flat_map(move |lvl| weights.clone().into_iter().map(move |w| w.with_level(lvl)))
                .map(move |w| ((h, n, v, l), w))
        }) {
            let name = format!("{:?} {:?} {heads}x{nope}+{v}", kv_b.dtype(), kv_b.level());
            let gemm = gemm::available()
                && kv_b.level() == Level::Avx512Bf16
                && match kv_b.dtype() {
                    crate::format::Dtype::Bf16 => true,
                    crate::format::Dtype::Fp8E4m3 => nope % 128 == 0,
                    _ => false,
                };
            let rows: Vec<Vec<f32>> = (0..kv_b.out)
                .map(|o| {
                    let mut r = vec![0f32; lora];
                    kv_b.row(o, &mut r);
                    r
                })
                .collect();
            let ab = Absorbed::new(kv_b, heads, nope, v);
            // 70 tokens: a full task of 64 and a partial one.
            for tokens in [1usize, 3, 7, 70] {
                // q rows of nope + 3, out rows of lora + 2.
                let (qs, os) = (nope + 3, lora + 2);
                let q = values(tokens * heads * qs, tokens as u64);
                let mut out = vec![f32::NAN; tokens * heads * os];
                ab.latent_queries(&q, qs, tokens, &mut out, os, &Scratch::default());
                let lat = values(tokens * heads * lora, 100 + tokens as u64);
                let mut o = vec![f32::NAN; tokens * heads * v];
                ab.values(&lat, tokens, &mut o, &Scratch::default());
                if tokens > FEW_TOKENS {
                    let mut o2 = vec![f32::NAN; tokens * heads * v];
                    let ran = ab.values_gemm(&lat, tokens, &mut o2, &Scratch::default());
                    assert_eq!(ran, gemm, "{name}: W_UV on the GEMM");
                }
                for t in 0..tokens {
                    for h in 0..heads {
                        let th = t * heads + h;
                        for c in 0..lora {
                            let want: f64 = (0..nope)
                                .map(|d| q[th * qs + d] as f64 * rows[h * (nope + v) + d][c] as f64)
                                .sum();
                            let got = out[th * os + c] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{name} t{tokens} lat[{t},{h},{c}] {got} vs {want}"
                            );
                        }
                        assert!(out[th * os + lora].is_nan(), "wrote past kv_lora");
                        for d in 0..v {
                            let want: f64 = (0..lora)
                                .map(|c| {
                                    rows[h * (nope + v) + nope + d][c] as f64
                                        * lat[th * lora + c] as f64
                                })
                                .sum();
                            let got = o[th * v + d] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{name} t{tokens} o[{t},{h},{d}] {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
