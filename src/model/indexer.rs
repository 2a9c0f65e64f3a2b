//! DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention): for each
//! new token it scores every token of the sequence so far, and the
//! attention then runs over the `index_topk` best only
//! (`inference/model.py`, class `Indexer`, of DeepSeek-V3.2-Exp):
//!
//! - `q = wq_b(qr)` per indexer head (`qr`: the normed `q_a` output the
//!   attention's queries start from), `k = LayerNorm(wk(x))`, one key per
//!   token shared by all heads;
//! - RoPE on the first `qk_rope_head_dim` elements of both, in the
//!   *half-split* (NeoX) pairing `(i, i + rope/2)`: DeepSeek's later fix
//!   to its reference, which vLLM, SGLang and Transformers follow; the
//!   attention itself keeps the interleaved pairs;
//! - a Hadamard rotation (`H / sqrt(dim)`), then E4M3 codes with one f32
//!   scale per query head and per key (amax / 448, rounded up to a power
//!   of two with `scale_fmt = "ue8m0"`); the keys are kept in the pool;
//! - `score[s] = k_scale[s] · Σ_h w[h] · relu(q_h · k_s)` with
//!   `w[h] = weights_proj(x)[h] · heads^-0.5 · q_scale[h] · dim^-0.5`;
//! - the `topk` highest scores among positions `0..=p` (ties: the earlier
//!   position); a token with at most `topk` positions keeps them all, which
//!   is plain causal attention.
//!
//! DeepSeek's reference rounds the intermediate vectors to bf16 between
//! these steps; here they stay f32 until the E4M3 codes. Products of two
//! E4M3 codes are exact in f32, so only the order of the sums differs from
//! the reference kernel; a score does not depend on the batch or the chunk
//! its token came in, so decoding token by token selects exactly what one
//! prefill selects.

use super::config::IndexerConfig;
use super::config::MAX_INDEX_HEAD_DIM;
use super::level::Level;
use super::linear::Linear;
use super::rope::Rope;
use super::scratch::Scratch;
use crate::format::fp8::{e4m3_to_f32, f32_to_e4m3, pow2_ceil, E4M3_MAX};
use crate::kv::{index_row_bytes, IndexKeys};
use rayon::prelude::*;

/// Floor of a vector's amax before its scale is taken (as DeepSeek's
/// `act_quant`), so an all-zero vector gets a finite scale.
const AMAX_FLOOR: f32 = 1e-4;
/// Keys scored per task when one token's candidates are split across
/// threads.
const KEYS_PER_TASK: usize = 1024;

/// One layer's indexer weights.
pub struct Indexer {
    pub cfg: IndexerConfig,
    /// `[heads * head_dim, q_lora_rank]`.
    pub wq_b: Linear,
    /// `[head_dim, hidden]`.
    pub wk: Linear,
    /// LayerNorm of the key: weight and bias `[head_dim]`.
    pub k_norm_weight: Vec<f32>,
    pub k_norm_bias: Vec<f32>,
    /// `[heads, hidden]`.
    pub weights_proj: Linear,
}

/// The indexer's part of a batch of new tokens.
pub struct IndexerTokens {
    /// Per token and head, the query's E4M3 codes as values `[T, heads, dim]`.
    pub q: Vec<f32>,
    /// Per token and head, the weight of that head's score `[T, heads]`
    /// (`w[h]` above, the query's scale folded in).
    pub w: Vec<f32>,
    /// Per token, the key row the pool keeps `[T, index_row_bytes]`.
    pub keys: Vec<u8>,
}

/// DeepSeek's LayerNorm (eps 1e-6, weight and bias), in place.
fn layer_norm(x: &mut [f32], w: &[f32], b: &[f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + 1e-6).sqrt();
    for ((v, &g), &bb) in x.iter_mut().zip(w).zip(b) {
        *v = ((*v as f64 - mean) * inv) as f32 * g + bb;
    }
}

/// The Walsh-Hadamard transform of `x` (a power-of-two length), scaled by
/// `len^-0.5` so that it is orthonormal.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = (n as f32).powf(-0.5);
    x.iter_mut().for_each(|v| *v *= s);
}

/// E4M3 codes of `x` with one scale (see the module comment); returns it.
pub fn quantize(x: &[f32], codes: &mut [u8], pow2_scales: bool) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(AMAX_FLOOR);
    let ratio = amax * (1.0 / E4M3_MAX);
    let scale = if pow2_scales { pow2_ceil(ratio) } else { ratio };
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = f32_to_e4m3((v / scale).clamp(-E4M3_MAX, E4M3_MAX));
    }
    scale
}

impl Indexer {
    /// Queries, head weights and keys of `total` new tokens: `x [T, hidden]`
    /// their hidden states, `qr [T, q_lora_rank]` the normed `q_a` outputs,
    /// `pos[t]` their positions.
    pub fn prepare(
        &self,
        x: &[f32],
        qr: &[f32],
        pos: &[usize],
        rope: &Rope,
        scratch: &Scratch,
    ) -> IndexerTokens {
        let total = pos.len();
        let (heads, dim) = (self.cfg.heads, self.cfg.head_dim);
        let pow2 = self.cfg.pow2_scales;
        let mut q = vec![0f32; total * heads * dim];
        self.wq_b.matmul_with(qr, total, &mut q, scratch);
        let mut k = vec![0f32; total * dim];
        self.wk.matmul_with(x, total, &mut k, scratch);
        let mut w = vec![0f32; total * heads];
        self.weights_proj.matmul_with(x, total, &mut w, scratch);
        let irow = index_row_bytes(dim);
        let mut keys = vec![0u8; total * irow];
        let head_scale = (heads as f32).powf(-0.5) * (dim as f32).powf(-0.5);
        q.par_chunks_mut(heads * dim)
            .zip(w.par_chunks_mut(heads))
            .zip(pos.par_iter())
            .for_each(|((qt, wt), &p)| {
                let mut codes = [0u8; MAX_INDEX_HEAD_DIM];
                let ch = &mut codes[..dim];
                for (qh, wh) in qt.chunks_exact_mut(dim).zip(wt.iter_mut()) {
                    rope.apply_half_split(qh, p);
                    hadamard(qh);
                    let s = quantize(qh, ch, pow2);
                    for (v, &c) in qh.iter_mut().zip(ch.iter()) {
                        *v = e4m3_to_f32(c);
                    }
                    *wh *= head_scale * s;
                }
            });
        k.par_chunks_mut(dim)
            .zip(keys.par_chunks_mut(irow))
            .zip(pos.par_iter())
            .for_each(|((kt, row), &p)| {
                layer_norm(kt, &self.k_norm_weight, &self.k_norm_bias);
                rope.apply_half_split(kt, p);
                hadamard(kt);
                let (codes, scale) = row.split_at_mut(dim);
                let s = quantize(kt, codes, pow2);
                scale.copy_from_slice(&s.to_le_bytes());
            });
        IndexerTokens { q, w, keys }
    }
}

/// Keys per call of the f32 kernel (independent sums): 8 with AVX-512's 32
/// registers; 4 with AVX2's 16, where 8 keys of two vectors each left no
/// register for the query (measured: the kernel's share of a V3.2 decode
/// step at context 4096 fell from 5.7% to 2.9% with 4).
const KEYS_F32: usize = 8;
#[cfg(target_arch = "x86_64")]
const KEYS_AVX2: usize = 4;
/// Heads per vector group of the f32 kernel (the query is padded to a
/// multiple): two AVX2 vectors or one AVX-512 vector.
const LANES: usize = 16;

/// Scores of `K` keys, before their scales: lanes are query heads
/// and each key's values are broadcast, so keys are used as stored. `kf
/// [K][dim]` holds the keys' code values, `qt [dim][hp]` the query's
/// per head (`hp` a multiple of [`LANES`], zero past the real heads), `wp
/// [hp]` the head weights (zero past them). Plain loops, vectorized by the
/// compiler in the builds of `simd` below.
#[inline(always)]
fn keys_scores_f32<const K: usize>(
    kf: &[f32],
    qt: &[f32],
    wp: &[f32],
    dim: usize,
    hp: usize,
) -> [f32; K] {
    let mut out = [0f32; K];
    for g in (0..hp).step_by(LANES) {
        let mut acc = [[0f32; LANES]; K];
        for d in 0..dim {
            let qv: &[f32; LANES] = qt[d * hp + g..][..LANES].try_into().expect("LANES heads");
            for (k, a) in acc.iter_mut().enumerate() {
                let kv = kf[k * dim + d];
                for l in 0..LANES {
                    a[l] += qv[l] * kv;
                }
            }
        }
        let wv = &wp[g..g + LANES];
        for (o, a) in out.iter_mut().zip(&acc) {
            let mut sum = 0f32;
            for l in 0..LANES {
                sum += a[l].max(0.0) * wv[l];
            }
            *o += sum;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{keys_scores_f32, KEYS_AVX2, KEYS_BF16, KEYS_F32};
    use std::arch::x86_64::*;

    /// Scores of [`KEYS_BF16`] keys on `vdpbf16ps`, before their scales:
    /// lanes are 16 query heads, and each key's bf16 pairs are broadcast,
    /// so keys are used as stored (no transposition). `kp [KEYS_BF16][pairs]`
    /// holds the keys' code values as bf16 pairs (dims 2i, 2i+1 in pair i),
    /// `qt [pairs][hp]` the query's per head (`hp` heads, a multiple of 16,
    /// zero past the real ones), `wp [hp]` the head weights (zero past
    /// them). E4M3 values are bf16 values and their products exact, so only
    /// the order of the f32 sums differs from the FMA version.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 are present; the slices have those sizes.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn keys_scores_bf16(
        kp: &[u32],
        qt: &[u32],
        wp: &[f32],
        pairs: usize,
        hp: usize,
    ) -> [f32; KEYS_BF16] {
        debug_assert!(kp.len() >= KEYS_BF16 * pairs && qt.len() >= pairs * hp && wp.len() >= hp);
        let mut out = [0f32; KEYS_BF16];
        for g in (0..hp).step_by(16) {
            let mut acc = [_mm512_setzero_ps(); KEYS_BF16];
            for i in 0..pairs {
                // SAFETY (caller): qt row i has hp >= g + 16 entries.
                let qv = unsafe {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        qt.as_ptr().add(i * hp + g) as *const _,
                    ))
                };
                for (k, a) in acc.iter_mut().enumerate() {
                    // SAFETY: any bits are a valid bf16 pair vector.
                    let kv = unsafe {
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                            kp[k * pairs + i] as i32,
                        ))
                    };
                    *a = _mm512_dpbf16_ps(*a, qv, kv);
                }
            }
            // SAFETY (caller): wp has hp >= g + 16 entries.
            let wv = unsafe { _mm512_loadu_ps(wp.as_ptr().add(g)) };
            for (o, a) in out.iter_mut().zip(acc) {
                let relu = _mm512_max_ps(a, _mm512_setzero_ps());
                *o += _mm512_reduce_add_ps(_mm512_mul_ps(relu, wv));
            }
        }
        out
    }

    /// [`keys_scores_f32`] compiled for AVX-512F: 16 heads per vector.
    #[target_feature(enable = "avx512f")]
    pub fn keys_scores_avx512(
        kf: &[f32],
        qt: &[f32],
        wp: &[f32],
        dim: usize,
        hp: usize,
    ) -> [f32; KEYS_F32] {
        keys_scores_f32::<KEYS_F32>(kf, qt, wp, dim, hp)
    }

    /// [`keys_scores_f32`] compiled for AVX2 + FMA: 8 heads per vector.
    #[target_feature(enable = "avx2,fma")]
    pub fn keys_scores_avx2(
        kf: &[f32],
        qt: &[f32],
        wp: &[f32],
        dim: usize,
        hp: usize,
    ) -> [f32; KEYS_AVX2] {
        keys_scores_f32::<KEYS_AVX2>(kf, qt, wp, dim, hp)
    }
}

/// One query laid out for the score kernels, built once per token: heads
/// padded to `hp` (a multiple of 16, zero query and weight past the real
/// ones) in the lanes.
struct QueryLanes {
    /// `[dim][hp]` code values (f32 kernels), or `[dim/2][hp]` bf16 pairs
    /// (the `vdpbf16ps` kernel).
    q: Lanes,
    /// Head weights `[hp]`.
    w: Vec<f32>,
    hp: usize,
    dim: usize,
}

enum Lanes {
    F32(Vec<f32>),
    #[cfg(target_arch = "x86_64")]
    Bf16(Vec<u32>),
}

/// Code values are bf16 values: their top 16 bits.
#[cfg(target_arch = "x86_64")]
fn bf16_bits(v: f32) -> u32 {
    v.to_bits() >> 16
}

impl QueryLanes {
    /// `q [heads, dim]` code values and `w [heads]`, for the kernels of `lvl`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn new(q: &[f32], w: &[f32], dim: usize, lvl: Level) -> Self {
        let heads = w.len();
        let hp = heads.next_multiple_of(LANES);
        let mut wp = vec![0f32; hp];
        wp[..heads].copy_from_slice(w);
        #[cfg(target_arch = "x86_64")]
        if lvl == Level::Avx512Bf16 && dim.is_multiple_of(2) {
            let mut qt = vec![0u32; dim / 2 * hp];
            for (h, qh) in q.chunks_exact(dim).enumerate() {
                for (i, p) in qh.chunks_exact(2).enumerate() {
                    qt[i * hp + h] = bf16_bits(p[0]) | (bf16_bits(p[1]) << 16);
                }
            }
            return QueryLanes {
                q: Lanes::Bf16(qt),
                w: wp,
                hp,
                dim,
            };
        }
        let mut qt = vec![0f32; dim * hp];
        for (h, qh) in q.chunks_exact(dim).enumerate() {
            for (d, &v) in qh.iter().enumerate() {
                qt[d * hp + h] = v;
            }
        }
        QueryLanes {
            q: Lanes::F32(qt),
            w: wp,
            hp,
            dim,
        }
    }
}

/// The scores of keys `first..first + out.len()` for one query, into
/// `out`, with the vector code of `lvl` (the level `ql` was built for).
fn score_range(keys: &IndexKeys<'_>, ql: &QueryLanes, first: usize, out: &mut [f32], lvl: Level) {
    let (dim, hp, wp) = (ql.dim, ql.hp, &ql.w[..]);
    let qt = match &ql.q {
        Lanes::F32(qt) => qt,
        #[cfg(target_arch = "x86_64")]
        Lanes::Bf16(qt) => return score_range_bf16(keys, qt, ql, first, out),
    };
    match lvl {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx512Bf16 => {
            key_blocks::<f32, KEYS_F32>(keys, first, out, dim, codes_f32, |kf| {
                // SAFETY: the level never exceeds the CPU's features.
                unsafe { simd::keys_scores_avx512(kf, qt, wp, dim, hp) }
            })
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => key_blocks::<f32, KEYS_AVX2>(keys, first, out, dim, codes_f32, |kf| {
            // SAFETY: as above.
            unsafe { simd::keys_scores_avx2(kf, qt, wp, dim, hp) }
        }),
        _ => key_blocks::<f32, KEYS_F32>(keys, first, out, dim, codes_f32, |kf| {
            keys_scores_f32::<KEYS_F32>(kf, qt, wp, dim, hp)
        }),
    }
}

/// Runs `kernel` over blocks of `K` keys from `first`: each key's codes
/// are converted by `convert` into its `width` elements of the block `[K]
/// [width]` (zero past the last key), and the kernel's scores are scaled
/// into `out`.
fn key_blocks<T: Copy + Default, const K: usize>(
    keys: &IndexKeys<'_>,
    first: usize,
    out: &mut [f32],
    width: usize,
    convert: impl Fn(&[u8], &mut [T]),
    kernel: impl Fn(&[T]) -> [f32; K],
) {
    let mut block = vec![T::default(); K * width];
    for (b, ob) in out.chunks_mut(K).enumerate() {
        let k0 = first + b * K;
        let mut scales = [0f32; K];
        if ob.len() < K {
            block.fill(T::default());
        }
        for (l, sc) in scales.iter_mut().enumerate().take(ob.len()) {
            let (codes, scale) = keys.key(k0 + l);
            *sc = scale;
            convert(codes, &mut block[l * width..(l + 1) * width]);
        }
        for ((o, v), sc) in ob.iter_mut().zip(kernel(&block)).zip(scales) {
            *o = sc * v;
        }
    }
}

/// E4M3 codes as f32 values (vectorized where the CPU allows).
fn codes_f32(codes: &[u8], dst: &mut [f32]) {
    crate::format::fp8::dequantize_tile(codes, 1.0, dst);
}

/// Keys per call of the `vdpbf16ps` kernel: independent sums.
#[cfg(target_arch = "x86_64")]
const KEYS_BF16: usize = 12;

/// [`score_range`] on `vdpbf16ps` (the [`Level::Avx512Bf16`] CPUs): `qt`
/// is `ql`'s bf16 pairs.
#[cfg(target_arch = "x86_64")]
fn score_range_bf16(
    keys: &IndexKeys<'_>,
    qt: &[u32],
    ql: &QueryLanes,
    first: usize,
    out: &mut [f32],
) {
    let (dim, hp) = (ql.dim, ql.hp);
    let pairs = dim / 2;
    let convert = |codes: &[u8], dst: &mut [u32]| {
        if !crate::format::fp8::e4m3_to_bf16_pairs(codes, dim, &[0], dst) {
            for (d, c) in dst.iter_mut().zip(codes.chunks_exact(2)) {
                *d = bf16_bits(e4m3_to_f32(c[0])) | (bf16_bits(e4m3_to_f32(c[1])) << 16);
            }
        }
    };
    key_blocks::<u32, KEYS_BF16>(keys, first, out, pairs, convert, |kp| {
        // SAFETY: the bf16 level implies AVX-512F and AVX512-BF16 (Level
        // caps it by the CPU); kp, qt and wp have the sizes the kernel reads.
        unsafe { simd::keys_scores_bf16(kp, qt, &ql.w, pairs, hp) }
    });
}

/// Fills `out` (`topk` entries) with the positions a query at position `p`
/// attends to, ascending, `-1` past the last: all of `0..=p` when that is
/// at most `topk`, else the `topk` best scores (`q`, `w` as in
/// [`IndexerTokens`]), scored with the vector code of `lvl`. The keys
/// `0..=p` must be in `keys`.
pub fn select(keys: &IndexKeys<'_>, q: &[f32], w: &[f32], p: usize, out: &mut [i32], lvl: Level) {
    let topk = out.len();
    let n = p + 1;
    debug_assert!(n <= keys.len);
    if n <= topk {
        for (i, o) in out.iter_mut().enumerate() {
            *o = if i < n { i as i32 } else { -1 };
        }
        return;
    }
    let ql = QueryLanes::new(q, w, keys.dim, lvl);
    let mut scores = vec![0f32; n];
    if n > KEYS_PER_TASK {
        scores
            .par_chunks_mut(KEYS_PER_TASK)
            .enumerate()
            .for_each(|(c, s)| score_range(keys, &ql, c * KEYS_PER_TASK, s, lvl));
    } else {
        score_range(keys, &ql, 0, &mut scores, lvl);
    }
    let mut order: Vec<u32> = (0..n as u32).collect();
    // Higher score first; equal scores: the earlier position.
    order.select_nth_unstable_by(topk - 1, |&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    let mut best = order[..topk].to_vec();
    best.sort_unstable();
    for (o, &b) in out.iter_mut().zip(&best) {
        *o = b as i32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_matches_the_matrix_and_is_orthonormal() {
        for n in [1usize, 2, 8, 64, 128] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
            let mut y = x.clone();
            hadamard(&mut y);
            for (r, &got) in y.iter().enumerate() {
                // H[r][c] = (-1)^popcount(r & c) / sqrt(n).
                let want: f64 = x
                    .iter()
                    .enumerate()
                    .map(|(c, &v)| {
                        let sign = if (r & c).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * v as f64
                    })
                    .sum::<f64>()
                    / (n as f64).sqrt();
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "n {n} row {r}: {got} vs {want}"
                );
            }
            let norm = |v: &[f32]| v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>();
            assert!((norm(&x) - norm(&y)).abs() < 1e-3 * norm(&x).max(1.0));
        }
    }

    /// At V3.2's width (64 heads of 128: the vector E4M3 → bf16 conversion
    /// and full 16-head groups) every level's scores of 45 keys (blocks of
    /// 16 and 12 with tails) agree with a float64 sum of the same codes.
    #[test]
    fn scores_agree_on_every_level() {
        use crate::engine::{Engine, EngineOptions};
        use crate::format::KvFormat;
        use crate::kv::{KvPool, PoolOptions};
        let (heads, dim, n) = (64usize, 128usize, 45usize);
        let engine = std::sync::Arc::new(Engine::new(&EngineOptions::default()).unwrap());
        let pool = KvPool::new(
            engine,
            PoolOptions {
                format: KvFormat::F32,
                d_qk: 8,
                num_layers: 1,
                block_size: 4,
                num_blocks: 16,
                index_dim: dim,
            },
        )
        .unwrap();
        pool.create_seq(1).unwrap();
        let vals = crate::model::gen::uniform(n * dim + heads * dim + heads, 5);
        let mut rows = vec![0u8; n * index_row_bytes(dim)];
        for (t, row) in rows.chunks_exact_mut(index_row_bytes(dim)).enumerate() {
            let (codes, scale) = row.split_at_mut(dim);
            let s = quantize(&vals[t * dim..(t + 1) * dim], codes, t % 2 == 0);
            scale.copy_from_slice(&s.to_le_bytes());
        }
        let kv = vec![0f32; n * 8];
        pool.append_batch_indexed(
            0,
            &[(1, n, bytemuck::cast_slice(&kv))],
            crate::format::Dtype::F32,
            Some(&[&rows]),
        )
        .unwrap();
        let mut q = vec![0f32; heads * dim];
        let mut codes = vec![0u8; dim];
        for (h, qh) in q.chunks_exact_mut(dim).enumerate() {
            let src = &vals[n * dim + h * dim..][..dim];
            quantize(src, &mut codes, false);
            for (v, &c) in qh.iter_mut().zip(&codes) {
                *v = e4m3_to_f32(c);
            }
        }
        let w = &vals[n * dim + heads * dim..];
        pool.with_index_keys(1, 0, |keys| {
            let want: Vec<f64> = (0..n)
                .map(|t| {
                    let (c, s) = keys.key(t);
                    let dots = q.chunks_exact(dim).map(|qh| {
                        qh.iter()
                            .zip(c)
                            .map(|(&a, &b)| a as f64 * e4m3_to_f32(b) as f64)
                            .sum::<f64>()
                    });
                    s as f64
                        * dots
                            .zip(w)
                            .map(|(d, &wh)| wh as f64 * d.max(0.0))
                            .sum::<f64>()
                })
                .collect();
            let top = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for lvl in [
                Level::Portable,
                Level::Avx2,
                Level::Avx512,
                Level::Avx512Bf16,
            ] {
                if lvl > Level::best() {
                    continue;
                }
                let mut got = vec![0f32; n];
                score_range(&keys, &QueryLanes::new(&q, w, dim, lvl), 0, &mut got, lvl);
                for (t, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - e).abs() <= 1e-5 * top,
                        "{lvl:?} key {t}: {g} vs {e}"
                    );
                }
            }
        })
        .unwrap();
    }

    #[test]
    fn quantize_scales_and_rounds() {
        let x = [3.0f32, -1.5, 0.25, 0.0];
        let mut c = [0u8; 4];
        // Plain: amax / 448, so the largest value lands on 448.
        let s = quantize(&x, &mut c, false);
        assert_eq!(s, 3.0 * (1.0 / 448.0));
        assert_eq!(e4m3_to_f32(c[0]), 448.0);
        // ue8m0: the next power of two up: 3/448 -> 2^-7.
        let s = quantize(&x, &mut c, true);
        assert_eq!(s, 2f32.powi(-7));
        assert_eq!(e4m3_to_f32(c[0]), 384.0);
        assert_eq!(e4m3_to_f32(c[1]), -192.0);
        // All zero: the amax floor gives a finite scale and zero codes.
        let s = quantize(&[0.0; 4], &mut c, false);
        assert!(s > 0.0 && c.iter().all(|&b| e4m3_to_f32(b) == 0.0));
    }
}
