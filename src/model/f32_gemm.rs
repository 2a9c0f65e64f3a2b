//! `Y = X · W` in f32 for rows of X and Y at any stride, with W row-major
//! `[k][n]`: the per-head products of the absorbed projections in prefill
//! (`q_nope · W_UK[h]`, `lat · W_UV[h]ᵀ`), whose operands interleave the
//! heads. The AVX-512 kernel keeps 8 rows x 32 columns of Y in registers
//! over k, the AVX2 one 6 rows x 16 columns (its 16 registers), so each
//! row of W loaded from cache serves several rows of X. Both are one macro
//! body (`row_block!`) over their ISA's intrinsics.

use super::level::Level;

/// Rows of X (and Y) per register block: AVX-512 (32 registers), AVX2 (16).
#[cfg(target_arch = "x86_64")]
const TB: usize = 8;
#[cfg(target_arch = "x86_64")]
const TB_AVX2: usize = 6;

/// `module::block::<tb>(args)`: the block of `tb` rows (one of the listed
/// counts) of a vector module, the run-time `tb` turned into the const.
#[cfg(target_arch = "x86_64")]
macro_rules! block_of_rows {
    ($module:ident, $tb:expr, $args:tt, $($r:literal)*) => {
        match $tb {
            $($r => $module::block::<$r> $args,)*
            tb => unreachable!("block of {tb} rows"),
        }
    };
}

/// `y[t][..n] = Σ_j x[t][j] · w[j][..n]` for `t < rows`, where row `t` of x
/// starts at `x[t * xs]` (`k` values) and of y at `y[t * ys]`.
///
/// # Panics
/// When a slice is too short for the shape (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows(
    lvl: Level,
    x: &[f32],
    xs: usize,
    w: &[f32],
    k: usize,
    n: usize,
    y: &mut [f32],
    ys: usize,
    rows: usize,
) {
    if rows == 0 {
        return;
    }
    assert!(w.len() >= k * n && x.len() >= (rows - 1) * xs + k);
    assert!(y.len() >= (rows - 1) * ys + n && xs >= k && ys >= n);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = lvl;
    #[cfg(target_arch = "x86_64")]
    if lvl >= Level::Avx2 {
        let tb_max = if lvl >= Level::Avx512 { TB } else { TB_AVX2 };
        let mut t = 0;
        while t < rows {
            let tb = tb_max.min(rows - t);
            let (xr, yr) = (&x[t * xs..], &mut y[t * ys..]);
            // SAFETY: the level is capped by the CPU (AVX-512F, or AVX2 and
            // FMA); the rows t..t + tb of x and y and all of w lie inside
            // the slices (asserted above).
            unsafe {
                if lvl >= Level::Avx512 {
                    block_of_rows!(avx512, tb, (xr, xs, w, k, n, yr, ys), 1 2 3 4 5 6 7 8)
                } else {
                    block_of_rows!(avx2, tb, (xr, xs, w, k, n, yr, ys), 1 2 3 4 5 6)
                }
            }
            t += tb;
        }
        return;
    }
    portable(x, xs, w, k, n, y, ys, rows);
}

#[allow(clippy::too_many_arguments)]
fn portable(
    x: &[f32],
    xs: usize,
    w: &[f32],
    k: usize,
    n: usize,
    y: &mut [f32],
    ys: usize,
    rows: usize,
) {
    for t in 0..rows {
        let yr = &mut y[t * ys..][..n];
        yr.fill(0.0);
        for (j, &a) in x[t * xs..][..k].iter().enumerate() {
            for (o, &b) in yr.iter_mut().zip(&w[j * n..][..n]) {
                *o += a * b;
            }
        }
    }
}

/// One register block over a module's intrinsics: `R` rows of Y, all `n`
/// columns, two vectors (`2 * $lanes` columns) at a time with `R x 2`
/// accumulators; the last columns (fewer than `2 * $lanes`) under masks
/// through the module's `load_n` / `store_n`.
#[cfg(target_arch = "x86_64")]
macro_rules! row_block {
    ($feat:literal, $lanes:literal, $zero:ident, $load:ident, $store:ident, $splat:ident, $fma:ident) => {
        /// # Safety
        /// The target features enabled; rows `0..R` of x (stride xs, k
        /// values) and y (stride ys, n values) and `w [k][n]` are inside
        /// the slices.
        #[target_feature(enable = $feat)]
        pub unsafe fn block<const R: usize>(
            x: &[f32],
            xs: usize,
            w: &[f32],
            k: usize,
            n: usize,
            y: &mut [f32],
            ys: usize,
        ) {
            debug_assert!(x.len() >= (R - 1) * xs + k && y.len() >= (R - 1) * ys + n);
            debug_assert!(w.len() >= k * n);
            const W: usize = 2 * $lanes;
            let mut c = 0;
            while c < n {
                let full = n - c >= W;
                let (w0, w1) = (
                    (n - c).min($lanes),
                    (n - c).saturating_sub($lanes).min($lanes),
                );
                // SAFETY: loads and stores touch columns c..c + w0 + w1 <= n
                // of rows inside the slices (masked past n); x reads stay
                // in row t's k values.
                unsafe {
                    let mut acc = [[$zero(); 2]; R];
                    for j in 0..k {
                        let wr = w.as_ptr().add(j * n + c);
                        let (b0, b1) = if full {
                            ($load(wr), $load(wr.add($lanes)))
                        } else {
                            (load_n(wr, w0), load_n(wr.add($lanes), w1))
                        };
                        for (t, a) in acc.iter_mut().enumerate() {
                            let s = $splat(*x.get_unchecked(t * xs + j));
                            a[0] = $fma(s, b0, a[0]);
                            a[1] = $fma(s, b1, a[1]);
                        }
                    }
                    for (t, a) in acc.iter().enumerate() {
                        let yr = y.as_mut_ptr().add(t * ys + c);
                        if full {
                            $store(yr, a[0]);
                            $store(yr.add($lanes), a[1]);
                        } else {
                            store_n(yr, a[0], w0);
                            store_n(yr.add($lanes), a[1], w1);
                        }
                    }
                }
                c += W;
            }
        }
    };
}

/// 8 rows x 32 columns: 16 accumulators; tails under `__mmask16`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F enabled; `p..p + n` (n <= 16) readable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_n(p: *const f32, n: usize) -> __m512 {
        // SAFETY: caller contract; masked-off lanes are not read.
        unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p) }
    }

    /// # Safety
    /// AVX-512F enabled; `p..p + n` (n <= 16) writable.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_n(p: *mut f32, v: __m512, n: usize) {
        // SAFETY: caller contract; masked-off lanes are not written.
        unsafe { _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as __mmask16, v) }
    }

    row_block!(
        "avx512f",
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps
    );
}

/// 6 rows x 16 columns: 12 accumulators; tails under `vmaskmovps` masks.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Lanes `0..n` set (n <= 8).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mask(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// # Safety
    /// AVX2 enabled; `p..p + n` (n <= 8) readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_n(p: *const f32, n: usize) -> __m256 {
        // SAFETY: caller contract; masked-off lanes are not read.
        unsafe { _mm256_maskload_ps(p, mask(n)) }
    }

    /// # Safety
    /// AVX2 enabled; `p..p + n` (n <= 8) writable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_n(p: *mut f32, v: __m256, n: usize) {
        // SAFETY: caller contract; masked-off lanes are not written.
        unsafe { _mm256_maskstore_ps(p, mask(n), v) }
    }

    row_block!(
        "avx2,fma",
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gen::uniform;

    /// Row counts around the block of 8, column counts around the two
    /// vectors of 16 (masked tails), strides wider than the rows, at every
    /// level this CPU runs, against f64 sums; bytes past each row of y stay
    /// untouched.
    #[test]
    fn matmul_rows_matches_f64() {
        for (rows, k, n) in [
            (17usize, 128usize, 512usize),
            (3, 5, 7),
            (5, 9, 52),
            (7, 3, 28),
            (8, 40, 33),
            (1, 1, 16),
        ] {
            let (xs, ys) = (k + 3, n + 2);
            let x = uniform(rows * xs, 1);
            let w = uniform(k * n, 2);
            for lvl in Level::available() {
                let mut y = vec![f32::NAN; rows * ys];
                matmul_rows(lvl, &x, xs, &w, k, n, &mut y, ys, rows);
                for t in 0..rows {
                    for o in 0..n {
                        let want: f64 = (0..k)
                            .map(|j| x[t * xs + j] as f64 * w[j * n + o] as f64)
                            .sum();
                        let got = y[t * ys + o] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{lvl:?} rows {rows} k {k} n {n}: y[{t}][{o}] = {got}, want {want}"
                        );
                    }
                    assert!(y[t * ys + n].is_nan(), "{lvl:?} wrote past row {t}");
                }
            }
        }
    }
}
