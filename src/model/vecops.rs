//! Vector kernels for the projections: dot products of f32 activations with
//! weight rows in their stored precision (f32, bf16, f16, FP8 e4m3 with a
//! scale per 128 elements), converted in registers, plus `axpy`. Each takes
//! the model's [`Level`]: AVX-512F or AVX2 (both with FMA and F16C for
//! f16/FP8), or portable code.

#![cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]

use super::level::Level;
use crate::format::fp8::E4M3_TABLE;

/// The vector module a level runs, as a tag for the dispatch below.
#[derive(Clone, Copy)]
enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    None,
}

/// `lvl` never exceeds what the CPU has ([`Level`] caps it), so the
/// `unsafe` calls below hold their feature contract.
fn simd(lvl: Level) -> Simd {
    match lvl {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 | Level::Avx512Bf16 => Simd::Avx512,
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => Simd::Avx2,
        _ => Simd::None,
    }
}

pub use crate::format::prefetch;

/// Portable f32 dot product with independent partial sums.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len()) / 8 * 8;
    for (x, y) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[n..].iter().zip(&b[n..]) {
        s += x * y;
    }
    s
}

/// The vector kernels, written once over a module's primitives: `V` (a
/// vector of `LANES` f32), `zero`, `splat`, `loadu`, `storeu`, `fmadd`,
/// `add`, `mul`, `hsum`, and the converting loads `bf16` (`LANES` values),
/// `f16` (`LANES`) and `fp8_pair` (`2 * LANES` E4M3 codes as two vectors,
/// each value times 2^-8: see `e4m3_as_f16`). `$f` is the target features of
/// the f32/bf16 kernels, `$h` those of the f16/FP8 ones. Each unrolls to
/// several independent sums (or rows) per step, enough loads in flight to
/// stream weights at memory speed.
#[cfg(target_arch = "x86_64")]
macro_rules! vector_kernels {
    ($f:literal, $h:literal) => {
        #[target_feature(enable = $f)]
        pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let full = n / (4 * LANES) * (4 * LANES);
            let mut s = [zero(); 4];
            let mut i = 0;
            while i < full {
                for (k, acc) in s.iter_mut().enumerate() {
                    // SAFETY: i + 4 * LANES <= n for both slices.
                    unsafe {
                        let e = i + LANES * k;
                        *acc = fmadd(loadu(a.as_ptr().add(e)), loadu(b.as_ptr().add(e)), *acc);
                    }
                }
                i += 4 * LANES;
            }
            let mut t = hsum(add(add(s[0], s[1]), add(s[2], s[3])));
            for k in full..n {
                t += a[k] * b[k];
            }
            t
        }

        /// `row` holds `x.len()` little-endian bf16 values.
        #[target_feature(enable = $f)]
        pub fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
            let n = x.len().min(row.len() / 2);
            let full = n / (4 * LANES) * (4 * LANES);
            let mut s = [zero(); 4];
            let mut i = 0;
            while i < full {
                for (k, acc) in s.iter_mut().enumerate() {
                    let e = i + LANES * k;
                    // SAFETY: elements e..e+LANES exist in both (bytes 2e.. of row).
                    unsafe {
                        *acc = fmadd(
                            bf16(row.as_ptr().add(2 * e)),
                            loadu(x.as_ptr().add(e)),
                            *acc,
                        );
                    }
                }
                i += 4 * LANES;
            }
            let t = hsum(add(add(s[0], s[1]), add(s[2], s[3])));
            t + super::portable::dot_bf16(&row[2 * full..2 * n], &x[full..n])
        }

        /// Four bf16 rows times the same `x`: each `x` vector is loaded once
        /// for four rows, which matters when `x` is larger than L1 (o_proj's
        /// input is 64 KiB). Each row is prefetched a cache line per 32
        /// elements, `ahead` bytes ahead.
        #[target_feature(enable = $f)]
        pub fn dot_bf16_x4(rows: [&[u8]; 4], x: &[f32], ahead: usize) -> [f32; 4] {
            let n = rows.iter().fold(x.len(), |m, r| m.min(r.len() / 2));
            let full = n / (2 * LANES) * (2 * LANES);
            let mut acc = [[zero(); 2]; 4];
            let mut i = 0;
            while i < full {
                // SAFETY: elements i..i+2*LANES exist in x and in every row.
                unsafe {
                    let x0 = loadu(x.as_ptr().add(i));
                    let x1 = loadu(x.as_ptr().add(i + LANES));
                    for (r, row) in rows.iter().enumerate() {
                        if i % 32 == 0 {
                            prefetch(row.as_ptr().wrapping_add(2 * i + ahead));
                        }
                        let p = row.as_ptr().add(2 * i);
                        acc[r][0] = fmadd(bf16(p), x0, acc[r][0]);
                        acc[r][1] = fmadd(bf16(p.add(2 * LANES)), x1, acc[r][1]);
                    }
                }
                i += 2 * LANES;
            }
            let mut out = [0f32; 4];
            for (r, o) in out.iter_mut().enumerate() {
                *o = hsum(add(acc[r][0], acc[r][1]))
                    + super::portable::dot_bf16(&rows[r][2 * full..2 * n], &x[full..n]);
            }
            out
        }

        /// [`dot_bf16_x4`] for `T` tokens: each vector of the four rows is
        /// converted once and multiplied into every token's sum (one sum
        /// per row and token: `4 T` independent chains).
        #[target_feature(enable = $f)]
        pub fn dot_bf16_x4_tokens<const T: usize>(
            rows: [&[u8]; 4],
            xs: [&[f32]; T],
            ahead: usize,
        ) -> [[f32; 4]; T] {
            let n = xs.iter().fold(usize::MAX, |m, x| m.min(x.len()));
            let n = rows.iter().fold(n, |m, r| m.min(r.len() / 2));
            let full = n / LANES * LANES;
            let mut acc = [[zero(); 4]; T];
            let mut i = 0;
            while i < full {
                let mut w = [zero(); 4];
                for (r, row) in rows.iter().enumerate() {
                    if i % 32 == 0 {
                        prefetch(row.as_ptr().wrapping_add(2 * i + ahead));
                    }
                    // SAFETY: elements i..i+LANES exist in every row.
                    w[r] = unsafe { bf16(row.as_ptr().add(2 * i)) };
                }
                for (a, x) in acc.iter_mut().zip(&xs) {
                    // SAFETY: elements i..i+LANES exist in every x.
                    let xv = unsafe { loadu(x.as_ptr().add(i)) };
                    for (s, &wr) in a.iter_mut().zip(&w) {
                        *s = fmadd(wr, xv, *s);
                    }
                }
                i += LANES;
            }
            let mut out = [[0f32; 4]; T];
            for ((o, a), x) in out.iter_mut().zip(&acc).zip(&xs) {
                for (r, (v, s)) in o.iter_mut().zip(a).enumerate() {
                    *v = hsum(*s)
                        + super::portable::dot_bf16(&rows[r][2 * full..2 * n], &x[full..n]);
                }
            }
            out
        }

        /// Four E4M3 rows (each with its per-block scales) times the same `x`.
        /// Per block: vector partial sums, folded into the total with the
        /// block's scale (times 256 for the f16 reading) without a
        /// horizontal reduction.
        #[target_feature(enable = $h)]
        pub fn dot_fp8_x4(
            rows: [&[u8]; 4],
            scales: [&[f32]; 4],
            block: usize,
            x: &[f32],
            ahead: usize,
        ) -> [f32; 4] {
            let n = rows.iter().fold(x.len(), |m, r| m.min(r.len()));
            let mut total = [zero(); 4];
            let mut tail = [0f32; 4];
            let k256 = splat(256.0);
            let mut b0 = 0;
            let mut bi = 0;
            while b0 < n {
                let b1 = (b0 + block).min(n);
                let full = b0 + (b1 - b0) / (2 * LANES) * (2 * LANES);
                let mut acc = [[zero(); 2]; 4];
                let mut i = b0;
                while i < full {
                    // SAFETY: elements i..i+2*LANES exist in x and in every row.
                    unsafe {
                        let x0 = loadu(x.as_ptr().add(i));
                        let x1 = loadu(x.as_ptr().add(i + LANES));
                        for (r, row) in rows.iter().enumerate() {
                            if (i - b0).is_multiple_of(64) {
                                prefetch(row.as_ptr().wrapping_add(i + ahead));
                            }
                            let (f0, f1) = fp8_pair(row.as_ptr().add(i));
                            acc[r][0] = fmadd(f0, x0, acc[r][0]);
                            acc[r][1] = fmadd(f1, x1, acc[r][1]);
                        }
                    }
                    i += 2 * LANES;
                }
                for r in 0..4 {
                    let sum = add(acc[r][0], acc[r][1]);
                    total[r] = fmadd(mul(sum, k256), splat(scales[r][bi]), total[r]);
                    let mut part = 0f32;
                    for k in full..b1 {
                        part += super::E4M3_TABLE[rows[r][k] as usize] * x[k];
                    }
                    tail[r] += part * scales[r][bi];
                }
                b0 = b1;
                bi += 1;
            }
            [0, 1, 2, 3].map(|r| hsum(total[r]) + tail[r])
        }

        /// [`dot_fp8_x4`] for `T` tokens: each code vector of the four rows
        /// is converted once, scaled by its block's scale, and multiplied
        /// into every token's sum, so a decode step of a few sequences
        /// converts each weight once per `T` tokens instead of once per
        /// token. The rows go [`FP8_ROWS`] at a time, one sum per row and
        /// token for the whole row: scaling the weights, rather than
        /// folding each block's sums, keeps the sums in registers. `block`
        /// must be a multiple of `2 * LANES` (the dispatch checks).
        #[target_feature(enable = $h)]
        pub fn dot_fp8_x4_tokens<const T: usize>(
            rows: [&[u8]; 4],
            scales: [&[f32]; 4],
            block: usize,
            xs: [&[f32]; T],
            ahead: usize,
        ) -> [[f32; 4]; T] {
            debug_assert!(block.is_multiple_of(2 * LANES));
            let n = xs.iter().fold(usize::MAX, |m, x| m.min(x.len()));
            let n = rows.iter().fold(n, |m, r| m.min(r.len()));
            let full = n / (2 * LANES) * (2 * LANES);
            let mut out = [[0f32; 4]; T];
            for p in (0..4).step_by(FP8_ROWS) {
                let mut acc = [[zero(); FP8_ROWS]; T];
                let mut b0 = 0;
                while b0 < full {
                    let b1 = (b0 + block).min(full);
                    // The f16 reading is the value times 2^-8.
                    let sc: [_; FP8_ROWS] =
                        std::array::from_fn(|k| splat(256.0 * scales[p + k][b0 / block]));
                    let mut i = b0;
                    while i < b1 {
                        for (k, &s) in sc.iter().enumerate() {
                            let row = rows[p + k];
                            if (i - b0).is_multiple_of(64) {
                                prefetch(row.as_ptr().wrapping_add(i + ahead));
                            }
                            // SAFETY: elements i..i+2*LANES exist in every row.
                            let (w0, w1) = unsafe { fp8_pair(row.as_ptr().add(i)) };
                            let (w0, w1) = (mul(w0, s), mul(w1, s));
                            for (a, x) in acc.iter_mut().zip(&xs) {
                                // SAFETY: elements i..i+2*LANES exist in every x.
                                let (x0, x1) = unsafe {
                                    (loadu(x.as_ptr().add(i)), loadu(x.as_ptr().add(i + LANES)))
                                };
                                a[k] = fmadd(w1, x1, fmadd(w0, x0, a[k]));
                            }
                        }
                        i += 2 * LANES;
                    }
                    b0 = b1;
                }
                for ((o, a), x) in out.iter_mut().zip(&acc).zip(&xs) {
                    for (k, &s) in a.iter().enumerate() {
                        let r = p + k;
                        let mut tail = 0f32;
                        for c in full..n {
                            tail += super::E4M3_TABLE[rows[r][c] as usize]
                                * x[c]
                                * scales[r][c / block];
                        }
                        o[r] = hsum(s) + tail;
                    }
                }
            }
            out
        }

        /// `row` holds `x.len()` little-endian f16 values.
        #[target_feature(enable = $h)]
        pub fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
            let n = x.len().min(row.len() / 2);
            let full = n / (2 * LANES) * (2 * LANES);
            let (mut s0, mut s1) = (zero(), zero());
            let mut i = 0;
            while i < full {
                // SAFETY: elements i..i+2*LANES exist in both.
                unsafe {
                    let p = row.as_ptr().add(2 * i);
                    s0 = fmadd(f16(p), loadu(x.as_ptr().add(i)), s0);
                    s1 = fmadd(f16(p.add(2 * LANES)), loadu(x.as_ptr().add(i + LANES)), s1);
                }
                i += 2 * LANES;
            }
            hsum(add(s0, s1)) + super::portable::dot_f16(&row[2 * full..2 * n], &x[full..n])
        }

        /// E4M3 codes times `x`, one scale per `block` codes (folded per
        /// block as in `dot_fp8_x4`); two sums keep two loads in flight.
        #[target_feature(enable = $h)]
        pub fn dot_fp8(codes: &[u8], scales: &[f32], block: usize, x: &[f32]) -> f32 {
            let n = x.len().min(codes.len());
            let mut total = zero();
            let mut tail = 0f32;
            let mut b0 = 0;
            let mut bi = 0;
            while b0 < n {
                let b1 = (b0 + block).min(n);
                let full = b0 + (b1 - b0) / (2 * LANES) * (2 * LANES);
                let (mut s0, mut s1) = (zero(), zero());
                let mut i = b0;
                while i < full {
                    // SAFETY: elements i..i+2*LANES exist in both.
                    unsafe {
                        let (f0, f1) = fp8_pair(codes.as_ptr().add(i));
                        s0 = fmadd(f0, loadu(x.as_ptr().add(i)), s0);
                        s1 = fmadd(f1, loadu(x.as_ptr().add(i + LANES)), s1);
                    }
                    i += 2 * LANES;
                }
                let block_sum = mul(add(s0, s1), splat(256.0));
                total = fmadd(block_sum, splat(scales[bi]), total);
                let mut part = 0f32;
                for k in full..b1 {
                    part += super::E4M3_TABLE[codes[k] as usize] * x[k];
                }
                tail += part * scales[bi];
                b0 = b1;
                bi += 1;
            }
            hsum(total) + tail
        }

        /// `dst[i] = row[i]` for a bf16 row, prefetching the row `ahead`
        /// bytes ahead (where a caller converting chunk by chunk reads
        /// next).
        #[target_feature(enable = $f)]
        pub fn widen_bf16(row: &[u8], dst: &mut [f32], ahead: usize) {
            let n = dst.len().min(row.len() / 2);
            let full = n / LANES * LANES;
            let mut i = 0;
            while i < full {
                // SAFETY: elements i..i+LANES exist in dst and in row.
                unsafe {
                    if i % 32 == 0 {
                        prefetch(row.as_ptr().wrapping_add(2 * i + ahead));
                    }
                    storeu(dst.as_mut_ptr().add(i), bf16(row.as_ptr().add(2 * i)));
                }
                i += LANES;
            }
            super::portable::widen_bf16(&row[2 * full..2 * n], &mut dst[full..n]);
        }

        /// `y += Σ a[k] · rows[k]` for four bf16 rows: `y` is loaded and
        /// stored once per four rows.
        #[target_feature(enable = $f)]
        pub fn axpy_bf16_x4(rows: [&[u8]; 4], a: [f32; 4], y: &mut [f32], ahead: usize) {
            let n = rows.iter().fold(y.len(), |m, r| m.min(r.len() / 2));
            let full = n / LANES * LANES;
            let av = a.map(|v| splat(v));
            let mut i = 0;
            while i < full {
                // SAFETY: elements i..i+LANES exist in y and in every row.
                unsafe {
                    let p = y.as_mut_ptr().add(i);
                    let mut acc = loadu(p);
                    for (r, row) in rows.iter().enumerate() {
                        if i % 32 == 0 {
                            prefetch(row.as_ptr().wrapping_add(2 * i + ahead));
                        }
                        acc = fmadd(bf16(row.as_ptr().add(2 * i)), av[r], acc);
                    }
                    storeu(p, acc);
                }
                i += LANES;
            }
            for (r, row) in rows.iter().enumerate() {
                super::portable::axpy_bf16(&row[2 * full..2 * n], a[r], &mut y[full..n]);
            }
        }

        /// `y += Σ a[k] · rows[k]` for four E4M3 rows with per-`block` scales.
        #[target_feature(enable = $h)]
        pub fn axpy_fp8_x4(
            rows: [&[u8]; 4],
            scales: [&[f32]; 4],
            block: usize,
            a: [f32; 4],
            y: &mut [f32],
            ahead: usize,
        ) {
            let n = rows.iter().fold(y.len(), |m, r| m.min(r.len()));
            let mut b0 = 0;
            let mut bi = 0;
            while b0 < n {
                let b1 = (b0 + block).min(n);
                let full = b0 + (b1 - b0) / (2 * LANES) * (2 * LANES);
                // The f16 reading of a code is its value times 2^-8.
                let coef: [f32; 4] = [0, 1, 2, 3].map(|r| a[r] * scales[r][bi]);
                let cv = coef.map(|c| mul(splat(c), splat(256.0)));
                let mut i = b0;
                while i < full {
                    // SAFETY: elements i..i+2*LANES exist in y and in every row.
                    unsafe {
                        let p = y.as_mut_ptr().add(i);
                        let (mut y0, mut y1) = (loadu(p), loadu(p.add(LANES)));
                        for (r, row) in rows.iter().enumerate() {
                            if (i - b0).is_multiple_of(64) {
                                prefetch(row.as_ptr().wrapping_add(i + ahead));
                            }
                            let (f0, f1) = fp8_pair(row.as_ptr().add(i));
                            y0 = fmadd(f0, cv[r], y0);
                            y1 = fmadd(f1, cv[r], y1);
                        }
                        storeu(p, y0);
                        storeu(p.add(LANES), y1);
                    }
                    i += 2 * LANES;
                }
                for (r, row) in rows.iter().enumerate() {
                    for k in full..b1 {
                        y[k] += coef[r] * super::E4M3_TABLE[row[k] as usize];
                    }
                }
                b0 = b1;
                bi += 1;
            }
        }

        /// `y += a * x`.
        #[target_feature(enable = $f)]
        pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
            let n = y.len().min(x.len());
            let full = n / LANES * LANES;
            let av = splat(a);
            let mut i = 0;
            while i < full {
                // SAFETY: elements i..i+LANES exist in both.
                unsafe {
                    let p = y.as_mut_ptr().add(i);
                    storeu(p, fmadd(av, loadu(x.as_ptr().add(i)), loadu(p)));
                }
                i += LANES;
            }
            for k in full..n {
                y[k] += a * x[k];
            }
        }
    };
}

/// AVX-512F (with F16C for f16/FP8): 16 lanes.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::prefetch;
    use crate::format::fp8::simd::e4m3_as_f16;
    use std::arch::x86_64::*;

    const LANES: usize = 16;
    /// FP8 rows per pass of `dot_fp8_x4_tokens`: 4 rows x 4 tokens of sums
    /// fit AVX-512's 32 registers.
    const FP8_ROWS: usize = 4;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn splat(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }
    /// # Safety
    /// `p .. p + 16` readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn loadu(p: *const f32) -> __m512 {
        // SAFETY: caller contract.
        unsafe { _mm512_loadu_ps(p) }
    }
    /// # Safety
    /// `p .. p + 16` writable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn storeu(p: *mut f32, v: __m512) {
        // SAFETY: caller contract.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn hsum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    /// 16 bf16 values (32 bytes at `p`) as f32.
    ///
    /// # Safety
    /// `p .. p + 32` readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn bf16(p: *const u8) -> __m512 {
        // SAFETY: caller contract.
        let w = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16))
    }
    /// 16 f16 values (32 bytes at `p`) as f32.
    ///
    /// # Safety
    /// `p .. p + 32` readable.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn f16(p: *const u8) -> __m512 {
        // SAFETY: caller contract.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(p as *const __m256i) })
    }
    /// 32 E4M3 codes at `p` as two vectors, each value times 2^-8.
    ///
    /// # Safety
    /// `p .. p + 32` readable.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn fp8_pair(p: *const u8) -> (__m512, __m512) {
        // SAFETY: caller contract.
        let c = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        (
            _mm512_cvtph_ps(e4m3_as_f16(_mm256_castsi256_si128(c))),
            _mm512_cvtph_ps(e4m3_as_f16(_mm256_extracti128_si256(c, 1))),
        )
    }

    vector_kernels!("avx512f", "avx512f,f16c");
}

/// AVX2 + FMA (with F16C for f16/FP8): 8 lanes, for CPUs without AVX-512
/// (Zen 2/3, most client Intel parts).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::prefetch;
    use crate::format::fp8::simd::e4m3_as_f16;
    use std::arch::x86_64::*;

    const LANES: usize = 8;
    /// FP8 rows per pass of `dot_fp8_x4_tokens`: 2 rows x 4 tokens of sums
    /// fit AVX2's 16 registers (4 rows spill them).
    const FP8_ROWS: usize = 2;

    #[inline]
    #[target_feature(enable = "avx2")]
    fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    fn splat(v: f32) -> __m256 {
        _mm256_set1_ps(v)
    }
    /// # Safety
    /// `p .. p + 8` readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn loadu(p: *const f32) -> __m256 {
        // SAFETY: caller contract.
        unsafe { _mm256_loadu_ps(p) }
    }
    /// # Safety
    /// `p .. p + 8` writable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn storeu(p: *mut f32, v: __m256) {
        // SAFETY: caller contract.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
    /// 8 bf16 values (16 bytes at `p`) as f32.
    ///
    /// # Safety
    /// `p .. p + 16` readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bf16(p: *const u8) -> __m256 {
        // SAFETY: caller contract.
        let w = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16))
    }
    /// 8 f16 values (16 bytes at `p`) as f32.
    ///
    /// # Safety
    /// `p .. p + 16` readable.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn f16(p: *const u8) -> __m256 {
        // SAFETY: caller contract.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p as *const __m128i) })
    }
    /// 16 E4M3 codes at `p` as two vectors, each value times 2^-8.
    ///
    /// # Safety
    /// `p .. p + 16` readable.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn fp8_pair(p: *const u8) -> (__m256, __m256) {
        // SAFETY: caller contract.
        let h = e4m3_as_f16(unsafe { _mm_loadu_si128(p as *const __m128i) });
        (
            _mm256_cvtph_ps(_mm256_castsi256_si128(h)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)),
        )
    }

    vector_kernels!("avx2,fma", "avx2,fma,f16c");
}

/// The fallbacks, also the reference the vector versions are tested against.
mod portable {
    use super::E4M3_TABLE;

    pub fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        x.iter()
            .zip(row.chunks_exact(2))
            .map(|(v, b)| v * f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .sum()
    }

    pub fn widen_bf16(row: &[u8], dst: &mut [f32]) {
        for (d, b) in dst.iter_mut().zip(row.chunks_exact(2)) {
            *d = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
        }
    }

    pub fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
        x.iter()
            .zip(row.chunks_exact(2))
            .map(|(v, b)| v * half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .sum()
    }

    pub fn dot_fp8(codes: &[u8], scales: &[f32], block: usize, x: &[f32]) -> f32 {
        x.iter()
            .zip(codes)
            .enumerate()
            .map(|(k, (v, &c))| v * E4M3_TABLE[c as usize] * scales[k / block])
            .sum()
    }

    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(v, &b)| *v += a * b);
    }

    pub fn axpy_bf16(row: &[u8], a: f32, y: &mut [f32]) {
        y.iter_mut().zip(row.chunks_exact(2)).for_each(|(v, b)| {
            *v += a * f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
        });
    }

    pub fn axpy_fp8(codes: &[u8], scales: &[f32], block: usize, a: f32, y: &mut [f32]) {
        y.iter_mut()
            .zip(codes)
            .enumerate()
            .for_each(|(k, (v, &c))| *v += a * scales[k / block] * E4M3_TABLE[c as usize]);
    }
}

/// Dispatches to the vector module of `lvl` (same function names and
/// arguments), or evaluates the portable fallback.
macro_rules! dispatch {
    ($lvl:expr, $f:ident($($arg:expr),*), $fallback:expr) => {
        match simd($lvl) {
            // SAFETY: the level is capped by the CPU's features (`simd`).
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { avx512::$f($($arg),*) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { avx2::$f($($arg),*) },
            Simd::None => $fallback,
        }
    };
}

/// `a · b` in f32.
pub fn dot(lvl: Level, a: &[f32], b: &[f32]) -> f32 {
    dispatch!(lvl, dot_f32(a, b), dot_portable(a, b))
}

/// bf16 row (little-endian bytes) times f32 `x`.
pub fn dot_bf16(lvl: Level, row: &[u8], x: &[f32]) -> f32 {
    dispatch!(lvl, dot_bf16(row, x), portable::dot_bf16(row, x))
}

/// A bf16 row (little-endian bytes) as f32 into `dst` (`dst.len()`
/// values), prefetching `ahead` bytes past each position; any `ahead` is
/// safe.
pub fn widen_bf16(lvl: Level, row: &[u8], dst: &mut [f32], ahead: usize) {
    dispatch!(
        lvl,
        widen_bf16(row, dst, ahead),
        portable::widen_bf16(row, dst)
    )
}

/// Four bf16 rows times the same `x`. `ahead` is how far past each row's
/// current position to prefetch, in bytes; any value is safe.
pub fn dot_bf16_x4(lvl: Level, rows: [&[u8]; 4], x: &[f32], ahead: usize) -> [f32; 4] {
    dispatch!(
        lvl,
        dot_bf16_x4(rows, x, ahead),
        rows.map(|r| portable::dot_bf16(r, x))
    )
}

/// Runs `xs` in groups of `per` tokens through the vector module's
/// `$kernel::<T>` (the group's tokens as `[&[f32]; T]` in `$x`), writing
/// each group's `[[f32; 4]; T]` into `out`; a group of one (or any group
/// on portable code) goes token by token through `$single`.
macro_rules! token_groups {
    ($lvl:expr, $per:expr, $xs:expr, $out:expr,
     |$x:ident| $kernel:ident($($arg:expr),*), |$x1:ident| $single:expr) => {
        for (group, o) in $xs.chunks($per).zip($out.chunks_mut($per)) {
            #[cfg(target_arch = "x86_64")]
            macro_rules! run {
                ($m:ident, $t:literal) => {{
                    let $x: [&[f32]; $t] = std::array::from_fn(|t| group[t]);
                    // SAFETY: the level is capped by the CPU's features (`simd`).
                    o.copy_from_slice(&unsafe { $m::$kernel::<$t>($($arg),*) });
                }};
            }
            match (simd($lvl), group.len()) {
                #[cfg(target_arch = "x86_64")]
                (Simd::Avx512, 2) => run!(avx512, 2),
                #[cfg(target_arch = "x86_64")]
                (Simd::Avx512, 3) => run!(avx512, 3),
                #[cfg(target_arch = "x86_64")]
                (Simd::Avx512, 4) => run!(avx512, 4),
                #[cfg(target_arch = "x86_64")]
                (Simd::Avx2, 2) => run!(avx2, 2),
                #[cfg(target_arch = "x86_64")]
                (Simd::Avx2, 3) => run!(avx2, 3),
                #[cfg(target_arch = "x86_64")]
                (Simd::Avx2, 4) => run!(avx2, 4),
                _ => {
                    for (v, $x1) in o.iter_mut().zip(group) {
                        *v = $single;
                    }
                }
            }
        }
    };
}

/// Four bf16 rows times each of the tokens `xs`, into `out[t][k]` (row `k`
/// times token `t`; `out` holds `xs.len()`), converting each row vector
/// once for several tokens: four at a time with AVX-512's 32 registers,
/// two with AVX2's 16. `ahead` as for [`dot_bf16_x4`].
pub fn dot_bf16_x4_tokens(
    lvl: Level,
    rows: [&[u8]; 4],
    xs: &[&[f32]],
    ahead: usize,
    out: &mut [[f32; 4]],
) {
    let per = match simd(lvl) {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => 4,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => 2,
        Simd::None => 1,
    };
    token_groups!(
        lvl,
        per,
        xs,
        out,
        |x| dot_bf16_x4_tokens(rows, x, ahead),
        |x| dot_bf16_x4(lvl, rows, x, ahead)
    );
}

/// Four E4M3 rows (scales per `block` elements) times the same `x`.
/// `ahead` is the prefetch distance in bytes, as for [`dot_bf16_x4`].
pub fn dot_fp8_x4(
    lvl: Level,
    rows: [&[u8]; 4],
    scales: [&[f32]; 4],
    block: usize,
    x: &[f32],
    ahead: usize,
) -> [f32; 4] {
    dispatch!(
        lvl,
        dot_fp8_x4(rows, scales, block, x, ahead),
        [0, 1, 2, 3].map(|r| portable::dot_fp8(rows[r], scales[r], block, x))
    )
}

/// Four E4M3 rows times each of the tokens `xs`, into `out[t][k]` (row `k`
/// times token `t`; `out` holds `xs.len()`), converting each code vector
/// once for up to four tokens: all four rows at once with AVX-512's 32
/// registers, two at a time with AVX2's 16. A `block` that does not hold
/// whole vector steps goes token by token. `scales`, `block` and `ahead`
/// as for [`dot_fp8_x4`].
pub fn dot_fp8_x4_tokens(
    lvl: Level,
    rows: [&[u8]; 4],
    scales: [&[f32]; 4],
    block: usize,
    xs: &[&[f32]],
    ahead: usize,
    out: &mut [[f32; 4]],
) {
    // Blocks must hold whole steps of the vector loop (two vectors).
    let per = match simd(lvl) {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 if block.is_multiple_of(32) => 4,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 if block.is_multiple_of(16) => 4,
        _ => 1,
    };
    token_groups!(
        lvl,
        per,
        xs,
        out,
        |x| dot_fp8_x4_tokens(rows, scales, block, x, ahead),
        |x| dot_fp8_x4(lvl, rows, scales, block, x, ahead)
    );
}

/// f16 row (little-endian bytes) times f32 `x`.
pub fn dot_f16(lvl: Level, row: &[u8], x: &[f32]) -> f32 {
    dispatch!(lvl, dot_f16(row, x), portable::dot_f16(row, x))
}

/// E4M3 row times f32 `x`, `scales[k]` applying to elements `[k*block, (k+1)*block)`.
pub fn dot_fp8(lvl: Level, codes: &[u8], scales: &[f32], block: usize, x: &[f32]) -> f32 {
    dispatch!(
        lvl,
        dot_fp8(codes, scales, block, x),
        portable::dot_fp8(codes, scales, block, x)
    )
}

/// `y += Σ a[k] · rows[k]` for four bf16 rows; `ahead` is the prefetch
/// distance in bytes, as for [`dot_bf16_x4`].
pub fn axpy_bf16_x4(lvl: Level, rows: [&[u8]; 4], a: [f32; 4], y: &mut [f32], ahead: usize) {
    dispatch!(lvl, axpy_bf16_x4(rows, a, y, ahead), {
        for r in 0..4 {
            portable::axpy_bf16(rows[r], a[r], y);
        }
    })
}

/// `y += Σ a[k] · rows[k]` for four E4M3 rows (scales per `block`
/// elements); `ahead` is the prefetch distance in bytes.
pub fn axpy_fp8_x4(
    lvl: Level,
    rows: [&[u8]; 4],
    scales: [&[f32]; 4],
    block: usize,
    a: [f32; 4],
    y: &mut [f32],
    ahead: usize,
) {
    dispatch!(lvl, axpy_fp8_x4(rows, scales, block, a, y, ahead), {
        for r in 0..4 {
            portable::axpy_fp8(rows[r], scales[r], block, a[r], y);
        }
    })
}

/// `y += a * x`.
pub fn axpy(lvl: Level, y: &mut [f32], a: f32, x: &[f32]) {
    dispatch!(lvl, axpy(y, a, x), portable::axpy(y, a, x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::fp8::f32_to_e4m3;

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-4 * (1.0 + b.abs())
    }

    /// Every level this CPU runs (portable, AVX2, AVX-512), each against
    /// the plain sums and the portable forms.
    #[test]
    fn every_kind_matches_the_plain_sum() {
        let levels = Level::available();
        println!("vecops levels: {levels:?}");
        for (lvl, n) in levels
            .into_iter()
            .flat_map(|l| [0usize, 1, 7, 8, 15, 16, 33, 100, 257, 576].map(|n| (l, n)))
        {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let w: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 3.0).collect();
            let want: f32 = x.iter().zip(&w).map(|(a, b)| a * b).sum();
            assert!(close(dot(lvl, &w, &x), want), "{lvl:?} f32 n={n}");
            assert!(close(dot_portable(&w, &x), want), "portable f32 n={n}");
            let bf: Vec<u8> = w
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            let wb: f32 = x
                .iter()
                .zip(&w)
                .map(|(a, b)| a * half::bf16::from_f32(*b).to_f32())
                .sum();
            assert!(close(dot_bf16(lvl, &bf, &x), wb), "{lvl:?} bf16 n={n}");
            // Widened exactly, every value, nothing past dst.
            let mut wide = vec![f32::NAN; n + 1];
            widen_bf16(lvl, &bf, &mut wide[..n], 64);
            for (i, (&g, v)) in wide.iter().zip(&w).enumerate() {
                let want = half::bf16::from_f32(*v).to_f32();
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "{lvl:?} widen bf16 n={n} [{i}]"
                );
            }
            assert!(wide[n].is_nan(), "{lvl:?} widen bf16 n={n} wrote past dst");
            assert!(
                close(portable::dot_bf16(&bf, &x), wb),
                "portable bf16 n={n}"
            );
            let h: Vec<u8> = w
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
                .collect();
            let wh: f32 = x
                .iter()
                .zip(&w)
                .map(|(a, b)| a * half::f16::from_f32(*b).to_f32())
                .sum();
            assert!(close(dot_f16(lvl, &h, &x), wh), "{lvl:?} f16 n={n}");
            assert!(close(portable::dot_f16(&h, &x), wh), "portable f16 n={n}");
            // FP8 with a different power-of-two-ish scale per block of 64.
            let codes: Vec<u8> = w.iter().map(|&v| f32_to_e4m3(v * 37.0)).collect();
            codes.iter().for_each(|&c| assert!(c & 0x7f != 0x7f));
            let scales: Vec<f32> = (0..n.div_ceil(64)).map(|k| 0.5 + k as f32 * 0.25).collect();
            let w8: f32 = x
                .iter()
                .zip(&codes)
                .enumerate()
                .map(|(k, (a, &c))| a * E4M3_TABLE[c as usize] * scales[k / 64])
                .sum();
            assert!(
                close(dot_fp8(lvl, &codes, &scales, 64, &x), w8),
                "{lvl:?} fp8 n={n}"
            );
            assert!(
                close(portable::dot_fp8(&codes, &scales, 64, &x), w8),
                "portable fp8 n={n}"
            );
            // Four rows at once: rows 1..4 are rotations of row 0.
            let rot = |v: &[u8], r: usize| -> Vec<u8> {
                let mut v = v.to_vec();
                if !v.is_empty() {
                    let k = (r * 5) % v.len();
                    v.rotate_left(k);
                }
                v
            };
            let rot_f32 = |v: &[f32], r: usize| -> Vec<f32> {
                let mut v = v.to_vec();
                if !v.is_empty() {
                    let k = r % v.len();
                    v.rotate_left(k);
                }
                v
            };
            let bf4: Vec<Vec<u8>> = (0..4).map(|r| rot(&bf, 2 * r)).collect();
            let got = dot_bf16_x4(lvl, [&bf4[0], &bf4[1], &bf4[2], &bf4[3]], &x, 4 * n);
            for r in 0..4 {
                let want = portable::dot_bf16(&bf4[r], &x);
                assert!(close(got[r], want), "{lvl:?} bf16 x4 n={n} row {r}");
            }
            let c4: Vec<Vec<u8>> = (0..4).map(|r| rot(&codes, r)).collect();
            let got = dot_fp8_x4(
                lvl,
                [&c4[0], &c4[1], &c4[2], &c4[3]],
                [&scales, &scales, &scales, &scales],
                64,
                &x,
                4 * n,
            );
            for r in 0..4 {
                let want = portable::dot_fp8(&c4[r], &scales, 64, &x);
                assert!(close(got[r], want), "{lvl:?} fp8 x4 n={n} row {r}");
            }
            // Several tokens at once (five: a full group and a remainder at
            // every level), each against the single-token portable form.
            let xt: Vec<Vec<f32>> = (0..5).map(|t| rot_f32(&x, 3 * t + 1)).collect();
            let xr: Vec<&[f32]> = xt.iter().map(|v| &v[..]).collect();
            // Blocks of 64 hold whole vector steps at every level, 48 only
            // AVX2's, 40 none (those go token by token); every row has its
            // own scales.
            for (m, block) in (1..=xr.len()).flat_map(|m| [64, 48, 40].map(|b| (m, b))) {
                let sc: Vec<Vec<f32>> = (0..4)
                    .map(|r| {
                        (0..n.div_ceil(block))
                            .map(|k| 0.5 + (k + 3 * r) as f32 * 0.125)
                            .collect()
                    })
                    .collect();
                let mut got = vec![[f32::NAN; 4]; m];
                dot_fp8_x4_tokens(
                    lvl,
                    [&c4[0], &c4[1], &c4[2], &c4[3]],
                    [&sc[0], &sc[1], &sc[2], &sc[3]],
                    block,
                    &xr[..m],
                    4 * n,
                    &mut got,
                );
                for (t, g) in got.iter().enumerate() {
                    for r in 0..4 {
                        let want = portable::dot_fp8(&c4[r], &sc[r], block, xr[t]);
                        assert!(
                            close(g[r], want),
                            "{lvl:?} fp8 x4 {m} tokens n={n} block {block} [{t}][{r}]: {} vs {want}",
                            g[r]
                        );
                    }
                }
            }
            let a4 = [0.5f32, -1.25, 2.0, 0.0];
            let (mut y, mut yp) = (x.clone(), x.clone());
            axpy_bf16_x4(lvl, [&bf4[0], &bf4[1], &bf4[2], &bf4[3]], a4, &mut y, 8 * n);
            for r in 0..4 {
                portable::axpy_bf16(&bf4[r], a4[r], &mut yp);
            }
            assert!(
                y.iter().zip(&yp).all(|(a, b)| close(*a, *b)),
                "{lvl:?} bf16 axpy x4 n={n}"
            );
            let (mut y, mut yp) = (x.clone(), x.clone());
            let s4 = [&scales[..], &scales[..], &scales[..], &scales[..]];
            axpy_fp8_x4(
                lvl,
                [&c4[0], &c4[1], &c4[2], &c4[3]],
                s4,
                64,
                a4,
                &mut y,
                4 * n,
            );
            for r in 0..4 {
                portable::axpy_fp8(&c4[r], &scales, 64, a4[r], &mut yp);
            }
            assert!(
                y.iter().zip(&yp).all(|(a, b)| close(*a, *b)),
                "{lvl:?} fp8 axpy x4 n={n}"
            );
            // The portable forms against the plain sums.
            let mut yb = vec![0f32; n];
            portable::axpy_bf16(&bf, 1.0, &mut yb);
            let mut y8 = vec![0f32; n];
            portable::axpy_fp8(&codes, &scales, 64, 1.0, &mut y8);
            for k in 0..n {
                assert_eq!(yb[k], half::bf16::from_f32(w[k]).to_f32());
                assert_eq!(y8[k], E4M3_TABLE[codes[k] as usize] * scales[k / 64]);
            }
            let (mut y, mut yp) = (w.clone(), w.clone());
            axpy(lvl, &mut y, 0.5, &x);
            portable::axpy(&mut yp, 0.5, &x);
            for k in 0..n {
                assert!(close(y[k], w[k] + 0.5 * x[k]) && close(yp[k], y[k]));
            }
        }
    }
}
