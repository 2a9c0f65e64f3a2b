//! The AMX attention kernel: per tile of up to 128 keys both GEMMs run on
//! AMX tiles, and only the softmax and the packing of operands on AVX-512.
//!
//! - `Sᵀ = K · Qᵀ`: the keys' bf16 rows are the A tiles as the cache holds
//!   them (read in place, or converted once per tile), the queries are
//!   packed once per call as the B operand (`[d/2][rows]` pairs), and the C
//!   tiles land as `st [key][row]`, the layout of the vector softmax (rows
//!   in lanes). Nothing is transposed per key tile.
//! - online softmax in f32, shared with the AVX-512 kernels;
//! - `O += P · V`: P rounded to bf16 (as FlashMLA does; only with a bf16
//!   output) and transposed to row-major pairs (the A operand, a 16 x 16
//!   transpose per block), V's rows interleaved in pairs (the B operand),
//!   O accumulated in C tiles over the tile's keys.
//!
//! Generic over [`Tiles`], so the tests run the whole kernel on the
//! software tile model.

use super::x86::V512;
use super::{fit, fit_lines, fit_u32_lines, q_pairs_t, softmax_tile, transpose16};
use crate::backend::cpu::amx::{grid, Tiled, Tiles};
use crate::backend::cpu::kernel::{finalize, AttnTask, Scratch};
use crate::format::KvFormat;
use std::arch::x86_64::*;

/// Keys per tile: 128 keys give P·V four K chunks per load and store of an
/// O tile (64 would give two).
pub const KT: usize = 128;
/// Keys per A tile of `Sᵀ`.
const SUB: usize = 16;

/// Whether the kernel computes `task` as exactly as the AVX512-BF16 one:
/// bf16 queries, a cache whose values are bf16 (BF16, or FP8 with
/// power-of-two scales), a bf16 output (P may be rounded), `d_qk % 32 == 0`
/// (whole A tiles) and `d_v % 16 == 0` (whole C tiles).
pub fn applies(task: &AttnTask<'_>) -> bool {
    task.q_bf16.is_some()
        && task.p_bf16
        && task.d_qk.is_multiple_of(32)
        && task.d_v.is_multiple_of(16)
        && task.d_v <= task.d_qk
        && matches!(
            task.kv_format(),
            KvFormat::Bf16 | KvFormat::Fp8V32 | KvFormat::Fp8Model1
        )
}

/// The kernel body (see the module comment).
///
/// # Safety
/// AVX-512F, BW and BF16 are enabled; `tiles` are configured (all eight,
/// 16 x 64 bytes) on this thread; [`applies`] holds for `task`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn attend<T: Tiles>(
    tiles: &mut T,
    task: &AttnTask<'_>,
    scratch: &mut Scratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    debug_assert!(applies(task));
    let (d, dv) = (task.d_qk, task.d_v);
    let d2 = d / 2;
    // Whole A-tile steps (16 pairs) of leading query columns that are
    // zero: left out of the scores (at least one step stays).
    let k0 = (task.q_skip / 32).min((d2 / 16).saturating_sub(1));
    let rows = task.n_q * task.h_q;
    let rp = rows.div_ceil(16) * 16;

    let pairs = fit_u32_lines(&mut scratch.pairs, d2 * rp + KT * d2);
    let (qb, kb) = pairs.split_at_mut(d2 * rp);
    // SAFETY: AVX-512F enabled; the bf16 queries hold rows x d, qb d2 x rp.
    unsafe { q_pairs_t(task.q_bf16.unwrap_or_default(), rows, d, rp, qb) };
    let pv_buf = fit_u32_lines(&mut scratch.pv_pairs, KT / 2 * dv + rp * KT / 2);
    let (vp, pa) = pv_buf.split_at_mut(KT / 2 * dv);
    let sc = fit_lines(&mut scratch.scores, KT * rp + rp * dv);
    let (st, acc) = sc.split_at_mut(KT * rp);
    acc.fill(0.0);
    let row = fit(&mut scratch.k_tile, d);
    let row_max = fit(&mut scratch.row_max, rows);
    let row_sum = fit(&mut scratch.row_sum, rows);
    row_max.fill(f32::NEG_INFINITY);
    row_sum.fill(0.0);

    let mut t0 = task.start;
    while t0 < task.end {
        let n = KT.min(task.end - t0);
        let nsub = n.div_ceil(SUB);
        // Each 16-key A tile: in place when its rows are consecutive in one
        // block of a BF16 cache, else converted into `kb` (zero rows past n).
        let mut in_place: [Option<&[u32]>; KT / SUB] = [None; KT / SUB];
        for (s, place) in in_place.iter_mut().enumerate().take(nsub) {
            let (j0, m) = (t0 + s * SUB, SUB.min(n - s * SUB));
            if m == SUB {
                *place = task.bf16_tile(j0, SUB);
                if place.is_some() {
                    continue;
                }
            }
            let dst = &mut kb[s * SUB * d2..][..SUB * d2];
            for (j, kr) in dst.chunks_exact_mut(d2).enumerate() {
                if j >= m {
                    kr.fill(0);
                } else if !task.gather_pairs(j0 + j, kr) {
                    // Exact: the cache's values are bf16 (`applies`).
                    task.gather(j0 + j, row);
                    for (x, p) in kr.iter_mut().zip(row.chunks_exact(2)) {
                        *x = (p[0].to_bits() >> 16) | (p[1].to_bits() & 0xffff_0000);
                    }
                }
            }
        }
        let kb: &[u32] = kb;
        let sub: [&[u32]; KT / SUB] =
            std::array::from_fn(|s| in_place[s].unwrap_or(&kb[s * SUB * d2..][..SUB * d2]));
        let sub = &sub[..nsub];

        // The next tile's keys are fetched into the cache meanwhile (32
        // per pair of A tiles), as in the AVX-512 kernels.
        let fetch = |s0: usize| task.prefetch_keys(t0 + n + s0 * SUB..t0 + n + (s0 + 2) * SUB);
        // SAFETY: tiles configured (caller); each `sub` tile holds 16 rows
        // of d2 pairs, qb d2 x rp, st KT x rp >= nsub * 16 x rp.
        unsafe { scores(tiles, sub, qb, rp, (k0, d2), st, fetch) };
        // SAFETY: AVX-512F enabled; st holds n * rp, rp % 16 == 0.
        unsafe { scale(&mut st[..n * rp], task.scale) };
        // SAFETY: AVX-512F enabled; sizes as softmax_tile requires (acc
        // holds rp >= rows rows of dv).
        unsafe { softmax_tile::<V512>(task, st, rp, t0, n, rows, row_max, row_sum, acc, dv) };
        let np16 = n.div_ceil(2 * SUB) * SUB;
        // SAFETY: AVX-512F, BW and BF16 enabled; pa holds rp * np16 <= rp * KT/2,
        // vp np16 * dv <= KT/2 * dv; st holds n * rp.
        unsafe {
            p_rows(st, rp, n, np16, pa);
            v_pairs(sub, d2, n, np16, dv, vp);
            pv(tiles, pa, rp, np16, vp, dv, acc);
        }
        t0 += n;
    }
    o[..rows * dv].copy_from_slice(&acc[..rows * dv]);
    finalize(o, lse, row_max, row_sum, dv);
}

/// `st [16 s + j][r] = Σ_d sub[s][j][d] · Q[r][d]` for every key tile `s`
/// and all `rp` rows, unscaled, `d` from step `k0` (16 pairs a step; the
/// queries are zero before it): 2 key tiles x 2 row blocks per [`mac_dyn`].
/// `fetch(s0)` runs before key tiles `s0` and `s0 + 1` (to prefetch).
///
/// # Safety
/// Tiles configured; every `sub[s]` holds 16 x `d2` u32 with `d2 % 16 ==
/// 0`, `qb` `d2 * rp`, `st` `sub.len() * 16 * rp`, `rp % 16 == 0`.
#[inline(always)]
unsafe fn scores<T: Tiles>(
    t: &mut T,
    sub: &[&[u32]],
    qb: &[u32],
    rp: usize,
    (k0, d2): (usize, usize),
    st: &mut [f32],
    fetch: impl Fn(usize),
) {
    assert!(d2.is_multiple_of(16) && rp.is_multiple_of(16) && qb.len() >= d2 * rp);
    assert!(k0 * 16 <= d2);
    assert!(st.len() >= sub.len() * SUB * rp && sub.iter().all(|s| s.len() >= SUB * d2));
    let stp = st.as_mut_ptr();
    let a = Tiled {
        at: |s: usize| sub[s][k0 * 16..].as_ptr() as *const u8,
        stride: d2 * 4,
        step: 64,
    };
    let b = Tiled {
        at: |r: usize| qb[k0 * 16 * rp + r * 16..].as_ptr() as *const u8,
        stride: rp * 4,
        step: 16 * rp * 4,
    };
    let c = |s: usize, r: usize| stp.wrapping_add(s * SUB * rp + r * 16) as *mut u8;
    // SAFETY: A tile (s, k): rows of sub[s], bytes 64(k0 + k)..+ 64 of
    // each (k0 + k < d2 / 16); B tile (r, k): qb rows 16(k0 + k)..+ 16,
    // columns of block r; C tile (s, r): st rows of key tile s, columns of
    // block r. All inside the asserted sizes.
    unsafe {
        grid(
            t,
            (sub.len(), rp / 16),
            d2 / 16 - k0,
            a,
            b,
            c,
            rp * 4,
            false,
            fetch,
        )
    };
}

/// `x *= s` (AMX sums unscaled products; the other kernels fold the scale
/// into their last step too).
///
/// # Safety
/// AVX-512F enabled; `x.len() % 16 == 0`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scale(x: &mut [f32], s: f32) {
    // SAFETY: AVX-512F enabled (caller); each chunk holds 16 values.
    unsafe {
        let sv = _mm512_set1_ps(s);
        for c in x.chunks_exact_mut(16) {
            _mm512_storeu_ps(
                c.as_mut_ptr(),
                _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), sv),
            );
        }
    }
}

/// P (`st [n][rp]`, f32) as the A operand of P·V: `pa [r][jp]` = the pair
/// (P[2jp][r], P[2jp + 1][r]) rounded to bf16 (nearest even), zero for
/// keys past `n` up to `np16` pairs.
///
/// # Safety
/// AVX-512F, BW and BF16 enabled; `st` holds `n * rp`, `pa` `rp * np16`;
/// `rp` and `np16` multiples of 16, `n <= 2 * np16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn p_rows(st: &[f32], rp: usize, n: usize, np16: usize, pa: &mut [u32]) {
    assert!(st.len() >= n * rp && pa.len() >= rp * np16 && n <= 2 * np16);
    assert!(rp.is_multiple_of(16) && np16.is_multiple_of(16));
    // Interleaves the two halves of a 32 x bf16 vector: lane r of the
    // result holds (low half's r, high half's r).
    let mix: [i16; 32] = std::array::from_fn(|i| (i / 2 + 16 * (i % 2)) as i16);
    // SAFETY: AVX-512F, BW and BF16 enabled (caller); every load reads 16
    // f32 of a key row < n inside st, every store writes 16 u32 of a row
    // < rp inside pa (asserted above).
    unsafe {
        let mix = _mm512_loadu_si512(mix.as_ptr() as *const __m512i);
        let key = |j: usize, rb: usize| {
            if j < n {
                _mm512_loadu_ps(st.as_ptr().add(j * rp + rb))
            } else {
                _mm512_setzero_ps()
            }
        };
        for rb in (0..rp).step_by(16) {
            for jc in (0..np16).step_by(16) {
                let mut v = [_mm512_setzero_si512(); 16];
                for (x, vx) in v.iter_mut().enumerate() {
                    let jp = jc + x;
                    if 2 * jp < n {
                        let pair = _mm512_cvtne2ps_pbh(key(2 * jp + 1, rb), key(2 * jp, rb));
                        *vx = _mm512_permutexvar_epi16(
                            mix,
                            std::mem::transmute::<__m512bh, __m512i>(pair),
                        );
                    }
                }
                transpose16(&mut v);
                for (r, vr) in v.iter().enumerate() {
                    _mm512_storeu_si512(
                        pa.as_mut_ptr().add((rb + r) * np16 + jc) as *mut __m512i,
                        *vr,
                    );
                }
            }
        }
    }
}

/// V as the B operand of P·V: `vp [jp][c]` = (V[2jp][c], V[2jp + 1][c])
/// for the first `dv` columns of the keys' bf16 rows (`sub[j / 16]` row
/// `j % 16`), zero past `n` up to `np16` pairs.
///
/// # Safety
/// AVX-512F and BW enabled; each `sub[s]` holds 16 rows of `d2` u32,
/// `n <= 16 * sub.len()`, `dv % 16 == 0`, `dv <= 2 * d2`, `vp` holds
/// `np16 * dv`, `n <= 2 * np16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn v_pairs(sub: &[&[u32]], d2: usize, n: usize, np16: usize, dv: usize, vp: &mut [u32]) {
    assert!(n <= SUB * sub.len() && dv.is_multiple_of(16) && dv <= 2 * d2);
    assert!(vp.len() >= np16 * dv && n <= 2 * np16 && sub.iter().all(|s| s.len() >= SUB * d2));
    let key = |j: usize| -> *const u16 { sub[j / SUB][(j % SUB) * d2..].as_ptr() as *const u16 };
    let lo: [i16; 32] = std::array::from_fn(|i| (i / 2 + 32 * (i % 2)) as i16);
    let hi: [i16; 32] = std::array::from_fn(|i| (16 + i / 2 + 32 * (i % 2)) as i16);
    // SAFETY: AVX-512F and BW enabled (caller); masked loads read columns
    // c..c + w < dv <= 2 * d2 of a key row < n; stores write inside row jp
    // of vp (asserted sizes).
    unsafe {
        let (lo, hi) = (
            _mm512_loadu_si512(lo.as_ptr() as *const __m512i),
            _mm512_loadu_si512(hi.as_ptr() as *const __m512i),
        );
        for jp in 0..np16 {
            let out = vp.as_mut_ptr().add(jp * dv);
            if 2 * jp >= n {
                std::slice::from_raw_parts_mut(out, dv).fill(0);
                continue;
            }
            let (a, b) = (key(2 * jp), (2 * jp + 1 < n).then(|| key(2 * jp + 1)));
            for c in (0..dv).step_by(32) {
                let w = 32.min(dv - c);
                let m: __mmask32 = if w == 32 { !0 } else { (1 << w) - 1 };
                let x = _mm512_maskz_loadu_epi16(m, a.add(c) as *const i16);
                let y = match b {
                    Some(b) => _mm512_maskz_loadu_epi16(m, b.add(c) as *const i16),
                    None => _mm512_setzero_si512(),
                };
                _mm512_storeu_si512(
                    out.add(c) as *mut __m512i,
                    _mm512_permutex2var_epi16(x, lo, y),
                );
                if w == 32 {
                    _mm512_storeu_si512(
                        out.add(c + 16) as *mut __m512i,
                        _mm512_permutex2var_epi16(x, hi, y),
                    );
                }
            }
        }
    }
}

/// `acc [r][..dv] += Σ_jp pa[r][jp] · vp[jp][..]` for all `rp` rows: 2 row
/// blocks x 2 column blocks of O per [`mac_dyn`], over `np16 / 16` chunks.
///
/// # Safety
/// Tiles configured; `pa` holds `rp * np16`, `vp` `np16 * dv`, `acc`
/// `rp * dv`; `rp`, `np16`, `dv` multiples of 16.
#[inline(always)]
unsafe fn pv<T: Tiles>(
    t: &mut T,
    pa: &[u32],
    rp: usize,
    np16: usize,
    vp: &[u32],
    dv: usize,
    acc: &mut [f32],
) {
    assert!(rp.is_multiple_of(16) && np16.is_multiple_of(16) && dv.is_multiple_of(16));
    assert!(pa.len() >= rp * np16 && vp.len() >= np16 * dv && acc.len() >= rp * dv);
    let ap = acc.as_mut_ptr();
    let a = Tiled {
        at: |r: usize| pa[r * 16 * np16..].as_ptr() as *const u8,
        stride: np16 * 4,
        step: 64,
    };
    let b = Tiled {
        at: |c: usize| vp[c * 16..].as_ptr() as *const u8,
        stride: dv * 4,
        step: 16 * dv * 4,
    };
    let c = |r: usize, c: usize| ap.wrapping_add(r * 16 * dv + c * 16) as *mut u8;
    // SAFETY: A tile (r, k): pa rows of block r, pairs 16k..16k + 16; B
    // tile (c, k): vp rows 16k..16k + 16, columns of block c; C tile
    // (r, c): acc rows of block r, columns of block c. All inside the
    // asserted sizes.
    unsafe {
        grid(
            t,
            (rp / 16, dv / 16),
            np16 / 16,
            a,
            b,
            c,
            dv * 4,
            true,
            |_| {},
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avx512_bw_bf16() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    }

    fn bf16_bits(x: f32) -> u32 {
        half::bf16::from_f32(x).to_bits() as u32
    }

    /// P's A operand: pairs along the keys, rounded to nearest even, rows
    /// transposed, zero past n (odd n, n not a multiple of 32, rp > 16).
    #[test]
    fn p_rows_pairs_and_transposes() {
        if !avx512_bw_bf16() {
            eprintln!("SKIPPED p_rows: CPU lacks avx512f+bw+bf16");
            return;
        }
        for (n, rp) in [(128usize, 32usize), (37, 16), (1, 48), (64, 16)] {
            let np16 = n.div_ceil(32) * 16;
            let st = crate::model::gen::uniform(n * rp, n as u64);
            let st: Vec<f32> = st.iter().map(|x| x + 0.5).collect();
            let mut pa = vec![0xdead_beefu32; rp * np16];
            // SAFETY: features detected; sizes as required.
            unsafe { p_rows(&st, rp, n, np16, &mut pa) };
            for r in 0..rp {
                for jp in 0..np16 {
                    let p = |j: usize| if j < n { bf16_bits(st[j * rp + r]) } else { 0 };
                    let want = p(2 * jp) | (p(2 * jp + 1) << 16);
                    assert_eq!(pa[r * np16 + jp], want, "n {n} rp {rp} [{r}][{jp}]");
                }
            }
        }
    }

    /// V's B operand from rows spread over key tiles: pairs of rows,
    /// column tails of 16, zero past n.
    #[test]
    fn v_pairs_interleave_rows() {
        if !avx512_bw_bf16() {
            eprintln!("SKIPPED v_pairs: CPU lacks avx512f+bw+bf16");
            return;
        }
        for (n, d2, dv) in [(128usize, 288usize, 512usize), (37, 24, 48), (1, 16, 16)] {
            let tiles = n.div_ceil(SUB);
            let raw: Vec<Vec<u32>> = (0..tiles)
                .map(|s| {
                    crate::model::gen::uniform(SUB * d2 * 2, s as u64)
                        .chunks_exact(2)
                        .map(|p| bf16_bits(p[0]) | (bf16_bits(p[1]) << 16))
                        .collect()
                })
                .collect();
            let sub: Vec<&[u32]> = raw.iter().map(|v| v.as_slice()).collect();
            let np16 = n.div_ceil(32) * 16;
            let mut vp = vec![0xdead_beefu32; np16 * dv];
            // SAFETY: features detected; sizes as required.
            unsafe { v_pairs(&sub, d2, n, np16, dv, &mut vp) };
            let half = |j: usize, c: usize| -> u32 {
                if j >= n {
                    return 0;
                }
                let w = sub[j / SUB][(j % SUB) * d2 + c / 2];
                if c.is_multiple_of(2) {
                    w & 0xffff
                } else {
                    w >> 16
                }
            };
            for jp in 0..np16 {
                for c in 0..dv {
                    let want = half(2 * jp, c) | (half(2 * jp + 1, c) << 16);
                    assert_eq!(vp[jp * dv + c], want, "n {n} dv {dv} [{jp}][{c}]");
                }
            }
        }
    }
}
