//! The SIMD attention kernels: AVX2+FMA, AVX-512F, AVX512-BF16, and (in
//! [`amx_attn`]) AMX-BF16.
//!
//! Per tile of up to 64 keys, the query rows of a task are the M dimension
//! of two small GEMMs:
//! - `S = Q · Kᵀ`: Q is transposed once per task (rows in vector lanes) and
//!   each key element is broadcast, so K is used as the cache stores it; on
//!   AVX512-BF16 the keys are bf16 pairs read in place (BF16 cache) or
//!   converted per row (FP8), and the products run on `vdpbf16ps`;
//! - online softmax in f32, a vector of rows at a time;
//! - `O += P · V`: V is the first d_v columns of the tile; a block of R rows
//!   x 4 vectors of O stays in registers over the tile (on `vdpbf16ps` with
//!   P rounded to bf16 when the output is bf16).
//!
//! While a tile computes, the next tile's keys are prefetched. The code is
//! generic over a vector type and inlined into `#[target_feature]` entry
//! points, so each ISA gets its own instructions.

// Off x86-64 only the scalar kernel exists; the generic code here is unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]
// Register blocks are indexed [row][vector] with run-time bounds (rows left,
// vectors per ISA); index loops state that layout more plainly than zips.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
use super::amx;
#[cfg(target_arch = "x86_64")]
mod amx_attn;
use super::isa::CpuIsa;
use super::kernel::{finalize, AttentionKernel, AttnTask, CallQueries, Scratch, K_TILE};
use super::phases::{Laps, Phase};
use crate::format::KvFormat;

/// Query rows per register block.
const R: usize = 6;

/// Keys per scores block when the query rows fit one vector: R keys would
/// give R independent FMA (or `vdpbf16ps`) chains, too few to cover the
/// latency of two pipes. Even, so blocks hold whole V pairs; 12
/// accumulators, the query vector and a broadcast fit 16 registers.
const R_ONE_VECTOR: usize = 12;

/// Calls `$f::<V, RN>(args)` with the run-time row count `$rn` (1..=R)
/// turned into a constant, so register blocks are fully unrolled and stay
/// in registers.
macro_rules! with_rows {
    ($rn:expr, $f:ident::<$v:ident>($($arg:expr),*)) => {
        match $rn {
            1 => $f::<$v, 1>($($arg),*),
            2 => $f::<$v, 2>($($arg),*),
            3 => $f::<$v, 3>($($arg),*),
            4 => $f::<$v, 4>($($arg),*),
            5 => $f::<$v, 5>($($arg),*),
            _ => $f::<$v, R>($($arg),*),
        }
    };
}

/// The few vector operations the kernel needs.
trait Vector: Copy {
    const LANES: usize;
    /// Vectors per register block along keys (scores) and along d_v
    /// (accumulate): `R x BLOCK` accumulators plus `BLOCK` loads must fit
    /// in the register file.
    const BLOCK: usize;
    /// # Safety
    /// `p` must point to `LANES` readable f32 and the ISA must be enabled.
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// `p` must point to `LANES` writable f32 and the ISA must be enabled.
    unsafe fn store(self, p: *mut f32);
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn splat(x: f32) -> Self;
    /// `self + a * b`.
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    /// Lane-wise `a op b` for `op` in +, -, *, max, min; round to nearest.
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn add(self, b: Self) -> Self;
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn sub(self, b: Self) -> Self;
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn mul(self, b: Self) -> Self;
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn max(self, b: Self) -> Self;
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn min(self, b: Self) -> Self;
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn round(self) -> Self;
    /// `2^self` for integral lanes in [-126, 127].
    /// # Safety
    /// The ISA must be enabled.
    unsafe fn pow2(self) -> Self;

    /// `e^x` lane-wise, to about 2 ulp (Cephes' `expf`: `x = n·ln2 + r`,
    /// a degree-6 polynomial in r, times `2^n`). Inputs are clamped to
    /// [-87.3, 88.3], so very negative ones (the softmax's masked or
    /// far-below-max scores, and -inf) give ~1e-38, not 0.
    /// # Safety
    /// The ISA must be enabled.
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        // SAFETY: caller contract (the ISA is enabled).
        unsafe {
            let x = self.max(Self::splat(-87.3)).min(Self::splat(88.3));
            let n = x.mul(Self::splat(std::f32::consts::LOG2_E)).round();
            let r = x
                .fma(n, Self::splat(-0.693_359_4))
                .fma(n, Self::splat(2.121_944_4e-4));
            let mut p = Self::splat(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                0.166_666_65,
                0.5,
            ] {
                p = Self::splat(c).fma(p, r);
            }
            let y = r.add(Self::splat(1.0)).fma(p, r.mul(r));
            y.mul(n.pow2())
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    /// add, sub, mul, max, min of a vector type through its intrinsics.
    macro_rules! binary_ops {
        ($v:ident, $add:ident, $sub:ident, $mul:ident, $max:ident, $min:ident) => {
            binary_ops!(@one $v, add, $add);
            binary_ops!(@one $v, sub, $sub);
            binary_ops!(@one $v, mul, $mul);
            binary_ops!(@one $v, max, $max);
            binary_ops!(@one $v, min, $min);
        };
        (@one $v:ident, $name:ident, $f:ident) => {
            #[inline(always)]
            unsafe fn $name(self, b: Self) -> Self {
                // SAFETY: caller contract (the vector's ISA is enabled).
                $v(unsafe { $f(self.0, b.0) })
            }
        };
    }

    #[derive(Clone, Copy)]
    pub struct V256(__m256);
    #[derive(Clone, Copy)]
    pub struct V512(pub __m512);

    impl Vector for V256 {
        const LANES: usize = 8;
        const BLOCK: usize = 2;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: caller contract.
            V256(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: caller contract.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: caller contract (AVX enabled).
            V256(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: caller contract (FMA enabled).
            V256(unsafe { _mm256_fmadd_ps(a.0, b.0, self.0) })
        }
        binary_ops!(
            V256,
            _mm256_add_ps,
            _mm256_sub_ps,
            _mm256_mul_ps,
            _mm256_max_ps,
            _mm256_min_ps
        );
        #[inline(always)]
        unsafe fn round(self) -> Self {
            // SAFETY: caller contract (AVX enabled).
            V256(unsafe {
                _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
            })
        }
        #[inline(always)]
        unsafe fn pow2(self) -> Self {
            // SAFETY: caller contract (AVX2 enabled).
            V256(unsafe {
                let e = _mm256_add_epi32(_mm256_cvtps_epi32(self.0), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
            })
        }
    }

    impl Vector for V512 {
        const LANES: usize = 16;
        const BLOCK: usize = 4;
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: caller contract.
            V512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: caller contract.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: caller contract (AVX-512F enabled).
            V512(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            // SAFETY: caller contract (AVX-512F enabled).
            V512(unsafe { _mm512_fmadd_ps(a.0, b.0, self.0) })
        }
        binary_ops!(
            V512,
            _mm512_add_ps,
            _mm512_sub_ps,
            _mm512_mul_ps,
            _mm512_max_ps,
            _mm512_min_ps
        );
        #[inline(always)]
        unsafe fn round(self) -> Self {
            // SAFETY: caller contract (AVX-512F enabled).
            V512(unsafe {
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
            })
        }
        #[inline(always)]
        unsafe fn pow2(self) -> Self {
            // SAFETY: caller contract (AVX-512F enabled).
            V512(unsafe {
                let e = _mm512_add_epi32(_mm512_cvtps_epi32(self.0), _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
            })
        }
    }
}

/// Q·Kᵀ with `vdpbf16ps`: each 32-bit lane holds a bf16 pair (dims 2i,
/// 2i+1); one instruction multiplies 16 rows' pairs by a broadcast key
/// pair and accumulates in f32.
#[cfg(target_arch = "x86_64")]
mod bf16 {
    use super::{K_TILE, R, R_ONE_VECTOR};
    use std::arch::x86_64::*;

    /// `st[j][rb..] = scale * Σ_i qt2[i][rb..] · keys[j][i]`, `i` from `i0`
    /// (the pairs before it are zero in every query), for `NJ` keys from
    /// `j0` and `RV` row vectors from `rb`.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 enabled; sizes as in `scores_tile`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const NJ: usize, const RV: usize>(
        qt2: &[u32],
        rp: usize,
        rb: usize,
        keys: &[&[u32]],
        (i0, d2): (usize, usize),
        j0: usize,
        scale: f32,
        st: &mut [f32],
    ) {
        debug_assert!(rb + RV * 16 <= rp && qt2.len() >= d2 * rp && keys.len() >= j0 + NJ);
        debug_assert!(keys[j0..j0 + NJ].iter().all(|k| k.len() >= d2));
        debug_assert!(st.len() >= (j0 + NJ) * rp);
        let mut kr = [keys[j0]; NJ];
        for (jj, k) in kr.iter_mut().enumerate().skip(1) {
            *k = keys[j0 + jj];
        }
        let mut acc = [[_mm512_setzero_ps(); 4]; NJ];
        for i in i0..d2 {
            let mut qv = [_mm512_setzero_si512(); 4];
            for (v, x) in qv.iter_mut().enumerate().take(RV) {
                // SAFETY: in bounds by the assertions above.
                *x = unsafe {
                    _mm512_loadu_si512(qt2.as_ptr().add(i * rp + rb + v * 16) as *const __m512i)
                };
            }
            for jj in 0..NJ {
                // SAFETY: in bounds by the assertions above.
                let kb = _mm512_set1_epi32(unsafe { *kr[jj].get_unchecked(i) } as i32);
                for v in 0..RV {
                    // SAFETY: bit casts between same-size vector types.
                    let (q, k): (__m512bh, __m512bh) = unsafe {
                        (
                            std::mem::transmute::<__m512i, __m512bh>(qv[v]),
                            std::mem::transmute::<__m512i, __m512bh>(kb),
                        )
                    };
                    acc[jj][v] = _mm512_dpbf16_ps(acc[jj][v], q, k);
                }
            }
        }
        let sv = _mm512_set1_ps(scale);
        for jj in 0..NJ {
            for v in 0..RV {
                // SAFETY: in bounds by the assertions above.
                unsafe {
                    _mm512_storeu_ps(
                        st.as_mut_ptr().add((j0 + jj) * rp + rb + v * 16),
                        _mm512_mul_ps(acc[jj][v], sv),
                    )
                };
            }
        }
    }

    /// V of a tile as bf16 pairs along the keys: `vp[jp][c]` holds
    /// `V[2jp][c]` (low half) and `V[2jp + 1][c]` (high half, 0 past `n`).
    /// Exact: the tile's values are bf16 (bf16 or FP8 cache).
    ///
    /// # Safety
    /// AVX-512F enabled; `k_tile` holds `n` rows at stride `d >= dv`, `vp`
    /// holds `n.div_ceil(2) * dv`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn v_pairs(k_tile: &[f32], d: usize, n: usize, dv: usize, vp: &mut [u32]) {
        debug_assert!(vp.len() >= n.div_ceil(2) * dv && k_tile.len() >= n * d && dv <= d);
        for jp in 0..n.div_ceil(2) {
            let lo = &k_tile[2 * jp * d..2 * jp * d + dv];
            let out = &mut vp[jp * dv..(jp + 1) * dv];
            if 2 * jp + 1 < n {
                let hi = &k_tile[(2 * jp + 1) * d..(2 * jp + 1) * d + dv];
                for ((o, a), b) in out.iter_mut().zip(lo).zip(hi) {
                    *o = (a.to_bits() >> 16) | (b.to_bits() & 0xffff_0000);
                }
            } else {
                for (o, a) in out.iter_mut().zip(lo) {
                    *o = a.to_bits() >> 16;
                }
            }
        }
    }

    /// [`v_pairs`] from the keys as stored bf16 pairs (`keys[j]`, `d2`
    /// pairs each, what a BF16 cache holds), for the pairs `jps` only (keys
    /// `2 * jps.start..`): no f32 copy of the tile is needed, and the
    /// kernel pairs each block of keys right after its scores, from L1.
    ///
    /// # Safety
    /// AVX-512F enabled; `keys` holds `n` rows of at least `dv / 2` pairs,
    /// `vp` holds `n.div_ceil(2) * dv`, `jps.end <= n.div_ceil(2)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn v_pairs_raw(
        keys: &[&[u32]],
        n: usize,
        dv: usize,
        vp: &mut [u32],
        jps: std::ops::Range<usize>,
    ) {
        debug_assert!(vp.len() >= n.div_ceil(2) * dv && keys.len() >= n);
        debug_assert!(jps.end <= n.div_ceil(2));
        let row = |j: usize| -> &[u16] { &bytemuck::cast_slice(keys[j])[..dv] };
        let full = dv / 16 * 16;
        for jp in jps {
            let lo = row(2 * jp);
            let hi = (2 * jp + 1 < n).then(|| row(2 * jp + 1));
            let out = &mut vp[jp * dv..][..dv];
            let mut c = 0;
            while c < full {
                // SAFETY: columns c..c + 16 exist in lo, hi and out.
                unsafe {
                    let load = |r: &[u16]| {
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                            r.as_ptr().add(c) as *const __m256i
                        ))
                    };
                    let mut v = load(lo);
                    if let Some(h) = hi {
                        v = _mm512_or_si512(v, _mm512_slli_epi32(load(h), 16));
                    }
                    _mm512_storeu_si512(out.as_mut_ptr().add(c) as *mut __m512i, v);
                }
                c += 16;
            }
            for c in full..dv {
                out[c] = lo[c] as u32 | hi.map_or(0, |h| (h[c] as u32) << 16);
            }
        }
    }

    /// P of a tile (`st [n][rp]`, f32) rounded to bf16 pairs along the keys:
    /// `pp[jp][r]` = (P[2jp][r], P[2jp + 1][r]), rounded to nearest even.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 enabled; `st` holds `n * rp`, `pp` holds
    /// `n.div_ceil(2) * rp`, `rp` a multiple of 16.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn p_pairs(st: &[f32], rp: usize, n: usize, pp: &mut [u32]) {
        debug_assert!(
            rp.is_multiple_of(16) && st.len() >= n * rp && pp.len() >= n.div_ceil(2) * rp
        );
        for jp in 0..n.div_ceil(2) {
            for r in (0..rp).step_by(16) {
                // SAFETY: in bounds by the assertion above.
                unsafe {
                    let e = _mm512_loadu_ps(st.as_ptr().add(2 * jp * rp + r));
                    let o = if 2 * jp + 1 < n {
                        _mm512_loadu_ps(st.as_ptr().add((2 * jp + 1) * rp + r))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let lo: __m256i =
                        std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e));
                    let hi: __m256i =
                        std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(o));
                    let v = _mm512_or_si512(
                        _mm512_cvtepu16_epi32(lo),
                        _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16),
                    );
                    _mm512_storeu_si512(pp.as_mut_ptr().add(jp * rp + r) as *mut __m512i, v);
                }
            }
        }
    }

    /// `o[r][..] += Σ_jp pp[jp][r0 + r] · vp[jp][..]` for `RN` rows, with
    /// `vdpbf16ps` (two keys per instruction).
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 enabled; `pp` holds `np * rp` from `r0`,
    /// `vp` holds `np * dv`, `o` holds `RN * dv`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn accumulate_pairs<const RN: usize>(
        pp: &[u32],
        rp: usize,
        r0: usize,
        np: usize,
        vp: &[u32],
        dv: usize,
        o: &mut [f32],
    ) {
        debug_assert!(RN <= R && o.len() >= RN * dv && vp.len() >= np * dv);
        debug_assert!(np == 0 || pp.len() >= (np - 1) * rp + r0 + RN);
        let full = dv / 64 * 64;
        let mut c = 0;
        while c < full {
            let mut acc = [[_mm512_setzero_ps(); 4]; RN];
            for (r, a) in acc.iter_mut().enumerate() {
                for (v, x) in a.iter_mut().enumerate() {
                    // SAFETY: in bounds by the assertions above.
                    *x = unsafe { _mm512_loadu_ps(o.as_ptr().add(r * dv + c + 16 * v)) };
                }
            }
            for jp in 0..np {
                let mut vv = [_mm512_setzero_si512(); 4];
                for (v, x) in vv.iter_mut().enumerate() {
                    // SAFETY: in bounds by the assertions above.
                    *x = unsafe {
                        _mm512_loadu_si512(vp.as_ptr().add(jp * dv + c + 16 * v) as *const __m512i)
                    };
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: in bounds by the assertions above.
                    let pb =
                        _mm512_set1_epi32(unsafe { *pp.get_unchecked(jp * rp + r0 + r) } as i32);
                    for v in 0..4 {
                        // SAFETY: bit casts between same-size vector types.
                        let (pv, vb): (__m512bh, __m512bh) = unsafe {
                            (
                                std::mem::transmute::<__m512i, __m512bh>(pb),
                                std::mem::transmute::<__m512i, __m512bh>(vv[v]),
                            )
                        };
                        a[v] = _mm512_dpbf16_ps(a[v], pv, vb);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (v, x) in a.iter().enumerate() {
                    // SAFETY: in bounds by the assertions above.
                    unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(r * dv + c + 16 * v), *x) };
                }
            }
            c += 64;
        }
        // Columns past the last full chunk.
        let bf = |x: u32| f32::from_bits(x << 16);
        for r in 0..RN {
            for jp in 0..np {
                let p = pp[jp * rp + r0 + r];
                let (pe, po) = (bf(p & 0xffff), bf(p >> 16));
                for x in full..dv {
                    let v = vp[jp * dv + x];
                    o[r * dv + x] += pe * bf(v & 0xffff) + po * bf(v >> 16);
                }
            }
        }
    }

    /// Scores of the whole tile (`n` keys, all `rp` rows); `fetch(j0..j1)`
    /// runs before the first row block of keys `j0..j1` (to prefetch), and
    /// `done(j0..j1)` after the last row block of keys `j0..j1`, while
    /// their rows are still in L1.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 enabled; `qt2` holds `d2 * rp`, `keys` holds
    /// `n` rows of at least `d2` pairs, `st` holds `K_TILE * rp`, `rp` a
    /// multiple of 16, `n <= K_TILE`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_tile(
        qt2: &[u32],
        rp: usize,
        keys: &[&[u32]],
        (i0, d2): (usize, usize),
        n: usize,
        scale: f32,
        st: &mut [f32],
        fetch: impl Fn(std::ops::Range<usize>),
        mut done: impl FnMut(std::ops::Range<usize>),
    ) {
        debug_assert!(n <= K_TILE);
        macro_rules! keys {
            ($rv:literal, $nj:expr, $rb:expr, $j0:expr) => {
                match $nj {
                    1 => block::<1, $rv>(qt2, rp, $rb, keys, (i0, d2), $j0, scale, st),
                    2 => block::<2, $rv>(qt2, rp, $rb, keys, (i0, d2), $j0, scale, st),
                    3 => block::<3, $rv>(qt2, rp, $rb, keys, (i0, d2), $j0, scale, st),
                    4 => block::<4, $rv>(qt2, rp, $rb, keys, (i0, d2), $j0, scale, st),
                    5 => block::<5, $rv>(qt2, rp, $rb, keys, (i0, d2), $j0, scale, st),
                    _ => block::<R, $rv>(qt2, rp, $rb, keys, (i0, d2), $j0, scale, st),
                }
            };
        }
        let mut rb = 0;
        while rb < rp {
            let rv = 4.min((rp - rb) / 16);
            let mut j0 = 0;
            while j0 < n {
                // One row vector (h_q <= 16): R_ONE_VECTOR keys (h_q = 16
                // ran at 38-41% of the peak on Zen 5 with R).
                let nj = if rv == 1 && n - j0 >= R_ONE_VECTOR {
                    R_ONE_VECTOR
                } else {
                    R.min(n - j0)
                };
                if rb == 0 {
                    fetch(j0..j0 + nj);
                }
                // SAFETY: forwarded contract; block sizes within bounds.
                unsafe {
                    match rv {
                        1 if nj == R_ONE_VECTOR => {
                            block::<R_ONE_VECTOR, 1>(qt2, rp, rb, keys, (i0, d2), j0, scale, st)
                        }
                        1 => keys!(1, nj, rb, j0),
                        2 => keys!(2, nj, rb, j0),
                        3 => keys!(3, nj, rb, j0),
                        _ => keys!(4, nj, rb, j0),
                    }
                }
                if rb + rv * 16 >= rp {
                    done(j0..j0 + nj);
                }
                j0 += nj;
            }
            rb += rv * 16;
        }
    }
}

fn fit_u32(v: &mut Vec<u32>, n: usize) -> &mut [u32] {
    if v.len() < n {
        v.resize(n, 0);
    }
    &mut v[..n]
}

/// [`fit_u32`] starting on a 64-byte boundary.
fn fit_u32_lines(v: &mut Vec<u32>, n: usize) -> &mut [u32] {
    if v.len() < n + 16 {
        v.resize(n + 16, 0);
    }
    let at = crate::backend::to_line(v.as_ptr());
    &mut v[at..at + n]
}

/// [`fit`] starting on a 64-byte boundary.
fn fit_lines(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n + 16 {
        v.resize(n + 16, 0.0);
    }
    let at = crate::backend::to_line(v.as_ptr());
    &mut v[at..at + n]
}

fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Scores for `NJ` keys and `RV` vectors of query rows, with the queries
/// transposed: `st[(j0+jj)*rp + rb + v*L] = Σ_k qt[k*rp + rb + v*L] * kr[(j0+jj)*d + k]`,
/// `k` from `k0` (the columns before it are zero in every query).
/// Rows sit in vector lanes and keys are broadcast, so K is used as
/// gathered (row-major) and never transposed.
///
/// # Safety
/// The ISA of `V` must be enabled; `qt` holds `d * rp`, `kr` holds rows
/// `j0..j0+NJ` of `d`, `st` holds `K_TILE * rp`, `rb + RV*L <= rp`.
#[inline(always)]
unsafe fn scores_t<V: Vector, const NJ: usize, const RV: usize>(
    qt: &[f32],
    rp: usize,
    rb: usize,
    kr: &[f32],
    (k0, d): (usize, usize),
    j0: usize,
    st: &mut [f32],
) {
    debug_assert!(RV <= 4 && rb + RV * V::LANES <= rp && qt.len() >= d * rp);
    debug_assert!(kr.len() >= (j0 + NJ) * d && st.len() >= (j0 + NJ) * rp);
    // SAFETY: ISA enabled (caller); every pointer below stays inside the
    // slices whose lengths are checked above.
    unsafe {
        let mut acc = [[V::splat(0.0); 4]; NJ];
        for k in k0..d {
            let qrow = qt.as_ptr().add(k * rp + rb);
            let mut qv = [V::splat(0.0); 4];
            for (v, x) in qv.iter_mut().enumerate().take(RV) {
                *x = V::load(qrow.add(v * V::LANES));
            }
            for jj in 0..NJ {
                let kb = V::splat(*kr.get_unchecked((j0 + jj) * d + k));
                for v in 0..RV {
                    acc[jj][v] = acc[jj][v].fma(qv[v], kb);
                }
            }
        }
        for jj in 0..NJ {
            for v in 0..RV {
                acc[jj][v].store(st.as_mut_ptr().add((j0 + jj) * rp + rb + v * V::LANES));
            }
        }
    }
}

/// `scores_t` with run-time block sizes `nj` (1..=R, or R_ONE_VECTOR with
/// `rv` 1) and `rv` (1..=4).
///
/// # Safety
/// As [`scores_t`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_block<V: Vector>(
    nj: usize,
    rv: usize,
    qt: &[f32],
    rp: usize,
    rb: usize,
    kr: &[f32],
    d: (usize, usize),
    j0: usize,
    st: &mut [f32],
) {
    macro_rules! keys {
        ($rv:literal) => {
            match nj {
                1 => scores_t::<V, 1, $rv>(qt, rp, rb, kr, d, j0, st),
                2 => scores_t::<V, 2, $rv>(qt, rp, rb, kr, d, j0, st),
                3 => scores_t::<V, 3, $rv>(qt, rp, rb, kr, d, j0, st),
                4 => scores_t::<V, 4, $rv>(qt, rp, rb, kr, d, j0, st),
                5 => scores_t::<V, 5, $rv>(qt, rp, rb, kr, d, j0, st),
                _ => scores_t::<V, R, $rv>(qt, rp, rb, kr, d, j0, st),
            }
        };
    }
    // SAFETY: forwarded contract.
    unsafe {
        match rv {
            1 if nj == R_ONE_VECTOR => scores_t::<V, R_ONE_VECTOR, 1>(qt, rp, rb, kr, d, j0, st),
            1 => keys!(1),
            2 => keys!(2),
            3 => keys!(3),
            _ => keys!(4),
        }
    }
}

/// `o[r][0..dv] += sum_j p[j*pj + r] * vt[j][0..dv]` for `rn <= R` rows,
/// where row `j` of V starts at `vt[j * stride]`.
///
/// # Safety
/// The ISA of `V` must be enabled; `p` holds `(n-1)*pj + rn`, `o` holds `rn`
/// rows of `dv` at stride `dv`, `vt` holds `n` rows at `stride >= dv`.
#[inline(always)]
unsafe fn accumulate<V: Vector, const RN: usize>(
    p: &[f32],
    pj: usize,
    n: usize,
    vt: &[f32],
    stride: usize,
    o: &mut [f32],
    dv: usize,
) {
    let rn = RN;
    let nb = V::BLOCK;
    let chunk = nb * V::LANES;
    debug_assert!(
        (n == 0 || p.len() >= (n - 1) * pj + rn)
            && o.len() >= rn * dv
            && (n == 0 || vt.len() >= (n - 1) * stride + dv)
    );
    let full = dv / chunk * chunk;
    // SAFETY: ISA enabled (caller); pointers stay inside the checked slices.
    unsafe {
        let mut c = 0;
        while c < full {
            let mut acc = [[V::splat(0.0); 4]; RN];
            for r in 0..rn {
                for v in 0..nb {
                    acc[r][v] = V::load(o.as_ptr().add(r * dv + c + v * V::LANES));
                }
            }
            for j in 0..n {
                let vrow = vt.as_ptr().add(j * stride + c);
                let mut vv = [V::splat(0.0); 4];
                for (v, x) in vv.iter_mut().enumerate().take(nb) {
                    *x = V::load(vrow.add(v * V::LANES));
                }
                for r in 0..rn {
                    let pv = V::splat(*p.get_unchecked(j * pj + r));
                    for v in 0..nb {
                        acc[r][v] = acc[r][v].fma(pv, vv[v]);
                    }
                }
            }
            for r in 0..rn {
                for v in 0..nb {
                    acc[r][v].store(o.as_mut_ptr().add(r * dv + c + v * V::LANES));
                }
            }
            c += chunk;
        }
    }
    // Columns past the last full chunk.
    for r in 0..rn {
        for j in 0..n {
            let pw = p[j * pj + r];
            let v = &vt[j * stride..j * stride + dv];
            for x in full..dv {
                o[r * dv + x] += pw * v[x];
            }
        }
    }
}

/// The online-softmax step for `V::LANES` rows from `rb` that see every
/// key of the tile: new running max, `p = e^(s - max)` stored over the
/// scores, running sums, and the rescale of rows whose max moved.
///
/// # Safety
/// The ISA of `V` is enabled; `st` holds `n` keys × `rp` rows, `row_max`
/// and `row_sum` rows `rb..rb + LANES`, `o` those rows × `dv`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_rows<V: Vector>(
    st: &mut [f32],
    rp: usize,
    rb: usize,
    n: usize,
    row_max: &mut [f32],
    row_sum: &mut [f32],
    o: &mut [f32],
    dv: usize,
) {
    let lanes = V::LANES;
    debug_assert!(n >= 1 && st.len() >= (n - 1) * rp + rb + lanes);
    debug_assert!(row_max.len() >= rb + lanes && row_sum.len() >= rb + lanes);
    debug_assert!(o.len() >= (rb + lanes) * dv && lanes <= 16);
    // SAFETY: in bounds by the assertions above; ISA enabled (caller).
    unsafe {
        let s = st.as_mut_ptr().add(rb);
        let mut tmax = V::load(s);
        for j in 1..n {
            tmax = tmax.max(V::load(s.add(j * rp)));
        }
        let m_old = V::load(row_max.as_ptr().add(rb));
        let m_new = m_old.max(tmax);
        let alpha = m_old.sub(m_new).exp();
        let mut sum = V::splat(0.0);
        for j in 0..n {
            let p = V::load(s.add(j * rp)).sub(m_new).exp();
            p.store(s.add(j * rp));
            sum = sum.add(p);
        }
        let rs = row_sum.as_mut_ptr().add(rb);
        V::load(rs).mul(alpha).add(sum).store(rs);
        m_new.store(row_max.as_mut_ptr().add(rb));
        let mut a = [0f32; 16];
        alpha.store(a.as_mut_ptr());
        for (l, &al) in a[..lanes].iter().enumerate() {
            if al != 1.0 {
                o[(rb + l) * dv..(rb + l + 1) * dv]
                    .iter_mut()
                    .for_each(|x| *x *= al);
            }
        }
    }
}

/// `out [d/2][rp]` = the task's bf16 queries as pairs along d, transposed
/// (rows in lanes); rows past `rows` are zero. 16 x 16 blocks of pairs
/// go through [`transpose16`].
///
/// # Safety
/// AVX-512F enabled; `qb` holds `rows * d` bf16, `out` `d / 2 * rp`,
/// `rows <= rp`, `rp` a multiple of 16, `d` even.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn q_pairs_t(qb: &[u8], rows: usize, d: usize, rp: usize, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let d2 = d / 2;
    assert!(qb.len() >= rows * d * 2 && out.len() >= d2 * rp && rows <= rp);
    assert!(rp.is_multiple_of(16) && d.is_multiple_of(2));
    for r0 in (0..rp).step_by(16) {
        for k0 in (0..d2).step_by(16) {
            let w = 16.min(d2 - k0);
            let m: __mmask16 = if w == 16 { !0 } else { (1 << w) - 1 };
            // SAFETY: AVX-512F enabled (caller); masked loads read pairs
            // k0..k0 + w of a row < rows inside qb, stores write rows
            // k0..k0 + w of out at columns r0..r0 + 16 <= rp (asserted).
            unsafe {
                let mut v: [__m512i; 16] = std::array::from_fn(|i| {
                    if r0 + i < rows {
                        let p = qb.as_ptr().add(((r0 + i) * d + 2 * k0) * 2);
                        _mm512_maskz_loadu_epi32(m, p as *const i32)
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                transpose16(&mut v);
                for (i, x) in v.iter().take(w).enumerate() {
                    _mm512_storeu_si512(
                        out.as_mut_ptr().add((k0 + i) * rp + r0) as *mut __m512i,
                        *x,
                    );
                }
            }
        }
    }
}

/// Transposes 16 vectors of 16 u32 (`r[i]` lane `l` becomes `r[l]` lane
/// `i`): at each width b = 8, 4, 2, 1 the off-diagonal b x b blocks of
/// every 2b x 2b block swap places.
///
/// # Safety
/// AVX-512F enabled.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    for (stage, b) in [8usize, 4, 2, 1].into_iter().enumerate() {
        // SAFETY: AVX-512F enabled (caller); the index tables hold 16 i32.
        unsafe {
            let (lo, hi) = (
                _mm512_loadu_si512(TRANSPOSE16[stage][0].as_ptr() as *const __m512i),
                _mm512_loadu_si512(TRANSPOSE16[stage][1].as_ptr() as *const __m512i),
            );
            for i in (0..16).filter(|i| (i / b) % 2 == 0) {
                let (x, y) = (r[i], r[i + b]);
                r[i] = _mm512_permutex2var_epi32(x, lo, y);
                r[i + b] = _mm512_permutex2var_epi32(x, hi, y);
            }
        }
    }
}

/// [`transpose16`]'s `vpermt2d` indices at widths 8, 4, 2, 1: (low, high)
/// halves of each swap (lanes of the second operand count from 16), built
/// at compile time so no call assembles them.
#[cfg(target_arch = "x86_64")]
const TRANSPOSE16: [[[i32; 16]; 2]; 4] = [
    transpose16_index(8),
    transpose16_index(4),
    transpose16_index(2),
    transpose16_index(1),
];

#[cfg(target_arch = "x86_64")]
const fn transpose16_index(b: usize) -> [[i32; 16]; 2] {
    let mut t = [[0i32; 16]; 2];
    let mut l = 0;
    while l < 16 {
        let keep = (l / b).is_multiple_of(2);
        t[0][l] = if keep { l } else { 16 + l - b } as i32;
        t[1][l] = if keep { l + b } else { 16 + l } as i32;
        l += 1;
    }
    t
}

/// Online softmax over a tile's scores `st [n][rp]` (keys `t0..t0 + n`),
/// one vector of rows at a time: p overwrites the scores, running max and
/// sum advance, and rows whose max moved get `o` rescaled. Rows at a
/// causal edge (some keys past their visible prefix, p = 0 there) and a
/// last partial vector go one by one.
///
/// # Safety
/// The ISA of `V` is enabled; `st` holds `n * rp`, `row_max`/`row_sum`
/// `rows`, `o` `rows * dv`; `rows <= rp`, `rp` a multiple of the lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_tile<V: Vector>(
    task: &AttnTask<'_>,
    st: &mut [f32],
    rp: usize,
    t0: usize,
    n: usize,
    rows: usize,
    row_max: &mut [f32],
    row_sum: &mut [f32],
    o: &mut [f32],
    dv: usize,
) {
    let (lanes, h_q) = (V::LANES, task.h_q);
    let mut rb = 0;
    while rb < rows {
        let re = (rb + lanes).min(rows);
        if re - rb == lanes && (rb..re).all(|row| task.visible(row / h_q) >= t0 + n) {
            // SAFETY: ISA enabled (caller); rows rb..rb + lanes exist in
            // st (stride rp), row_max, row_sum and o.
            unsafe { softmax_rows::<V>(st, rp, rb, n, row_max, row_sum, o, dv) };
            rb = re;
            continue;
        }
        for row in rb..re {
            let vis = task.visible(row / h_q).saturating_sub(t0).min(n);
            let (max, sum) = (&mut row_max[row], &mut row_sum[row]);
            let alpha = softmax_row(st, rp, row, (n, vis), 1.0, max, sum);
            if alpha != 1.0 {
                o[row * dv..(row + 1) * dv]
                    .iter_mut()
                    .for_each(|x| *x *= alpha);
            }
        }
        rb = re;
    }
}

/// One query row's online softmax over a tile's scores (column `row` of
/// `st [n][rp]`): keys `0..vis` are visible, their scores times `scale`
/// (1 where `st` is already scaled), the rest masked. p overwrites the
/// scores (0 where masked), the running `max` and `sum` advance. Returns
/// the factor the row's accumulated output must be multiplied by (1 when
/// the max did not move, or when no key was ever visible: all p are 0).
pub(super) fn softmax_row(
    st: &mut [f32],
    rp: usize,
    row: usize,
    (n, vis): (usize, usize),
    scale: f32,
    max: &mut f32,
    sum: &mut f32,
) -> f32 {
    let tile_max = (0..vis)
        .map(|j| st[j * rp + row] * scale)
        .fold(f32::NEG_INFINITY, f32::max);
    let new_max = max.max(tile_max);
    if new_max == f32::NEG_INFINITY {
        (0..n).for_each(|j| st[j * rp + row] = 0.0);
        return 1.0;
    }
    let alpha = (*max - new_max).exp();
    let mut tile_sum = 0.0;
    for j in 0..n {
        let x = &mut st[j * rp + row];
        *x = if j < vis {
            (*x * scale - new_max).exp()
        } else {
            0.0
        };
        tile_sum += *x;
    }
    *sum = *sum * alpha + tile_sum;
    *max = new_max;
    alpha
}

/// Points `keys[..n]` at the bf16-pair rows (`d_qk / 2` each) of keys
/// `t0..t0 + n`: in place where a BF16 cache stores them (a tile inside
/// one block, or row by row), otherwise converted into `k2`: straight
/// from the cache with `direct` where the format allows, else packed from
/// the f32 `k_tile` (which the caller already gathered without `direct`).
fn tile_key_rows<'k>(
    task: &'k AttnTask<'_>,
    t0: usize,
    n: usize,
    direct: bool,
    k_tile: &mut [f32],
    k2: &'k mut [u32],
    keys: &mut [&'k [u32]; K_TILE],
) {
    let (d, d2) = (task.d_qk, task.d_qk / 2);
    if let Some(tile) = direct.then(|| task.bf16_tile(t0, n)).flatten() {
        for (key, row) in keys.iter_mut().zip(tile.chunks_exact(d2)) {
            *key = row;
        }
        return;
    }
    let rows = keys.iter_mut().zip(k2.chunks_exact_mut(d2)).take(n);
    for (j, (key, kr)) in rows.enumerate() {
        if direct {
            if let Some(row) = task.bf16_row(t0 + j) {
                *key = row;
                continue;
            }
            if task.gather_pairs(t0 + j, kr) {
                *key = kr;
                continue;
            }
            task.gather(t0 + j, &mut k_tile[j * d..(j + 1) * d]);
        }
        let kf = &k_tile[j * d..(j + 1) * d];
        for (x, f) in kr.iter_mut().zip(kf.chunks_exact(2)) {
            *x = (f[0].to_bits() >> 16) | (f[1].to_bits() & 0xffff_0000);
        }
        *key = kr;
    }
}

/// The kernel body for one vector type.
///
/// # Safety
/// The ISA of `V` must be enabled.
#[inline(always)]
unsafe fn attend_with<V: Vector, const BF16: bool>(
    task: &AttnTask<'_>,
    scratch: &mut Scratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let mut laps = Laps::start();
    let (d, dv, h_q) = (task.d_qk, task.d_v, task.h_q);
    // Leading query columns that are zero: left out of Q·Kᵀ (even, so the
    // bf16 pairs start on a pair).
    let skip = task.q_skip & !1;
    let rows = task.n_q * h_q;
    let lanes = V::LANES;
    // Query rows padded to whole vectors; padding rows are zero and ignored.
    let rp = rows.div_ceil(lanes) * lanes;
    let use_bf16 = BF16 && lanes == 16 && bf16_dots_apply(&task.call());
    // P·V with `vdpbf16ps` too (P rounded to bf16, as FlashMLA does) when
    // the output is bf16 anyway; V is exactly bf16 when the keys are.
    let p_bf16 = BF16 && use_bf16 && task.p_bf16 && dv % 16 == 0;
    // Both GEMMs on `vdpbf16ps` over a BF16 or FP8_V32 cache: keys become
    // the bf16 pairs Q·Kᵀ reads straight from the cache (copied, or e4m3
    // converted exactly), V's pairs interleave them, and the f32 copy of
    // the tile is skipped (at h_q = 16 it was a third of the kernel's time).
    let direct_pairs = p_bf16 && task.keys_as_pairs();
    let k_tile = fit(&mut scratch.k_tile, K_TILE * d);
    let buf = fit(&mut scratch.scores, d * rp + K_TILE * rp);
    let (qt, st) = buf.split_at_mut(d * rp);
    let d2 = d / 2;
    if use_bf16 {
        let pairs = fit_u32(&mut scratch.pairs, d2 * rp + K_TILE * d2);
        // SAFETY: use_bf16 implies the avx512bf16 entry point (AVX-512F);
        // the bf16 queries hold rows x d, pairs d2 x rp.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            q_pairs_t(task.q_bf16.unwrap_or_default(), rows, d, rp, pairs)
        };
    } else {
        for (k, qrow) in qt.chunks_exact_mut(rp).enumerate() {
            for (r, x) in qrow.iter_mut().enumerate() {
                *x = if r < rows { task.q[r * d + k] } else { 0.0 };
            }
        }
    }
    let row_max = fit(&mut scratch.row_max, rows);
    let row_sum = fit(&mut scratch.row_sum, rows);
    row_max.fill(f32::NEG_INFINITY);
    row_sum.fill(0.0);
    o[..rows * dv].fill(0.0);

    laps.lap(Phase::Rest);
    let mut t0 = task.start;
    while t0 < task.end {
        let n = K_TILE.min(task.end - t0);
        // The next tile's keys, fetched into the cache while this tile
        // computes, a block of R keys at a time: read from the cache (in
        // place, or converted row by row) they otherwise arrive at memory
        // latency, and h_q = 16 ran at 43% of the vdpbf16ps peak, not 58%.
        let fetch =
            |j: std::ops::Range<usize>| task.prefetch_keys(t0 + n + j.start..t0 + n + j.end);
        if !direct_pairs {
            for j in 0..n {
                task.gather(t0 + j, &mut k_tile[j * d..(j + 1) * d]);
            }
        }
        // The tile's keys as rows of bf16 pairs (exact: the values are
        // bf16). Rows a BF16 cache holds are read in place, so their misses
        // overlap the dot products instead of stalling a copy (sparse keys
        // and tiles across blocks too); others are converted.
        let mut keys: [&[u32]; K_TILE] = [&[]; K_TILE];
        if use_bf16 {
            let pairs = fit_u32(&mut scratch.pairs, d2 * rp + K_TILE * d2);
            let (qt2, k2) = pairs.split_at_mut(d2 * rp);
            tile_key_rows(task, t0, n, direct_pairs, k_tile, k2, &mut keys);
            laps.lap(Phase::Keys);
            // V's pairs are built from each block of keys right after its
            // scores, from L1 (R is even, so blocks hold whole pairs); at
            // h_q = 16 that made the kernel 3-6% faster than pairing the
            // whole tile afterwards, from L2.
            let np = n.div_ceil(2);
            let vp: &mut [u32] = if direct_pairs {
                fit_u32(&mut scratch.pv_pairs, np * dv + np * rp)
            } else {
                &mut []
            };
            let pair_v = |j: std::ops::Range<usize>| {
                #[cfg(target_arch = "x86_64")]
                if direct_pairs {
                    // SAFETY: as below; keys holds n rows of d2 >= dv / 2
                    // pairs and vp np * dv.
                    unsafe { bf16::v_pairs_raw(&keys, n, dv, vp, j.start / 2..j.end.div_ceil(2)) }
                }
            };
            // SAFETY: BF16 is only true in the avx512bf16 entry point; keys
            // holds n rows of d2 pairs.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                bf16::scores_tile(
                    qt2,
                    rp,
                    &keys,
                    (skip / 2, d2),
                    n,
                    task.scale,
                    st,
                    fetch,
                    pair_v,
                )
            };
        } else {
            laps.lap(Phase::Keys);
            // S for the whole tile: blocks of R keys x BLOCK row vectors.
            let mut rb = 0;
            while rb < rp {
                let rv = V::BLOCK.min((rp - rb) / lanes);
                let mut j0 = 0;
                while j0 < n {
                    let nj = if rv == 1 && n - j0 >= R_ONE_VECTOR {
                        R_ONE_VECTOR
                    } else {
                        R.min(n - j0)
                    };
                    if rb == 0 {
                        fetch(j0..j0 + nj);
                    }
                    // SAFETY: ISA enabled (caller); sizes as required.
                    unsafe { scores_block::<V>(nj, rv, qt, rp, rb, k_tile, (skip, d), j0, st) };
                    j0 += nj;
                }
                rb += rv * lanes;
            }
        }
        laps.lap(Phase::Scores);
        // SAFETY: ISA enabled (caller); st holds n keys x rp rows, the row
        // state `rows`, o `rows * dv`.
        unsafe { softmax_tile::<V>(task, st, rp, t0, n, rows, row_max, row_sum, o, dv) };
        laps.lap(Phase::Softmax);
        #[cfg(target_arch = "x86_64")]
        if p_bf16 {
            let np = n.div_ceil(2);
            let pairs = fit_u32(&mut scratch.pv_pairs, np * dv + np * rp);
            let (vp, pp) = pairs.split_at_mut(np * dv);
            // SAFETY: p_bf16 implies the avx512bf16 entry point; sizes as required.
            unsafe {
                if !direct_pairs {
                    bf16::v_pairs(k_tile, d, n, dv, vp);
                }
                bf16::p_pairs(st, rp, n, pp);
            }
            laps.lap(Phase::VPairs);
            let mut r0 = 0;
            while r0 < rows {
                let rn = R.min(rows - r0);
                let o_rows = &mut o[r0 * dv..];
                // SAFETY: as above.
                unsafe {
                    match rn {
                        1 => bf16::accumulate_pairs::<1>(pp, rp, r0, np, vp, dv, o_rows),
                        2 => bf16::accumulate_pairs::<2>(pp, rp, r0, np, vp, dv, o_rows),
                        3 => bf16::accumulate_pairs::<3>(pp, rp, r0, np, vp, dv, o_rows),
                        4 => bf16::accumulate_pairs::<4>(pp, rp, r0, np, vp, dv, o_rows),
                        5 => bf16::accumulate_pairs::<5>(pp, rp, r0, np, vp, dv, o_rows),
                        _ => bf16::accumulate_pairs::<R>(pp, rp, r0, np, vp, dv, o_rows),
                    }
                };
                r0 += rn;
            }
            laps.lap(Phase::Pv);
            t0 += n;
            continue;
        }
        let mut r0 = 0;
        while r0 < rows {
            let rn = R.min(rows - r0);
            // SAFETY: ISA enabled (caller); slice sizes as required.
            unsafe {
                with_rows!(
                    rn,
                    accumulate::<V>(&st[r0..], rp, n, k_tile, d, &mut o[r0 * dv..], dv)
                )
            };
            r0 += rn;
        }
        laps.lap(Phase::Pv);
        t0 += n;
    }
    finalize(o, lse, row_max, row_sum, dv);
    laps.lap(Phase::Rest);
    laps.finish(task.end - task.start, rows);
}

/// Whether the avx512bf16 kernel takes `Q·Kᵀ` of a call like `call` on
/// `vdpbf16ps`, from the bf16 queries: queries and keys exactly bf16 (bf16
/// queries; a BF16 or FP8 cache, e4m3 times a power of two being a bf16),
/// even `d_qk`.
fn bf16_dots_apply(call: &CallQueries) -> bool {
    call.q_bf16
        && call.d_qk.is_multiple_of(2)
        && matches!(
            call.kv_format,
            KvFormat::Bf16 | KvFormat::Fp8V32 | KvFormat::Fp8Model1
        )
}

/// AVX2 + FMA, 8 lanes.
pub struct Avx2Kernel;
/// AVX-512F with `vdpbf16ps` for Q·Kᵀ on bf16 queries and bf16/FP8 caches.
pub struct Avx512Bf16Kernel;
/// Both GEMMs on AMX-BF16 tiles ([`amx_attn`]) where the task allows it
/// (bf16 queries and output, a bf16-exact cache, d % 32 == 0,
/// d_v % 16 == 0), otherwise as [`Avx512Kernel`]. `emulated` runs the
/// tiles in software (`MLART_AMX_EMULATE=1`: slow; tests the AMX code on
/// CPUs without AMX).
pub struct AmxKernel {
    pub emulated: bool,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn attend_amx(
    emulated: bool,
    task: &AttnTask<'_>,
    scratch: &mut Scratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    if !amx_attn::applies(task) {
        // The f32 kernel: on Intel CPUs (all AMX CPUs so far) `vdpbf16ps`
        // runs at half the FMA rate (see `CpuIsa::rank`).
        // SAFETY: AVX-512F is enabled here.
        return unsafe { attend_with::<x86::V512, false>(task, scratch, o, lse) };
    }
    if emulated {
        // SAFETY: AVX-512F, BW and BF16 are enabled; the software tiles
        // need no configuration.
        unsafe { amx_attn::attend(&mut amx::Emu::default(), task, scratch, o, lse) }
    } else {
        // SAFETY: selected only when the CPU has AMX-BF16 and the OS
        // granted AMX permission; the session configures the tiles on this
        // thread and releases them when dropped.
        unsafe { amx_attn::attend(&mut amx::Session::start(), task, scratch, o, lse) }
    }
}

impl AttentionKernel for AmxKernel {
    fn isa(&self) -> CpuIsa {
        CpuIsa::Amx
    }

    fn reads_f32_queries(&self, call: &CallQueries) -> bool {
        #[cfg(target_arch = "x86_64")]
        return !amx_attn::applies_to(call);
        #[cfg(not(target_arch = "x86_64"))]
        super::kernel::ScalarKernel.reads_f32_queries(call)
    }

    fn attend(&self, task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the engine selects this kernel only after detecting
        // AVX-512F, BW and BF16, and AMX with its permission unless emulated.
        unsafe {
            attend_amx(self.emulated, task, scratch, o, lse)
        }
        #[cfg(not(target_arch = "x86_64"))]
        super::kernel::ScalarKernel.attend(task, scratch, o, lse)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn attend_avx512bf16(task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs with AVX-512F and AVX512-BF16 enabled.
    unsafe { attend_with::<x86::V512, true>(task, scratch, o, lse) }
}

impl AttentionKernel for Avx512Bf16Kernel {
    fn isa(&self) -> CpuIsa {
        CpuIsa::Avx512Bf16
    }

    fn reads_f32_queries(&self, call: &CallQueries) -> bool {
        // Elsewhere the scalar kernel stands in, and reads them.
        !(cfg!(target_arch = "x86_64") && bf16_dots_apply(call))
    }

    fn attend(&self, task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the engine selects this kernel only after detecting AVX-512F and AVX512-BF16.
        unsafe {
            attend_avx512bf16(task, scratch, o, lse)
        }
        #[cfg(not(target_arch = "x86_64"))]
        super::kernel::ScalarKernel.attend(task, scratch, o, lse)
    }
}
/// AVX-512F, 16 lanes.
pub struct Avx512Kernel;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs with AVX2 and FMA enabled.
    unsafe { attend_with::<x86::V256, false>(task, scratch, o, lse) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn attend_avx512(task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs with AVX-512F enabled.
    unsafe { attend_with::<x86::V512, false>(task, scratch, o, lse) }
}

impl AttentionKernel for Avx2Kernel {
    fn isa(&self) -> CpuIsa {
        CpuIsa::Avx2
    }

    fn attend(&self, task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the engine selects this kernel only after detecting AVX2 and FMA.
        unsafe {
            attend_avx2(task, scratch, o, lse)
        }
        #[cfg(not(target_arch = "x86_64"))]
        super::kernel::ScalarKernel.attend(task, scratch, o, lse)
    }
}

impl AttentionKernel for Avx512Kernel {
    fn isa(&self) -> CpuIsa {
        CpuIsa::Avx512
    }

    fn attend(&self, task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the engine selects this kernel only after detecting AVX-512F.
        unsafe {
            attend_avx512(task, scratch, o, lse)
        }
        #[cfg(not(target_arch = "x86_64"))]
        super::kernel::ScalarKernel.attend(task, scratch, o, lse)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::bf16;

    /// The vector `exp` of both widths against f64 over the softmax's
    /// range, -inf and the clamp included.
    #[test]
    fn vector_exp_is_within_a_few_ulp() {
        use super::x86::{V256, V512};
        use super::Vector;
        fn check<V: Vector>(name: &str) {
            let mut xs: Vec<f32> = (0..20000).map(|i| -100.0 + i as f32 * 0.0094).collect();
            xs.extend([
                0.0,
                -0.0,
                1e-30,
                -1e-30,
                88.0,
                f32::NEG_INFINITY,
                -87.0,
                -88.0,
            ]);
            xs.resize(xs.len().div_ceil(16) * 16, 0.5);
            let mut out = vec![0f32; xs.len()];
            for (i, c) in xs.chunks(V::LANES).enumerate() {
                // SAFETY: the caller checked the ISA; c has LANES values.
                unsafe {
                    V::load(c.as_ptr())
                        .exp()
                        .store(out.as_mut_ptr().add(i * V::LANES))
                };
            }
            for (&x, &y) in xs.iter().zip(&out) {
                let want = (x as f64).exp();
                if x < -87.3 {
                    assert!((0.0..2e-38).contains(&y), "{name} exp({x}) = {y}");
                } else {
                    let rel = ((y as f64 - want) / want).abs();
                    assert!(
                        rel <= 4.0 * f32::EPSILON as f64,
                        "{name} exp({x}) = {y}, want {want}"
                    );
                }
            }
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            check::<V256>("avx2");
        } else {
            eprintln!("SKIPPED vector exp avx2: CPU lacks avx2+fma");
        }
        if std::is_x86_feature_detected!("avx512f") {
            check::<V512>("avx512");
        } else {
            eprintln!("SKIPPED vector exp avx512: CPU lacks avx512f");
        }
    }

    #[test]
    fn transpose16_transposes() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED transpose16: CPU lacks avx512f");
            return;
        }
        let m: Vec<u32> = (0..256).collect();
        let mut out = vec![0u32; 256];
        // SAFETY: AVX-512F detected; m and out hold 16 x 16 u32.
        unsafe {
            use std::arch::x86_64::*;
            let mut r: [__m512i; 16] =
                std::array::from_fn(|i| _mm512_loadu_si512(m[16 * i..].as_ptr() as *const __m512i));
            super::transpose16(&mut r);
            for (i, v) in r.iter().enumerate() {
                _mm512_storeu_si512(out[16 * i..].as_mut_ptr() as *mut __m512i, *v);
            }
        }
        for i in 0..16 {
            for l in 0..16 {
                assert_eq!(out[16 * i + l], m[16 * l + i], "[{i}][{l}]");
            }
        }
    }

    /// The AMX kernel leaves the f32 queries unpacked exactly for the calls
    /// its tiles take (bf16 in and out, whole tiles, a bf16-exact cache);
    /// any other call falls back to the f32 kernel, which reads them. The
    /// avx512bf16 kernel leaves them where its `Q·Kᵀ` reads the bf16 ones.
    #[test]
    fn kernels_skip_f32_queries_only_where_they_read_bf16_ones() {
        use super::{AmxKernel, Avx512Bf16Kernel, Avx512Kernel};
        use crate::backend::cpu::kernel::{AttentionKernel, CallQueries, ScalarKernel};
        use crate::format::KvFormat;
        let tiles = CallQueries {
            q_bf16: true,
            p_bf16: true,
            d_qk: 576,
            d_v: 512,
            kv_format: KvFormat::Bf16,
        };
        let k = AmxKernel { emulated: true };
        assert!(!k.reads_f32_queries(&tiles));
        let fp8 = CallQueries {
            kv_format: KvFormat::Fp8V32,
            ..tiles
        };
        assert!(!k.reads_f32_queries(&fp8));
        for other in [
            CallQueries {
                q_bf16: false,
                ..tiles
            },
            CallQueries {
                p_bf16: false,
                ..tiles
            },
            CallQueries {
                d_qk: 40,
                d_v: 32,
                ..tiles
            },
            CallQueries { d_v: 40, ..tiles },
            CallQueries {
                kv_format: KvFormat::F32,
                ..tiles
            },
            CallQueries {
                kv_format: KvFormat::F16,
                ..tiles
            },
        ] {
            assert!(k.reads_f32_queries(&other), "{other:?}");
        }
        // The avx512bf16 kernel takes Q·Kᵀ from the bf16 queries for any
        // output and even d_qk; the f32 kernels always read them.
        let any_out = CallQueries {
            p_bf16: false,
            d_qk: 40,
            d_v: 40,
            ..tiles
        };
        assert!(!Avx512Bf16Kernel.reads_f32_queries(&any_out));
        for other in [
            CallQueries {
                q_bf16: false,
                ..tiles
            },
            CallQueries { d_qk: 33, ..tiles },
            CallQueries {
                kv_format: KvFormat::F16,
                ..tiles
            },
        ] {
            assert!(Avx512Bf16Kernel.reads_f32_queries(&other), "{other:?}");
        }
        assert!(Avx512Kernel.reads_f32_queries(&tiles));
        assert!(ScalarKernel.reads_f32_queries(&tiles));
    }

    /// Queries as transposed pairs: rows not a multiple of 16 (zero
    /// padding), pair counts with a partial last block of 16.
    #[test]
    fn q_pairs_t_transposes_pairs() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED q_pairs_t: CPU lacks avx512f");
            return;
        }
        for (rows, d) in [(128usize, 576usize), (7, 40), (17, 64), (1, 2)] {
            let rp = rows.div_ceil(16) * 16;
            let qb: Vec<u8> = crate::model::gen::uniform(rows * d, rows as u64)
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                .collect();
            let mut out = vec![0xdead_beefu32; d / 2 * rp];
            // SAFETY: avx512f detected; sizes as required.
            unsafe { super::q_pairs_t(&qb, rows, d, rp, &mut out) };
            for k2 in 0..d / 2 {
                for r in 0..rp {
                    let want = if r < rows {
                        let at = (r * d + 2 * k2) * 2;
                        u32::from_le_bytes([qb[at], qb[at + 1], qb[at + 2], qb[at + 3]])
                    } else {
                        0
                    };
                    assert_eq!(out[k2 * rp + r], want, "rows {rows} d {d} [{k2}][{r}]");
                }
            }
        }
    }

    /// V pairs from the stored bf16 rows equal the pairs built from the f32
    /// copy, bit for bit, for odd and even key counts and column tails.
    #[test]
    fn v_pairs_from_stored_rows_equal_v_pairs_from_f32() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED v_pairs_raw: CPU lacks avx512f");
            return;
        }
        let vals = crate::model::gen::uniform(64 * 576, 7);
        for (n, d, dv) in [
            (64usize, 576usize, 512usize),
            (37, 576, 512),
            (1, 64, 64),
            (5, 40, 40),
        ] {
            let words: Vec<u16> = vals[..n * d]
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect();
            let k_tile: Vec<f32> = words
                .iter()
                .map(|w| f32::from_bits((*w as u32) << 16))
                .collect();
            let k2: Vec<u32> = bytemuck::cast_slice(&words).to_vec();
            let keys: Vec<&[u32]> = k2.chunks_exact(d / 2).collect();
            let np = n.div_ceil(2);
            let (mut a, mut b) = (vec![7u32; np * dv], vec![9u32; np * dv]);
            // SAFETY: avx512f detected; sizes as required.
            unsafe { bf16::v_pairs(&k_tile, d, n, dv, &mut a) };
            // In pieces, as the kernel builds them: every pair exactly once.
            let mut jp = 0;
            for len in [1, 3, 2].iter().cycle() {
                let end = (jp + len).min(np);
                // SAFETY: as above; end <= np.
                unsafe { bf16::v_pairs_raw(&keys, n, dv, &mut b, jp..end) };
                jp = end;
                if jp == np {
                    break;
                }
            }
            assert_eq!(a, b, "n {n} d {d} dv {dv}");
        }
    }
}
