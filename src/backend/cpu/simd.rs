//! AVX2+FMA and AVX-512F attention kernels (f32 FMA on dequantized tiles).
//!
//! Per tile of up to 64 keys, the query rows of a task are the M dimension
//! of two small GEMMs:
//! - `S = Q · Kᵀ`: K is gathered (and dequantized) once, transposed to
//!   `[d_qk][64]`, and a block of R query rows is multiplied against it with
//!   `R x KEYS/LANES` accumulators in registers (broadcast q, load Kᵀ row);
//! - online softmax on S (scalar exp, one per score);
//! - `O += P · V`: V is the first d_v columns of the row-major tile; a block
//!   of R rows x 4 vectors of O stays in registers over the 64 keys.
//!
//! The code is generic over a vector type and inlined into
//! `#[target_feature]` entry points, so each ISA gets its own instructions.

// Register blocks are indexed [row][vector] with run-time bounds (rows left,
// vectors per ISA); index loops state that layout more plainly than zips.
#![allow(clippy::needless_range_loop)]

use super::isa::CpuIsa;
use super::kernel::{finalize, AttentionKernel, AttnTask, Scratch, K_TILE};

/// Query rows per register block.
const R: usize = 6;

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
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct V256(__m256);
    #[derive(Clone, Copy)]
    pub struct V512(__m512);

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
    }
}

fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Scores for `NJ` keys and `RV` vectors of query rows, with the queries
/// transposed: `st[(j0+jj)*rp + rb + v*L] = Σ_k qt[k*rp + rb + v*L] * kr[(j0+jj)*d + k]`.
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
    d: usize,
    j0: usize,
    st: &mut [f32],
) {
    debug_assert!(RV <= 4 && rb + RV * V::LANES <= rp && qt.len() >= d * rp);
    debug_assert!(kr.len() >= (j0 + NJ) * d && st.len() >= (j0 + NJ) * rp);
    // SAFETY: ISA enabled (caller); every pointer below stays inside the
    // slices whose lengths are checked above.
    unsafe {
        let mut acc = [[V::splat(0.0); 4]; NJ];
        for k in 0..d {
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

/// `scores_t` with run-time block sizes `nj` (1..=R) and `rv` (1..=4).
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
    d: usize,
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

/// The kernel body for one vector type.
///
/// # Safety
/// The ISA of `V` must be enabled.
#[inline(always)]
unsafe fn attend_with<V: Vector>(
    task: &AttnTask<'_>,
    scratch: &mut Scratch,
    o: &mut [f32],
    lse: &mut [f32],
) {
    let (d, dv, h_q) = (task.d_qk, task.d_v, task.h_q);
    let rows = task.n_q * h_q;
    let lanes = V::LANES;
    // Query rows padded to whole vectors; padding rows are zero and ignored.
    let rp = rows.div_ceil(lanes) * lanes;
    let k_tile = fit(&mut scratch.k_tile, K_TILE * d);
    let buf = fit(&mut scratch.scores, d * rp + K_TILE * rp);
    let (qt, st) = buf.split_at_mut(d * rp);
    for (k, qrow) in qt.chunks_exact_mut(rp).enumerate() {
        for (r, x) in qrow.iter_mut().enumerate() {
            *x = if r < rows { task.q[r * d + k] } else { 0.0 };
        }
    }
    let row_max = fit(&mut scratch.row_max, rows);
    let row_sum = fit(&mut scratch.row_sum, rows);
    row_max.fill(f32::NEG_INFINITY);
    row_sum.fill(0.0);
    o[..rows * dv].fill(0.0);

    let mut t0 = task.start;
    while t0 < task.end {
        let n = K_TILE.min(task.end - t0);
        for j in 0..n {
            task.gather(t0 + j, &mut k_tile[j * d..(j + 1) * d]);
        }
        // S for the whole tile: blocks of R keys x BLOCK row vectors.
        let mut rb = 0;
        while rb < rp {
            let rv = V::BLOCK.min((rp - rb) / lanes);
            let mut j0 = 0;
            while j0 < n {
                let nj = R.min(n - j0);
                // SAFETY: ISA enabled (caller); sizes as required.
                unsafe { scores_block::<V>(nj, rv, qt, rp, rb, k_tile, d, j0, st) };
                j0 += nj;
            }
            rb += rv * lanes;
        }
        // Online softmax per row; keys past the visible prefix get p = 0.
        for row in 0..rows {
            let vis = task.visible(row / h_q).saturating_sub(t0).min(n);
            let tile_max = (0..vis)
                .map(|j| st[j * rp + row])
                .fold(f32::NEG_INFINITY, f32::max);
            let new_max = row_max[row].max(tile_max);
            if new_max == f32::NEG_INFINITY {
                (0..n).for_each(|j| st[j * rp + row] = 0.0);
                continue;
            }
            let alpha = (row_max[row] - new_max).exp();
            let mut sum = 0.0;
            for j in 0..n {
                let x = &mut st[j * rp + row];
                *x = if j < vis { (*x - new_max).exp() } else { 0.0 };
                sum += *x;
            }
            row_sum[row] = row_sum[row] * alpha + sum;
            row_max[row] = new_max;
            if alpha != 1.0 {
                o[row * dv..(row + 1) * dv]
                    .iter_mut()
                    .for_each(|x| *x *= alpha);
            }
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
        t0 += n;
    }
    finalize(o, lse, row_max, row_sum, dv);
}

/// AVX2 + FMA, 8 lanes.
pub struct Avx2Kernel;
/// AVX-512F, 16 lanes.
pub struct Avx512Kernel;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs with AVX2 and FMA enabled.
    unsafe { attend_with::<x86::V256>(task, scratch, o, lse) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn attend_avx512(task: &AttnTask<'_>, scratch: &mut Scratch, o: &mut [f32], lse: &mut [f32]) {
    // SAFETY: this function only runs with AVX-512F enabled.
    unsafe { attend_with::<x86::V512>(task, scratch, o, lse) }
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
